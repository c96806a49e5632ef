"""The pipeline half of ofacls on Ray: what runs on the cluster's actors, and
the Dataset that wires it (see the package docstring)."""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ofacls.calibration import Calibration, settings_of
from ofacls.errors import OfaclsError, UsageError, debug
from ofacls.hub import DEFAULT_MODEL_ID
from ofacls.images import DEFAULT_MAX_PIXELS
from ofacls.prediction import Prediction
from ofacls.runner import Item, Options, device_defaults
from ofacls.sources.expand import Source, TableColumns, is_url
from ofacls.sources.fetch import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT
from ofacls.sources.parts import Part, read_part
from ofacls.sources.walk import BadInput

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from ofacls.classifier import Classifier


INSTALL_HINT = "pip install 'ofacls[ray]'"
# The columns ClassifyBatch writes (input columns other than these and the image
# bytes, such as a sequence number, are passed through). `top_k` is Prediction.top_k
# with each label's class index: a list of {label, score, index}, best first.
OUTPUT_COLUMNS = ("input", "label", "score", "index", "top_k", "error", "prediction_set")
LOST = "no result came back from the Ray cluster for this input"
RESUMED = "not classified: OUT already holds its row"


def require_ray() -> Any:
    """The `ray` module, or a UsageError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without its data extra lacks pyarrow)
    except ImportError:
        raise UsageError(f"--engine ray needs Ray Data: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class Settings:
    """How every actor loads its Classifier and classifies: the CLI's options.

    `model` is a ModelScope id (each node resolves it: its own cache or a shared
    MODELSCOPE_CACHE) or a folder every node can read at that path. `threads`:
    torch threads per actor (default: the cores the actor's process may use,
    divided by `actors_per_node`); Ray itself would leave one per requested CPU."""

    model: str = DEFAULT_MODEL_ID
    device: str = "auto"
    precision: str = "auto"
    labels: tuple[str, ...] | None = None
    top_k: int = 5
    decode: str = "exact"
    batch_size: int | None = None  # None: what suits the device (runner.device_defaults)
    workers: int | None = None
    timeout: float = DEFAULT_TIMEOUT
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    quantize: str | None = None
    offline: bool | None = None  # None: OFACLS_OFFLINE
    cache_dir: str | None = None
    threads: int | None = None
    actors_per_node: int = 1
    # a Calibration's to_dict: each actor checks it against its own classifier
    calibration: dict[str, Any] | None = None


class ClassifyBatch:
    """The callable class for `Dataset.map_batches`: a batch of rows -> ofacls rows.

    Each input row names an image by its `input` column (a path or an http(s)
    URL; also what the output row's `input` shows), or holds the image file's
    bytes in a `bytes` column; a `location` column, where present, is read
    instead of `input` (the CLI keeps a relative name as typed and sends the
    absolute path). An `error` column, where set, is the row's result (an input
    that names nothing readable); a row whose `resumed` column is true is not
    classified. Constructor keywords are `Settings`' fields. The batch may come
    in any of Ray's formats; the result is a pyarrow Table.

    Calls may run on several threads at once (see `build_pipeline`): each loads its
    own batch, and they take turns on the model."""

    def __init__(self, model: str | os.PathLike[str] = DEFAULT_MODEL_ID, **settings: Any) -> None:
        self.settings = Settings(model=os.fspath(model), **settings)
        self.turns = threading.Lock()  # one batch on the model at a time
        # Ray reports an error raised here to the driver only as text (the actor
        # died in its creation task); raised from the first call instead, the error
        # itself arrives, so the CLI can say it in one line with its exit code.
        self.failed: OfaclsError | None = None
        try:
            self.classifier = self._load()
            self.options = self._options(self.classifier)
        except OfaclsError as e:
            if debug():
                raise
            self.failed = e

    def _options(self, clf: Classifier) -> Options:
        s = self.settings
        batch, workers = device_defaults(clf.device.type)
        calibration = None
        if s.calibration is not None:
            calibration = Calibration.from_dict(s.calibration)
            calibration.check(settings_of(clf, s.model, s.decode, s.quantize))
            calibration.check_decode(s.decode)
        return Options(top_k=s.top_k, decode=s.decode, batch_size=s.batch_size or batch,
                       workers=s.workers or workers, timeout=s.timeout, max_bytes=s.max_bytes,
                       calibration=calibration)

    def _load(self) -> Classifier:
        from ofacls.classifier import Classifier
        from ofacls.tuning import tune_process

        s = self.settings
        if s.top_k < 1 or s.decode not in ("exact", "beam"):
            raise UsageError(f"top_k must be at least 1 and decode exact or beam, not "
                             f"{s.top_k!r} and {s.decode!r}")
        folder = resolve_on_node(s.model, offline=s.offline, cache_dir=s.cache_dir)
        clf = Classifier.from_pretrained(folder, device=s.device, precision=s.precision,
                                         labels=list(s.labels) if s.labels is not None else None,
                                         max_pixels=s.max_pixels, quantize=s.quantize)
        # An actor is a process that exists to classify. Ray sets OMP_NUM_THREADS
        # to the actor's CPU request (1), which would leave a CPU model on one core.
        tune_process(threads=False)
        import torch

        torch.set_num_threads(s.threads or max(1, _cores() // max(1, s.actors_per_node)))
        return clf

    def __call__(self, batch: Any) -> pa.Table:
        if self.failed is not None:
            raise self.failed
        table = _as_table(batch)
        names, locations = _column(table, "input"), _column(table, "location")
        data, errors, resumed = _column(table, "bytes"), _column(table, "error"), _column(table, "resumed")
        items = [_item(names[i], locations[i], data[i], errors[i]) for i in range(table.num_rows)]
        # a row OUT already holds is not classified: the driver drops it (see run_parts)
        todo = [i for i in range(table.num_rows) if not resumed[i]]
        predictions = [Prediction.failed(item.name, RESUMED) for item in items]
        for i, pred in zip(todo, self._predict([items[i] for i in todo])):
            predictions[i] = pred
        keep = [c for c in table.column_names if c not in (*OUTPUT_COLUMNS, "bytes", "location")]
        out = prediction_table(predictions)
        for name in keep:
            out = out.append_column(name, table.column(name))
        return out

    def _predict(self, items: list[Item]) -> list[Prediction]:
        """One Prediction per item, whatever happens to any of them."""
        from ofacls import runner

        clf = cast("Classifier", _TakingTurns(self.classifier, self.turns))
        try:
            return list(runner.iter_predictions(items, clf, self.options))
        except Exception:  # one exception here would fail the whole dataset: retry one by one
            if debug():
                raise
        out: list[Prediction] = []
        for item in items:
            try:
                out.extend(runner.iter_predictions([item], clf, self.options))
            except Exception as e:  # this input alone: its row says why
                if debug():
                    raise
                out.append(Prediction.failed(item.name, f"classification failed: {e or type(e).__name__}"))
        return out


class _TakingTurns:
    """A Classifier whose batches go through the model one at a time, `turns` held:
    images still load (read, fetch, decode) on any number of threads meanwhile."""

    def __init__(self, classifier: Classifier, turns: threading.Lock) -> None:
        self._classifier, self._turns = classifier, turns

    def __getattr__(self, name: str) -> Any:
        return getattr(self._classifier, name)

    def predict_pixels(self, *args: Any, **kwargs: Any) -> list[Prediction]:
        with self._turns:
            return self._classifier.predict_pixels(*args, **kwargs)


def resolve_on_node(model: str, *, offline: bool | None = None,
                    cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`model`'s folder on this node: a folder as it is; an id from this node's cache,
    downloaded by one process at a time (the others wait, then find it cached)."""
    from ofacls.hub import env_offline, resolve_model

    offline = env_offline() if offline is None else offline
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    # where resolve_model keeps the model (hub._cache_root), so the lock sits beside it
    root = Path(cache_dir or os.environ.get("OFACLS_CACHE_DIR") or os.environ.get("MODELSCOPE_CACHE")
                or Path.home() / ".cache" / "modelscope").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock  # a dependency of Ray itself

        lock: contextlib.AbstractContextManager[Any] = FileLock(
            str(root / f".ofacls-{model.replace('/', '--')}.lock"))
    except OSError:
        lock = contextlib.nullcontext()  # a read-only shared cache: nothing to download into anyway
    with lock:
        return resolve_model(model, offline=offline, cache_dir=cache_dir, progress=False)


