"""`ofacls eval`: accuracy on labelled images, and agreement between settings."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ofacls.calibration import COLUMNS as SET_COLUMNS
from ofacls.cli.app import InputsCommand, app
from ofacls.cli.feedback import EXIT_FAILED, TOLD_AT_MOST, err, one_line_errors, quiet_decoders, write_stdout
from ofacls.cli.options import (
    Decode,
    Format,
    RunSettings,
    classifying,
    completing,
    labels_arg,
    load_calibration,
    load_classifier,
    run_settings,
)
from ofacls.errors import OutputError, UsageError
from ofacls.outfile import can_resume

if TYPE_CHECKING:
    from ofacls.calibration import Calibration
    from ofacls.classifier import Classifier
    from ofacls.evaluate import Example
    from ofacls.prediction import Prediction
    from ofacls.runner import Stats


@app.command(name="eval", cls=InputsCommand)
@classifying
def evaluate(
    data: Annotated[list[str], typer.Argument(
        help="A folder with one folder per class (named by label or WordNet id), a CSV/JSONL of "
             "input,label rows (label: name, WordNet id or class index), or unlabelled inputs as "
             "batch takes them.", metavar="DATA", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="The report as one JSON object.")] = False,
    compare: Annotated[Optional[str], typer.Option(
        "--compare", metavar="KEY=VALUE", show_default=False,
        autocompletion=completing("precision=bf16", "precision=fp32", "precision=fp16", "quantize=int8",
                                  "decode=beam", "decode=exact", "device=cpu", "device=cuda", "model="),
        help="Classify again with one setting changed (precision, quantize, decode, device, "
             "model) and report top-1 agreement, top-5 overlap and the largest probability "
             "difference.")] = None,
    real_labels: Annotated[Optional[Path], typer.Option(
        "--real-labels", metavar="FILE", show_default=False,
        help="ImageNet-ReaL JSON (real.json): a list of valid class indexes per image, in "
             "file-name order; adds ReaL top-1.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="ROWS", show_default=False,
        help="Also write one row per image (batch's columns plus true_label) to a .csv, .tsv, "
             ".jsonl, .json or .parquet file.")] = None,
    fmt: Annotated[Optional[Format], typer.Option(
        "--format", "-f", help="Format of ROWS; default from the extension.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing ROWS.")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Keep ROWS' successful rows (they count in the report); classify the rest.")
    ] = False,
    calibrate: Annotated[Optional[Path], typer.Option(
        "--calibrate", metavar="CAL.json", show_default=False,
        help="Write a calibration for prediction sets made from DATA's labelled images (split "
             "conformal, LAC score): predict, batch and serve take it with --calibration.")] = None,
    coverage: Annotated[float, typer.Option(
        "--coverage", min=0.5, max=0.999, metavar="P",
        help="With --calibrate: the share of images whose prediction set must hold the true label.")
    ] = 0.9,
    *,
    run: RunSettings,
) -> None:
    """Accuracy on labelled images: top-1 and top-5 with 95% intervals, the worst classes
    and the most confused pairs; with --compare, the agreement of two settings.

    The report goes to stdout (a table, or one JSON object with --json); each failed
    input is told on stderr and left out of the accuracy. Rows hold the top
    max(K, 5) labels, as top-5 accuracy needs them.

    Examples:

      ofacls eval val/                  # val/n01440764/*.JPEG, val/goldfish/...

      ofacls eval labels.csv --json     # rows of input,label

      ofacls eval photos/ --compare precision=bf16    # needs no labels

      ofacls eval val/ -o rows.csv --resume

      ofacls eval cal/ --calibrate cal.json --coverage 0.9    # then: --calibration cal.json
    """
    from ofacls import evaluate as ev

    with one_line_errors(resumable=output is not None and can_resume(output)):
        quiet_decoders()
        if output is not None and os.fspath(output) == "-":
            raise UsageError("eval -o -: the report goes to stdout; write the rows to a file")
        if overwrite and resume:
            raise UsageError("--overwrite and --resume exclude each other")
        setting = ev.parse_setting(compare) if compare else None
        if calibrate is not None and run.calibration is not None:
            raise UsageError("--calibrate makes a calibration and --calibration uses one: give one")
        if calibrate is not None and run.decode != Decode.exact:
            raise UsageError("--calibrate needs exact decoding (beam scores are not probabilities)")
        _refuse_if_nothing_exists(data)
        names, model_labels = _label_names(run)
        examples = ev.read_data(data, ev.ClassNames(names, wnids=model_labels),
                                warn=lambda m: err(f"warning: {m}"))
        if examples and all(e.error is not None for e in examples):
            # DATA that names nothing readable: a usage error, not a report of failures
            for e in examples[:TOLD_AT_MOST]:
                err(f"{e.input}: {e.error}")
            raise UsageError("nothing to evaluate: no input named can be read")
        real = ev.real_labels(real_labels, examples) if real_labels else None
        k = max(run.top_k, 5)
        with ExitStack() as stack:
            out = None
            if output is not None:
                from ofacls.outfile import OutputFile

                columns = (*ev.ROW_COLUMNS, *(SET_COLUMNS if run.calibration is not None else ()))
                out = stack.enter_context(OutputFile(output, fmt=fmt.value if fmt else None, top_k=k,
                                                     overwrite=overwrite, resume=resume,
                                                     columns=columns))
            # checked before the model loads: a row eval did not write is refused in a second
            done = (ev.resumed_rows(out.path, out.fmt, examples, names)
                    if out is not None and out.done else {})
            clf = load_classifier(run)

            def write(pred: Prediction, example: Example) -> None:
                if not pred.ok:
                    err(f"{pred.input}: {pred.error}")
                if out is not None:
                    out.write(ev.labelled(pred, example, names))

            settings = _settings(run, clf)
            calibration = load_calibration(run, clf)
            preds, stats = _classify(examples, clf, run, k, done, write, calibration)
            if out is not None:
                out.close()  # the rows are complete before the second run starts
                if not run.quiet:
                    err(f"done {stats.done}, failed {stats.failed}, skipped {len(examples) - stats.total}, "
                        f"{stats.rate:.2f} images/s -> {out.name}")
        report = ev.score(examples, preds, names, real)
        report.resumed = len(examples) - stats.total
        report.settings = settings
        if calibration is not None:
            report.sets = ev.set_report(examples, preds, names, calibration.coverage)
        if calibrate is not None:
            report.calibration = _calibrate(calibrate, coverage, clf, run, examples, preds, names, k)
        if setting is not None:
            same = clf if setting[0] == "decode" else None
            del clf  # one model in memory at a time: two Large ones are 4 GB on a CPU
            report.agreement = _compare(setting, examples, preds, same, run, k, names)
        rendered = report.to_dict()
        if as_json:
            import json

            write_stdout(json.dumps(rendered) + "\n")
        else:
            from ofacls.render import eval_report

            eval_report(rendered, sys.stdout)
    raise typer.Exit(EXIT_FAILED if report.failed else 0)


def _refuse_if_nothing_exists(data: Sequence[str]) -> None:
    """A mistyped DATA (`eval vall/`) told before even the model's label file is read."""
    from ofacls.sources.expand import is_url
    from ofacls.sources.walk import GLOB_MAGIC

    if all(d != "-" and not is_url(d) and not GLOB_MAGIC.search(d) and not os.path.lexists(d)
           for d in data):
        for d in data[:TOLD_AT_MOST]:
            err(f"{d}: no such file or directory")
        raise UsageError("nothing to evaluate: no input named can be read")


