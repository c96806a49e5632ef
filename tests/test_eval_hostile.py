"""`ofacls eval` on label files and trees that are not what they seem: names holding
Unicode line breaks, overlong lines, unclosed quotes, images beside the class
folders, and --resume rows edited by hand."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    assert_one_line_errors,
    cli_env,
    invoke,
    one_torch_thread,  # noqa: F401  (autouse fixture)
    run_cli,
    small_image,
)

from ofacls.evaluate import LINE_LIMIT

# A form feed, NEL and LINE SEPARATOR: str.splitlines() breaks lines at each of them
ODD_NAMES = ["plain.png", "form\x0cfeed.png", "next\x85line.png", "line\u2028sep.png", "par\u2029sep.png"]


@pytest.fixture(scope="module")
def labels(model: Path) -> list[str]:
    r = invoke(["labels"], model=model)
    assert r.exit_code == 0, r.stderr
    return r.stdout.splitlines()


def _eval(model: Path, *args: str) -> tuple[int, str, str]:
    r = invoke(["eval", *args, "--device", "cpu", "--quiet"], model=model)
    return r.exit_code, r.stdout, r.stderr


def _usage_error(model: Path, *args: str) -> str:
    code, out, err = _eval(model, *args)
    assert (code, out) == (2, ""), (code, err)
    assert_one_line_errors(err)
    assert len(err.splitlines()) == 1, err
    return err


# --- label files: lines end at \n alone -------------------------------------------


def test_names_with_unicode_line_breaks(model: Path, labels: list[str], tmp_path: Path) -> None:
    """Five images, five rows, in CSV and in JSONL (valid JSONL: the characters raw
    inside JSON strings), with a header, a BOM and CRLF endings."""
    for name in ODD_NAMES:
        small_image(tmp_path / "img" / name)
    rows = [(f"img/{name}", labels[i]) for i, name in enumerate(ODD_NAMES)]
    (tmp_path / "rows.csv").write_bytes(
        ("\ufeffinput,label\r\n" + "".join(f"{a},{b}\r\n" for a, b in rows)).encode())
    (tmp_path / "rows.jsonl").write_bytes(
        "".join(json.dumps({"input": a, "label": b}, ensure_ascii=False) + "\n" for a, b in rows).encode())
    assert "\u2028" in (tmp_path / "rows.jsonl").read_text(encoding="utf-8")

    for data in ("rows.csv", "rows.jsonl"):
        code, out, err = _eval(model, str(tmp_path / data), "--json")
        assert code == 0, err
        rep = json.loads(out)
        assert (rep["images"], rep["failed"], rep["labelled"]) == (5, 0, 5)
        assert sorted(c["label"] for c in rep["worst_classes"]) == sorted(labels[:5])


# --- label files: overlong lines ---------------------------------------------------


def test_a_field_past_the_line_limit_is_one_line(model: Path, labels: list[str], tmp_path: Path) -> None:
    """Past the csv module's own field limit (128 KiB): no csv.Error traceback."""
    img = small_image(tmp_path / "a.png")
    long = "x" * (129 * 1024)
    (tmp_path / "rows.csv").write_text(f"{img},{labels[0]}\n{img},{long}\n{img},{labels[1]}\n",
                                       encoding="utf-8")
    assert f"rows.csv line 2 is longer than {LINE_LIMIT // 1024} KiB" in _usage_error(
        model, str(tmp_path / "rows.csv"))
    (tmp_path / "quoted.csv").write_text(f'"{img}","{long}"\n', encoding="utf-8")
    assert "quoted.csv line 1 is longer than" in _usage_error(model, str(tmp_path / "quoted.csv"))
    (tmp_path / "rows.jsonl").write_text(json.dumps({"input": str(img), "label": long}) + "\n",
                                         encoding="utf-8")
    assert "rows.jsonl line 1 is longer than" in _usage_error(model, str(tmp_path / "rows.jsonl"))
    # a line of exactly the limit, its newline included, is read
    pad = LINE_LIMIT - len(f"{img},{labels[0]}\n".encode())
    (tmp_path / "edge.csv").write_text(f"{img},{' ' * pad}{labels[0]}\n", encoding="utf-8")
    code, out, err = _eval(model, str(tmp_path / "edge.csv"), "--json")
    assert code == 0, err
    assert json.loads(out)["labelled"] == 1


