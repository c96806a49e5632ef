"""Labels of the user's own, class indices from the label file, and `ofacls info`."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
from pathlib import Path

import pytest
from cli_helpers import cli_env, invoke, one_torch_thread, run_cli, small_image  # noqa: F401
from ofa_factory import IMAGES_DIR, OWN_LABELS, imagenet_labels

from ofacls import Classifier
from ofacls.errors import CheckpointError, UsageError


def rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pics(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pics")
    return [small_image(folder / f"{name}.png", name + ".png")
            for name in ("chelsea", "horse", "coffee")]


@pytest.fixture(scope="module")
def clf(model: Path) -> Classifier:
    return Classifier.from_pretrained(model, device="cpu")


def copy_model(model: Path, dest: Path) -> Path:
    """`model` in `dest`, its files hard-linked except the ones a test rewrites."""
    dest.mkdir(parents=True)
    for f in model.iterdir():
        os.link(f, dest / f.name)
    return dest


def rewrite(folder: Path, name: str, text: str) -> None:
    (folder / name).unlink()  # a hard link: the original keeps its text
    (folder / name).write_text(text, encoding="utf-8")


# --- any strings ---------------------------------------------------------------------------


def test_own_strings_are_ranked_with_probabilities_that_sum_to_one(clf: Classifier,
                                                                   pics: list[Path]) -> None:
    preds = clf.classify(pics, top_k=len(OWN_LABELS), labels=list(OWN_LABELS))
    for pred in preds:
        assert pred.ok, pred.error
        assert sorted(lab for lab, _ in pred.top_k) == sorted(OWN_LABELS)
        assert math.fsum(s for _, s in pred.top_k) == pytest.approx(1.0, abs=1e-6)  # fp32 softmaxes
        # each string's index is its place in the list given
        assert pred.indices == [OWN_LABELS.index(lab) for lab, _ in pred.top_k]


def test_a_call_s_labels_equal_a_classifier_loaded_with_them(model: Path, clf: Classifier,
                                                             pics: list[Path]) -> None:
    loaded = Classifier.from_pretrained(model, device="cpu", labels=list(OWN_LABELS))
    a = loaded.classify(pics, top_k=3)
    b = clf.classify(pics, top_k=3, labels=list(OWN_LABELS))
    assert [p.top_k for p in a] == [p.top_k for p in b]
    # and the classifier's own labels are untouched by the call
    assert len(clf.labels) == 1000


def test_the_model_s_labels_stay_a_subset_with_the_model_s_indices(clf: Classifier,
                                                                  pics: list[Path]) -> None:
    names = imagenet_labels()
    pred = clf.classify(pics[0], top_k=3, labels=["goldfish", "Tench", "great_white_shark"])[0]
    assert {lab: i for (lab, _), i in zip(pred.top_k, pred.indices)} == {
        "tench": 0, "goldfish": 1, "great white shark": 2}
    assert [names[i] for i in pred.indices] == [lab for lab, _ in pred.top_k]


def test_exact_search_and_teacher_forcing_agree(clf: Classifier, pics: list[Path]) -> None:
    """`probabilities_of` reads a label's probability off one decoder call: the same
    number the search finds for it, for the best label and for the worst."""
    import torch

    batch = torch.stack([clf.pixels(p) for p in pics])
    ranked = clf.classify_pixels(batch, top_k=len(OWN_LABELS), labels=list(OWN_LABELS))
    for pick in (0, -1):
        answers = [r[pick][0] for r in ranked]
        probs = clf.probabilities_of(batch, answers, labels=list(OWN_LABELS))
        assert probs == pytest.approx([r[pick][1] for r in ranked], rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("labels, message", [
    (["forklift", "forklift"], "listed twice"),
    (["forklift", " "], "is empty"),
    (["fork\x1blift"], "control character U+001B"),
    (["x" * 1001], "more than 1,000"),
])
def test_bad_own_labels_are_one_line_usage_errors(clf: Classifier, labels: list[str],
                                                  message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        clf.label_set(labels)


def test_label_sets_made_on_many_threads_at_once(clf: Classifier) -> None:
    """A service makes label sets on its decode threads, each set of some client's;
    the kept sets turn over meanwhile. Threads switch as often as Python allows, so
    an unguarded cache fails here (KeyError, dict changed size) in most runs."""
    import sys
    import threading

    errors: list[BaseException] = []

    def make(t: int) -> None:
        try:
            for i in range(200):
                labels = [f"w{t}x{i}", f"y{t}z{i}"]
                assert clf.label_set(labels).names == labels
        except BaseException as e:  # reported below, with the thread's own error
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=make, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


def test_labels_on_the_command_line_take_any_strings(model: Path, pics: list[Path],
                                                     tmp_path: Path) -> None:
    listing = tmp_path / "mine.txt"
    listing.write_text("\n".join(OWN_LABELS) + "\n", encoding="utf-8")
    result = invoke(["predict", str(pics[0]), "--json", "-k", "2", "--labels", str(listing)], model=model)
    assert result.exit_code == 0, result.stderr
    (row,) = rows(result.stdout)
    assert row["label"] in OWN_LABELS and row["index"] == OWN_LABELS.index(row["label"])


# --- against ModelScope itself, where its environment is built ---------------------------

REFERENCE_PYTHON = Path(os.environ.get("OFA_REFERENCE_PYTHON",
                                       Path.home() / ".cache/ofa-reference/venv/bin/python"))
RUN_REFERENCE = Path(__file__).resolve().parents[2] / "shared/reference/run_reference.py"


@pytest.mark.skipif(not (REFERENCE_PYTHON.exists() and RUN_REFERENCE.exists()),
                    reason="the reference environment (../shared/reference/setup.sh) is not built here")
def test_own_labels_equal_modelscope_traverse_live(ckpt_r50_traverse: Path, tmp_path: Path) -> None:
    """Strings no golden holds: ModelScope's traverse mode on a folder whose label file
    holds them, against `predict --labels` on the ImageNet-labelled twin."""
    mine = ["a red bicycle", "a red bus", "two cats on a sofa", "an empty street at night",
            "a plate of food"]
    folder = copy_model(ckpt_r50_traverse, tmp_path / "own")
    rewrite(folder, "answer2label.json", json.dumps({s: i for i, s in enumerate(mine)}))
    images = ["chelsea.png", "horse.png", "coffee.png"]
    proc = subprocess.run([str(REFERENCE_PYTHON), str(RUN_REFERENCE), str(folder), *images,
                           "--topk", str(len(mine))], cwd=IMAGES_DIR, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = {Path(r["image"]).name: dict(r["traverse_top"]) for r in rows(
        "\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith("{")))}
    ours = Classifier.from_pretrained(ckpt_r50_traverse, device="cpu", labels=mine)
    for image in images:
        (pred,) = ours.classify([IMAGES_DIR / image], top_k=len(mine))
        for label, p in pred.top_k:
            # fp32 on both sides, same CPU: rounding alone (1.5e-3 is the parity budget)
            assert abs(p - reference[image][label]) < 1.5e-3, (image, label)


# --- class indices from the label file -------------------------------------------------------


def test_a_shuffled_label_file_keeps_every_label_s_index(model: Path, tmp_path: Path,
                                                         pics: list[Path]) -> None:
    names = imagenet_labels()
    pairs = list(enumerate(names))
    random.Random(3).shuffle(pairs)
    folder = copy_model(model, tmp_path / "shuffled")
    rewrite(folder, "answer2label.json", json.dumps({name: i for i, name in pairs}))
    plain = invoke(["predict", *map(str, pics), "--json", "-k", "5"], model=model)
    shuffled = invoke(["predict", *map(str, pics), "--json", "-k", "5"], model=folder)
    assert plain.exit_code == shuffled.exit_code == 0, shuffled.stderr
    for a, b in zip(rows(plain.stdout), rows(shuffled.stdout)):
        def ranked(row: dict) -> list[tuple[str, int]]:
            return [(t["label"], t["index"]) for t in row["top_k"]]

        assert ranked(a) == ranked(b)
        assert all(names[t["index"]] == t["label"] for t in b["top_k"])
    # `ofacls labels` lists them in class-index order whatever the file's order
    listed = invoke(["labels", "--model", str(folder)])
    assert listed.stdout.splitlines() == names
    # 1..N values count from one
    rewrite(folder, "answer2label.json", json.dumps({name: i + 1 for i, name in pairs}))
    assert invoke(["labels", "--model", str(folder)]).stdout.splitlines() == names


def test_values_that_are_not_a_permutation_leave_the_file_order(model: Path, tmp_path: Path) -> None:
    names = imagenet_labels()
    folder = copy_model(model, tmp_path / "gaps")
    rewrite(folder, "answer2label.json", json.dumps({name: 2 * i for i, name in enumerate(reversed(names))}))
    assert invoke(["labels", "--model", str(folder)]).stdout.splitlines() == names[::-1]


def test_a_configuration_naming_no_label_file_is_one_line(model: Path, tmp_path: Path) -> None:
    folder = copy_model(model, tmp_path / "nolabels")
    data = json.loads((model / "configuration.json").read_text())
    del data["model"]["answer2label"]
    rewrite(folder, "configuration.json", json.dumps(data))
    with pytest.raises(CheckpointError, match="names no label file"):
        Classifier.from_pretrained(folder, device="cpu")
    proc = run_cli(["predict", str(IMAGES_DIR / "horse.png"), "--model", str(folder)], env=cli_env())
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1
    assert "names no label file (model.answer2label)" in proc.stderr


def test_decode_auto_follows_gen_type(ckpt_r50_generation: Path, ckpt_r50_traverse: Path) -> None:
    image = str(IMAGES_DIR / "horse.png")
    for folder, mode in ((ckpt_r50_generation, "beam"), (ckpt_r50_traverse, "exact")):
        auto = invoke(["predict", image, "--json", "--decode", "auto", "--model", str(folder)])
        named = invoke(["predict", image, "--json", "--decode", mode, "--model", str(folder)])
        assert auto.exit_code == 0, auto.stderr
        assert rows(auto.stdout) == rows(named.stdout)
