"""The driver half of `ofacls batch --engine ray`: connecting, sizing the actor
pool, and handing rows out in input order, each input once."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ofacls.errors import ClusterError, OfaclsError, debug
from ofacls.prediction import Prediction
from ofacls.resume import AlreadyDone
from ofacls.runner import Item, Stats
from ofacls.sources.expand import TableColumns, is_url
from ofacls.sources.parts import Part

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data


from ofacls.ray.pipeline import (
    LOST,
    POSITION_BITS,
    ClassifyBatch,
    Settings,
    actor_count,
    build_pipeline,
    call_blocks,
    default_gpus,
    for_pool,
    input_row,
    parts_dataset,
    require_ray,
    resolve_on_node,
    row_prediction,
)

# seconds to wait for the cluster's GCS port to accept a connection
PROBE_TIMEOUT = 3.0
# Joining, where the user has not set it: one try at the GCS instead of Ray's 20
# (each up to ~30 s), so a port that accepts connections but is not a Ray cluster
# fails in under a minute, not several. (Ray reads this one in Python, at ray.init;
# its C++ timeouts are read when ray is imported, too early to set here.)
_JOIN_BOUNDS = {"RAY_gcs_server_port_wait_time_s": "1"}


def check_address(address: str | None, timeout: float = PROBE_TIMEOUT) -> None:
    """Raise ClusterError unless the cluster at `address` (host:port, or
    ray://host:port) accepts a TCP connection within `timeout` seconds.

    ray.init retries an address where nothing answers for minutes, silently; a
    plain connect says in at most `timeout` seconds that nothing is there. An
    address Ray resolves itself ("auto", "local") is left to it."""
    where = _host_port(address) if address else None
    if where is None:
        return
    import socket

    try:
        socket.create_connection(where, timeout=timeout).close()
    except OSError:
        raise ClusterError(f"cannot reach a Ray cluster at {address} "
                           "(is 'ray start --head' running there?)") from None


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


@contextlib.contextmanager
def connected(address: str | None, on_phase: Callable[[str], None] | None = None) -> Iterator[None]:
    """Connected to Ray for the block: to the cluster at `address`, or to a local Ray
    instance started for the block and shut down after it. A process already
    connected (ray.init called by the program) keeps its connection.

    `on_phase` hears which of the two starts (each takes seconds). An address where
    nothing answers is a ClusterError within seconds (`check_address`)."""
    ray = require_ray()
    if ray.is_initialized():
        yield
        return
    check_address(address)
    if on_phase is not None:
        on_phase(f"joining the Ray cluster at {address}" if address else "starting a local Ray instance")
    quiet: dict[str, Any] = dict(include_dashboard=False, log_to_driver=debug(),
                                 logging_level=logging.DEBUG if debug() else logging.ERROR)
    with _quiet_backend(), _signal_handlers_kept(), _env(_JOIN_BOUNDS if address else {}):
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                # more logical CPUs than pipeline stages, or a stage waits forever for one
                ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), **quiet)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
            where = f"join the Ray cluster at {address}" if address else "start a local Ray instance"
            raise ClusterError(f"cannot {where}: {_first_line(e)}") from None
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _env(defaults: dict[str, str]) -> Iterator[None]:
    """The environment variables in `defaults` that are not set, set for the block."""
    added = [name for name in defaults if name not in os.environ]
    for name in added:
        os.environ[name] = defaults[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """The process's handlers for SIGTERM, SIGHUP and SIGINT as they were before the
    block, set again after it.

    ray.init replaces the SIGTERM handler with its own (sys.exit(15); with a local
    head node, one that kills the node's processes and exits 1), and the core worker
    it starts installs a C++ failure handler that prints a stack dump on SIGTERM.
    The caller's handlers (the CLI's: an interruption, one line, exit 143) take
    over again; Ray's processes are still stopped by ray.shutdown on the way out.
    Only the main thread can set handlers, so elsewhere this does nothing."""
    import signal
    import threading

    saved: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP", "SIGINT"):
            signum = getattr(signal, name, None)
            handler = signal.getsignal(signum) if signum is not None else None
            if signum is not None and handler is not None:  # None: set outside Python
                saved[signum] = handler
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _quiet_backend() -> Iterator[None]:
    """ray.init with Ray's C++ core logging only fatal errors to this process's stderr.

    In normal operation the core logs to the driver's stderr at error level (Ray
    Data's actors take their arguments from the object store, which it reports
    on every actor start), and the CLI's stderr carries one line per problem.
    The driver's core reads RAY_BACKEND_LOG_LEVEL when ray.init starts it and
    says so on stderr, so stderr's descriptor points at /dev/null meanwhile; a
    failed ray.init still raises. OFACLS_DEBUG or a RAY_BACKEND_LOG_LEVEL of the
    user's own leaves both alone."""
    name = "RAY_BACKEND_LOG_LEVEL"
    if debug() or name in os.environ:
        yield
        return
    import sys

    os.environ[name] = "fatal"
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.environ.pop(name, None)


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data's console log (plan, progress notices, timings) off for the block;
    its log file under the Ray session keeps everything."""
    if debug():
        yield
        return
    handlers = [h for h in logging.getLogger("ray.data").handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(logging.CRITICAL)  # a failed run comes back as an exception: one line
    try:
        yield
    finally:
        for h, level in zip(handlers, levels):
            h.setLevel(level)


def run_batch(items: Sequence[Item], settings: Settings, on_row: Callable[[Prediction], None], *,
              address: str | None = None, actors: int | None = None,
              gpus_per_actor: float | None = None, resources: dict[str, float] | None = None,
              on_progress: Callable[[Stats], None] | None = None,
              on_phase: Callable[[str], None] | None = None,
              udf: type[ClassifyBatch] = ClassifyBatch) -> Stats:
    """`ofacls batch --engine ray`: classify every item on a Ray cluster, calling
    `on_row` once per item, in input order, here in the driver, as each batch
    comes back; returns the counts.

    `on_phase` hears each slow phase as it starts, in words: starting or joining
    Ray, loading the model on the replicas (the rows follow);
    `resources`: custom Ray resources each actor needs (see `build_pipeline`);
    `udf`: the actors' class, ClassifyBatch or a subclass keeping its row contract.
    Items that already carry an error, and a run with nothing to classify, never
    reach the cluster. An item the cluster never answers (it cannot happen unless
    Ray loses data) still gets its row, an error."""
    stats = Stats(total=len(items))
    emit = stats.reporter(on_row, on_progress)

    rows = [row for seq, item in enumerate(items) if (row := _item_row(seq, item)) is not None]
    order = InOrder(items, emit)
    if not rows:
        order.finish()
        return stats
    cluster = _Cluster(settings, address, actors, gpus_per_actor, resources, on_phase, udf)
    with connected(address, on_phase), _quiet_ray_data():
        stats.started = time.perf_counter()  # the rate counts the cluster's work, not its start
        # closed at once on any exception (a failed write, Ctrl-C): the cluster's work stops
        answers = cluster.classify(lambda s, gpus: call_blocks(rows, s, gpus), len(rows))
        with contextlib.closing(answers) as out:
            for row in out:
                order.add(row["seq"], row_prediction(row))
    order.finish()
    return stats


def run_parts(parts: Sequence[Part], settings: Settings, on_row: Callable[[Prediction], None], *,
              columns: TableColumns | None = None, done: set[str] | Counter[str] | None = None,
              address: str | None = None, actors: int | None = None,
              gpus_per_actor: float | None = None, resources: dict[str, float] | None = None,
              on_progress: Callable[[Stats], None] | None = None,
              on_phase: Callable[[str], None] | None = None,
              udf: type[ClassifyBatch] = ClassifyBatch) -> Stats:
    """`run_batch` for inputs the cluster reads itself (ofacls.sources.parts: tables
    and shards read where they are classified): `on_row` once per input, in input
    order, here in the driver; the counts' `skipped` are the rows `done` held.

    `done`: the input_keys of the rows a resumed OUT holds (resume.AlreadyDone).
    The readers mark such rows and the actors pass them by; the driver alone
    decides, in input order, which naming each row of OUT stands for, so a row
    the readers passed by that OUT holds no more of (an input named more often
    than OUT has rows for it) is read and classified again, in a second round."""
    stats = Stats()
    emit = stats.reporter(on_row, on_progress)
    taken = AlreadyDone(done) if done else None
    marks = frozenset(done) if done else None
    by_index = {part.index: part for part in parts}
    cluster = _Cluster(settings, address, actors, gpus_per_actor, resources, on_phase, udf)
    cwd = os.getcwd()
    todo = list(parts)
    with connected(address, on_phase), _quiet_ray_data():
        stats.started = time.perf_counter()
        while todo:
            again: dict[int, set[int]] = {}
            read = functools.partial(parts_dataset, todo, columns=columns or TableColumns(),
                                     done=marks, cwd=cwd)
            with contextlib.closing(cluster.classify(read, None)) as out:
                _hand_out(out, emit, taken, again, stats)
            todo = [dataclasses.replace(by_index[i], only=frozenset(p)) for i, p in sorted(again.items())]
            marks = None
    return stats


def _hand_out(rows: Iterator[dict[str, Any]], emit: Callable[[Prediction], None], taken: AlreadyDone | None,
              again: dict[int, set[int]], stats: Stats) -> None:
    """run_parts' rows, in order, to `emit`, less those OUT holds (counted as skipped);
    a row the readers passed by that OUT holds no more of goes into `again` (part
    index -> positions) for another round."""
    import pickle

    last = -1
    for row in rows:
        seq = row["seq"]
        # in order (preserve_order): a row at or before the last is one seen already
        if seq <= last:
            continue
        last = seq
        if taken is not None and taken.take(row["input"]):
            stats.skipped += 1
        elif row.get("resumed"):
            again.setdefault(seq >> POSITION_BITS, set()).add(seq & ((1 << POSITION_BITS) - 1))
        else:
            pred = row_prediction(row)
            kept = row.get("kept")
            emit(pred if kept is None else dataclasses.replace(pred, extra=pickle.loads(kept)))


class _Cluster:
    """How a run's actors are set up, and the rows they give back."""

    def __init__(self, settings: Settings, address: str | None, actors: int | None,
                 gpus_per_actor: float | None, resources: dict[str, float] | None,
                 on_phase: Callable[[str], None] | None, udf: type[ClassifyBatch]) -> None:
        ray = require_ray()
        if address is None and not ray.is_initialized():
            # this machine is the whole cluster: resolve (download) the model once, here,
            # with the CLI's errors and exit codes, before any actor starts
            settings = dataclasses.replace(settings, model=str(
                resolve_on_node(settings.model, offline=settings.offline, cache_dir=settings.cache_dir)))
        elif not is_url(settings.model) and Path(settings.model).expanduser().is_dir():
            settings = dataclasses.replace(settings, model=str(Path(settings.model).expanduser().resolve()))
        if settings.cache_dir is not None:  # a worker's current folder is not the driver's
            settings = dataclasses.replace(
                settings, cache_dir=os.path.abspath(os.path.expanduser(settings.cache_dir)))
        self.settings, self.actors, self.gpus_per_actor = settings, actors, gpus_per_actor
        self.resources, self.on_phase, self.udf = resources, on_phase, udf

    def classify(self, rows_in: Callable[[Settings, float], ray.data.Dataset], rows: int | None
                 ) -> Generator[dict[str, Any], None, None]:
        """The output rows of the Dataset `rows_in` makes (from the pool's settings
        and GPUs per actor), classified by the pool, as they come back; `rows`: how
        many there are, when known (no more actors than calls)."""
        settings = self.settings
        gpus = default_gpus(settings.device) if self.gpus_per_actor is None else self.gpus_per_actor
        n = actor_count(self.actors, gpus, settings, rows)
        if self.on_phase is not None:
            self.on_phase(f"loading the model on {n} replica{'s' if n > 1 else ''}")
        if settings.threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
            settings = dataclasses.replace(settings, threads=int(os.environ["OMP_NUM_THREADS"]))
        settings = for_pool(settings, n, gpus)
        ds = build_pipeline(rows_in(settings, gpus), settings, actors=n, gpus_per_actor=gpus,
                            resources=self.resources, udf=self.udf, call_per_block=True)
        _configure(ds)
        # no prefetching: with it, Ray Data hands out a block only once the next one
        # is there too, so a finished batch waited for the slowest batch after it
        batches = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
        try:
            for batch in batches:
                yield from cast("pa.Table", batch).to_pylist()
        except Exception as e:
            raise _run_failed(e) from None
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # on Ctrl-C or a failed write: stop the cluster's work now


