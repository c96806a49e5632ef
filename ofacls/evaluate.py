"""`ofacls eval`: accuracy on labelled images, and agreement between two settings.

DATA is a folder tree with one folder per class (named by the class's label, as
`ofacls labels` prints it, or by its WordNet id such as n01440764), a CSV or JSONL
file of `input,label` rows (a label name, a WordNet id or a class index), or any
input `ofacls batch` takes (then unlabelled: only agreement can be reported).

A label file is read as its format says: lines end at `\n` alone (a form feed or
U+2028 inside a name or a JSON string is text, not a line break), a CSV record is
one line (a quoted field left open at its line's end is an error naming the line,
not a record that swallows the rows after it), and a line is at most LINE_LIMIT
bytes (read no further: a 300 MB "line" is refused, not held in memory).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ofacls.errors import OutputError, UsageError
from ofacls.labels import LabelNames
from ofacls.prediction import Prediction
from ofacls.sources.tables import is_table

if TYPE_CHECKING:
    from ofacls.classifier import Classifier
    from ofacls.runner import Item, Options, Stats
    from ofacls.sources.expand import BadInput, Source

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval
# The longest line a label file may have, its newline included. Far past any path
# (PATH_MAX is 4096) or URL a row names, and under the csv module's default field
# limit (128 KiB), so a CSV field can never reach that limit on one line.
LINE_LIMIT = 64 * 1024
_BOM = b"\xef\xbb\xbf"
SHOWN_NAMES = 5  # file names a warning lists before it only counts the rest


def imagenet_wnids() -> list[str]:
    """ImageNet-1K's WordNet ids in class-index order (the sorted ILSVRC order)."""
    text = resources.files("ofacls").joinpath("data/imagenet_wnids.txt").read_text(encoding="ascii")
    return text.split()


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: sound near 0 and 1 and for small n,
    where the normal approximation leaves [0, 1]."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at p = 0 and p = 1 the bounds are exactly 0 and 1; the formula leaves rounding
    # dust there (5.6e-17), which a report would print
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


class ClassNames:
    """Resolves a class as DATA names it (label, WordNet id or index) to its class index."""

    def __init__(self, labels: Sequence[str], wnids: bool = True) -> None:
        """`wnids`: whether the labels are ImageNet's (a user's own strings are not)."""
        self.labels = list(labels)
        self._names = LabelNames(self.labels)
        self._wnids = ({w: i for i, w in enumerate(imagenet_wnids())}
                       if wnids and len(self.labels) == 1000 else {})

    def resolve(self, name: str, *, numbers: bool) -> int:
        """A label (LabelNames' rule), then a WordNet id, then (rows only) a class
        index; otherwise a UsageError naming the nearest labels."""
        text = name.strip()
        found = self._names.find(text)
        if found is None:
            found = self._wnids.get(text)
        if found is not None:
            return found
        if numbers and text.isdigit():
            if int(text) < len(self.labels):
                return int(text)
            raise UsageError(f"class index {text} is out of range: this model has classes "
                             f"0-{len(self.labels) - 1}")
        raise UsageError(f"unknown class {name!r}: not a label of this model"
                         f"{' nor an ImageNet WordNet id' if self._wnids else ''}; "
                         f"the nearest labels are {', '.join(map(repr, self.nearest(text)))} "
                         "(ofacls labels lists them all)")

    def nearest(self, name: str, n: int = 3) -> list[str]:
        return self._names.nearest(name, n)


@dataclass(frozen=True)
class Example:
    """One input to classify, with its true class index (None: unlabelled): a `source`
    to read, or the `error` of an input that names nothing readable."""

    input: str
    truth: int | None
    source: Source | None = None
    error: str | None = None

    def item(self) -> Item:
        from ofacls.runner import Item

        return Item(self.input, self.source, error=self.error)


