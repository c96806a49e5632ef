"""The ofacls command line: parse, call the core, print.

Only this module knows about Typer, exit codes and terminals. It imports
nothing heavy at module level (torch, PIL and modelscope load inside the
commands), so `ofacls --help` and shell completion answer instantly.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from typer.core import TyperGroup

from ofacls import __version__
from ofacls.errors import InputError, ModelError, OfaclsError, OutputError, UsageError, debug
from ofacls.hub import DEFAULT_MODEL_ID
from ofacls.images import DEFAULT_MAX_PIXELS
from ofacls.sources import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT

if TYPE_CHECKING:
    from ofacls.classifier import Classifier
    from ofacls.prediction import Prediction
    from ofacls.runner import Item, Options, Stats

EXIT_FAILED, EXIT_USAGE, EXIT_MODEL, EXIT_INTERRUPTED = 1, 2, 3, 130
EXIT_CODES = ("Exit codes: 0 every input classified; 1 at least one input failed (all rows "
              "still written); 2 bad usage; 3 the model could not be found, downloaded or "
              "loaded; 130 interrupted.")


class _OneLineErrors(TyperGroup):
    """Click's usage errors as one `ofacls: ...` line on stderr, like all of ours.

    Click prints usage, a hint and the error over four lines; scripts that read
    stderr get one line per problem instead. `ofacls` alone still shows the help."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except typer.Abort:
            _err("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except Exception as e:
            # by class name: Typer >= 0.22 raises its own vendored copies of click's classes
            kinds = {c.__name__ for c in type(e).__mro__}
            if "ClickException" not in kinds:
                raise
            if "NoArgsIsHelpError" in kinds:
                e.show()  # type: ignore[attr-defined]
                sys.exit(e.exit_code)  # type: ignore[attr-defined]
            ctx = getattr(e, "ctx", None)
            where = f" (see {ctx.command_path} --help)" if "UsageError" in kinds and ctx else ""
            # Typer's pydantic-based checks say "Value error, 'x' is not one of ..."
            message = e.format_message().replace("Value error, ", "")  # type: ignore[attr-defined]
            _err(f"{message}{where}")
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="ofacls",
    cls=_OneLineErrors,
    help="Classify images into the 1000 ImageNet classes with OFA.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Decode(str, Enum):
    exact = "exact"
    beam = "beam"


class Format(str, Enum):
    csv = "csv"
    jsonl = "jsonl"


# Options shared by several commands, defined once.
ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", envvar="OFACLS_MODEL", metavar="ID|DIR",
    help="ModelScope model id or local model folder. An id is taken from the local cache, "
         "else downloaded on first use.")]
OfflineOpt = Annotated[bool, typer.Option(
    "--offline", envvar="OFACLS_OFFLINE", help="Never contact the hub; use the local cache only.")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", metavar="DEVICE", help="auto (CUDA when available), cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", metavar="PRECISION", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.")]
DecodeOpt = Annotated[Decode, typer.Option(
    "--decode", help="exact: the exact top-k labels and their probabilities; beam: ModelScope's "
                     "beam search, scored by length-normalised log-probability.")]
TopKOpt = Annotated[int, typer.Option("--top-k", "-k", min=1, metavar="K", help="How many labels per image.")]
LabelsOpt = Annotated[Optional[str], typer.Option(
    "--labels", metavar="FILE|a,b,c", help="Choose only among these labels: a file (one per line) or a,b,c.")]
BatchSizeOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", "-b", min=1, metavar="N",
    help="Images per model call.  [default: 4 on CPU, 32 on a GPU]", show_default=False)]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", "-j", min=1, metavar="N", show_default=False,
    help="Threads that read, download and decode images.  [default: 4 on CPU, "
         "one per core (4-16) with a GPU]")]
TimeoutOpt = Annotated[float, typer.Option(
    "--timeout", min=0.1, metavar="SECONDS", help="Seconds allowed per URL.")]
