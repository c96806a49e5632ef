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
from typing import TYPE_CHECKING, TextIO

from ofacls.prediction import Prediction

if TYPE_CHECKING:
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
        if not probabilities:
            for heading in ("", "label", "log-prob / token", ""):
                table.add_column(heading)
        for rank, (label, score) in enumerate(pred.top_k, 1):
            table.add_row(f"{rank}.", Text(escape(label), style="bold" if rank == 1 else ""),
                          f"{score:.2%}" if probabilities else f"{score:.4f}",
                          Text("█" * round(score * 20) if probabilities else "", style="cyan"))
        console.print(table)

    return show


@contextmanager
def progress_bar(total: int, stream: TextIO) -> Iterator[Callable[[Stats], None]]:
    """A transient progress bar on `stream` (a terminal); yields the callback to feed it.

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