def read_data(data: Sequence[str], names: ClassNames, *,
              warn: Callable[[str], None] | None = None) -> list[Example]:
    """DATA arguments -> examples, in a stable order (class folders sorted by name).
    `warn` is told of images that a class-folder tree holds but does not evaluate."""
    from ofacls.sources.expand import expand_inputs

    out: list[Example] = []
    plain: list[str] = []

    def flush() -> None:
        out.extend(_example(e, None) for e in expand_inputs(plain))
        plain.clear()

    for arg in data:
        path = Path(arg)
        suffix = path.suffix.lower()
        folders = _class_folders(path) if path.is_dir() else []
        if path.is_file() and suffix in (".csv", ".jsonl", ".ndjson"):
            flush()
            out.extend(_read_rows(path, names))
        elif path.is_file() and is_table(arg):  # Parquet, TSV, gzipped: batch's table reader
            flush()
            out.extend(_table_examples(arg, names))
        elif folders:
            flush()
            for folder in folders:
                truth = names.resolve(folder.name, numbers=False)
                out.extend(_example(e, truth) for e in expand_inputs([os.path.join(arg, folder.name)]))
            beside = _images_beside(path)
            if beside and warn is not None:
                warn(_beside_message(arg, beside))
        else:
            plain.append(arg)
    flush()
    return out


def _table_examples(table: str, names: ClassNames) -> Iterator[Example]:
    """A table's rows (as `batch` reads tables: its input column) with their `label`
    column's class; a row whose label is empty is unlabelled."""
    from ofacls.sources.expand import Source, TableColumns, expand_inputs

    for found in expand_inputs([table], columns=TableColumns(keep=("label",))):
        label = found.extra.get("label") if isinstance(found, Source) and found.extra else None
        text = "" if label is None else str(label).strip()
        truth = names.resolve(text, numbers=True) if text else None
        yield _example(found, truth)


def _example(found: Source | BadInput, truth: int | None) -> Example:
    from ofacls.sources.expand import Source

    if isinstance(found, Source):
        return Example(found.name, truth, source=found)
    return Example(found.name, truth, error=found.error)


def _class_folders(path: Path) -> list[Path]:
    try:
        return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.name)
    except OSError:
        return []  # unlistable: taken as a plain input, whose walk tells why in its row


def _images_beside(path: Path) -> list[str]:
    """The names of the images in a class-folder tree's top folder: they have no class,
    so they are not evaluated (hidden files and other files are not images to tell of)."""
    from ofacls.sources.walk import is_image_name

    return sorted(p.name for p in path.iterdir()
                  if not p.name.startswith(".") and is_image_name(p.name) and p.is_file())


def _beside_message(arg: str, beside: Sequence[str]) -> str:
    n = len(beside)
    shown = ", ".join(beside[:SHOWN_NAMES]) + (f" and {n - SHOWN_NAMES} more" if n > SHOWN_NAMES else "")
    return (f"{arg}: {n} {'image' if n == 1 else 'images'} beside the class folders "
            f"{'is' if n == 1 else 'are'} not evaluated: {shown}")


def _read_rows(path: Path, names: ClassNames) -> list[Example]:
    """`input,label` rows (CSV with or without that header; JSONL objects with both keys).
    A relative input is taken relative to the data file's folder; an input that names
    several images (a folder, a glob) gives each of them the row's label."""
    from ofacls.sources.expand import expand_inputs

    try:
        with open(path, "rb") as f:
            rows = list(_csv_rows(f, path) if path.suffix.lower() == ".csv" else _jsonl_rows(f, path))
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    base = path.parent
    out: list[Example] = []
    for n, inp, lab in rows:
        try:
            truth = names.resolve(lab, numbers=True) if lab.strip() else None
        except UsageError as e:
            raise UsageError(f"{path} line {n}: {e}") from None
        where = inp if os.path.isabs(inp) or "://" in inp else str(base / inp)
        out.extend(_example(e, truth) for e in expand_inputs([where]))
    return out