def prediction_table(predictions: Sequence[Prediction]) -> pa.Table:
    """Predictions as a pyarrow Table with OUTPUT_COLUMNS."""
    import pyarrow as pa

    entry = pa.struct([("label", pa.string()), ("score", pa.float64()), ("index", pa.int64())])
    schema = pa.schema([("input", pa.string()), ("label", pa.string()), ("score", pa.float64()),
                        ("index", pa.int64()), ("top_k", pa.list_(entry)), ("error", pa.string()),
                        ("prediction_set", pa.list_(pa.string()))])
    rows = [{"input": p.input, "label": p.label, "score": p.score, "index": p.index,
             "top_k": [{"label": lab, "score": s, "index": i}
                       for (lab, s), i in zip(p.top_k, _indices(p))],
             "error": p.error, "prediction_set": p.prediction_set} for p in predictions]
    return pa.Table.from_pylist(rows, schema=schema)


def row_prediction(row: dict[str, Any]) -> Prediction:
    """A ClassifyBatch output row back as the Prediction it was made from."""
    top_k = row.get("top_k") or []
    return Prediction(input=row["input"], label=row["label"], score=row["score"],
                      top_k=[(e["label"], e["score"]) for e in top_k], error=row["error"],
                      indices=[e["index"] for e in top_k if e.get("index") is not None],
                      prediction_set=_listed(row.get("prediction_set")))


