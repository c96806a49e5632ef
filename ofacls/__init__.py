"""ofacls: classify images into the ImageNet-1K classes with OFA.

    from ofacls import Classifier
    clf = Classifier.from_pretrained("path/to/model", device="cpu")
    clf.classify(["cat.jpg"], top_k=5)

`Classifier` is imported lazily so that `import ofacls` (and the CLI's
`--help`) never pays for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Classifier", "Prediction", "__version__"]

if TYPE_CHECKING:
    from ofacls.classifier import Classifier
    from ofacls.prediction import Prediction


def __getattr__(name: str) -> Any:
    if name == "Classifier":
        from ofacls.classifier import Classifier

        return Classifier
    if name == "Prediction":
        from ofacls.prediction import Prediction

        return Prediction
    raise AttributeError(name)
