"""`ofacls predict` and `ofacls batch`."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ofacls.calibration import COLUMNS as SET_COLUMNS
from ofacls.cli.app import InputsCommand, app
from ofacls.cli.feedback import (
    EXIT_FAILED,
    EXIT_USAGE,
    FailureTeller,
    err,
    one_line_errors,
    quiet_decoders,
    stdout_failed,
    write_stdout,
)
from ofacls.cli.options import (
    Decode,
    Format,
    InputColOpt,
    InputsArg,
    KeepColsOpt,
    NullOpt,
    RunSettings,
    classifying,
    labels_arg,
    load_calibration,
    load_classifier,
    table_columns,
)
from ofacls.errors import UsageError

if TYPE_CHECKING:
    from ofacls.classifier import Classifier
    from ofacls.prediction import Prediction
    from ofacls.runner import Item, Options, Stats
    from ofacls.sources.expand import TableColumns
    from ofacls.sources.parts import Part
    from ofacls.sources.walk import BadInput, Source


def _items(inputs: list[str], run: RunSettings, null: bool,
           columns: TableColumns | None = None) -> Sequence[Item] | Iterator[Item]:
    """Every input, expanded; the ones naming nothing readable carry their error.

    With a list on stdin (`-`), a table, a shard or an object store the items
    stream: the first images are classified while the list is still being written
    (`find ... | ofacls batch -`), and a table of millions of rows never sits in
    memory. Otherwise they are expanded at once into a list and each bad one is
    reported right away: a mistyped path is known before the model loads (which
    takes seconds), while the other inputs still run; when none can be read it is
    a usage error."""
    from ofacls.runner import Item
    from ofacls.sources.expand import Source, TableColumns, expand_inputs, streams

    if "-" in inputs and sys.stdin is not None and sys.stdin.isatty():
        err("reading a list of inputs from stdin, "
            f"{'NUL-separated' if null else 'one per line'} (end it with Ctrl-D)")
    items = (Item(e.name, e) if isinstance(e, Source) else Item(e.name, error=e.error)
             for e in expand_inputs(inputs, stdin=getattr(sys.stdin, "buffer", sys.stdin), null=null,
                                    max_bytes=run.max_download, columns=columns or TableColumns()))
    if any(streams(i) for i in inputs):
        return items
    listed = list(items)
    for item in listed:
        if item.error is not None:
            err(f"{item.name}: {item.error}")
    if listed and all(item.error is not None for item in listed):
        # a mistyped path as the only input: a usage error, before the model loads
        # (seconds) and before OUT exists (which a corrected rerun would then refuse)
        raise UsageError("nothing to classify: no input named can be read")
    return listed


def _told(items: Sequence[Item] | Iterator[Item]) -> set[str]:
    """The inputs _items already named on stderr (a streamed list names none up front)."""
    return {i.name for i in items if i.error is not None} if isinstance(items, Sequence) else set()


class _NotYetWritten:
    """The items whose rows are not in the resumed file (compared by input_key),
    as a stream; `skipped` counts the others so far."""

    def __init__(self, items: Iterable[Item], done: set[str] | Counter[str]) -> None:
        from ofacls.resume import AlreadyDone

        self._items, self._done = items, AlreadyDone(done)
        self.skipped = 0

    def __iter__(self) -> Iterator[Item]:
        for item in self._items:
            if not self._done.take(item.name):
                yield item
            else:
                self.skipped += 1


def _run(items: Iterable[Item], clf: Classifier, options: Options,
         on_row: Callable[[Prediction], None], quiet: bool, progress: bool) -> Stats:
    """Run the batch, with a progress bar on stderr when it is a terminal (its
    total unknown while the inputs stream)."""
    from ofacls import runner
    from ofacls.render import progress_bar

    total = len(items) if isinstance(items, Sequence) else 0
    if not (progress and not quiet and sys.stderr.isatty()):
        return runner.run(items, clf, options, on_row, total=total)
    with progress_bar(total or None, sys.stderr) as on_progress:
        return runner.run(items, clf, options, on_row, on_progress, total=total)


@app.command(cls=InputsCommand)
@classifying
def predict(
    inputs: InputsArg,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per input per line.")] = False,
    null: NullOpt = False,
    input_col: InputColOpt = None,
    keep_cols: KeepColsOpt = None,
    *,
    run: RunSettings,
) -> None:
    """Classify images and print their top-k labels: a line (or table) for every input.

    On a terminal: a small table per image. Piped: input, then label<TAB>score for
    each of the top k, tab-separated (a failed input: input<TAB>error: why). --json:
    {"input", "label", "score", "index", "top_k", "error"} per line. Failed inputs
    are also told on stderr, one line each, and make the exit code 1.

    Examples:

      ofacls predict cat.jpg https://example.com/dog.jpg

      ofacls predict -k 3 --json photos/ | jq -r .label

      find . -name '*.jpg' -print0 | ofacls predict -0 -

      cat photo.jpg | ofacls predict -
    """
    with one_line_errors():
        quiet_decoders()
        items = _items(inputs, run, null, table_columns(input_col, keep_cols))
        clf = load_classifier(run)
        calibration = load_calibration(run, clf)
        show = _printer(as_json, probabilities=run.decode == Decode.exact, told=_told(items))
        stats = _run(items, clf, run.options(clf.device.type, calibration), show, run.quiet,
                     progress=False)
    raise typer.Exit(EXIT_FAILED if stats.failed else 0)


def _printer(as_json: bool, probabilities: bool, told: set[str]) -> Callable[[Prediction], None]:
    """How `predict` shows each row: JSON lines, a table on a terminal, tab-separated
    lines otherwise. Every input gets its line, a failed one with its error (and,
    off a terminal, the one-line error on stderr too); on a terminal a failure
    already named on stderr (`told`, before the model loaded) is not shown again."""
    from ofacls import render

    if not as_json and sys.stdout.isatty():
        table = render.table_printer(sys.stdout, probabilities)

        def show_table(pred: Prediction) -> None:
            if not pred.ok and pred.input in told:
                return
            try:
                table(pred)
            except BrokenPipeError:
                raise
            except OSError as e:
                raise stdout_failed(e) from None

        return show_table
    line = render.json_line if as_json else render.tsv_line

    def show_line(pred: Prediction) -> None:
        write_stdout(line(pred))
        if not pred.ok and pred.input not in told:
            err(f"{pred.input}: {pred.error}")

    return show_line


class Engine(str, Enum):
    local = "local"
    ray = "ray"


@app.command(cls=InputsCommand)
@classifying
def batch(
    inputs: InputsArg,
    output: Annotated[str, typer.Option("--output", "-o", metavar="OUT",
                                        help="Output file (.csv, .tsv, .jsonl, .json or .parquet), "
                                             "- for stdout, or a folder (DIR/, local or s3://...) "
                                             "of parts of --shard-rows rows.",
                                        show_default=False)],
    shard_rows: Annotated[int, typer.Option(
        "--shard-rows", min=1, metavar="N",
        help="With a folder as OUT: rows per part (part-00000.EXT, ...).")] = 100_000,
    fmt: Annotated[Optional[Format], typer.Option(
        "--format", "-f", help="Output format; default from the extension.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Keep OUT's successful rows; classify the rest and the failed ones.")] = False,
    engine: Annotated[Engine, typer.Option(
        "--engine", help="local: this process; ray: a Ray cluster (pip install 'ofacls[ray]').")
    ] = Engine.local,
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", envvar="RAY_ADDRESS", metavar="ADDR",
        help="With --engine ray: the cluster to join (default: a local Ray instance for this run).")] = None,
    actors: Annotated[Optional[int], typer.Option(
        "--actors", min=1, metavar="N", show_default=False,
        help="With --engine ray: model replicas.  [default: one per node on CPUs, one per GPU]")] = None,
    gpus_per_actor: Annotated[Optional[float], typer.Option(
        "--gpus-per-actor", min=0, metavar="G", show_default=False,
        help="With --engine ray: GPUs per replica (0.5: two share one).  [default: 1 where the "
             "cluster has GPUs, else 0]")] = None,
    null: NullOpt = False,
    input_col: InputColOpt = None,
    keep_cols: KeepColsOpt = None,
    *,
    run: RunSettings,
) -> None:
    """Classify many images into a CSV, TSV, JSONL, JSON or Parquet file, one row per input,
    in input order.

    Examples:

      ofacls batch ./photos -o out.csv

      ofacls batch urls.txt 'shots/**/*.png' -o out.jsonl --top-k 5

      ofacls batch ./photos -o out.csv --resume      # after Ctrl-C or a crash
    """
    from ofacls.outfile import OutputFile, can_resume
    from ofacls.shardout import ShardedOutput, is_sharded
    from ofacls.sources.objects import is_object_url
    from ofacls.sources.parts import plan, read_on_cluster

    if overwrite and resume:
        err("--overwrite and --resume exclude each other")
        raise typer.Exit(EXIT_USAGE)
    with one_line_errors(resumable=can_resume(output), stdin="-" in inputs):
        quiet_decoders()
        if engine == Engine.ray:
            from ofacls.ray import check_address, require_ray


            require_ray()  # before OUT or stdin is touched
            check_address(ray_address)
        # named inputs are expanded before OUT and the model: a mistyped path is told at once
        columns = table_columns(input_col, keep_cols)
        # on Ray, tables and shards are read by the cluster's workers, never listed here
        parted = engine == Engine.ray and any(read_on_cluster(i) for i in inputs)
        items = iter(()) if parted else _items(inputs, run, null, columns)
        # a resume keeps the failed rows of inputs this run does not name (a list on
        # stdin may name any: its failed rows are all retried)
        named = [i.name for i in items] if isinstance(items, Sequence) else None
        if is_object_url(output) and not is_sharded(output):
            raise UsageError(f"-o {output}: in an object store OUT is a folder of parts: end it with /")
        row_columns = (*(SET_COLUMNS if run.calibration is not None else ()), *columns.keep)
        out: OutputFile | ShardedOutput
        if is_sharded(output):
            out = ShardedOutput(output, fmt=fmt.value if fmt else None, top_k=run.top_k,
                                shard_rows=shard_rows, overwrite=overwrite, resume=resume,
                                columns=row_columns)
        else:
            out = OutputFile(output, fmt=fmt.value if fmt else None, top_k=run.top_k,
                             overwrite=overwrite, resume=resume, retry=named, columns=row_columns)
        with out:
            todo = _NotYetWritten(items, out.done)
            # the driver of a Ray run sizes the work up front; a stream stays a stream
            work = list(todo) if isinstance(items, Sequence) or engine == Engine.ray else todo
            tell = FailureTeller(f"their rows in {out.name} say why", _told(items),
                                 total=len(work) if isinstance(work, list) and not parted else None)

            def write(pred: Prediction) -> None:
                out.write(pred)
                tell(pred)

            # rows on the terminal are the progress: a bar would draw over them
            bar = not (os.fspath(output) == "-" and sys.stdout.isatty())
            if parted:
                parts = list(plan(inputs, lambda arg: _expanded(arg, run, null, columns)))
                stats = _run_on_ray([], run, write, ray_address, actors, gpus_per_actor, progress=bar,
                                    parts=parts, columns=columns, done=out.done)
                todo.skipped = stats.skipped
            elif isinstance(work, list) and engine == Engine.ray:
                stats = _run_on_ray(work, run, write, ray_address, actors, gpus_per_actor, progress=bar)
            else:
                clf = load_classifier(run)
                stats = _run(work, clf, run.options(clf.device.type, load_calibration(run, clf)),
                             write, run.quiet, progress=bar)
            skipped = todo.skipped
        if not run.quiet:
            err(f"done {stats.done}, failed {stats.failed}, skipped {skipped}, "
                 f"{stats.rate:.2f} images/s -> {out.name}")
    raise typer.Exit(EXIT_FAILED if stats.failed else 0)


def _expanded(arg: str, run: RunSettings, null: bool, columns: TableColumns) -> Iterator[Source | BadInput]:
    """One input expanded as _items expands it (stdin included), for a Ray run's plan."""
    from ofacls.sources.expand import expand_inputs

    return expand_inputs([arg], stdin=getattr(sys.stdin, "buffer", sys.stdin), null=null,
                         max_bytes=run.max_download, columns=columns)


