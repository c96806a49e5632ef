"""The result of classifying one input: what every writer and the CLI consume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Prediction:
    """One input's answer, or the one-line reason it has none.

    `input` is the path or URL exactly as the user gave it (for files found by
    walking a folder or expanding a glob: the folder or pattern's base as given,
    joined with the path below it). `top_k` is best first and starts with
    (`label`, `score`). `indices` holds each top_k label's class index: its
    position in the model's label file (ImageNet's 0-999 index), so results
    join with ImageNet tooling; `index` is the first. On failure `label`/`score`
    are None, `top_k` and `indices` are empty and `error` says why in one line.

    `prediction_set` is there only with a calibration: the labels whose probability
    reaches its threshold, best first (any number, none included), which hold the
    true label with the calibration's coverage on data like its own.
    """

    input: str
    label: str | None = None
    score: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    indices: list[int] = field(default_factory=list)
    prediction_set: list[str] | None = None
    # columns carried from the input's table row (--keep-cols), after ours in every row
    extra: dict[str, Any] | None = field(default=None, compare=False)

    @classmethod
    def failed(cls, input: str, error: str) -> Prediction:
        return cls(input=input, error=" ".join(str(error).split()) or "error")

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def index(self) -> int | None:
        """The class index of `label` (None on failure)."""
        return self.indices[0] if self.indices else None

    def to_dict(self) -> dict[str, Any]:
        """The schema shared by `predict --json` and every output format. `index`
        (and each top_k entry's) is None where the class index is not known."""
        indices: list[int | None] = [*self.indices, *[None] * (len(self.top_k) - len(self.indices))]
        return {
            "input": self.input,
            "label": self.label,
            "score": self.score,
            "index": self.index,
            "top_k": [{"label": lab, "score": s, "index": i}
                      for (lab, s), i in zip(self.top_k, indices)],
            "error": self.error,
            **({} if self.prediction_set is None else {"prediction_set": self.prediction_set}),
            **(self.extra or {}),
        }