MaxPixelsOpt = Annotated[int, typer.Option(
    "--max-pixels", min=1, metavar="PIXELS",
    help="Refuse images with more pixels than this (decompression bombs).")]
MaxBytesOpt = Annotated[int, typer.Option(
    "--max-download", min=1, metavar="BYTES", help="Refuse downloads larger than this many bytes.")]
QuantizeOpt = Annotated[Optional[str], typer.Option(
    "--quantize", metavar="int8",
    help="int8: dynamic int8 Linear layers on CPU (faster, slightly different).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no summary.")]
InputsArg = Annotated[list[str], typer.Argument(
    help="Image files, folders, quoted globs, http(s) URLs, .txt lists of those, "
         "or - to read such a list from stdin.", show_default=False, metavar="INPUT")]


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
    quiet: bool

    def options(self, device_type: str) -> Options:
        from ofacls.runner import Options, device_defaults

        batch_size, workers = device_defaults(device_type)
        return Options(top_k=self.top_k, decode=self.decode.value,
                       batch_size=self.batch_size or batch_size, workers=self.workers or workers,
                       timeout=self.timeout, max_bytes=self.max_download)


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
    ("quiet", QuietOpt, False),
]


def _classifying(command: Callable[..., None]) -> Callable[..., None]:
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
        command(**kwargs, run=run)

    wrapper.__signature__ = inspect.Signature(own + shared)  # type: ignore[attr-defined]
    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ofacls {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False
          ) -> None:
    """Classify images into the 1000 ImageNet classes with OFA."""
    _log_to_stderr()


class _OneLineHandler(logging.Handler):
    """The library's notices (`logging.getLogger("ofacls")`) as our own stderr lines."""

    def emit(self, record: logging.LogRecord) -> None:
        _err(record.getMessage())


def _log_to_stderr() -> None:
    log = logging.getLogger("ofacls")
    if not any(isinstance(h, _OneLineHandler) for h in log.handlers):
        log.addHandler(_OneLineHandler(logging.INFO))
    log.propagate = False