def _listed(value: Any) -> list[str] | None:
    return None if value is None else [str(v) for v in value]


def _indices(p: Prediction) -> list[int | None]:
    return list(p.indices) if len(p.indices) == len(p.top_k) else [None] * len(p.top_k)


def _as_table(batch: Any) -> pa.Table:
    """A batch in any of Ray's formats (pyarrow, pandas, dict of numpy arrays) as a Table."""
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, dict):
        return pa.table({k: list(v) for k, v in batch.items()})
    return pa.Table.from_pandas(batch, preserve_index=False)


def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def _item(name: Any, location: Any, data: Any, error: Any = None) -> Item:
    """One input row as the runner's Item; a row naming no image, or carrying the
    reason it has none (`error`), is an error Item."""
    label = "<bytes>" if name is None and data is not None else str(name if name is not None else "")
    if error is not None:
        return Item(label, error=str(error))
    if data is not None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return Item(label, error=f"the bytes column holds a {type(data).__name__}, not bytes")
        return Item(label, image=bytes(data))
    where = location if location is not None else name
    if not isinstance(where, str) or not where:
        return Item(label, error="this row names no image (no input, location or bytes)")
    return Item(label, Source(label, where, is_url(where)))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- the driver ---------------------------------------------------------------------


def build_pipeline(ds: ray.data.Dataset, settings: Settings | None = None, *, actors: int = 1,
                   gpus_per_actor: float = 0, cpus_per_actor: float = 1,
                   rows_per_call: int | None = None, udf: type = ClassifyBatch,
                   resources: dict[str, float] | None = None,
                   call_per_block: bool = False) -> ray.data.Dataset:
    """`ds` (rows as ClassifyBatch reads them) classified by a pool of `actors`
    actors, each holding a model on `gpus_per_actor` GPUs (fractions share one).

    Ray Data restarts an actor whose process or node dies and retries its batch
    as often as it takes (its actor pools default to max_restarts=-1 and
    max_task_retries=-1). `resources`: custom resources each actor needs (to put
    the actors on chosen nodes, say). `call_per_block`: each of `ds`'s blocks is
    one call, whatever `rows_per_call` (see `call_blocks`).

    A ClassifyBatch actor runs two calls at once where Ray allows it: one loads
    its batch (reads, downloads, decodes) while the other's is on the model, as
    a local batch overlaps the two."""
    require_ray()
    settings = settings or Settings()
    rows_per_call = rows_per_call or _rows_per_call(settings, gpus_per_actor)
    return ds.map_batches(udf, fn_constructor_kwargs=asdict(settings),
                          batch_size=None if call_per_block else rows_per_call,
                          batch_format="pyarrow",
                          compute=_actor_pool(actors, overlap=issubclass(udf, ClassifyBatch)),
                          num_cpus=cpus_per_actor,
                          # num_gpus=0 has been read as a GPU request: None unless wanted
                          num_gpus=gpus_per_actor or None, resources=resources)


