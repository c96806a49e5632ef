"""The options every classifying command shares, gathered into `RunSettings`,
and loading the classifier they describe."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ofacls.cli.feedback import EXIT_USAGE, err, one_line_errors
from ofacls.errors import UsageError
from ofacls.hub import DEFAULT_MODEL_ID
from ofacls.images import DEFAULT_MAX_PIXELS
from ofacls.sources.fetch import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT


class Decode(str, Enum):
    exact = "exact"
    beam = "beam"
    auto = "auto"  # the model folder's gen_type: traverse -> exact, generation -> beam


class Format(str, Enum):
    csv = "csv"
    tsv = "tsv"
    jsonl = "jsonl"
    ndjson = "ndjson"
    json = "json"
    parquet = "parquet"


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str | int, *, most: int = 2**50) -> int:
    """A byte count as people write it: 52428800, 50MB, 50MiB, 1.5G, 512k.

    kB, MB, GB, TB are powers of 1000 (SI), KiB, MiB, GiB, TiB and the bare
    letters K, M, G, T powers of 1024, as dd, Docker and ulimit read them."""
    if isinstance(text, int):  # click hands the parser the default as it was declared
        return text
    found = _SIZE.fullmatch(text.strip())
    if not found:
        raise typer.BadParameter(f"{text!r} is not a size (for example 50MB, 20MiB, 1.5G or 1048576)")
    number, prefix, binary, b = found.groups()
    base = 1000 if prefix and b and not binary else 1024
    size = int(float(number) * base ** _POWERS[prefix.lower()])
    if not 1 <= size <= most:
        raise typer.BadParameter(f"{text} is not between 1 byte and {format_size(most)}")
    return size


def format_size(size: int) -> str:
    """The shortest exact binary spelling of a byte count (52428800 -> 50MiB)."""
    for unit, power in (("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if size % 1024**power == 0:
            return f"{size // 1024**power}{unit}"
    return str(size)


def size_option(*names: str, default: int, most: int, help: str) -> Any:
    """A typer.Option taking a size with units (parse_size), at most `most` bytes;
    help shows `default` in units too."""
    return typer.Option(*names, metavar="SIZE", parser=functools.partial(parse_size, most=most),
                        show_default=False,  # click would show the bare integer
                        help=f"{help} (e.g. 50MB, 20MiB, 1.5G; at most {format_size(most)}).  "
                             f"[default: {format_size(default)}]")


# Options shared by several commands, defined once.
ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", envvar="OFACLS_MODEL", metavar="ID|DIR", show_default=False, show_envvar=False,
    # "\b" keeps click from rewrapping the paragraph: the id stays whole on its line
    help="ModelScope model id or local model folder. An id is taken from the local cache, "
         f"else downloaded on first use.  [env var: OFACLS_MODEL]\n\n\b\n[default: {DEFAULT_MODEL_ID}]")]
CacheDirOpt = Annotated[Optional[Path], typer.Option(
    "--cache-dir", envvar="OFACLS_CACHE_DIR", metavar="DIR", show_default=False,
    help="Where downloaded models are kept.  [default: $MODELSCOPE_CACHE, else "
         "~/.cache/modelscope]")]
OfflineOpt = Annotated[bool, typer.Option(
    "--offline", envvar="OFACLS_OFFLINE", help="Never contact the hub; use the local cache only.")]
def completing(*values: str) -> Callable[[str], list[str]]:
    """A completion callback offering `values` (for options whose values are open-ended
    strings, so click cannot offer them as it does an Enum's)."""
    return lambda incomplete: [v for v in values if v.startswith(incomplete)]


DeviceOpt = Annotated[str, typer.Option(
    "--device", metavar="DEVICE", autocompletion=completing("auto", "cpu", "cuda", "cuda:0", "cuda:1", "mps"),
    help="auto (CUDA when available), cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", metavar="PRECISION", autocompletion=completing("auto", "fp32", "fp16", "bf16"),
    help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.")]
DecodeOpt = Annotated[Decode, typer.Option(
    "--decode", help="exact: the exact top-k labels and their probabilities; beam: ModelScope's "
                     "beam search, scored by length-normalised log-probability; auto: what the "
                     "model folder's gen_type asks ModelScope for (traverse: exact, generation: beam).")]
TopKOpt = Annotated[int, typer.Option("--top-k", "-k", min=1, metavar="K", help="How many labels per image.")]
LabelsOpt = Annotated[Optional[str], typer.Option(
    "--labels", metavar="FILE|a,b,c",
    help="Choose only among these labels: a file (one per line) or a,b,c. The model's own "
         "labels keep their class indices; any other text is ranked by the model too (its "
         "index: its place in the list).")]
CalibrationOpt = Annotated[Optional[Path], typer.Option(
    "--calibration", metavar="CAL.json", show_default=False,
    help="Add each image's prediction set: the labels that hold the true one with the "
         "coverage `ofacls eval --calibrate` computed (exact decoding).")]

if TYPE_CHECKING:
    from ofacls.calibration import Calibration
    from ofacls.classifier import Classifier
    from ofacls.runner import Options
    from ofacls.sources.expand import TableColumns
BatchSizeOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", "-b", min=1, max=4096, metavar="N",
    help="Images per model call.  [default: 4 on CPU, 32 on a GPU]", show_default=False)]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", "-j", min=1, max=256, metavar="N", show_default=False,
    help="Threads that read, download and decode images.  [default: 4 on CPU, "
         "one per core (4-16) with a GPU]")]
