"""writers: rows round-trip through CSV and JSONL whatever the names; OUT is refused,
locked, resumed and truncated exactly as a batch needs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ofacls.errors import OutputError
from ofacls.prediction import Prediction
from ofacls.writers import (
    OutputFile,
    csv_header,
    csv_line,
    csv_row,
    format_score,
    json_line,
    output_format,
    read_rows,
)

ROOT = Path(__file__).resolve().parents[1]

CAT = Prediction(
    "a.jpg", "tabby cat", 0.75, [("tabby cat", 0.75), ("tiger cat", 0.125), ("lynx", 0.0625)]
)
BAD = Prediction.failed("b.jpg", "not an image PIL can decode")
DOG = Prediction("c.jpg", "beagle", 0.5, [("beagle", 0.5)])


def rows_of(path: Path) -> list[dict[str, object]]:
    return read_rows(path)


# --- rows -------------------------------------------------------------------------


def test_csv_header() -> None:
    assert csv_header(1) == ["input", "label", "score", "error"]
    assert csv_header(3) == [
        "input",
        "label",
        "score",
        "error",
        "label_2",
        "score_2",
        "label_3",
        "score_3",
    ]
    with pytest.raises(ValueError):
        csv_header(0)


def test_csv_row_pads_and_truncates_to_top_k() -> None:
    assert csv_row(CAT, 1) == ["a.jpg", "tabby cat", "0.75", ""]
    assert csv_row(CAT, 2) == ["a.jpg", "tabby cat", "0.75", "", "tiger cat", "0.125"]
    assert csv_row(CAT, 5)[-4:] == ["", "", "", ""]
    assert csv_row(BAD, 3) == ["b.jpg", "", "", "not an image PIL can decode", "", "", "", ""]
    assert len(csv_row(BAD, 3)) == len(csv_header(3))


def test_csv_line_quotes_what_needs_quoting() -> None:
    odd = Prediction.failed('my, "odd"\nname\r.jpg', "x")
    assert csv_line(odd, 1) == '"my, ""odd""\nname\r.jpg",,,x\n'
    assert csv_line(CAT, 1) == "a.jpg,tabby cat,0.75,\n"


def test_json_line_is_the_prediction_schema() -> None:
    line = json_line(Prediction("café.jpg", "cat", 0.5, [("cat", 0.5)]))
    assert "\n" not in line and "café" in line
    assert json.loads(line) == {
        "input": "café.jpg",
        "label": "cat",
        "score": 0.5,
        "top_k": [{"label": "cat", "score": 0.5}],
        "error": None,
    }


@given(st.floats(min_value=0, max_value=1))
def test_scores_round_trip_exactly(score: float) -> None:
    assert float(format_score(score)) == score
    assert format_score(None) == ""


def test_output_format() -> None:
    assert output_format("x.csv") == "csv"
    assert output_format("X.JSONL") == "jsonl"
    assert output_format("x.out", "JSONL") == "jsonl"
    with pytest.raises(OutputError, match="--format"):
        output_format("x.json")
    with pytest.raises(OutputError, match="unknown output format"):
        output_format("x.csv", "xml")


# --- round trips ------------------------------------------------------------------

# POSIX names cannot hold NUL; anything else goes, surrogates aside (they are the
# separate non-UTF-8 case below).
text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"))
labels = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1)
scores = st.floats(min_value=0, max_value=1)
predictions = st.one_of(
    st.builds(
        lambda name, ranked: Prediction(name, ranked[0][0], ranked[0][1], ranked),
        text,
        st.lists(st.tuples(labels, scores), min_size=1, max_size=4),
    ),
    st.builds(Prediction.failed, text, text),
)


@settings(max_examples=60, deadline=None)
@given(preds=st.lists(predictions, max_size=6), fmt=st.sampled_from(["csv", "jsonl"]))
def test_any_name_round_trips(preds: list[Prediction], fmt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"out.{fmt}"
        with OutputFile(out, top_k=4) as f:
            for p in preds:
                f.write(p)
        if not preds:  # a file it created and wrote nothing to is removed
            assert not out.exists()
            return
        assert read_rows(out) == [p.to_dict() for p in preds]
        with OutputFile(out, top_k=4, resume=True) as f:
            assert f.finished == {p.input for p in preds if p.ok}
            assert not f.dropped_torn_row
        assert read_rows(out) == [p.to_dict() for p in preds if p.ok]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_non_utf8_names_round_trip_byte_for_byte(tmp_path: Path, fmt: str) -> None:
    name = os.fsdecode(b"caf\xe9, \xff.jpg")  # as os.scandir gives a Latin-1 name
    out = tmp_path / f"out.{fmt}"
    with OutputFile(out) as f:
        f.write(Prediction(name, "cat", 0.5, [("cat", 0.5)]))
    assert b"caf\xe9, \xff.jpg" in out.read_bytes()
    assert read_rows(out)[0]["input"] == name


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_rows_are_flushed_as_written(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"out.{fmt}"
    with OutputFile(out, top_k=3) as f:
        f.write(CAT)
        assert read_rows(out) == [CAT.to_dict()]
        f.write(BAD)
        assert read_rows(out) == [CAT.to_dict(), BAD.to_dict()]


def test_csv_file_layout(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    with OutputFile(out, top_k=2) as f:
        f.write(CAT)
        f.write(BAD)
    assert out.read_text() == (
        "input,label,score,error,label_2,score_2\n"
        "a.jpg,tabby cat,0.75,,tiger cat,0.125\n"
        "b.jpg,,,not an image PIL can decode,,\n"
    )


def test_explicit_format_overrides_the_extension(tmp_path: Path) -> None:
    out = tmp_path / "results.txt"
    with OutputFile(out, fmt="jsonl") as f:
        f.write(CAT)
    assert json.loads(out.read_text()) == CAT.to_dict()


# --- refusing, overwriting, resuming ----------------------------------------------


def test_existing_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    out.write_text("precious\n")
    with pytest.raises(OutputError, match="already exists: use --overwrite .* or --resume"):
        OutputFile(out)
    assert out.read_text() == "precious\n"
    assert not (tmp_path / "out.csv.lock").exists()


def test_overwrite_replaces(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    with OutputFile(out, overwrite=True) as f:
        assert f.finished == set()
        f.write(CAT)
    assert rows_of(out) == [CAT.to_dict()]


def test_overwrite_and_resume_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot be used together"):
        OutputFile(tmp_path / "out.csv", overwrite=True, resume=True)


def test_unwritable_destinations(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot write .*no such file or directory"):
        OutputFile(tmp_path / "missing" / "out.csv")
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        OutputFile(tmp_path / "d.csv", overwrite=True)


def test_resume_of_a_missing_or_empty_file_starts_it(tmp_path: Path) -> None:
    for out in (tmp_path / "new.csv", tmp_path / "empty.csv"):
        if out.name == "empty.csv":
            out.write_bytes(b"")
        with OutputFile(out, top_k=2, resume=True) as f:
            assert f.finished == set()
            f.write(CAT)
        assert out.read_text().splitlines()[0] == "input,label,score,error,label_2,score_2"
        assert rows_of(out) == [
            Prediction(CAT.input, CAT.label, CAT.score, CAT.top_k[:2]).to_dict()
        ]


@pytest.mark.parametrize(
    ("fmt", "torn"),
    [
        ("jsonl", b'{"input": "c.jpg", "lab'),  # no newline
        ("jsonl", b'{"input": "c.jpg", "lab\n'),  # unparsable last line
        ("csv", b"c.jpg,tabby ca"),  # no newline
        ("csv", b'"c\n'),  # torn inside a quoted name that holds a newline
        ("csv", b"c.jpg,cat\n"),  # too few fields
    ],
)
def test_resume_drops_a_torn_last_row(tmp_path: Path, fmt: str, torn: bytes) -> None:
    out = tmp_path / f"out.{fmt}"
    with OutputFile(out, top_k=3) as f:
        f.write(CAT)
        f.write(DOG)
    whole = out.read_bytes()
    out.write_bytes(whole + torn)
    with OutputFile(out, top_k=3, resume=True) as f:
        assert f.finished == {"a.jpg", "c.jpg"}
        assert f.dropped_torn_row
        assert out.read_bytes() == whole
        f.write(Prediction.failed("d.jpg", "x"))
    assert [r["input"] for r in rows_of(out)] == ["a.jpg", "c.jpg", "d.jpg"]


def test_resume_with_only_a_torn_header(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    out.write_bytes(b"input,lab")
    with OutputFile(out, resume=True) as f:
        f.write(CAT)
    assert out.read_text() == "input,label,score,error\na.jpg,tabby cat,0.75,\n"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_resume_drops_failed_rows_so_they_are_retried(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"out.{fmt}"
    with OutputFile(out, top_k=2) as f:
        for p in (CAT, BAD, CAT, DOG, BAD):
            f.write(p)
    out.chmod(0o640)
    with OutputFile(out, top_k=2, resume=True) as f:
        assert f.finished_counts == {"a.jpg": 2, "c.jpg": 1}
        assert [r["input"] for r in rows_of(out)] == ["a.jpg", "a.jpg", "c.jpg"]
        f.write(BAD)  # retried, failed again: one row for it now
    assert [r["input"] for r in rows_of(out)] == ["a.jpg", "a.jpg", "c.jpg", "b.jpg"]
    assert out.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no .tmp, no .lock


def test_resume_through_a_symlink_rewrites_the_file_it_names(tmp_path: Path) -> None:
    real = tmp_path / "data" / "out.csv"
    real.parent.mkdir()
    with OutputFile(real) as f:
        f.write(BAD)
        f.write(CAT)
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    with OutputFile(link, resume=True) as f:
        assert f.finished == {"a.jpg"}
    assert link.is_symlink() and [r["input"] for r in rows_of(real)] == ["a.jpg"]


def test_overwrite_keeps_the_old_file_until_the_first_row(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    out.write_text("precious\n")
    with OutputFile(out, overwrite=True):
        assert out.read_text() == "precious\n"
    assert out.read_text() == "precious\n"  # nothing classified, nothing lost
    with OutputFile(out, overwrite=True) as f:
        f.write(CAT)
    assert out.read_text() == "input,label,score,error\na.jpg,tabby cat,0.75,\n"


def test_a_new_file_without_rows_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    with OutputFile(out):
        assert out.read_text() == "input,label,score,error\n"
    assert not out.exists()


STREAM = """
import sys
from ofacls.prediction import Prediction
from ofacls.writers import OutputFile
print("before", flush=True)
with OutputFile(sys.argv[1], fmt=sys.argv[2] or None) as f:
    f.write(Prediction("a.jpg", "tabby", 0.5, [("tabby", 0.5)]))
