"""`ofacls eval`: accuracy, confusions, failed inputs, rows, resume, --compare and usage
errors, on data the tests build from the tiny model's own answers."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import assert_one_line_errors, cli_env, run_cli, small_image

from ofacls.errors import UsageError
from ofacls.evaluate import ClassNames, Example, agreement, imagenet_wnids, real_labels, score, wilson
from ofacls.formats import read_rows
from ofacls.prediction import Prediction

WNIDS = imagenet_wnids()


def test_wnids_are_imagenets() -> None:
    assert len(WNIDS) == 1000 == len(set(WNIDS))
    assert WNIDS == sorted(WNIDS)
    assert (WNIDS[0], WNIDS[281], WNIDS[-1]) == ("n01440764", "n02123045", "n15075141")


def test_wilson_interval() -> None:
    lo, hi = wilson(8, 10)
    assert round(lo, 4) == 0.4902 and round(hi, 4) == 0.9433
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    # exact at the ends for every n, not rounding dust such as 5.55e-17
    assert all(wilson(0, n)[0] == 0.0 and wilson(n, n)[1] == 1.0 for n in range(1, 500))


# --- the parts, on predictions made by hand ----------------------------------------

LABELS = [f"class {i}" for i in range(998)] + ["Cardigan", "cardigan"]


def _pred(name: str, top: list[tuple[int, float]]) -> Prediction:
    return Prediction(name, LABELS[top[0][0]], top[0][1], [(LABELS[i], s) for i, s in top], None,
                      [i for i, _ in top])


def test_class_names() -> None:
    names = ClassNames(LABELS)
    assert names.resolve("class 7", numbers=False) == 7
    assert names.resolve("CLASS_7", numbers=False) == 7  # case and _ for a space
    assert names.resolve(WNIDS[7], numbers=False) == 7
    assert names.resolve(" 12 ", numbers=True) == 12
    assert names.resolve("cardigan", numbers=False) == 999
    with pytest.raises(UsageError, match="unknown class 'CARDIGAN'"):
        names.resolve("CARDIGAN", numbers=False)  # two labels match it loosely: only exact tells
    with pytest.raises(UsageError, match="unknown class '12'"):
        names.resolve("12", numbers=False)  # a folder named 12 is not class 12
    with pytest.raises(UsageError, match="out of range"):
        names.resolve("1000", numbers=True)
    with pytest.raises(UsageError, match="nearest labels are 'class 12'") as e:
        names.resolve("clas 12", numbers=True)
    assert "\n" not in str(e.value)


def test_score_and_agreement() -> None:
    examples = [Example("a", 1), Example("b", 1), Example("c", 2), Example("d", None), Example("e", 3)]
    a = [_pred("a", [(1, 0.6), (2, 0.3)]), _pred("b", [(2, 0.5), (1, 0.4)]),
         _pred("c", [(0, 0.9), (1, 0.1)]), _pred("d", [(5, 1.0)]), Prediction.failed("e", "broken")]
    rep = score(examples, a, LABELS).to_dict()
    assert (rep["images"], rep["failed"], rep["labelled"]) == (5, 1, 3)
    assert (rep["top1"]["correct"], rep["top5"]["correct"]) == (1, 2)
    assert rep["top1"]["ci95"] == list(wilson(1, 3))
    assert [(c["label"], c["correct"], c["images"]) for c in rep["worst_classes"]] == [
        ("class 2", 0, 1), ("class 1", 1, 2)]
    assert rep["confused"] == [{"true": "class 1", "predicted": "class 2", "count": 1},
                               {"true": "class 2", "predicted": "class 0", "count": 1}]

    b = [_pred("a", [(1, 0.5), (2, 0.4)]), _pred("b", [(1, 0.45), (2, 0.45)]),
         _pred("c", [(0, 0.95), (3, 0.05)]), _pred("d", [(5, 1.0)]), _pred("e", [(3, 1.0)])]
    agree = agreement(a, b, probabilities=True)
    assert (agree["images"], agree["top1_agree"]) == (4, 3)  # e failed in a: left out
    assert agree["top5_overlap"] == pytest.approx((2 + 2 + 1 + 1) / 5 / 4)
    assert agree["max_prob_diff"] == pytest.approx(0.1)  # a's class 1 and 2; b's class 1
    assert agreement(a, b, probabilities=False)["max_prob_diff"] is None


def test_real_labels_follow_file_names(tmp_path: Path) -> None:
    examples = [Example("x/b.png", 0), Example("y/a.png", 0), Example("x/c.png", 0)]
    file = tmp_path / "real.json"
    file.write_text(json.dumps([[1], [2, 3], []]))  # for a.png, b.png, c.png
    assert real_labels(file, examples) == [[2, 3], [1], []]
    file.write_text("[[1]]")
    with pytest.raises(UsageError, match="1 entries for 3 images"):
        real_labels(file, examples)
    file.write_text('[["1"], [], []]')
    with pytest.raises(UsageError, match="not a JSON list of lists of class indexes"):
        real_labels(file, examples)


# --- the command, on a tree and rows built from the model's own answers -----------


@pytest.fixture(scope="module")
def answers(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny model's top 5 for two small images (A, B), its labels, and a class W
    that neither has among its top 5."""
    env = cli_env(model)
    src = tmp_path_factory.mktemp("eval-src")
    images = {"A": small_image(src / "A.png", "chelsea.png"), "B": small_image(src / "B.png", "coffee.png")}
    r = run_cli(["predict", "--json", "-k", "5", "--device", "cpu", *map(str, images.values())], env=env)
    assert r.returncode == 0, r.stderr
    top = {k: [t["index"] for t in json.loads(line)["top_k"]]
           for k, line in zip(images, r.stdout.splitlines())}
    labels = run_cli(["labels"], env=env).stdout.splitlines()
    w = next(i for i in range(len(labels)) if i not in top["A"] + top["B"])
    return {"images": images, "top": top, "labels": labels, "W": w}


