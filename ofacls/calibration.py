"""Prediction sets by split conformal prediction: a threshold from labelled images.

A top-1 probability alone does not say how often the answer is right. Given n
labelled images like the ones to come (exchangeable with them), split conformal
prediction finds a threshold t such that the set of labels whose probability is
at least t holds the true label with probability at least the chosen coverage
(Vovk et al.; Angelopoulos & Bates, "A Gentle Introduction to Conformal
Prediction", 2021). It holds for any model, however (un)calibrated its scores.

The score is LAC ("least ambiguous set-valued classifier", Sadinle, Lei &
Wasserman 2019): one minus the true label's probability. Of the standard scores
it gives the smallest sets on average for a given coverage, and it needs one
number per image that ofacls computes exactly (the true label's probability
under the model, whatever its rank); a set is then "every label of probability
>= t", which the exact search finds by going on until its frontier falls below
t. APS, the other common score, adapts set sizes to how hard an image is but
makes larger sets on average, and needs the probability mass of every label
ranked above the true one. LAC's sets can be empty (no label reaches t): an
image the model is unsure of, to be reviewed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ofacls.errors import InputError, UsageError

if TYPE_CHECKING:
    from ofacls.classifier import Classifier
    from ofacls.evaluate import Example
    from ofacls.prediction import Prediction
    from ofacls.runner import Options

SCORE = "lac"
COLUMNS = ("prediction_set",)  # what a calibrated run's rows add
FORMAT = "ofacls-calibration/1"
# What a calibration was made with; a run with another of these gets other
# probabilities, for which the threshold means nothing.
MATCHED = ("model", "revision", "decode", "precision", "quantize", "labels")
MAX_FILE_BYTES = 16 << 20


def conformal_threshold(true_probs: Sequence[float], coverage: float) -> float:
    """The LAC threshold for `coverage` from the true labels' probabilities of n
    calibration images: the ceil((n+1) * coverage)-th largest of them, so that a
    new image's true label reaches it with probability >= coverage."""
    if not 0 < coverage < 1:
        raise UsageError(f"coverage must be between 0 and 1, not {coverage}")
    n = len(true_probs)
    rank = math.ceil((n + 1) * coverage)
    if rank > n:
        # the quantile is past the largest score: only the set of all labels covers
        least = next(m for m in range(1, 10**6) if math.ceil((m + 1) * coverage) <= m)
        raise UsageError(f"coverage {coverage} needs at least {least} labelled images that can be "
                         f"read; {n} were")
    return sorted(true_probs, reverse=True)[rank - 1]


@dataclass(frozen=True)
class Calibration:
    """A conformal threshold and what it was made with."""

    threshold: float  # a label is in the set when its probability is at least this
    coverage: float  # the target: P(true label in set) >= coverage
    images: int  # calibration images it was computed from
    settings: dict[str, Any] = field(default_factory=dict)  # the MATCHED keys
    score: str = SCORE

    def check_decode(self, decode: str) -> float:
        """The threshold, for a run decoding with `decode`: beam scores are not
        probabilities, so a set needs exact decoding."""
        if decode != "exact":
            raise UsageError("a calibration needs exact decoding (beam scores are not probabilities)")
        return self.threshold

    def check(self, settings: Mapping[str, Any], source: str = "the calibration") -> None:
        """Refuse a run whose settings differ from the calibration's in a MATCHED key."""
        for key in MATCHED:
            mine, theirs = self.settings.get(key), settings.get(key)
            if mine != theirs:
                raise UsageError(f"{source} was made with {key} {_show(key, mine)}, this run has "
                                 f"{_show(key, theirs)}: calibrate again with this run's settings")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "the calibration") -> Calibration:
        """A calibration from its to_dict; a UsageError naming `where` for anything else."""
        if data.get("format") != FORMAT:
            raise UsageError(f"{where} is not an ofacls calibration (ofacls eval DATA --calibrate FILE "
                             "writes one)")
        threshold, coverage = _number(data.get("threshold")), _number(data.get("coverage"))
        images, settings = data.get("images"), data.get("settings")
        if (threshold is None or not 0 <= threshold <= 1 or coverage is None or not 0 < coverage < 1
                or not isinstance(images, int) or not isinstance(settings, dict)
                or data.get("score") != SCORE):
            raise UsageError(f"{where}: a calibration with missing or out-of-range fields")
        return cls(threshold, coverage, images, dict(settings))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """A calibration file written by `ofacls eval --calibrate`; a UsageError naming
        the file for anything else."""
        where = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise UsageError(f"cannot read calibration {where}: {e.strerror or e}") from None
        try:
            data = json.loads(raw.decode("utf-8")) if len(raw) <= MAX_FILE_BYTES else None
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            data = {}
        return cls.from_dict(data, where)


def settings_of(clf: Classifier, model: str, decode: str, quantize: str | None) -> dict[str, Any]:
    """The MATCHED settings of a run on `clf`, loaded from `model` (a local folder
    counts by its absolute path, a hub snapshot by its revision)."""
    folder = clf.folder
    # the hub cache keeps a model as .../snapshots/<revision>/
    revision = folder.name if folder is not None and folder.parent.name == "snapshots" else None
    return {"model": os.path.abspath(model) if os.path.isdir(model) else model,
            "revision": revision, "decode": decode, "precision": clf.precision,
            "quantize": None if quantize in (None, "none") else quantize,
            "labels": None if clf.trie is clf.model_labels else list(clf.labels)}


def _number(v: object) -> float | None:
    """`v` as a finite float, else None."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _show(key: str, value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value[:3])) + (", ...]" if len(value) > 3 else "]")
    if value is None:
        return "all the model's" if key == "labels" else "none"
    return repr(value)


def true_probabilities(clf: Classifier, examples: Sequence[Example], preds: Sequence[Prediction],
                       labels: Sequence[str], options: Options) -> list[float]:
    """The true label's probability for every labelled example that was classified:
    read off its prediction where the label is among its top k, else computed on
    its image (a second read) in one decoder call per batch, whatever its rank."""
    import torch

    from ofacls.sources.expand import read_source

    probs: list[float] = []
    misses: list[tuple[Example, str]] = []
    for ex, pred in zip(examples, preds):
        if not pred.ok or ex.truth is None:
            continue
        true = labels[ex.truth]
        found = dict(pred.top_k).get(true)
        if found is not None:
            probs.append(found)
        elif ex.source is not None:
            misses.append((ex, true))
    for start in range(0, len(misses), options.batch_size):
        pixels, answers = [], []
        for ex, true in misses[start:start + options.batch_size]:
            assert ex.source is not None
            try:
                data = read_source(ex.source, timeout=options.timeout, max_bytes=options.max_bytes)
                pixels.append(clf.pixels(data))
            except InputError:  # gone or changed since it was classified: left out
                continue
            answers.append(true)
        if pixels:
            probs += clf.probabilities_of(torch.stack(pixels), answers, labels=options.labels)
    return probs