TimeoutOpt = Annotated[float, typer.Option(
    "--timeout", min=0.1, max=86400.0, metavar="SECONDS",
    help="Seconds allowed per URL (its whole download, redirects included).")]
MaxPixelsOpt = Annotated[int, typer.Option(
    "--max-pixels", min=1, metavar="PIXELS",
    help="Refuse images with more pixels than this (decompression bombs).")]
MaxBytesOpt = Annotated[int, size_option(
    "--max-download", default=DEFAULT_MAX_BYTES, most=2**34, help="Refuse downloads larger than this")]
QuantizeOpt = Annotated[Optional[str], typer.Option(
    "--quantize", metavar="int8", autocompletion=completing("int8"),
    help="int8: dynamic int8 Linear layers on CPU (faster, slightly different).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no summary.")]
InputsArg = Annotated[list[str], typer.Argument(
    help="Image files, folders, quoted globs, http(s) URLs, .txt lists of those, "
         "or - to read such a list (or one image's bytes) from stdin.", show_default=False,
    metavar="INPUT")]
InputColOpt = Annotated[Optional[str], typer.Option(
    "--input-col", metavar="NAME", show_default=False,
    help="In a table input (.parquet, .csv, .tsv, .jsonl, also .gz): the column naming each "
         "image.  [default: the first of url, path, input, image, file]")]
KeepColsOpt = Annotated[Optional[str], typer.Option(
    "--keep-cols", metavar="A,B", show_default=False,
    help="In a table input: columns carried into every output row, after ofacls' own.")]
_OWN_COLUMN = re.compile(r"^(input|label|score|index|top_k|error|prediction_set|true_label|"
                         r"(label|score|index)_\d+)$")


def table_columns(input_col: str | None, keep_cols: str | None) -> TableColumns:
    """--input-col and --keep-cols, a kept column that clashes with ours refused."""
    from ofacls.sources.expand import TableColumns

    keep = tuple(dict.fromkeys(c.strip() for c in (keep_cols or "").split(",") if c.strip()))
    clash = [c for c in keep if _OWN_COLUMN.match(c)]
    if clash:
        raise UsageError(f"--keep-cols {', '.join(map(repr, clash))}: ofacls' own rows have "
                         f"{'that column' if len(clash) == 1 else 'those columns'}")
    if input_col is not None and not input_col.strip():
        raise UsageError("--input-col names no column")
    return TableColumns(input_col.strip() if input_col else None, keep)


NullOpt = Annotated[bool, typer.Option(
    "--null", "-0", help="The list on stdin is NUL-separated (find -print0), not one per line.")]


@dataclass(frozen=True)
class RunSettings:
    """The options every classifying command takes (see `_classifying`)."""

    model: str
    top_k: int
    decode: Decode
    device: str
    precision: str
    labels: str | None
    batch_size: int | None  # None: what suits the device (runner.device_defaults)
    workers: int | None
    timeout: float
    max_pixels: int
    max_download: int
    quantize: str | None
    offline: bool
    cache_dir: Path | None
    quiet: bool
    calibration: Path | None

    def options(self, device_type: str, calibration: Calibration | None = None) -> Options:
        from ofacls.runner import Options, device_defaults

        batch_size, workers = device_defaults(device_type)
        return Options(top_k=self.top_k, decode=self.decode.value,
                       batch_size=self.batch_size or batch_size, workers=self.workers or workers,
                       timeout=self.timeout, max_bytes=self.max_download, calibration=calibration)