def _settings(run: RunSettings, clf: Classifier) -> dict[str, Any]:
    """What produced the report's predictions, so a report read later names its setting."""
    folder = clf.folder
    return {**run_settings(run, clf), "folder": None if folder is None else os.fspath(folder),
            "device": str(clf.device)}


def _label_names(run: RunSettings) -> tuple[list[str], bool]:
    """The labels DATA's classes are named from, in class-index order, and whether
    they are the model's (not strings of the user's own), before the model loads: a
    misnamed class is known in a second, not after the weights are read."""
    from ofacls.hub import resolve_model
    from ofacls.labels import LabelNames
    from ofacls.model.folder import ModelFolder

    names = ModelFolder.open(resolve_model(run.model, offline=run.offline, cache_dir=run.cache_dir)
                             ).label_names()
    wanted = labels_arg(run.labels)
    if wanted is None:
        return names, True
    if LabelNames(names).has_all(wanted):
        return names, True
    return [w.strip() for w in wanted], False


def _calibrate(path: Path, coverage: float, clf: Classifier, run: RunSettings,
               examples: Sequence[Example], preds: Sequence[Prediction], names: Sequence[str],
               k: int) -> dict[str, Any]:
    """--calibrate: the threshold from the true labels' probabilities, written to `path`."""
    import dataclasses

    from ofacls.calibration import Calibration, conformal_threshold, true_probabilities

    options = dataclasses.replace(run.options(clf.device.type), top_k=k)
    probs = true_probabilities(clf, examples, preds, names, options)
    cal = Calibration(conformal_threshold(probs, coverage), coverage, len(probs), run_settings(run, clf))
    try:
        cal.save(path)
    except OSError as e:
        raise OutputError(f"cannot write calibration {path}: {e.strerror or e}") from None
    if not run.quiet:
        err(f"calibration from {len(probs)} images -> {path} (threshold {cal.threshold:.4g})")
    return {"file": os.fspath(path), "images": len(probs), "coverage": coverage,
            "threshold": cal.threshold, "score": cal.score}