@contextmanager
def _errors() -> Iterator[None]:
    """Map ofacls' errors to one stderr line and an exit code (OFACLS_DEBUG=1: traceback)."""
    try:
        yield
    except KeyboardInterrupt:
        _err("interrupted")
        try:
            sys.stdout.flush()
        except OSError:
            pass  # a closed pipe: nothing more can reach it anyway
        # Not typer.Exit: the interpreter would then join the loader threads, and a
        # download in flight holds it for up to --timeout. Every row is already
        # written and OUT closed (batch closes it on the way out), so skip the wait.
        os._exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # `ofacls predict ... | head`: the reader has all it wants. Click would
        # exit 1 ("an input failed"); stop quietly instead, as main() intends.
        _quiet_stdout()
        raise typer.Exit(0) from None
    except OfaclsError as e:
        if debug():
            import traceback

            traceback.print_exc()
        _err(str(e))
        code = EXIT_MODEL if isinstance(e, ModelError) else (
            EXIT_FAILED if isinstance(e, InputError) else EXIT_USAGE)
        raise typer.Exit(code) from None


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so flushing it at exit cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _quiet_decoders() -> None:
    """Keep PIL's own warnings and log lines off stderr.

    A bad image already gets its one-line reason in its row; PIL's two-line
    UserWarnings (palette transparency, corrupt TIFF tags) and its logged
    errors would break "one line per failure" on stderr. Neither imports PIL.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore", module="PIL")
    pil = logging.getLogger("PIL")
    pil.propagate = False
    if not pil.handlers:  # with none, logging would fall back to printing to stderr
        pil.addHandler(logging.NullHandler())


def _err(message: str) -> None:
    """One line on stderr, its control characters escaped (names come from outside)."""
    from ofacls.render import escape

    try:
        print(f"ofacls: {escape(' '.join(message.split()))}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # a full or closed stderr: the work's outcome, and its exit code, stand


def _labels_arg(labels: str | None) -> list[str] | None:
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


def _load(run: RunSettings) -> Classifier:
    from ofacls.classifier import Classifier

    clf = Classifier.from_pretrained(run.model, device=run.device, precision=run.precision,
                                     labels=_labels_arg(run.labels), max_pixels=run.max_pixels,
                                     quantize=run.quantize, offline=run.offline,
                                     progress=not run.quiet and sys.stderr.isatty())
    import torch

    from ofacls.classifier import cpu_lacks_bf16
    from ofacls.tuning import tune_process

    tune_process()  # a process that exists to classify: every core, freed memory kept

    if clf.dtype == torch.bfloat16 and clf.device.type == "cpu" and not run.quiet and cpu_lacks_bf16():
        _err("warning: this CPU has no bf16 instructions (AMX or AVX-512 BF16), so "
             "bf16 runs emulated and is likely slower than fp32")
    return clf


def _items(inputs: list[str]) -> list[Item]:
    """Every input, expanded; the ones naming nothing readable carry their error."""
    from ofacls.runner import Item
    from ofacls.sources import Source, expand_inputs

    return [Item(e.name, e) if isinstance(e, Source) else Item(e.name, error=e.error)
            for e in expand_inputs(inputs, stdin=sys.stdin)]


def _not_yet_written(items: list[Item], written: Counter[str]) -> list[Item]:
    """Items whose rows are not in the resumed file; an input given twice needs two rows."""
    left = Counter(written)
    todo = []
    for item in items:
        if left[item.name] > 0:
            left[item.name] -= 1
        else:
            todo.append(item)
    return todo


def _run(items: list[Item], clf: Classifier, options: Options, on_row: Callable[[Prediction], None],
         quiet: bool, progress: bool) -> Stats:
    """Run the batch, with a progress bar on stderr when it is a terminal."""
    from ofacls import runner
    from ofacls.render import progress_bar

    if not (progress and not quiet and sys.stderr.isatty()):
        return runner.run(items, clf, options, on_row, total=len(items))
    with progress_bar(len(items), sys.stderr) as on_progress:
        return runner.run(items, clf, options, on_row, on_progress, total=len(items))


@app.command()
@_classifying
def predict(
    inputs: InputsArg,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per input per line.")] = False,
    *,
    run: RunSettings,
) -> None:
    """Classify images and print their labels.

    On a terminal: the top-k labels of each image. Piped: input<TAB>label<TAB>score
    lines. --json: {"input", "label", "score", "top_k", "error"} per line.
    """
    with _errors():
        _quiet_decoders()
        items = _items(inputs)
        clf = _load(run)
        show = _printer(as_json, probabilities=run.decode == Decode.exact)
        stats = _run(items, clf, run.options(clf.device.type), show, run.quiet, progress=False)
    raise typer.Exit(EXIT_FAILED if stats.failed else 0)


def _printer(as_json: bool, probabilities: bool) -> Callable[[Prediction], None]:
    """How `predict` shows each row: JSON lines, a table on a terminal, tab-separated
    lines otherwise. Every input gets its line, a failed one with its error (and,
    off a terminal, the one-line error on stderr too)."""
    from ofacls import render

    if not as_json and sys.stdout.isatty():
        table = render.table_printer(sys.stdout, probabilities)

        def show_table(pred: Prediction) -> None:
            try:
                table(pred)
            except BrokenPipeError:
                raise
            except OSError as e:
                raise _stdout_failed(e) from None

        return show_table
    line = render.json_line if as_json else render.tsv_line

    def show_line(pred: Prediction) -> None:
        _out(line(pred))
        if not pred.ok:
            _err(f"{pred.input}: {pred.error}")

    return show_line


def _out(text: str) -> None:
    """Write to stdout now. A stdout that cannot take it (disk full, a closed
    descriptor) ends the run with one line; a closed pipe stops it quietly."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:  # ValueError: the stream was closed
        raise _stdout_failed(e) from None