def _lines(f: BinaryIO, path: Path) -> Iterator[tuple[int, str]]:
    """A label file's lines (number from 1, text with its line ending), split at b"\n"
    only, each read no further than LINE_LIMIT bytes. Bytes that are not UTF-8 are
    kept as surrogate escapes, as os.scandir gives such file names, so a name in a
    row reaches the same file."""
    n = 0
    while raw := f.readline(LINE_LIMIT + 1):
        n += 1
        if len(raw) > LINE_LIMIT:
            raise UsageError(f"{path} line {n} is longer than {LINE_LIMIT // 1024} KiB: "
                             "not an input,label row")
        yield n, (raw.removeprefix(_BOM) if n == 1 else raw).decode("utf-8", "surrogateescape")


def _csv_rows(f: BinaryIO, path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, input, label) of each CSV record, one record a line."""
    lines = _lines(f, path)
    start = 0  # the line the record being read starts on
    taken = 0  # lines handed to the csv reader so far
    exhausted = False

    def one_line() -> Iterator[str]:
        nonlocal taken, exhausted
        for n, text in lines:
            if n > start:
                # the reader wants a second line: a quote opened on `start` is still
                # open, and would take every line after it into one field
                raise UsageError(_unclosed(path, start))
            taken = n
            yield text
        exhausted = True

    # strict: a quoted field still open at the end of the file is an error, not a field
    reader = csv.reader(one_line(), strict=True)
    while True:
        start = taken + 1
        try:
            rec = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if exhausted:  # the last line's quote: strict mode's "unexpected end of data"
                raise UsageError(_unclosed(path, start)) from None
            why = ("holds a carriage return inside an unquoted field (quote the field)"
                   if "new-line character" in str(e) else f"is not valid CSV ({e})")
            raise UsageError(f"{path} line {start} {why}") from None
        header = start == 1 and [c.strip().lower() for c in rec[:2]] == ["input", "label"]
        if rec and not header:
            yield start, rec[0], rec[1] if len(rec) > 1 else ""


def _unclosed(path: Path, line: int) -> str:
    return (f"{path} line {line} opens a quoted field that is not closed on that line "
            "(a field of a label file cannot hold a newline)")


def _jsonl_rows(f: BinaryIO, path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, input, label) of each JSON object, one object a line."""
    for n, line in _lines(f, path):
        if not line.strip(" \t\r\n"):  # JSON's own whitespace: a form feed is no blank line
            continue
        try:
            obj = json.loads(line)
            label = obj.get("label")
            yield n, str(obj["input"]), "" if label is None else str(label)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"{path} line {n} is not an {{\"input\", \"label\"}} object") from None


@dataclass(frozen=True)
class LabelledPrediction(Prediction):
    """A Prediction with the true label, as `ofacls eval -o` writes its rows."""

    true_label: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "true_label": self.true_label}


ROW_COLUMNS = ("true_label",)  # what eval's rows add to batch's columns


def labelled(pred: Prediction, example: Example, labels: Sequence[str]) -> LabelledPrediction:
    return LabelledPrediction(pred.input, pred.label, pred.score, pred.top_k, pred.error, pred.indices,
                              pred.prediction_set,
                              true_label=None if example.truth is None else labels[example.truth])