# name, Typer annotation, default: declared once, appended to each command by `_classifying`
_SHARED_OPTIONS: list[tuple[str, object, object]] = [
    ("model", ModelOpt, DEFAULT_MODEL_ID),
    ("top_k", TopKOpt, 5),
    ("decode", DecodeOpt, Decode.exact),
    ("device", DeviceOpt, "auto"),
    ("precision", PrecisionOpt, "auto"),
    ("labels", LabelsOpt, None),
    ("batch_size", BatchSizeOpt, None),
    ("workers", WorkersOpt, None),
    ("timeout", TimeoutOpt, DEFAULT_TIMEOUT),
    ("max_pixels", MaxPixelsOpt, DEFAULT_MAX_PIXELS),
    ("max_download", MaxBytesOpt, DEFAULT_MAX_BYTES),
    ("quantize", QuantizeOpt, None),
    ("offline", OfflineOpt, False),
    ("cache_dir", CacheDirOpt, None),
    ("quiet", QuietOpt, False),
    ("calibration", CalibrationOpt, None),
]


def classifying(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command the shared classification options; it receives them as `run`.

    Typer builds a command's options from its signature, so the wrapper shows
    the command's own parameters followed by the shared ones."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
           if p.name != "run"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                annotation=annotation)
              for name, annotation, default in _SHARED_OPTIONS]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        run = RunSettings(**{name: kwargs.pop(name) for name, _, _ in _SHARED_OPTIONS})
        if run.timeout != run.timeout:  # NaN passes click's range check
            err("Invalid value for '--timeout': nan is not a number of seconds "
                 f"(see ofacls {command.__name__} --help)")
            raise typer.Exit(EXIT_USAGE)
        if run.decode == Decode.auto:
            with one_line_errors():
                run = dataclasses.replace(run, decode=_folder_decode(run))
        command(**kwargs, run=run)

    wrapper.__signature__ = inspect.Signature(own + shared)  # type: ignore[attr-defined]
    return wrapper


def _folder_decode(run: RunSettings) -> Decode:
    """--decode auto: the decoding ModelScope's pipeline runs for the model folder."""
    from ofacls.hub import resolve_model
    from ofacls.model.folder import ModelFolder

    folder = ModelFolder.open(resolve_model(run.model, offline=run.offline, cache_dir=run.cache_dir))
    return Decode.exact if folder.task.gen_type == "traverse" else Decode.beam


def run_settings(run: RunSettings, clf: Classifier) -> dict[str, Any]:
    """What a run's probabilities depend on, as a calibration records them."""
    from ofacls.calibration import settings_of

    return settings_of(clf, run.model, run.decode.value, run.quantize)


def load_calibration(run: RunSettings, clf: Classifier) -> Calibration | None:
    """--calibration's file, refused unless made with this run's settings."""
    if run.calibration is None:
        return None
    from ofacls.calibration import Calibration

    cal = Calibration.load(run.calibration)
    cal.check(run_settings(run, clf), f"calibration {run.calibration}")
    cal.check_decode(run.decode.value)
    return cal


def labels_arg(labels: str | None) -> list[str] | None:
    if labels is None:
        return None
    path = Path(labels)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --labels file {labels}: {e}") from None
        names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    elif "," not in labels and (os.sep in labels or path.suffix.lower() == ".txt"):
        # no label has a "/" or ends in .txt: this was meant as a file
        raise UsageError(f"--labels {labels}: no such file")
    else:
        names = [n.strip() for n in labels.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--labels {labels!r} names no labels")
    return names


def load_classifier(run: RunSettings) -> Classifier:
    from ofacls.classifier import Classifier

    labels = labels_arg(run.labels)
    clf = Classifier.from_pretrained(run.model, device=run.device, precision=run.precision,
                                     labels=labels, max_pixels=run.max_pixels,
                                     quantize=run.quantize, offline=run.offline,
                                     cache_dir=run.cache_dir,
                                     progress=not run.quiet and sys.stderr.isatty())
    import torch

    from ofacls.classifier import cpu_lacks_bf16
    from ofacls.tuning import tune_process

    tune_process()  # a process that exists to classify: every core, freed memory kept

    if labels is not None and clf.trie.own and not run.quiet:
        for name, label in clf.model_labels.near_misses(labels)[:5]:
            err(f"warning: {name!r} is not a label of this model (its {label!r}?): the labels are "
                "taken as your own strings")

    if clf.dtype == torch.bfloat16 and clf.device.type == "cpu" and not run.quiet and cpu_lacks_bf16():
        err("warning: this CPU has no bf16 instructions (AMX or AVX-512 BF16), so "
             "bf16 runs emulated and is likely slower than fp32")
    return clf
