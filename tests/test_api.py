"""The Python API's edges: what `Classifier.classify` accepts as images, and an
image that beam search finishes no label for, through the API and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_helpers import (
    assert_one_line_errors,
    invoke,
    one_torch_thread,  # noqa: F401  (autouse fixture)
    small_image,
)
from PIL import Image

from ofacls.classifier import Classifier
from ofacls.prediction import Prediction
from ofacls.runner import Item, Options, run
from ofacls.sources.expand import Source


@pytest.fixture(scope="module")
def clf(model: Path) -> Classifier:
    return Classifier.from_pretrained(model)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_image(tmp_path_factory.mktemp("api") / "cat.png")


class FsPath(os.PathLike):
    """An os.PathLike that is not a pathlib.Path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __fspath__(self) -> str:
        return str(self.path)


def labels(preds: list[Prediction]) -> list[str | None]:
    assert all(p.ok for p in preds), [p.error for p in preds]
    return [p.label for p in preds]


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_a_bytes_like_object_is_one_image(clf: Classifier, photo: Path, kind: type) -> None:
    (want,) = labels(clf.classify(photo, top_k=1))
    data = kind(photo.read_bytes())
    for images in (data, [data], [data, data]):
        preds = clf.classify(images, top_k=1)
        assert labels(preds) == [want] * (1 if images is data else len(images))
        assert {p.input for p in preds} == {"<bytes>"}


def test_any_iterable_of_inputs_is_accepted_and_read_once(clf: Classifier, photo: Path) -> None:
    (want,) = labels(clf.classify([photo], top_k=1))
    consumed = []

    def gen():
        for im in (photo, str(photo), photo.read_bytes()):
            consumed.append(im)
            yield im

    assert labels(clf.classify(gen(), top_k=1)) == [want] * 3
    assert len(consumed) == 3
    assert labels(clf.classify({str(photo)}, top_k=1)) == [want]
    assert labels(clf.classify((photo,), top_k=1)) == [want]


def test_a_path_like_or_pil_image_alone_is_one_input(clf: Classifier, photo: Path) -> None:
    (want,) = labels(clf.classify(photo, top_k=1))
    (pred,) = clf.classify(FsPath(photo), top_k=1)
    assert pred.input == str(photo) and pred.label == want
    with Image.open(photo) as im:
        (pred,) = clf.classify(im.convert("RGB"), top_k=1)
    assert pred.ok and pred.input == "<image>"


@pytest.mark.parametrize("make", [
    lambda photo: 5, lambda photo: 2.5, lambda photo: None, lambda photo: [5],
    lambda photo: [10**10], lambda photo: [photo, 3], lambda photo: [[photo]],
    lambda photo: (x for x in [photo.read_bytes(), object()])],
    ids=["int", "float", "none", "int-in-list", "huge-int-in-list", "int-after-path",
         "list-in-list", "object-in-generator"])
def test_anything_else_is_a_type_error_before_any_work(
        clf: Classifier, photo: Path, monkeypatch: pytest.MonkeyPatch, make) -> None:
    calls: list[object] = []

    def preprocess(image: object) -> None:
        calls.append(image)
        raise AssertionError("preprocess called")

    monkeypatch.setattr(clf, "preprocess", preprocess)
    with pytest.raises(TypeError, match=r"of type '(int|float|NoneType|list|object)'"):
        clf.classify(make(photo))
    assert calls == []


def test_preprocess_refuses_other_types(clf: Classifier) -> None:
    with pytest.raises(TypeError, match="int"):
        clf.preprocess(5)  # type: ignore[arg-type]


# -- beam search that finishes no label ----------------------------------------------

NO_LABEL = "beam search finished no label"


@pytest.fixture(scope="module")
def unfinishable(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with beam_search settings under which no label can end: its
    labels are at most 9 tokens, but min_len 16 (max_len_b's value, which the
    configuration checks allow) forbids </s> before the 16th."""
    folder = tmp_path_factory.mktemp("unfinishable") / "m"
    folder.mkdir()
    for f in model.iterdir():
        if f.name != "configuration.json":
            os.link(f, folder / f.name)
    conf = json.loads((model / "configuration.json").read_text(encoding="utf-8"))
    conf["model"]["beam_search"].update(min_len=16, max_len_b=16)
    (folder / "configuration.json").write_text(json.dumps(conf, indent=2), encoding="utf-8")
    return folder


def test_beam_without_a_label_is_a_failed_prediction(unfinishable: Path, photo: Path) -> None:
    clf = Classifier.from_pretrained(unfinishable)
    assert clf.trie.max_tokens - 1 < clf.task.beam.min_len  # the premise: no label can end
    preds = clf.classify([photo, b"not an image", photo], decode="beam")
    assert [p.input for p in preds] == [str(photo), "<bytes>", str(photo)]
    for p in (preds[0], preds[2]):
        assert not p.ok and p.error.startswith(NO_LABEL) and "\n" not in p.error
        assert p.label is None and p.top_k == []
    assert NO_LABEL not in preds[1].error
    assert labels(clf.classify(photo, decode="exact"))  # exact decoding still answers


def test_runner_gives_the_failed_row_too(unfinishable: Path, photo: Path) -> None:
    clf = Classifier.from_pretrained(unfinishable)
    rows: list[Prediction] = []
    items = [Item(f"img{i}", Source(f"img{i}", str(photo), False)) for i in range(3)]
    stats = run(items, clf, Options(decode="beam", batch_size=2, workers=1), rows.append)
    assert [r.input for r in rows] == ["img0", "img1", "img2"]
    assert all(not r.ok and r.error.startswith(NO_LABEL) for r in rows)
    assert (stats.done, stats.failed) == (0, 3)


def test_cli_reports_it_as_an_input_failure(unfinishable: Path, photo: Path) -> None:
    result = invoke(["predict", str(photo), "--json", "--decode", "beam"], model=unfinishable)
    assert result.exit_code == 1, result.stderr
    (row,) = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert row["label"] is None and row["error"].startswith(NO_LABEL)
    assert_one_line_errors(result.stderr)


def test_from_pretrained_says_when_it_was_not_given_a_model_folder(tmp_path: Path) -> None:
    from ofacls.errors import CheckpointError, ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="no model folder at ./ofa_tiny"):
        Classifier.from_pretrained("./ofa_tiny")
    with pytest.raises(ModelNotFoundError, match="damo/ofa_tiny is not in the local cache"):
        Classifier.from_pretrained("damo/ofa_tiny", offline=True, cache_dir=tmp_path / "cache")
    (tmp_path / "photo.png").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"{tmp_path} is not an OFA model folder: it "
                                                 "has no config.json"):
        Classifier.from_pretrained(tmp_path)
