"""`ofacls eval`: accuracy on labelled images, and agreement between two settings.

DATA is a folder tree with one folder per class (named by the class's label, as
`ofacls labels` prints it, or by its WordNet id such as n01440764), a CSV or JSONL
file of `input,label` rows (a label name, a WordNet id or a class index), or any
input `ofacls batch` takes (then unlabelled: only agreement can be reported).
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ofacls.errors import UsageError
from ofacls.prediction import Prediction

if TYPE_CHECKING:
    from ofacls.classifier import Classifier
    from ofacls.inputs import BadInput, Source
    from ofacls.runner import Item, Options, Stats

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


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
    return (max(0.0, centre - half), min(1.0, centre + half))


class ClassNames:
    """Resolves a class as DATA names it (label, WordNet id or index) to its class index."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        self._index = {n: i for i, n in enumerate(self.labels)}
        loose = Counter(_loose(n) for n in self.labels)
        # ImageNet has two "cardigan"s (a dog, a sweater): only an exact name tells them apart
        self._loose = {_loose(n): i for i, n in enumerate(self.labels) if loose[_loose(n)] == 1}
        self._wnids = ({w: i for i, w in enumerate(imagenet_wnids())}
                       if len(self.labels) == 1000 else {})

    def resolve(self, name: str, *, numbers: bool) -> int:
        """Exact label, then case and `_`-for-space insensitive, then WordNet id, then
        (rows only) a class index; otherwise a UsageError naming the nearest labels."""
        text = name.strip()
        for table, key in ((self._index, text), (self._loose, _loose(text)), (self._wnids, text)):
            if key in table:
                return table[key]
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
        """The `n` labels most like `name` (case and `_` aside)."""
        by_loose: dict[str, str] = {}
        for label in self.labels:
            by_loose.setdefault(_loose(label), label)
        return [by_loose[m] for m in difflib.get_close_matches(_loose(name), list(by_loose), n=n, cutoff=0.0)]


def _loose(name: str) -> str:
    return name.replace("_", " ").casefold()


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


def read_data(data: Sequence[str], names: ClassNames) -> list[Example]:
    """DATA arguments -> examples, in a stable order (class folders sorted by name)."""
    from ofacls.inputs import expand_inputs

    out: list[Example] = []
    plain: list[str] = []

    def flush() -> None:
        out.extend(_example(e, None) for e in expand_inputs(plain))
        plain.clear()

    for arg in data:
        path = Path(arg)
        suffix = path.suffix.lower()
        if path.is_file() and suffix in (".csv", ".jsonl", ".ndjson"):
            flush()
            out.extend(_read_rows(path, names))
        elif path.is_dir() and _class_folders(path):
            flush()
            for folder in _class_folders(path):
                truth = names.resolve(folder.name, numbers=False)
                out.extend(_example(e, truth) for e in expand_inputs([os.path.join(arg, folder.name)]))
        else:
            plain.append(arg)
    flush()
    return out


def _example(found: Source | BadInput, truth: int | None) -> Example:
    from ofacls.inputs import Source

    if isinstance(found, Source):
        return Example(found.name, truth, source=found)
    return Example(found.name, truth, error=found.error)


def _class_folders(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _read_rows(path: Path, names: ClassNames) -> list[Example]:
    """`input,label` rows (CSV with or without that header; JSONL objects with both keys).
    A relative input is taken relative to the data file's folder; an input that names
    several images (a folder, a glob) gives each of them the row's label."""
    from ofacls.inputs import expand_inputs

    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    rows: list[tuple[int, str, str]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.reader(text.splitlines())
        for rec in reader:
            header = reader.line_num == 1 and [c.strip().lower() for c in rec[:2]] == ["input", "label"]
            if not rec or header:
                continue
            rows.append((reader.line_num, rec[0], rec[1] if len(rec) > 1 else ""))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                    label = obj.get("label")
                    rows.append((n, str(obj["input"]), "" if label is None else str(label)))
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise UsageError(f"{path} line {n} is not an {{\"input\", \"label\"}} object") from None
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


@dataclass(frozen=True)
class LabelledPrediction(Prediction):
    """A Prediction with the true label, as `ofacls eval -o` writes its rows."""

    true_label: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "true_label": self.true_label}


ROW_COLUMNS = ("true_label",)  # what eval's rows add to batch's columns


def labelled(pred: Prediction, example: Example, labels: Sequence[str]) -> LabelledPrediction:
    return LabelledPrediction(pred.input, pred.label, pred.score, pred.top_k, pred.error, pred.indices,
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

    def to_dict(self) -> dict[str, Any]:
        n = self.labelled
        acc = {k: {"correct": c, "accuracy": c / n if n else None, "ci95": list(wilson(c, n)) if n else None}
               for k, c in (("top1", self.top1), ("top5", self.top5))}
        worst = sorted(self.per_class.items(), key=lambda kv: (kv[1][0] / kv[1][1], -kv[1][1], kv[0]))[:10]
        out: dict[str, Any] = {
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
        return out


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


def rows_by_input(path: str | os.PathLike[str], fmt: str) -> dict[str, Prediction]:
    """The successful rows of an output file, by input_key (the first of each input)."""
    from ofacls.formats import prediction_of, read_rows
    from ofacls.outfile import InputKeys

    key = InputKeys()
    out: dict[str, Prediction] = {}
    for row in read_rows(path, fmt):
        if row.get("error") is None:
            out.setdefault(key(row["input"]), prediction_of(row))
    return out