def _actor_pool(actors: int, overlap: bool) -> Any:
    """A pool of `actors` actors; with `overlap`, each runs two calls at a time on
    threads of its own, where the installed Ray can (else one at a time)."""
    import ray.data

    strategy = ray.data.ActorPoolStrategy
    if overlap and "enable_true_multi_threading" in inspect.signature(strategy).parameters:
        return strategy(size=actors, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)
    return strategy(size=actors)


def _rows_per_call(settings: Settings, gpus_per_actor: float) -> int:
    return settings.batch_size or device_defaults("cuda" if gpus_per_actor else "cpu")[0]


def call_blocks(rows: list[dict[str, Any]], settings: Settings, gpus_per_actor: float) -> ray.data.Dataset:
    """`rows` as a Dataset of blocks of at most one model batch each, for
    `build_pipeline(..., call_per_block=True)`: one actor call a batch.

    What an actor's task returns reaches the driver only when the task ends, as
    one block (Ray Data gathers the outputs of a task's calls, even yielded ones,
    into blocks of up to 128 MiB), and a task takes whole input blocks, as many as
    make up `batch_size` rows. So rows stream back a batch at a time only when
    each input block is one batch and each task one block."""
    import pyarrow as pa

    ray = require_ray()
    per_call = _rows_per_call(settings, gpus_per_actor)
    schema = pa.schema([("seq", pa.int64()), ("input", pa.string()), ("location", pa.string()),
                        ("bytes", pa.binary())])
    # from_items would split the rows evenly (5 rows in batches of 4: 3 and 2)
    return ray.data.from_arrow([pa.Table.from_pylist(rows[i:i + per_call], schema=schema)
                                for i in range(0, max(1, len(rows)), per_call)])


READ_ROWS = 256  # rows a read task hands on at a time


def parts_dataset(parts: Sequence[Part], settings: Settings, gpus_per_actor: float, *,
                  columns: TableColumns, done: frozenset[str] | None, cwd: str) -> ray.data.Dataset:
    """The rows of `parts` (ofacls.sources.parts), read on the cluster, as blocks of
    one model batch each (for `build_pipeline(..., call_per_block=True)`).

    Each part is read by a task of its own where it is (ofacls' own readers: the
    same rows, names and error rows as a local batch, and each row's position, which
    Ray Data's read_parquet does not give); the rows are then cut into one block
    per model call by Ray Data's streaming repartition. A row's `seq` is its part's
    index and its position in the part, so rows come back in input order. `done`:
    the input_keys of rows OUT already holds (names resolved against `cwd`, the
    driver's current folder), marked `resumed` rather than read or classified."""
    import pickle

    ray = require_ray()
    blocks = max(1, min(len(parts), 64))  # read tasks at a time: each part still one task
    ds = ray.data.from_items([{"part": pickle.dumps(p)} for p in parts], override_num_blocks=blocks)
    ds = ds.map_batches(_read_parts, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"columns": columns, "max_bytes": settings.max_bytes,
                                   "done": done, "cwd": cwd})
    return ds.repartition(target_num_rows_per_block=_rows_per_call(settings, gpus_per_actor), strict=True)


POSITION_BITS = 32  # seq = part index << POSITION_BITS | position in the part


