"""The terminal views: `predict`'s table, its piped and JSON lines, the batch
progress bar. The only module that imports rich (inside the functions).

Text that came from outside (file names, URLs, error messages that quote them)
is shown on a terminal with its control characters escaped, as `ls` does, so a
name cannot clear the screen, retitle the window or write the clipboard; data
written to pipes and files keeps it exact.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from ofacls.prediction import Prediction

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from ofacls.runner import Stats

# C0 and C1 controls, DEL, and the lone surrogates that stand for bytes of a
# name that is not valid UTF-8 (os.fsdecode's surrogateescape)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\udc80-\udcff]")
# a tab or line break in a file name would split a tab-separated line
_TSV_ESCAPES = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"})


def escape(text: str) -> str:
    """`text` safe to show on a terminal: each control character as `\\xNN`
    (`\\n`, `\\t` and `\\r` by name), each undecodable byte as `\\xNN`."""

    def one(m: re.Match[str]) -> str:
        c = m.group()
        named = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c)
        if named:
            return named
        code = ord(c)
        return f"\\x{code - 0xDC00 if code >= 0xDC80 else code:02x}"

    return _UNSAFE.sub(one, text)


def tsv_line(pred: Prediction) -> str:
    """`predict`'s piped line: input, then label and score for each of the top k,
    tab-separated; a failed input is `input<TAB>error: why`."""
    name = pred.input.translate(_TSV_ESCAPES)
    if not pred.ok:
        return f"{name}\terror: {pred.error}\n"
    pairs = "".join(f"\t{label.translate(_TSV_ESCAPES)}\t{score:.6g}" for label, score in pred.top_k)
    return f"{name}{pairs}\n"


def json_line(pred: Prediction) -> str:
    """`predict --json`'s line: the Prediction.to_dict object. Never NaN (scores
    that are not finite are error rows), so it is strict JSON."""
    return json.dumps(pred.to_dict(), ensure_ascii=False, allow_nan=False) + "\n"


def table_printer(stream: TextIO, probabilities: bool) -> Callable[[Prediction], None]:
    """A small table per image, for a terminal. `probabilities`: scores are
    probabilities (exact mode), shown as percentages with a bar; otherwise they
    are beam mode's length-normalised log-probabilities, and the header says so."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(file=stream)

    def show(pred: Prediction) -> None:
        # Text, not strings: a name or label holding "[red]" is shown, not obeyed.
        # The name is its own line, not the table's title, which wraps to the
        # table's width and would break a long path in two.
        console.print(Text(escape(pred.input)), soft_wrap=True)
        if not pred.ok:
            console.print(Text(f"  error: {escape(pred.error or '')}", style="red"), soft_wrap=True)
            return
        table = Table(show_header=not probabilities, box=None, padding=(0, 1))
        # numbers right-aligned, so 9.50% and 85.20% line up on their decimal point
        columns = (("", "right"), ("label", "left"), ("log-prob / token", "right"), ("", "left"))
        for heading, justify in columns:
            table.add_column(heading if not probabilities else "", justify=justify)  # type: ignore[arg-type]
        for rank, (label, score) in enumerate(pred.top_k, 1):
            table.add_row(f"{rank}.", Text(escape(label), style="bold" if rank == 1 else ""),
                          f"{score:.2%}" if probabilities else f"{score:.4f}",
                          Text("█" * round(score * 20) if probabilities else "", style="cyan"))
        console.print(table)
        if pred.prediction_set is not None:
            console.print(prediction_set_line(pred.prediction_set), soft_wrap=True)

    return show


def prediction_set_line(kept: list[str]) -> Text:
    """A prediction set under its image's table; marked where it is not one label
    (the model is unsure: several labels, or none, reach the threshold)."""
    from rich.text import Text

    if len(kept) == 1:
        return Text(f"  set: {escape(kept[0])}")
    if not kept:
        return Text("  set: empty - no label is likely enough (unsure)", style="yellow")
    return Text(f"  set of {len(kept)}: {escape(', '.join(kept))} (unsure)", style="yellow")