def _classify(examples: Sequence[Example], clf: Classifier, run: RunSettings, k: int,
              done: Mapping[str, Prediction],
              on_row: Callable[[Prediction, Example], None] | None,
              calibration: Calibration | None = None) -> tuple[list[Prediction], Stats]:
    """Every example's Prediction (the `done` ones from ROWS), with a progress bar on
    stderr when it is a terminal; and the counts of those classified now."""
    import dataclasses

    from ofacls import evaluate as ev
    from ofacls.runner import Stats

    options = dataclasses.replace(run.options(clf.device.type, calibration), top_k=k)
    stats = Stats(total=len(examples) - _count_done(examples, done))

    def count(pred: Prediction, example: Example) -> None:
        if pred.ok:
            stats.done += 1
        else:
            stats.failed += 1
        if on_row is not None:
            on_row(pred, example)

    with _progress(stats.total, run.quiet) as on_progress:
        preds = ev.classify(examples, clf, options, done=done, on_row=count, on_progress=on_progress)
    return preds, stats


def _count_done(examples: Sequence[Example], done: Mapping[str, Prediction]) -> int:
    from ofacls.outfile import InputKeys

    key = InputKeys()
    return sum(key(e.input) in done for e in examples) if done else 0


@contextmanager
def _progress(total: int, quiet: bool) -> Iterator[Callable[[Stats], None] | None]:
    if quiet or not sys.stderr.isatty() or not total:
        yield None
        return
    from ofacls.render import progress_bar

    with progress_bar(total, sys.stderr) as on_progress:
        yield on_progress


def _compare(setting: tuple[str, str], examples: Sequence[Example], preds: Sequence[Prediction],
             same: Classifier | None, run: RunSettings, k: int, names: Sequence[str]) -> dict[str, Any]:
    """The second run, with one setting changed: its agreement with the first and, on
    labelled data, its own accuracy. `same` is the first run's classifier where only
    the decoding changes."""
    import dataclasses
    import gc

    from ofacls import evaluate as ev

    key, value = setting
    if same is not None:
        other_run, other = dataclasses.replace(run, decode=Decode(value)), same
    else:
        changed: dict[str, Any] = {key: value}  # precision, quantize, device or model: all text
        other_run = dataclasses.replace(run, **changed)
        gc.collect()  # the first model's memory, before the second one loads
        other = load_classifier(other_run)
    b, _ = _classify(examples, other, other_run, k, {}, None)
    exact = run.decode == Decode.exact and other_run.decode == Decode.exact
    out = {"setting": f"{key}={value}", **ev.agreement(preds, b, probabilities=exact)}
    second = ev.score(examples, b, names).to_dict()
    if second["labelled"]:
        out.update(labelled=second["labelled"], top1=second["top1"], top5=second["top5"])
    return out