def _read_parts(batch: pa.Table, *, columns: TableColumns, max_bytes: int, done: frozenset[str] | None,
                cwd: str) -> Iterator[pa.Table]:
    """Ray Data's read stage: each part in `batch` as tables of rows for ClassifyBatch."""
    import pickle

    import pyarrow as pa

    from ofacls.resume import InputKeys

    schema = pa.schema([("seq", pa.int64()), ("input", pa.string()), ("location", pa.string()),
                        ("bytes", pa.binary()), ("error", pa.string()), ("kept", pa.binary()),
                        ("resumed", pa.bool_())])
    keys = InputKeys()
    for raw in batch.column("part").to_pylist():
        part: Part = pickle.loads(raw)
        rows: list[dict[str, Any]] = []
        for position, item in read_part(part, columns=columns, max_bytes=max_bytes):
            row: dict[str, Any] = {"seq": part.index << POSITION_BITS | position, "input": item.name}
            if isinstance(item, BadInput):
                row["error"] = item.error
            else:
                name = item.name if item.is_url or os.path.isabs(item.name) else os.path.join(cwd, item.name)
                row["resumed"] = done is not None and keys(name) in done
                if not row["resumed"]:
                    row["location"], row["bytes"] = item.location, item.data
                    if item.extra is not None:
                        row["kept"] = pickle.dumps(item.extra)
            rows.append(row)
            if len(rows) >= READ_ROWS:
                yield pa.Table.from_pylist(rows, schema=schema)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=schema)


def actor_count(actors: int | None, gpus: float, settings: Settings, rows: int | None) -> int:
    """Actors to start: as asked (else `pool_size`), but no more than there are calls
    to give them, where the rows are counted (`rows`): each one loads a model."""
    wanted = actors or pool_size(gpus)
    if rows is None:
        return max(1, wanted)
    return max(1, min(wanted, math.ceil(rows / _rows_per_call(settings, gpus))))


def classify_dataset(inputs: Iterable[str | os.PathLike[str] | bytes], *, actors: int | None = None,
                     gpus_per_actor: float | None = None, **settings: Any) -> ray.data.Dataset:
    """A Dataset of one ofacls row per input (paths, http(s) URLs or image bytes), with
    a `seq` column holding each input's position. Rows come in no particular order.

    Connects to Ray as `ray.init()` would if it is not connected yet. `actors`
    defaults to one per node on CPUs and one per GPU (see `pool_size`);
    `settings` are `Settings`' fields."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init()
    s = Settings(**settings)
    gpus = default_gpus(s.device) if gpus_per_actor is None else gpus_per_actor
    rows = [input_row(i, x) for i, x in enumerate(inputs)]
    n = actor_count(actors, gpus, s, len(rows))
    s = for_pool(s, n, gpus)
    return build_pipeline(call_blocks(rows, s, gpus), s, actors=n, gpus_per_actor=gpus,
                          call_per_block=True)


def input_row(seq: int, x: str | os.PathLike[str] | bytes) -> dict[str, Any]:
    if isinstance(x, (bytes, bytearray, memoryview)):
        return {"seq": seq, "input": "<bytes>", "location": None, "bytes": bytes(x)}
    name = os.fspath(x)
    # a worker's current folder is not the driver's: give it the absolute path
    return {"seq": seq, "input": name, "location": name if is_url(name) else os.path.abspath(name),
            "bytes": None}


def default_gpus(device: str) -> float:
    """GPUs per actor when not given: one where the cluster has GPUs, unless the
    device says CPU."""
    import ray

    if device == "cpu" or device == "mps":
        return 0
    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0


def pool_size(gpus_per_actor: float) -> int:
    """Actors when not given: one per node on CPUs (each uses all of its node's
    cores), as many as the cluster's GPUs hold on GPUs."""
    import ray

    if gpus_per_actor:
        return max(1, int(ray.cluster_resources().get("GPU", 0) // gpus_per_actor))
    return max(1, sum(1 for node in ray.nodes() if node.get("Alive")))


def for_pool(s: Settings, actors: int, gpus: float) -> Settings:
    """Settings as the actors of this pool need them: an actor shares its node's
    cores with the others there, and is kept off GPUs it was not given."""
    import ray

    nodes = max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
    changes: dict[str, Any] = {"actors_per_node": math.ceil(actors / nodes)}
    if not gpus and s.device == "auto":
        changes["device"] = "cpu"
    return Settings(**{**asdict(s), **changes})
