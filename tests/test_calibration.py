"""Prediction sets: the conformal threshold, its coverage on held-out images, and
the calibration file every command takes."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest
from cli_helpers import cli_env, invoke, one_torch_thread, run_cli  # noqa: F401
from ofa_factory import IMAGES_DIR
from PIL import Image

from ofacls import Classifier
from ofacls.calibration import Calibration, conformal_threshold
from ofacls.errors import UsageError

CLASSES = ["forklift", "pallet jack", "hand truck"]
LABELS = ",".join(CLASSES)
SOURCES = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "horse.png", "rocket.jpg"]
PER_HALF = 200


def rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- the threshold -----------------------------------------------------------------------------


def test_threshold_is_the_conformal_quantile() -> None:
    probs = [i / 100 for i in range(1, 100)]  # n = 99
    # ceil(100 * 0.9) = 90: the 90th largest of 0.99 .. 0.01 is 0.10
    assert conformal_threshold(probs, 0.9) == pytest.approx(0.10)
    assert conformal_threshold(probs, 0.5) == pytest.approx(0.50)
    with pytest.raises(UsageError, match="needs at least 9 labelled images"):
        conformal_threshold([0.5] * 8, 0.9)


def test_coverage_holds_over_many_random_splits() -> None:
    """The guarantee itself: over random calibration/test splits of scores from any
    distribution, the share of test scores at or above the threshold averages at
    least the target (and not much more: the quantile is not loose)."""
    rng = random.Random(0)
    population = [rng.betavariate(0.3, 2.0) for _ in range(4000)]
    for target in (0.8, 0.9, 0.95):
        shares = []
        for _ in range(300):
            sample = rng.sample(population, 400)
            cal, test = sample[:200], sample[200:]
            t = conformal_threshold(cal, target)
            shares.append(sum(p >= t for p in test) / len(test))
        mean = sum(shares) / len(shares)
        assert target - 0.005 <= mean <= target + 1 / 201 + 0.01, (target, mean)


# --- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def halves(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two folders of labelled images drawn alike (crops of a few photos, each photo's
    crops mostly of one class): calibrate on one, measure on the other."""
    root = tmp_path_factory.mktemp("labelled")
    rng = random.Random(1)
    photos = [Image.open(IMAGES_DIR / s).convert("RGB") for s in SOURCES]
    for half in ("cal", "test"):
        for i in range(PER_HALF):
            k = rng.randrange(len(photos))
            w, h = photos[k].size
            cw, ch = rng.randint(w // 4, w), rng.randint(h // 4, h)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            cls = CLASSES[k % 3] if rng.random() < 0.7 else rng.choice(CLASSES)
            (root / half / cls).mkdir(parents=True, exist_ok=True)
            photos[k].crop((x, y, x + cw, y + ch)).resize((40, 40)).save(root / half / cls / f"{i:04d}.png")
    return root / "cal", root / "test"


@pytest.fixture(scope="module")
def calibration(model: Path, halves: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cal") / "cal.json"
    result = invoke(["eval", str(halves[0]), "--labels", LABELS, "--calibrate", str(path),
                     "--coverage", "0.9", "--json", "-q"], model=model)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["calibration"]["images"] == PER_HALF
    assert report["calibration"]["file"] == str(path)
    return path


def test_coverage_on_held_out_images(model: Path, halves: tuple[Path, Path], calibration: Path) -> None:
    result = invoke(["eval", str(halves[1]), "--labels", LABELS, "--calibration", str(calibration),
                     "--json", "-q"], model=model)
    assert result.exit_code == 0, result.stderr
    sets = json.loads(result.stdout)["prediction_sets"]
    assert sets["images"] == PER_HALF and sets["target"] == 0.9
    # at or above the target within sampling error: the calibration's quantile and the
    # test share both vary, each with a standard error of about sqrt(0.09 / 200)
    assert sets["coverage"] >= 0.9 - 3 * math.sqrt(2 * 0.09 / PER_HALF)
    # the sets are informative: not every label every time
    assert sets["mean_set_size"] < len(CLASSES)
    assert {c["label"] for c in sets["worst_classes"]} == set(CLASSES)


def test_a_set_is_every_label_at_or_above_the_threshold(model: Path, halves: tuple[Path, Path],
                                                       calibration: Path) -> None:
    cal = Calibration.load(calibration)
    clf = Classifier.from_pretrained(model, device="cpu", labels=CLASSES)
    images = sorted(halves[1].rglob("*.png"))[:12]
    with_sets = clf.classify(images, top_k=1, calibration=cal)
    every = clf.classify(images, top_k=len(CLASSES))
    for a, b in zip(with_sets, every):
        assert len(a.top_k) == 1  # the set goes past top_k; top_k does not grow with it
        assert a.prediction_set == [lab for lab, p in b.top_k if p >= cal.threshold]


def test_every_output_format_carries_the_set(model: Path, halves: tuple[Path, Path], calibration: Path,
                                            tmp_path: Path) -> None:
    images = sorted(str(p) for p in halves[1].rglob("*.png"))[:4]
    common = ["--labels", LABELS, "--calibration", str(calibration), "-q"]
    by_format = {}
    for ext in ("csv", "tsv", "jsonl", "json", "parquet"):
        out = tmp_path / f"out.{ext}"
        result = invoke(["batch", *images, "-o", str(out), *common], model=model)
        assert result.exit_code == 0, result.stderr
        if ext in ("csv", "tsv"):
            with out.open(newline="", encoding="utf-8") as f:
                table = list(csv.DictReader(f, delimiter="," if ext == "csv" else "\t"))
            by_format[ext] = [json.loads(r["prediction_set"]) for r in table]
        elif ext == "parquet":
            import pyarrow.parquet as pq

            by_format[ext] = pq.read_table(out).column("prediction_set").to_pylist()
        else:
            data = json.loads(out.read_text()) if ext == "json" else rows(out.read_text())
            by_format[ext] = [r["prediction_set"] for r in data]
    predicted = rows(invoke(["predict", *images, "--json", *common], model=model).stdout)
    by_format["predict"] = [r["prediction_set"] for r in predicted]
    first = by_format["jsonl"]
    assert all(isinstance(s, list) and set(s) <= set(CLASSES) for s in first)
    assert all(sets == first for sets in by_format.values()), by_format


def test_a_calibration_made_with_other_settings_is_refused(model: Path, halves: tuple[Path, Path],
                                                          calibration: Path) -> None:
    image = str(next(halves[1].rglob("*.png")))
    for args, word in ((["--labels", "forklift,hand truck"], "labels"), ([], "labels"),
                       (["--labels", LABELS, "--precision", "bf16"], "precision"),
                       (["--labels", LABELS, "--decode", "beam"], "decode")):
        result = invoke(["predict", image, "--calibration", str(calibration), *args], model=model)
        assert result.exit_code == 2, result.stderr
        errors = [ln for ln in result.stderr.splitlines() if not ln.startswith("ofacls: warning:")]
        assert len(errors) == 1 and f"was made with {word}" in errors[0], result.stderr
    # and in a real process: one line, exit 2
    proc = run_cli(["predict", image, "--calibration", str(calibration)], env=cli_env(model))
    assert (proc.returncode, proc.stderr.count("\n")) == (2, 1), proc.stderr


def test_a_file_that_is_not_a_calibration_is_one_line(model: Path, tmp_path: Path) -> None:
    image = str(IMAGES_DIR / "horse.png")
    bogus = tmp_path / "bogus.json"
    for text in ("{}", "not json", json.dumps({"format": "ofacls-calibration/1", "threshold": 2})):
        bogus.write_text(text)
        result = invoke(["predict", image, "--calibration", str(bogus)], model=model)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
        assert str(bogus) in result.stderr
    result = invoke(["predict", image, "--calibration", str(tmp_path / "missing.json")], model=model)
    assert result.exit_code == 2 and "cannot read calibration" in result.stderr


def test_calibrate_needs_exact_decoding_and_enough_images(model: Path, halves: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    result = invoke(["eval", str(halves[0]), "--calibrate", str(out), "--decode", "beam"], model=model)
    assert result.exit_code == 2 and "exact decoding" in result.stderr
    few = tmp_path / "few" / "forklift"
    few.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(few / f"{i}.png")
    result = invoke(["eval", str(few.parent), "--labels", LABELS, "--calibrate", str(out)], model=model)
    assert result.exit_code == 2 and "needs at least 9 labelled images" in result.stderr
    assert not out.exists()


def test_the_terminal_table_marks_unsure_images() -> None:
    import io

    from ofacls.prediction import Prediction
    from ofacls.render import table_printer

    def shown(kept: list[str]) -> str:
        stream = io.StringIO()
        table_printer(stream, probabilities=True)(Prediction(
            input="a.jpg", label="tabby", score=0.6, top_k=[("tabby", 0.6), ("tiger cat", 0.3)],
            indices=[281, 282], prediction_set=kept))
        return stream.getvalue()

    assert "set: tabby" in shown(["tabby"]) and "unsure" not in shown(["tabby"])
    assert "set of 2: tabby, tiger cat (unsure)" in shown(["tabby", "tiger cat"])
    assert "set: empty - no label is likely enough (unsure)" in shown([])