def _stdout_failed(e: OSError | ValueError) -> OutputError:
    """The one-line error for a failed stdout write, with stdout pointed at
    /dev/null first: what is still buffered would fail again at exit."""
    _quiet_stdout()
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return OutputError(f"cannot write to stdout: {reason[:1].lower()}{reason[1:]}")


@app.command()
@_classifying
def batch(
    inputs: InputsArg,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT",
                                         help="Output file (.csv or .jsonl), or - for stdout.",
                                         show_default=False)],
    fmt: Annotated[Optional[Format], typer.Option(
        "--format", "-f", help="Output format; default from the extension.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Keep OUT's successful rows; classify the rest and the failed ones.")] = False,
    *,
    run: RunSettings,
) -> None:
    """Classify many images into a CSV or JSONL file, one row per input, in input order."""
    from ofacls.writers import OutputFile

    if overwrite and resume:
        _err("--overwrite and --resume exclude each other")
        raise typer.Exit(EXIT_USAGE)
    with _errors():
        _quiet_decoders()
        with OutputFile(output, fmt=fmt.value if fmt else None, top_k=run.top_k,
                        overwrite=overwrite, resume=resume) as out:
            items = _items(inputs)
            todo = _not_yet_written(items, out.finished_counts)
            skipped = len(items) - len(todo)
            clf = _load(run)
            stats = _run(todo, clf, run.options(clf.device.type), out.write, run.quiet, progress=True)
        if not run.quiet:
            _err(f"done {stats.done}, failed {stats.failed}, skipped {skipped}, "
                 f"{stats.rate:.2f} images/s -> {out.name}")
    raise typer.Exit(EXIT_FAILED if stats.failed else 0)


@app.command()
def download(
    model_id: Annotated[str, typer.Argument(help="ModelScope model id.")] = DEFAULT_MODEL_ID,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Model revision.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(
        "--cache-dir", help="Where to keep models (default: ModelScope's cache).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Fetch a model into the local cache (unless it is complete there) and print its folder."""
    from ofacls.hub import resolve_model

    with _errors():
        folder = resolve_model(model_id, revision=revision, cache_dir=cache_dir,
                               progress=not quiet and sys.stderr.isatty())
        _out(f"{folder}\n")


@app.command()
def labels(model: ModelOpt = DEFAULT_MODEL_ID, offline: OfflineOpt = False) -> None:
    """Print the model's labels, one per line."""
    from ofacls.hub import resolve_model
    from ofacls.model.folder import ModelFolder

    with _errors():
        names = ModelFolder.open(resolve_model(model, offline=offline)).label_names()
        _out("".join(f"{n}\n" for n in names))  # inside _errors: a closed pipe stops quietly


def main() -> None:
    from ofacls.libc import share_one_malloc_arena

    share_one_malloc_arena()  # before any thread allocates, or glibc ignores it
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:  # started with the descriptor closed (`>&-`)
            setattr(sys, name, open(os.devnull, "w"))
    try:
        app()
    except BrokenPipeError:  # `ofacls ... | head`: stop quietly
        sys.stderr.close()
        os._exit(0)
    except SystemExit as done:  # click ends every command this way, successful ones too
        if "torch" in sys.modules and isinstance(done.code, (int, type(None))):
            _exit_without_teardown(done.code or 0)
        raise


def _exit_without_teardown(code: int) -> NoReturn:
    """Exit at once, skipping the interpreter's teardown.

    Once torch is loaded, finalising its modules takes 0.6-1 s of CPU after the
    last row is out, and scripts that run ofacls once per image pay it every
    time. Nothing is left to finish by then: rows are written and files closed
    (the commands close them on the way out); only the std streams' buffers remain."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe or stream: nothing can reach it any more
    os._exit(code)


__all__ = ["app", "main"]