def _tree(answers: dict[str, Any], root: Path) -> tuple[Path, list[Path]]:
    """A: right under its own top label (named loosely), unreadable twice; A again
    under its second choice (a WordNet id folder: top-1 wrong, top-5 right); B twice
    under W (wrong). Returns the tree and its images in eval's order."""
    labels, top, images = answers["labels"], answers["top"], answers["images"]
    first, second = labels[top["A"][0]], labels[top["A"][1]]
    files = {
        first.upper().replace(" ", "_"): {"a.png": images["A"].read_bytes(), "broken.png": b"not an image",
                                           "empty.jpg": b""},
        WNIDS[labels.index(second)]: {"b.png": images["A"].read_bytes()},
        WNIDS[answers["W"]]: {"c.png": images["B"].read_bytes(), "c2.png": images["B"].read_bytes()},
    }
    order = []
    for folder in sorted(files):
        (root / folder).mkdir(parents=True)
        for name, data in sorted(files[folder].items()):
            (root / folder / name).write_bytes(data)
            order.append(root / folder / name)
    return root, order


def test_eval_tree(model: Path, answers: dict[str, Any], tmp_path: Path) -> None:
    labels, top, w = answers["labels"], answers["top"], answers["W"]
    first, second, b_top = labels[top["A"][0]], labels[top["A"][1]], labels[top["B"][0]]
    tree, order = _tree(answers, tmp_path / "tree")
    by_name = {p.name: p for p in order}
    real = {"a.png": [top["A"][0]], "b.png": [top["A"][2]], "broken.png": [], "c.png": [],
            "c2.png": [w, top["B"][0]], "empty.jpg": [top["A"][0]]}
    (tmp_path / "real.json").write_text(json.dumps([real[n] for n in sorted(real)]))
    rows = tmp_path / "rows.csv"

    r = run_cli(["eval", str(tree), "--json", "--device", "cpu", "--real-labels", str(tmp_path / "real.json"),
                 "-o", str(rows)], env=cli_env(model))
    assert r.returncode == 1, r.stderr  # inputs failed
    rep = json.loads(r.stdout)
    assert (rep["images"], rep["failed"], rep["labelled"], rep["resumed"]) == (6, 2, 4, 0)
    assert (rep["top1"]["correct"], rep["top5"]["correct"]) == (1, 2)
    assert rep["confused"] == [{"true": labels[w], "predicted": b_top, "count": 2},
                               {"true": second, "predicted": first, "count": 1}]
    assert [(c["label"], c["correct"], c["images"]) for c in rep["worst_classes"]] == [
        (labels[w], 0, 2), (second, 0, 1), (first, 1, 1)]
    # a.png right, b.png wrong, c2.png right; broken.png and c.png (empty lists) and
    # empty.jpg (failed) left out
    assert (rep["real_top1"]["correct"], rep["real_top1"]["images"]) == (2, 3)
    told = sorted(line.split(": ")[1] for line in r.stderr.splitlines() if "->" not in line)
    assert told == sorted([str(by_name["broken.png"]), str(by_name["empty.jpg"])])
    assert_one_line_errors(r.stderr)

    written = read_rows(rows)
    assert [row["input"] for row in written] == list(map(str, order))
    truth = {"a.png": first, "broken.png": first, "empty.jpg": first, "b.png": second,
             "c.png": labels[w], "c2.png": labels[w]}
    assert [row["true_label"] for row in written] == [truth[p.name] for p in order]
    assert [row["error"] is not None for row in written] == [p.name in ("broken.png", "empty.jpg")
                                                             for p in order]
    assert all(len(row["top_k"]) == 5 for row in written if row["error"] is None)

    # the report names what produced it
    settings = rep["settings"]
    assert (settings["folder"], settings["device"], settings["precision"]) == (str(model), "cpu", "fp32")
    assert (settings["decode"], settings["quantize"], settings["labels"], settings["revision"]) == (
        "exact", None, None, None)

    # the terminal table says the same
    r = run_cli(["eval", str(tree), "--device", "cpu", "--quiet"], env=cli_env(model))
    assert r.returncode == 1
    assert r.stdout.splitlines()[0] == f"model {settings['model']}, cpu fp32, decode exact, labels all"
    assert all(line == line.rstrip() for line in r.stdout.splitlines()), r.stdout  # piped: no padding
    assert "images 6 (2 failed), labelled 4" in r.stdout
    assert "top-1 25.00% 1/4" in r.stdout and "top-5 50.00% 2/4" in r.stdout