@dataclass
class Report:
    """What `ofacls eval` reports; `to_dict` is its --json object."""

    images: int = 0
    failed: int = 0
    labelled: int = 0
    top1: int = 0
    top5: int = 0
    per_class: dict[str, list[int]] = field(default_factory=dict)  # label -> [right, total]
    confused: Counter[tuple[str, str]] = field(default_factory=Counter)
    real: tuple[int, int] | None = None  # (right, counted)
    agreement: dict[str, Any] | None = None
    resumed: int = 0  # predictions taken from an earlier run's rows
    settings: dict[str, Any] | None = None  # what produced the predictions: model, decode, ...
    sets: dict[str, Any] | None = None  # prediction sets against the truth (set_report)
    calibration: dict[str, Any] | None = None  # the calibration this run made

    def to_dict(self) -> dict[str, Any]:
        n = self.labelled
        acc = {k: {"correct": c, "accuracy": c / n if n else None, "ci95": list(wilson(c, n)) if n else None}
               for k, c in (("top1", self.top1), ("top5", self.top5))}
        worst = sorted(self.per_class.items(), key=lambda kv: (kv[1][0] / kv[1][1], -kv[1][1], kv[0]))[:10]
        out: dict[str, Any] = {
            **({"settings": self.settings} if self.settings is not None else {}),
            "images": self.images, "failed": self.failed, "resumed": self.resumed, "labelled": n, **acc,
            "worst_classes": [{"label": k, "correct": r, "images": t, "accuracy": r / t}
                              for k, (r, t) in worst],
            "confused": [{"true": a, "predicted": b, "count": c}
                         for (a, b), c in sorted(self.confused.items(), key=lambda kv: (-kv[1], kv[0]))[:10]],
        }
        if self.real is not None:
            r, c = self.real
            out["real_top1"] = {"correct": r, "images": c, "accuracy": r / c if c else None,
                                "ci95": list(wilson(r, c)) if c else None}
        if self.agreement is not None:
            out["compare"] = self.agreement
        if self.sets is not None:
            out["prediction_sets"] = self.sets
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out


def set_report(examples: Sequence[Example], preds: Sequence[Prediction], labels: Sequence[str],
               target: float) -> dict[str, Any]:
    """How the prediction sets did on labelled images: coverage (the share whose set
    holds the true label, with its 95% interval, against the `target`), mean set
    size, empty and single-label sets, and the classes covered least."""
    n = covered = size = empty = single = 0
    per_class: dict[str, list[int]] = {}  # label -> [covered, images, total set size]
    for ex, p in zip(examples, preds):
        if not p.ok or ex.truth is None or p.prediction_set is None:
            continue
        true = labels[ex.truth]
        hit = true in p.prediction_set
        n, covered, size = n + 1, covered + hit, size + len(p.prediction_set)
        empty += not p.prediction_set
        single += len(p.prediction_set) == 1
        cls = per_class.setdefault(true, [0, 0, 0])
        cls[0], cls[1], cls[2] = cls[0] + hit, cls[1] + 1, cls[2] + len(p.prediction_set)
    worst = sorted(per_class.items(), key=lambda kv: (kv[1][0] / kv[1][1], -kv[1][1], kv[0]))[:10]
    return {"target": target, "images": n, "covered": covered,
            "coverage": covered / n if n else None, "ci95": list(wilson(covered, n)) if n else None,
            "mean_set_size": size / n if n else None, "empty_sets": empty, "single_label_sets": single,
            "worst_classes": [{"label": k, "covered": c, "images": t, "coverage": c / t,
                               "mean_set_size": z / t} for k, (c, t, z) in worst]}


def score(examples: Sequence[Example], preds: Sequence[Prediction], labels: Sequence[str],
          real: Sequence[Sequence[int]] | None = None) -> Report:
    """The report of predictions against the examples' classes (same order)."""
    rep = Report(images=len(examples))
    for ex, p in zip(examples, preds):
        if not p.ok:
            rep.failed += 1
            continue
        if ex.truth is None:
            continue
        rep.labelled += 1
        true = labels[ex.truth]
        cls = rep.per_class.setdefault(true, [0, 0])
        cls[1] += 1
        if p.index == ex.truth:
            rep.top1 += 1
            cls[0] += 1
        else:
            rep.confused[(true, p.label or "")] += 1
        if ex.truth in p.indices[:5]:
            rep.top5 += 1
    if real is not None:
        right = counted = 0
        for valid, p in zip(real, preds):
            if valid and p.ok:
                counted += 1
                right += p.index in valid
        rep.real = (right, counted)
    return rep