def _run_on_ray(items: list[Item], run: RunSettings, on_row: Callable[[Prediction], None],
                address: str | None, actors: int | None, gpus_per_actor: float | None,
                progress: bool, parts: list[Part] | None = None, columns: TableColumns | None = None,
                done: set[str] | Counter[str] | None = None) -> Stats:
    """`batch --engine ray`: the same rows, classified on a Ray cluster (ofacls.ray):
    the items, or else the `parts` the cluster reads itself (then `done`, the
    resumed OUT's keys, are passed by). Unless quiet, each phase that takes seconds
    (starting or joining Ray, loading the model) is a line on stderr as it starts,
    and a progress bar follows the rows on a terminal."""
    from contextlib import ExitStack

    from ofacls.ray import Settings, run_batch, run_parts
    from ofacls.render import progress_bar

    labels = labels_arg(run.labels)
    calibration = None
    if run.calibration is not None:  # its file read here; each actor checks its settings
        from ofacls.calibration import Calibration

        calibration = Calibration.load(run.calibration).to_dict()
    settings = Settings(model=run.model, device=run.device, precision=run.precision,
                        labels=tuple(labels) if labels is not None else None, top_k=run.top_k,
                        decode=run.decode.value, batch_size=run.batch_size, workers=run.workers,
                        timeout=run.timeout, max_bytes=run.max_download, max_pixels=run.max_pixels,
                        quantize=run.quantize, offline=run.offline,
                        cache_dir=os.fspath(run.cache_dir) if run.cache_dir is not None else None,
                        calibration=calibration)
    with ExitStack() as stack:
        bar: list[Callable[[Stats], None]] = []

        def on_progress(stats: Stats) -> None:
            if not bar:  # opened with the first row: the phase lines stay above it
                total = None if parts is not None else len(items)
                bar.append(stack.enter_context(progress_bar(total, sys.stderr)))
            bar[0](stats)

        show_bar = progress and not run.quiet and sys.stderr.isatty()
        how: dict[str, Any] = dict(address=address, actors=actors, gpus_per_actor=gpus_per_actor,
                                   on_progress=on_progress if show_bar else None,
                                   on_phase=None if run.quiet else err)
        if parts is not None:
            return run_parts(parts, settings, on_row, columns=columns, done=done, **how)
        return run_batch(items, settings, on_row, **how)