def test_rows_resume(model: Path, answers: dict[str, Any], tmp_path: Path) -> None:
    """A resumed run counts the rows it keeps, as written (not classified again), and
    retries the failed ones."""
    labels, top, w = answers["labels"], answers["top"], answers["W"]
    tree, order = _tree(answers, tmp_path / "tree")
    rows = tmp_path / "rows.csv"
    env = cli_env(model)
    r = run_cli(["eval", str(tree), "--device", "cpu", "--quiet", "-o", str(rows)], env=env)
    assert r.returncode == 1, r.stderr
    with rows.open(newline="", encoding="utf-8") as f:
        header, *records = list(csv.reader(f))
    kept = []
    for rec in records:
        name = os.path.basename(rec[0])
        if name == "c.png":  # as if the earlier run had said W: a right answer
            rec[1:4] = [labels[w], "0.9", str(w)]
        if name in ("a.png", "c.png", "broken.png"):
            kept.append(rec)
    with rows.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *kept])

    r = run_cli(["eval", str(tree), "--device", "cpu", "--json", "-o", str(rows), "--resume"], env=env)
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    assert (rep["images"], rep["failed"], rep["labelled"], rep["resumed"]) == (6, 2, 4, 2)
    assert (rep["top1"]["correct"], rep["top5"]["correct"]) == (2, 3)  # a.png, and the kept c.png
    assert {"true": labels[w], "predicted": labels[top["B"][0]], "count": 1} in rep["confused"]
    assert "done 2, failed 2, skipped 2" in r.stderr
    written = read_rows(rows)
    assert sorted(row["input"] for row in written) == sorted(map(str, order))
    assert next(row for row in written if row["input"].endswith("c.png"))["label"] == labels[w]

    r = run_cli(["eval", str(tree), "--device", "cpu", "-o", str(rows)], env=env)
    assert r.returncode == 2 and "--resume" in r.stderr and r.stdout == ""
    assert_one_line_errors(r.stderr)