def _peak_memory(model: Path, data: Path) -> tuple[str, int]:
    """The one-line error of `eval DATA` and the peak of Python's allocations during it."""
    tracemalloc.start()
    try:
        told = _usage_error(model, str(data))
        return told, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_300_mb_line_is_not_read_whole(model: Path, tmp_path: Path) -> None:
    """A sparse 300 MB file with no newline: refused after reading LINE_LIMIT bytes.
    The peak is compared with a one-line file's (the model's label names are read
    either way, some tens of MB), not with zero."""
    small = tmp_path / "small.csv"
    small.write_text('"a.png,tench\n', encoding="utf-8")
    _, baseline = _peak_memory(model, small)
    for name in ("huge.csv", "huge.jsonl"):
        huge = tmp_path / name
        with huge.open("wb") as f:
            f.truncate(300 << 20)
        told, peak = _peak_memory(model, huge)
        assert f"{name} line 1 is longer than" in told
        assert peak < baseline + (4 << 20), (peak, baseline)


# --- label files: quotes ------------------------------------------------------------


def test_unclosed_quote_is_an_error_naming_its_line(model: Path, labels: list[str], tmp_path: Path) -> None:
    """Unclosed, the quote would merge every row after it into one field."""
    img = small_image(tmp_path / "a.png")
    rows = tmp_path / "rows.csv"
    cases = {
        f'{img},{labels[0]}\n"{img},{labels[1]}\n{img},{labels[2]}\n{img},{labels[3]}\n': 2,  # mid-file
        f'{img},{labels[0]}\n{img},"{labels[1]}\n': 2,  # on the last line
        f'{img},{labels[0]}\n{img},"{labels[1]}': 2,  # on a last line with no newline
        f'{img},{labels[0]}\n"{img}\n",{labels[1]}\n': 2,  # well-formed CSV, a newline in a name
    }
    for text, line in cases.items():
        rows.write_text(text, encoding="utf-8")
        told = _usage_error(model, str(rows))
        assert f"rows.csv line {line} opens a quoted field that is not closed on that line" in told, told
    rows.write_text(f'{img},{labels[0]}\n"{img}"x,{labels[1]}\n', encoding="utf-8")
    assert "rows.csv line 2 is not valid CSV" in _usage_error(model, str(rows))
    rows.write_text(f"{img},{labels[0]}\n{img}\rx,{labels[1]}\n", encoding="utf-8")
    told = _usage_error(model, str(rows))
    assert "rows.csv line 2 holds a carriage return inside an unquoted field" in told


def test_label_file_errors_in_a_subprocess(model: Path, labels: list[str], tmp_path: Path) -> None:
    """The exit code and the stdout/stderr split, as a shell sees them."""
    img = small_image(tmp_path / "a.png")
    env = cli_env(model)
    rows = tmp_path / "rows.csv"
    rows.write_text(f'{img},{labels[0]}\n"{img},{labels[1]}\n{img},{labels[2]}\n', encoding="utf-8")
    (tmp_path / "long.csv").write_text(f"{img},{'y' * (200 * 1024)}\n", encoding="utf-8")
    for data, told in ((rows, "rows.csv line 2 opens a quoted field"), (tmp_path / "long.csv",
                                                                       "long.csv line 1 is longer than")):
        r = run_cli(["eval", str(data), "--device", "cpu"], env=env)
        assert (r.returncode, r.stdout) == (2, ""), r.stderr
        assert len(r.stderr.splitlines()) == 1 and told in r.stderr, r.stderr
        assert_one_line_errors(r.stderr)


# --- class-folder trees ------------------------------------------------------------


