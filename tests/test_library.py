"""The library as a program embedding it uses it: one streaming batch path behind
`classify` and `iter_classify`, models by id from the cache, no process-wide
state changed, honest errors per input."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cli_helpers import one_torch_thread, small_image  # noqa: F401  (autouse fixture)
from fakehub import FakeHub, fast_client_env
from httpserver import HTTPTestServer

from ofacls import Classifier
from ofacls.classifier import NON_FINITE
from ofacls.errors import UsageError
from ofacls.model.folder import ModelFolder


@pytest.fixture(scope="module")
def clf(model: Path) -> Classifier:
    return Classifier.from_pretrained(model, device="cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("lib")
    return [small_image(folder / f"{name}.png", source)
            for name, source in (("cat", "chelsea.png"), ("coffee", "coffee.png"),
                                 ("rocket", "rocket.jpg"))]


def test_iter_classify_reads_its_input_lazily_and_in_order(clf: Classifier,
                                                           photos: list[Path]) -> None:
    """A generator of (here endless) paths is read only a window ahead of the model."""
    taken: list[int] = []

    def endless() -> Iterator[Path]:
        for i in itertools.count():
            taken.append(i)
            yield photos[i % len(photos)]

    it = clf.iter_classify(endless(), batch_size=2, workers=2)
    first = [next(it) for _ in range(5)]
    it.close()  # the loader threads stop; nothing more is read
    assert [p.input for p in first] == [str(photos[i % 3]) for i in range(5)]
    # 5 answered, plus at most the prefetch window (2 x batch + workers) ahead
    assert len(taken) <= 5 + 2 * 2 + 2, len(taken)
    read = len(taken)
    with pytest.raises(StopIteration):
        next(it)
    assert len(taken) == read  # closed: the generator is not advanced any more


def test_classify_and_iter_classify_agree_with_one_image_calls(clf: Classifier,
                                                              photos: list[Path]) -> None:
    inputs = [*photos, *photos]
    listed = clf.classify(inputs, top_k=3, batch_size=4)
    assert [p.input for p in listed] == [str(p) for p in inputs]
    for pred in listed:
        (alone,) = clf.classify(pred.input, top_k=3)
        assert [lab for lab, _ in pred.top_k] == [lab for lab, _ in alone.top_k]
        assert [s for _, s in pred.top_k] == pytest.approx([s for _, s in alone.top_k], abs=1e-5)
        assert pred.indices == [clf.class_index[lab] for lab, _ in pred.top_k]


def test_bad_inputs_never_lose_the_others(clf: Classifier, photos: list[Path],
                                          tmp_path: Path) -> None:
    inputs = [photos[0], tmp_path / "missing.png", b"not an image", photos[1].read_bytes(),
              photos[2]]
    got = clf.classify(inputs, batch_size=2)
    assert [p.ok for p in got] == [True, False, False, True, True]
    assert got[1].error == "no such file or directory"
    assert got[2].input == "<bytes>" and got[2].error
    assert got[3].label == clf.classify(photos[1])[0].label


def test_urls_are_fetched_by_the_same_path(clf: Classifier, photos: list[Path]) -> None:
    server = HTTPTestServer().start()
    try:
        url = server.serve("/cat.png", photos[0].read_bytes())
        missing = server.url("/gone.png")
        by_url, gone = clf.classify([url, missing])
    finally:
        server.stop()
    assert by_url.input == url and by_url.label == clf.classify(photos[0])[0].label
    assert gone.error is not None and "404" in gone.error


def test_argument_errors_speak_of_arguments(clf: Classifier, photos: list[Path]) -> None:
    with pytest.raises(UsageError, match="^top_k must be"):
        clf.classify(photos[0], top_k=0)
    with pytest.raises(UsageError, match="unknown decode mode 'greedy'"):
        list(clf.iter_classify([photos[0]], decode="greedy"))
    with pytest.raises(TypeError, match="images\\[1\\]"):
        clf.classify([photos[0], 3])


def test_loading_and_classifying_change_no_process_wide_setting(model: Path,
                                                                 photos: list[Path]) -> None:
    """In a fresh process: torch's threads and the TF32 flags as the program set them."""
    code = f"""
import json, torch
torch.set_num_threads(1)
torch.backends.cudnn.allow_tf32 = True
torch.backends.cuda.matmul.allow_tf32 = True
from ofacls import Classifier
clf = Classifier.from_pretrained({str(model)!r})
clf.classify([{str(photos[0])!r}, {str(photos[1])!r}])
print(json.dumps([torch.get_num_threads(), torch.backends.cudnn.allow_tf32,
                  torch.backends.cuda.matmul.allow_tf32]))
import ofacls
ofacls.tune_process()  # the explicit opt-in the CLI uses
print(torch.get_num_threads())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300, env={**fast_client_env(), "OMP_NUM_THREADS": ""}
                         ).stdout.splitlines()
    assert json.loads(out[0]) == [1, True, True]
    assert int(out[1]) >= 1


def test_non_finite_scores_are_error_rows(model: Path, photos: list[Path], tmp_path: Path) -> None:
    """Broken (NaN) weights give error rows naming the likely cause, never a label."""
    broken = tmp_path / "nan"
    broken.mkdir()
    for f in model.iterdir():
        (broken / f.name).hardlink_to(f)
    (broken / "pytorch_model.bin").unlink()
    sd = torch.load(model / "pytorch_model.bin", weights_only=True)
    key = next(k for k in sd if k.endswith("layer_norm.weight") and k.startswith("decoder."))
    sd[key] = torch.full_like(sd[key], math.nan)
    torch.save(sd, broken / "pytorch_model.bin")
    (pred,) = Classifier.from_pretrained(broken).classify(photos[0])
    assert pred.label is None and pred.error == NON_FINITE
    result = subprocess.run([sys.executable, "-m", "ofacls", "predict", "--json", "--model",
                             str(broken), str(photos[0])], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    row = json.loads(result.stdout)  # strict JSON: no NaN
    assert row["error"] == NON_FINITE


def test_model_folder_reads_the_small_files_alone(model: Path, tmp_path: Path) -> None:
    """Labels come from configuration.json and the label file; the weights are not needed."""
    light = tmp_path / "light"
    light.mkdir()
    for name in ("config.json", "configuration.json", "answer2label.json"):
        (light / name).hardlink_to(model / name)
    folder = ModelFolder.open(light)
    assert folder.label_names() == ModelFolder.open(model).label_names()
    assert folder.lacks() == "no vocab.json, merges.txt, pytorch_model.bin"
    assert ModelFolder.open(model).lacks() == ""
    result = subprocess.run([sys.executable, "-m", "ofacls", "labels", "--model", str(light)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == folder.label_names()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "home"))
    return tmp_path / "cache"


def _cli_download(served_as: str, model: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    """`ofacls download damo/ofa_tiny` from a fake hub that serves `model` as `served_as`."""
    env = {**fast_client_env(), "MODELSCOPE_CACHE": str(cache)}
    with FakeHub({served_as: model}) as hub:
        env["MODELSCOPE_ENDPOINT"] = hub.url
        got = subprocess.run([sys.executable, "-m", "ofacls", "download", "damo/ofa_tiny", "-q"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    return got


def test_from_pretrained_by_id_offline_from_what_download_cached(
        model: Path, cache: Path, photos: list[Path]) -> None:
    _cli_download("damo/ofa_tiny", model, cache)
    # the hub is gone: the id resolves from the cache, without the network
    clf = Classifier.from_pretrained("damo/ofa_tiny", offline=True)
    assert clf.classify(photos[0])[0].label == Classifier.from_pretrained(model).classify(
        photos[0])[0].label


def test_a_damo_id_the_hub_moved_to_iic_is_found_there(
        model: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from ofacls.hub import cached_model, download, resolve_model

    with FakeHub({"iic/ofa_tiny": model}) as hub:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
        folder = download("damo/ofa_tiny", progress=False)
        assert "trying iic/ofa_tiny" in caplog.text
    assert (folder / "pytorch_model.bin").read_bytes() == (model / "pytorch_model.bin").read_bytes()
    # later runs find it under either name, offline
    assert resolve_model("damo/ofa_tiny", offline=True) == folder
    assert cached_model("iic/ofa_tiny") == folder


def test_the_cli_says_when_it_tries_iic(model: Path, cache: Path) -> None:
    got = _cli_download("iic/ofa_tiny", model, cache)
    assert got.stderr.startswith("ofacls: model damo/ofa_tiny is not on the hub; trying iic/")
    assert got.stderr.count("\n") == 1
