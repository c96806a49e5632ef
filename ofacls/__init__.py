"""ofacls: classify images into the ImageNet-1K classes with OFA.

    from ofacls import Classifier
    clf = Classifier.from_pretrained()  # OFA-Large: cached, else downloaded once
    for pred in clf.iter_classify(["cat.jpg", "https://example.com/dog.jpg"], top_k=5):
        print(pred.input, pred.label, pred.score)

`Classifier` is imported lazily so that `import ofacls` (and the CLI's
`--help`) never pays for torch. The library changes no process-wide setting;
`tune_process()` applies the CLI's thread and allocator tuning on request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Classifier", "Prediction", "__version__", "tune_process"]

if TYPE_CHECKING:
    from ofacls.classifier import Classifier
    from ofacls.prediction import Prediction
    from ofacls.tuning import tune_process


def __getattr__(name: str) -> Any:
    if name == "Classifier":
        from ofacls.classifier import Classifier

        return Classifier
    if name == "Prediction":
        from ofacls.prediction import Prediction

        return Prediction
    if name == "tune_process":
        from ofacls.tuning import tune_process

        return tune_process
    raise AttributeError(name)