"""


@pytest.mark.parametrize(("fmt", "expect"), [
    ("", "before\ninput,label,score,error\na.jpg,tabby,0.5,\n"),
    ("jsonl", 'before\n{"input": "a.jpg", "label": "tabby", "score": 0.5, '
              '"top_k": [{"label": "tabby", "score": 0.5}], "error": null}\n'),
])
def test_dash_streams_rows_to_stdout(fmt: str, expect: str) -> None:
    result = python(STREAM, "-", fmt)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expect


def test_non_regular_files_are_streamed_without_lock_or_resume(tmp_path: Path) -> None:
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    with OutputFile(fifo) as f:  # exists, yet no --overwrite is needed; csv by default
        f.write(CAT)
    assert reader.communicate(timeout=10)[0] == "input,label,score,error\na.jpg,tabby cat,0.75,\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [fifo.name]  # no lock sidecar
    with pytest.raises(OutputError, match="cannot resume .*: not a regular file"):
        OutputFile(fifo, fmt="csv", resume=True)
    with OutputFile(os.devnull) as f:
        f.write(CAT)
    assert f.fmt == "csv"


def test_resume_refuses_a_different_top_k(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    with OutputFile(out, top_k=3) as f:
        f.write(CAT)
    before = out.read_bytes()
    with pytest.raises(OutputError, match="columns for --top-k 3, not 5"):
        OutputFile(out, top_k=5, resume=True)
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    ("fmt", "content", "message"),
    [
        (
            "jsonl",
            b'{"input": "a"}\nnot json\n{"input": "b"}\n',
            "line 2 is not an ofacls JSON row",
        ),
        ("csv", b"name,size\na.jpg,3\n", "not an ofacls CSV file"),
        ("csv", b'input,label,score,error\na,b,0.5,\n"x"y,,,\nz,,,\n', "line 3 is not valid CSV"),
        (
            "csv",
            b"input,label,score,error\na.jpg,cat,high,\nb.jpg,,,e\n",
            "line 2 is not an ofacls row",
        ),
    ],
)
def test_resume_refuses_a_file_it_did_not_write(
    tmp_path: Path, fmt: str, content: bytes, message: str
) -> None:
    out = tmp_path / f"out.{fmt}"
    out.write_bytes(content)
    with pytest.raises(OutputError, match=message):
        OutputFile(out, resume=True)
    assert out.read_bytes() == content


def test_resume_tolerates_a_bom(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    out.write_bytes(b"\xef\xbb\xbfinput,label,score,error\na.jpg,cat,0.5,\n")
    with OutputFile(out, resume=True) as f:
        assert f.finished == {"a.jpg"}
        f.write(BAD)
    assert [r["input"] for r in rows_of(out)] == ["a.jpg", "b.jpg"]


# --- locking ----------------------------------------------------------------------

HOLD = """
import sys, time
from ofacls.writers import OutputFile
f = OutputFile(sys.argv[1], overwrite=True)
print("locked", flush=True)
time.sleep(60)
"""

TRY = """
import sys
from ofacls.errors import OutputError
from ofacls.writers import OutputFile
try:
    with OutputFile(sys.argv[1], resume=True) as f:
        print("opened")