@contextmanager
def progress_bar(total: int | None, stream: TextIO) -> Iterator[Callable[[Stats], None]]:
    """A transient progress bar on `stream` (a terminal); yields the callback to feed it.
    `total` None: not known yet (inputs that stream), so no time left is shown.

    The rate and time left leave out the first batch, whose time is mostly the
    model's warm-up (first allocations, lazy kernels): counted as steady speed,
    it made the first estimate several times too short."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(TextColumn("classifying"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[failed]} failed"),
                   TextColumn("{task.fields[eta]}"),
                   console=Console(file=stream), transient=True)
    task = bar.add_task("classifying", total=total, rate="", failed=0, eta="")
    # when the first batch's rows had all come out, and how many they were: its
    # rows arrive together, so the clock starts after the last of them
    start: dict[str, float] = {}

    def update(stats: Stats) -> None:
        seen = stats.done + stats.failed
        now = time.perf_counter()
        if "at" not in start or (start["burst"] and now - start["at"] < 0.05):
            start.update(at=now, seen=seen, burst=1)
        else:
            start["burst"] = 0
        elapsed, counted = now - start["at"], seen - start["seen"]
        rate = counted / elapsed if elapsed > 0 and counted > 0 else 0.0
        left = stats.total - seen
        eta = f"{_clock(left / rate)} left" if rate > 0 and left > 0 else ""
        bar.update(task, completed=seen, failed=stats.failed,
                   rate=f"{rate:.2f} img/s" if rate > 0 else "", eta=eta)

    with bar:
        yield update


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def eval_report(report: dict[str, object], stream: TextIO) -> None:
    """`ofacls eval`'s terminal view of an evaluate.Report.to_dict()."""
    from rich.console import Console

    console = Console(file=stream, highlight=False)
    r: dict = dict(report)
    with console.capture() as captured:
        _eval_report(console, r)
    # rich pads every table cell to its column's width: a piped report has no trailing spaces
    stream.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def _eval_report(console: Console, r: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    def say(text: str) -> None:
        # a Text: names from outside are never read as markup; one line each, never wrapped
        console.print(Text(text), soft_wrap=True)

    def pct(block: dict | None, of: int) -> str:
        if not block or block.get("accuracy") is None:
            return "n/a"
        lo, hi = block["ci95"]
        return f"{block['accuracy']:.2%} {block['correct']}/{of}  (95% CI {lo:.2%}-{hi:.2%})"

    settings = r.get("settings")
    if settings:
        revision = f" (revision {settings['revision']})" if settings.get("revision") else ""
        quantize = f" {settings['quantize']}" if settings.get("quantize") else ""
        say(f"model {escape(str(settings['model']))}{revision}, "
            f"{settings['device']} {settings['precision']}{quantize}, decode {settings['decode']}, "
            f"labels {settings.get('labels') or 'all'}")
    resumed = f", {r['resumed']} from the rows file" if r.get("resumed") else ""
    say(f"images {r['images']} ({r['failed']} failed{resumed}), labelled {r['labelled']}")
    if r["labelled"]:
        say(f"top-1 {pct(r['top1'], r['labelled'])}")
        say(f"top-5 {pct(r['top5'], r['labelled'])}")
    if "real_top1" in r:
        say(f"ReaL top-1 {pct(r['real_top1'], r['real_top1']['images'])}")
    if r["worst_classes"]:
        t = Table(title="worst classes", box=None, title_justify="left")
        for h in ("class", "correct", "images", "top-1"):
            t.add_column(h)
        for c in r["worst_classes"]:
            t.add_row(Text(escape(c["label"])), str(c["correct"]), str(c["images"]), f"{c['accuracy']:.0%}")
        console.print(t)
    if r["confused"]:
        t = Table(title="most confused", box=None, title_justify="left")
        for h in ("true", "predicted", "count"):
            t.add_column(h)
        for c in r["confused"]:
            t.add_row(Text(escape(c["true"])), Text(escape(c["predicted"])), str(c["count"]))
        console.print(t)
    cmp = r.get("compare")
    if cmp:
        with_ = f"with {escape(cmp['setting'])}:"
        diff = cmp["max_prob_diff"]
        lo, hi = cmp["top1_ci95"] or (0.0, 1.0)
        agree = (f" = {cmp['top1_agreement']:.2%} (95% CI {lo:.2%}-{hi:.2%})"
                 f", top-5 overlap {cmp['top5_overlap']:.3f}" if cmp["images"] else "")
        say(f"{with_} top-1 agreement {cmp['top1_agree']}/{cmp['images']}{agree}, "
            f"largest probability difference {'n/a' if diff is None else f'{diff:.4f}'}")
        if "top1" in cmp:
            say(f"{with_} top-1 {pct(cmp['top1'], cmp['labelled'])}")
            say(f"{with_} top-5 {pct(cmp['top5'], cmp['labelled'])}")
    sets = r.get("prediction_sets")
    if sets and sets["images"]:
        lo, hi = sets["ci95"]
        say(f"prediction sets: coverage {sets['coverage']:.2%} {sets['covered']}/{sets['images']} "
            f"(95% CI {lo:.2%}-{hi:.2%}, target {sets['target']:.0%}), mean size "
            f"{sets['mean_set_size']:.2f}, {sets['single_label_sets']} of one label, "
            f"{sets['empty_sets']} empty")
        t = Table(title="least covered classes", box=None, title_justify="left")
        for h in ("class", "covered", "images", "coverage", "mean size"):
            t.add_column(h)
        for c in sets["worst_classes"]:
            t.add_row(Text(escape(c["label"])), str(c["covered"]), str(c["images"]),
                      f"{c['coverage']:.0%}", f"{c['mean_set_size']:.2f}")
        console.print(t)
    cal = r.get("calibration")
    if cal:
        say(f"calibration: threshold {cal['threshold']:.6g} for coverage {cal['coverage']:.0%} "
            f"from {cal['images']} images ({cal['score'].upper()} score) -> {escape(cal['file'])}")


def info_text(facts: dict[str, Any]) -> str:
    """`ofacls info`'s view of model.describe's dict: a section per part, `key: value`
    lines, long lists cut short."""
    lines: list[str] = []

    def show(value: Any) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{k} {show(v)}" for k, v in value.items())
        if isinstance(value, list):
            return ", ".join(show(v) for v in value) if value else "none"
        return "none" if value is None else str(value)

    for key, value in facts.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            for k, v in value.items():
                if k == "first":
                    v = [f"{e['index']} {e['label']}" for e in v]
                lines.append(f"  {k}: {show(v)}")
        elif isinstance(value, list):  # the weight files
            lines.append(f"{key}:")
            for entry in value:
                rest = {k: v for k, v in entry.items() if k != "file"}
                lines.append(f"  {entry.get('file')}: {show(rest)}")
        else:
            lines.append(f"{key}: {show(value)}")
    # a label or path from elsewhere stays on its line
    return "".join(line.translate(_TSV_ESCAPES) + "\n" for line in lines)