def real_labels(file: str | os.PathLike[str], examples: Sequence[Example]) -> list[list[int]]:
    """ImageNet-ReaL's valid classes per example. FILE is a JSON list, one entry per image
    in the sorted order of the image file names (real.json for ILSVRC2012_val_*.JPEG):
    the examples, sorted by file name (not folder), take its entries in order, so their
    count must equal its length."""
    try:
        entries = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read --real-labels {file}: {e}") from None
    if not isinstance(entries, list) or not all(
            isinstance(x, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in x)
            for x in entries):
        raise UsageError(f"--real-labels {file} is not a JSON list of lists of class indexes")
    if len(entries) != len(examples):
        raise UsageError(f"--real-labels {file} has {len(entries)} entries for {len(examples)} images")
    order = sorted(range(len(examples)), key=lambda i: (os.path.basename(examples[i].input), i))
    out: list[list[int]] = [[] for _ in examples]
    for rank, i in enumerate(order):
        out[i] = entries[rank]
    return out


def agreement(a: Sequence[Prediction], b: Sequence[Prediction], *, probabilities: bool) -> dict[str, Any]:
    """Top-1 agreement, mean top-5 overlap (|A & B| / 5) and the largest probability
    difference (over the labels both runs rank in their top k; exact mode only) of two
    runs, on the inputs neither failed."""
    pairs = [(x, y) for x, y in zip(a, b) if x.ok and y.ok]
    n = len(pairs)
    same = sum(x.index == y.index for x, y in pairs)
    overlap = sum(len(set(x.indices[:5]) & set(y.indices[:5])) / 5 for x, y in pairs)
    diff: float | None = None
    if probabilities and n:
        diff = 0.0
        for x, y in pairs:
            px = dict(zip(x.indices, (s for _, s in x.top_k)))
            py = dict(zip(y.indices, (s for _, s in y.top_k)))
            for k in set(px) & set(py):
                diff = max(diff, abs(px[k] - py[k]))
    return {"images": n, "top1_agree": same, "top1_agreement": same / n if n else None,
            "top1_ci95": list(wilson(same, n)) if n else None,
            "top5_overlap": overlap / n if n else None,
            "max_prob_diff": diff}


COMPARE_KEYS = ("precision", "quantize", "decode", "device", "model")