except OutputError as e:
    print(e)
"""


def python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, text=True, capture_output=True, timeout=30
    )


def test_second_run_in_another_process_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    with OutputFile(out) as f:
        f.write(CAT)
        result = python(TRY, str(out))
        assert result.stdout.strip() == (
            f"{out} is being written by another ofacls run (pid {os.getpid()})"
        )
        assert rows_of(out) == [
            Prediction(CAT.input, CAT.label, CAT.score, CAT.top_k[:1]).to_dict()
        ]
    assert not (tmp_path / "out.csv.lock").exists()
    assert python(TRY, str(out)).stdout.strip() == "opened"


def test_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with OutputFile(out):
        with pytest.raises(OutputError, match="being written by another ofacls run"):
            OutputFile(out, overwrite=True)
        with pytest.raises(OutputError, match="being written by another ofacls run"):
            OutputFile(out)  # the lock is checked first, before "already exists"
    with OutputFile(out, resume=True):
        pass


def test_a_killed_writer_leaves_a_lock_the_next_run_takes_over(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert python(TRY, str(out)).stdout.strip() == (
            f"{out} is being written by another ofacls run (pid {holder.pid})"
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    assert (tmp_path / "out.csv.lock").exists()  # stale, but no longer locked
    assert python(TRY, str(out)).stdout.strip() == "opened"
    assert not (tmp_path / "out.csv.lock").exists()


def test_close_is_idempotent(tmp_path: Path) -> None:
    f = OutputFile(tmp_path / "out.csv")
    f.close()
    f.close()