def test_images_beside_the_class_folders_are_named(model: Path, labels: list[str], tmp_path: Path) -> None:
    val = tmp_path / "val"
    small_image(val / labels[0] / "in.png")
    for name in ("b.jpg", "a.png"):
        small_image(val / name)
    (val / "README.txt").write_text("not an image")
    small_image(val / ".hidden.png")
    code, out, err = _eval(model, str(val), "--json")
    assert code == 0, err
    assert json.loads(out)["images"] == 1
    assert err == (f"ofacls: warning: {val}: 2 images beside the class folders are not evaluated: "
                   "a.png, b.jpg\n")

    for i in range(5):
        small_image(val / f"c{i}.png")
    r = run_cli(["eval", str(val), "--device", "cpu", "--json"], env=cli_env(model))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["images"] == 1
    assert r.stderr.splitlines() == [f"ofacls: warning: {val}: 7 images beside the class folders are not "
                                     "evaluated: a.png, b.jpg, c0.png, c1.png, c2.png and 2 more"]


# --- --resume: rows are checked before they count --------------------------------


@pytest.fixture(scope="module")
def first_run(model: Path, labels: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tree of two images under classes neither is among the top 5 of (both wrong),
    and the CSV and JSONL rows eval wrote for it."""
    root = tmp_path_factory.mktemp("resume")
    imgs = [small_image(root / "src" / "A.png", "chelsea.png"),
            small_image(root / "src" / "B.png", "coffee.png")]
    r = invoke(["predict", "--json", "-k", "5", "--device", "cpu", *map(str, imgs)], model=model)
    assert r.exit_code == 0, r.stderr
    top = {i for line in r.stdout.splitlines() for i in (t["index"] for t in json.loads(line)["top_k"])}
    # sorted by name, so A's folder and row come first
    truth = sorted([i for i in range(len(labels)) if i not in top][:2], key=lambda i: labels[i])
    for img, t in zip(imgs, truth):
        (root / "val" / labels[t]).mkdir(parents=True)
        (root / "val" / labels[t] / img.name).write_bytes(img.read_bytes())
    out: dict[str, Any] = {"tree": root / "val", "truth": [labels[t] for t in truth], "truth_index": truth}
    for fmt in ("csv", "jsonl"):
        rows = root / f"rows.{fmt}"
        code, stdout, err = _eval(model, str(root / "val"), "--json", "-o", str(rows))
        assert code == 0, err
        rep = json.loads(stdout)
        assert (rep["labelled"], rep["top1"]["correct"], rep["top5"]["correct"]) == (2, 0, 0)
        out[fmt] = rows.read_bytes()
    return out


def _edit_csv(data: bytes, row: int, **fields: str) -> str:
    """The CSV rows `data` with fields of the `row`th record (0: the first after the header) changed."""
    header, *records = list(csv.reader(io.StringIO(data.decode(), newline="")))
    for name, value in fields.items():
        records[row][header.index(name)] = value
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *records])
    return buf.getvalue()


def test_resume_refuses_rows_eval_did_not_write(model: Path, labels: list[str], first_run: dict[str, Any],
                                                 tmp_path: Path) -> None:
    tree, truth, truth_index = first_run["tree"], first_run["truth"], first_run["truth_index"]
    rows = tmp_path / "rows.csv"
    base = first_run["csv"]
    a, b = tree / truth[0] / "A.png", tree / truth[1] / "B.png"
    cases = {
        # the true class's index under the predicted label: counted right, were it trusted
        "index": (_edit_csv(base, 0, index=str(truth_index[0])),
                  f"rows.csv line 2 ({a}): its label ", f"is not the class of its index {truth_index[0]} "
                                                       f"({truth[0]!r})"),
        "unknown": (_edit_csv(base, 1, label="no such class zz"),
                    f"rows.csv line 3 ({b}): its label 'no such class zz' is not a label of this model", ""),
        "range": (_edit_csv(base, 0, index_2=str(len(labels))),
                  f"rows.csv line 2 ({a}): its label 2 ", f"out of this model's 0-{len(labels) - 1}"),
        "truth": (_edit_csv(base, 1, true_label=truth[0]),
                  f"rows.csv line 3 ({b}): its true_label {truth[0]!r} is not DATA's ({truth[1]!r})", ""),
        "twice": (_edit_csv(base, 0, label_2=truth[0], index_2=str(truth_index[0]),
                            label_3=truth[0], index_3=str(truth_index[0])),
                  f"rows.csv line 2 ({a}): it names a class twice among its top labels", ""),
    }
    for name, (text, *told) in cases.items():
        rows.write_text(text, encoding="utf-8")
        err = _usage_error(model, str(tree), "--json", "-o", str(rows), "--resume")
        assert all(t in err for t in told) and "--overwrite" in err, (name, err)

    # the rows as written resume, and count
    rows.write_bytes(base)
    code, out, err = _eval(model, str(tree), "--json", "-o", str(rows), "--resume")
    assert code == 0, err
    rep = json.loads(out)
    assert (rep["resumed"], rep["labelled"], rep["top1"]["correct"]) == (2, 2, 0)


def test_resume_refuses_edited_jsonl_rows(model: Path, first_run: dict[str, Any], tmp_path: Path) -> None:
    """In JSONL the class that counts is the first top_k entry's; the row's own label,
    index and score must say the same."""
    tree, truth_index = first_run["tree"], first_run["truth_index"]
    objs = [json.loads(line) for line in first_run["jsonl"].decode().splitlines()]
    rows = tmp_path / "rows.jsonl"

    def write(edit: dict[str, Any], *, top: bool) -> None:
        edited = [dict(objs[0]), *objs[1:]]
        if top:
            edited[0]["top_k"] = [{**edited[0]["top_k"][0], **edit}, *edited[0]["top_k"][1:]]
        else:
            edited[0].update(edit)
        rows.write_text("".join(json.dumps(o) + "\n" for o in edited), encoding="utf-8")

    write({"index": truth_index[0]}, top=True)
    assert "rows.jsonl line 1 (" in _usage_error(model, str(tree), "-o", str(rows), "--resume")
    write({"index": truth_index[0]}, top=False)
    assert "are not its first top label's" in _usage_error(model, str(tree), "-o", str(rows), "--resume")
    write({"top_k": "tabby"}, top=False)
    assert "has no top labels" in _usage_error(model, str(tree), "-o", str(rows), "--resume")
    write({"score": "high"}, top=True)
    assert "has no finite score" in _usage_error(model, str(tree), "-o", str(rows), "--resume")


def test_resume_refusal_in_a_subprocess(model: Path, first_run: dict[str, Any], tmp_path: Path) -> None:
    tree, truth_index = first_run["tree"], first_run["truth_index"]
    rows = tmp_path / "rows.csv"
    rows.write_text(_edit_csv(first_run["csv"], 0, index=str(truth_index[0])), encoding="utf-8")
    r = run_cli(["eval", str(tree), "--device", "cpu", "--json", "-o", str(rows), "--resume"],
                env=cli_env(model))
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert len(r.stderr.splitlines()) == 1 and "rows.csv line 2 (" in r.stderr, r.stderr
    assert_one_line_errors(r.stderr)


def test_resume_keeps_an_input_listed_under_two_labels(model: Path, labels: list[str],
                                                        tmp_path: Path) -> None:
    """Its one kept row has the first listing's true_label: either of DATA's labels
    for it is its own, as is none for an unlabelled input."""
    img, other = small_image(tmp_path / "a.png"), small_image(tmp_path / "b.png", "coffee.png")
    data = tmp_path / "labels.csv"
    data.write_text(f"a.png,{labels[3]}\na.png,{labels[4]}\nb.png,\n", encoding="utf-8")
    rows = tmp_path / "rows.csv"
    code, out, err = _eval(model, str(data), "--json", "-o", str(rows))
    assert code == 0, err
    first = json.loads(out)
    code, out, err = _eval(model, str(data), "--json", "-o", str(rows), "--resume")
    assert code == 0, err
    again = json.loads(out)
    assert (again["images"], again["resumed"], again["labelled"]) == (3, 3, 2)
    assert again["top1"] == first["top1"] and again["top5"] == first["top5"]
    written = csv.DictReader(io.StringIO(rows.read_text(encoding="utf-8"), newline=""))
    assert {row["input"] for row in written} == {str(img), str(other)}