def _item_row(seq: int, item: Item) -> dict[str, Any] | None:
    """The row that sends `item` to the cluster, named as a local run names it; None
    for an item that already carries its error, or whose image is a decoded PIL
    image (not sent: its row says no result came back).

    An image the driver already holds (one piped on stdin, named `-`, or bytes
    given as an Item's image) travels in the row: no worker could read it."""
    if item.error is not None:
        return None
    data = item.source.data if item.source is not None else item.image
    if isinstance(data, (bytes, bytearray, memoryview)):
        return input_row(seq, bytes(data)) | {"input": item.name}
    if item.source is None:
        return None
    return input_row(seq, item.source.location) | {"input": item.name}


def _configure(ds: ray.data.Dataset) -> None:
    """Rows in input order, a failed call's own exception (UserCodeException would
    leave only its text), and no progress bars or plan printing of Ray's own on stderr."""
    ctx = ds.context
    ctx.execution_options.preserve_order = True
    if hasattr(ctx, "raise_original_map_exception"):
        ctx.raise_original_map_exception = True
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False


class InOrder:
    """Hands Predictions to `emit` in input order, each input once.

    `add` takes results as the cluster returns them, by sequence number; a
    number seen before (a recomputed block) is dropped. Items that carry an
    error are emitted when their turn comes."""

    def __init__(self, items: Sequence[Item], emit: Callable[[Prediction], None]) -> None:
        self.items, self.emit = items, emit
        self.next = 0
        self.waiting: dict[int, Prediction] = {}

    def add(self, seq: int, pred: Prediction) -> None:
        if seq < self.next or seq in self.waiting or not 0 <= seq < len(self.items):
            return
        self.waiting[seq] = pred
        self._drain()

    def _drain(self) -> None:
        while self.next < len(self.items):
            item = self.items[self.next]
            if item.error is not None:
                pred: Prediction | None = Prediction.failed(item.name, item.error)
            else:
                pred = self.waiting.pop(self.next, None)
            if pred is None:
                return
            self.next += 1
            extra = item.source.extra if item.source is not None else None
            # a table row's kept columns stay here: only what to classify goes to the cluster
            self.emit(pred if extra is None else dataclasses.replace(pred, extra=extra))

    def finish(self) -> None:
        """Emit what is left: the answers still waiting, and an error for each input
        the cluster never answered."""
        while self.next < len(self.items):
            item = self.items[self.next]
            if item.error is None and self.next not in self.waiting:
                self.waiting[self.next] = Prediction.failed(item.name, LOST)
            self._drain()


def _run_failed(e: BaseException) -> OfaclsError:
    """The error to report for a failed Ray run: ofacls' own error where one of ours
    caused it (a model that cannot load on a node: its exit code), else one line."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    culprit: BaseException | None = None  # the first exception not Ray's own
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if culprit is None and not type(x).__module__.startswith("ray"):
            culprit = x
        if isinstance(x, OfaclsError):
            # Ray's wrapper subclasses the cause's class; its text is the traceback,
            # and the cause's own message has Ray's advice appended on further lines
            ours = next(c for c in type(x).__mro__ if c.__module__.startswith("ofacls"))
            cause = getattr(x, "cause", None)
            return ours(_first_line(cause if isinstance(cause, OfaclsError) else x))
        todo += [x.__cause__, x.__context__, getattr(x, "cause", None)]
    if culprit is not None:
        return OfaclsError(f"the Ray run failed: {type(culprit).__name__}: {_first_line(culprit)}")
    return OfaclsError(f"the Ray run failed: {_first_line(e)}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