def test_eval_rows_names_wnids_indexes(model: Path, answers: dict[str, Any], tmp_path: Path) -> None:
    labels, top, w = answers["labels"], answers["top"], answers["W"]
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    a, c = data / "img" / "a.png", data / "img" / "c.png"
    a.write_bytes(answers["images"]["A"].read_bytes())
    c.write_bytes(answers["images"]["B"].read_bytes())
    second = WNIDS[top["A"][1]]
    (data / "rows.csv").write_text(
        f"input,label\nimg/a.png,{labels[top['A'][0]]}\nimg/a.png,{second}\nimg/c.png,{w}\nimg/c.png,\n",
        encoding="utf-8")
    (data / "rows.jsonl").write_text("\n".join(json.dumps(o) for o in [
        {"input": "img/a.png", "label": top["A"][0]},
        {"input": "img/c.png", "label": labels[top["B"][0]].upper()},
        {"input": str(a), "label": WNIDS[w]},
    ]) + "\n", encoding="utf-8")
    # run elsewhere: relative inputs are the data file's
    r = run_cli(["eval", "data/rows.csv", "data/rows.jsonl", "--json", "--device", "cpu"], env=cli_env(model),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert (rep["images"], rep["failed"], rep["labelled"]) == (7, 0, 6)
    assert (rep["top1"]["correct"], rep["top5"]["correct"]) == (3, 4)


def test_compare_bf16_labelled(model: Path, answers: dict[str, Any], tmp_path: Path) -> None:
    """The agreement eval reports is the one predict's fp32 and bf16 answers give,
    classified in the same order (so in the same batches)."""
    tree, order = _tree(answers, tmp_path / "tree")
    env = cli_env(model)
    ok = [str(p) for p in order if p.name not in ("broken.png", "empty.jpg")]

    def top(precision: str) -> list[dict[int, float]]:
        r = run_cli(["predict", "--json", "-k", "5", "--device", "cpu", "--precision", precision, *ok],
                    env=env)
        assert r.returncode == 0, r.stderr
        return [{t["index"]: t["score"] for t in json.loads(line)["top_k"]} for line in r.stdout.splitlines()]

    r = run_cli(["eval", str(tree), "--json", "--device", "cpu", "--compare", "precision=bf16"], env=env)
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    cmp = rep["compare"]
    a, b = top("fp32"), top("bf16")
    assert cmp["setting"] == "precision=bf16" and cmp["images"] == 4
    assert cmp["top1_agree"] == sum(next(iter(x)) == next(iter(y)) for x, y in zip(a, b))
    assert cmp["top5_overlap"] == pytest.approx(sum(len(x.keys() & y.keys()) / 5 for x, y in zip(a, b)) / 4)
    assert cmp["max_prob_diff"] == pytest.approx(
        max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x.keys() & y.keys()), abs=1e-12)
    truth = {"a.png": answers["top"]["A"][0], "b.png": answers["top"]["A"][1], "c.png": answers["W"],
             "c2.png": answers["W"]}
    assert cmp["labelled"] == 4
    assert cmp["top1"]["correct"] == sum(next(iter(y)) == truth[Path(name).name] for y, name in zip(b, ok))
    assert rep["top1"]["correct"] == 1


def test_compare_bf16_unlabelled(model: Path, tmp_path: Path) -> None:
    env = cli_env(model)
    imgs = [str(small_image(tmp_path / f"{s}.png", s + ".png")) for s in ("chelsea", "coffee", "horse")]

    def top(precision: str) -> list[list[int]]:
        out = run_cli(["predict", "--json", "-k", "5", "--device", "cpu", "--precision", precision, *imgs],
                      env=env).stdout.splitlines()
        return [[t["index"] for t in json.loads(line)["top_k"]] for line in out]

    a, b = top("fp32"), top("bf16")
    r = run_cli(["eval", *imgs, "--json", "--device", "cpu", "--compare", "precision=bf16"], env=env)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    cmp = rep["compare"]
    assert cmp["top1_agree"] == sum(x[0] == y[0] for x, y in zip(a, b))
    assert abs(cmp["top5_overlap"] - sum(len(set(x) & set(y)) / 5 for x, y in zip(a, b)) / 3) < 1e-9
    assert rep["labelled"] == 0 and "top1" not in cmp


def test_usage_errors(model: Path, answers: dict[str, Any], tmp_path: Path) -> None:
    """Exit 2, before the model loads, each with one line on stderr."""
    env = cli_env(model)
    first = answers["labels"][answers["top"]["A"][0]]
    img = answers["images"]["A"]

    def usage_error(*args: str) -> str:
        r = run_cli(["eval", *args, "--device", "cpu"], env=env)
        assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stderr)
        assert_one_line_errors(r.stderr)
        return r.stderr

    bad = tmp_path / "bad"
    (bad / (first + "x")).mkdir(parents=True)
    told = usage_error(str(bad))
    assert f"unknown class {first + 'x'!r}" in told and repr(first) in told  # among the nearest labels
    rows = tmp_path / "rows.csv"
    rows.write_text(f"{img},{first}\n{img},no such class zz\n", encoding="utf-8")
    assert "rows.csv line 2: unknown class 'no such class zz'" in usage_error(str(rows))
    rows.write_text(f"{img},1000\n", encoding="utf-8")
    assert "out of range" in usage_error(str(rows))
    (tmp_path / "real.json").write_text("[[1], [2]]")
    assert "2 entries for 1 images" in usage_error(str(img), "--real-labels", str(tmp_path / "real.json"))
    assert "report goes to stdout" in usage_error(str(img), "-o", "-")
    assert "--compare" in usage_error(str(img), "--compare", "top_k=3")