def parse_setting(text: str) -> tuple[str, str]:
    """`key=value` of --compare; only model and decoding settings can be compared."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in COMPARE_KEYS or not value.strip():
        raise UsageError(f"--compare {text!r}: give KEY=VALUE with KEY one of {', '.join(COMPARE_KEYS)}")
    if key == "decode" and value.strip() not in ("exact", "beam"):
        raise UsageError(f"--compare {text!r}: decode is exact or beam")
    return key, value.strip()


def classify(examples: Sequence[Example], clf: Classifier, options: Options, *,
             done: Mapping[str, Prediction] | None = None,
             on_row: Callable[[Prediction, Example], None] | None = None,
             on_progress: Callable[[Stats], None] | None = None) -> list[Prediction]:
    """Each example's Prediction, in order. `done` maps input_key to a Prediction an
    earlier run wrote (OUT's rows, on --resume): those examples take it and are not
    classified again. `on_row` sees every new Prediction as it comes."""
    from ofacls import runner
    from ofacls.outfile import InputKeys

    key = InputKeys()
    done = done or {}
    kept = [done.get(key(e.input)) for e in examples]
    todo = [e for e, old in zip(examples, kept) if old is None]
    new: list[Prediction] = []

    def row(pred: Prediction) -> None:
        if on_row is not None:
            on_row(pred, todo[len(new)])
        new.append(pred)

    runner.run([e.item() for e in todo], clf, options, row, on_progress, total=len(todo))
    fresh = iter(new)
    return [old if old is not None else next(fresh) for old in kept]


def resumed_rows(path: str | os.PathLike[str], fmt: str, examples: Sequence[Example],
                 labels: Sequence[str]) -> dict[str, Prediction]:
    """The successful rows of an output file that the examples take on --resume, by
    input_key (the first of each input). They count in the report as written, so each
    is checked first: a row whose class index is not its label's, whose label is not
    this model's, or whose true_label is not DATA's label for its input was not
    written by eval for this data, and is refused with an OutputError naming it
    rather than counted."""
    from ofacls.formats import prediction_of
    from ofacls.outfile import InputKeys

    key = InputKeys()
    truths: dict[str, set[str | None]] = {}
    for e in examples:
        truths.setdefault(key(e.input), set()).add(None if e.truth is None else labels[e.truth])
    out: dict[str, Prediction] = {}
    for where, row in _output_rows(path, fmt):
        if not isinstance(row, dict) or not isinstance(row.get("input"), str):
            raise OutputError(f"{where} is not an ofacls row")
        k = key(row["input"])
        if row.get("error") is not None or k in out or k not in truths:
            continue
        why = _unlike_eval(row, labels, truths[k])
        if why:
            raise OutputError(f"{where} ({row['input']}): {why}; --resume counts rows as written: "
                              "restore or delete the row, or start afresh with --overwrite")
        out[k] = prediction_of(row)
    return out


def _output_rows(path: str | os.PathLike[str], fmt: str) -> Iterator[tuple[str, Any]]:
    """(where, row) of each row of an output file: `FILE line N` in the line-based
    formats, streamed; `FILE row N` otherwise."""
    from ofacls.formats import Scanner, read_rows

    name = os.fspath(path)
    if fmt not in ("csv", "tsv", "jsonl"):
        for n, row in enumerate(read_rows(path, fmt), 1):
            yield f"{name} row {n}", row
        return
    try:
        with open(path, "rb") as f:
            for rec in Scanner(f, fmt, name):
                yield f"{name} line {rec.line}", rec.row
    except OSError as e:
        raise OutputError(f"cannot read {name}: {e.strerror or e}") from None


def _unlike_eval(row: Mapping[str, Any], labels: Sequence[str], truths: set[str | None]) -> str:
    """Why a successful row is not one eval writes for an input of these `truths`
    (a JSONL row is any object a hand left there); empty if it is."""
    top = row.get("top_k")
    if not isinstance(top, list) or not top or not all(isinstance(t, dict) for t in top):
        return "it has no top labels"
    for rank, t in enumerate(top, 1):
        lab, idx, sc = t.get("label"), t.get("index"), t.get("score")
        where = "its label" if rank == 1 else f"its label {rank}"
        if not isinstance(lab, str):
            return f"{where} is not text"
        if not isinstance(idx, int) or isinstance(idx, bool):
            return f"{where} {lab!r} has no class index"
        if not 0 <= idx < len(labels):
            return f"{where} {lab!r} has class index {idx}, out of this model's 0-{len(labels) - 1}"
        if labels[idx] != lab:
            return (f"{where} {lab!r} is not the class of its index {idx} ({labels[idx]!r})"
                    if lab in labels else f"{where} {lab!r} is not a label of this model")
        if not isinstance(sc, (int, float)) or isinstance(sc, bool) or not math.isfinite(sc):
            return f"{where} {lab!r} has no finite score"
    if (row.get("label"), row.get("index"), row.get("score")) != (top[0]["label"], top[0]["index"],
                                                                  top[0]["score"]):
        return "its label, index and score are not its first top label's"
    if len({t["index"] for t in top}) < len(top):
        return "it names a class twice among its top labels"
    if "true_label" in row and row["true_label"] not in truths:
        told = " or ".join(repr(t) if t is not None else "none" for t in sorted(truths, key=str))
        return f"its true_label {row['true_label']!r} is not DATA's ({told})"
    return ""
