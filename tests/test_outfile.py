"""outfile: OUT is refused, locked, resumed and rewritten exactly as a batch needs,
and every fault of OUT itself (full disk, deleted, truncated) is one OutputError."""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import cli_env, copies, run_cli, small_image
from httpserver import HTTPTestServer

from ofacls.errors import OutputError
from ofacls.formats import read_rows
from ofacls.outfile import OutputFile
from ofacls.prediction import Prediction
from ofacls.resume import InputKeys, input_key

ROOT = Path(__file__).resolve().parents[1]

CAT = Prediction("a.jpg", "tabby cat", 0.75, [("tabby cat", 0.75), ("tiger cat", 0.125)],
                 indices=[281, 282])
BAD = Prediction.failed("b.jpg", "not an image PIL can decode")
DOG = Prediction("c.jpg", "beagle", 0.5, [("beagle", 0.5)], indices=[162])


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows name their inputs relative to the run's folder: tmp_path here."""
    monkeypatch.chdir(tmp_path)


def inputs(path: Path) -> list[str]:
    return [r["input"] for r in read_rows(path)]


def write(out: Path, *preds: Prediction, top_k: int = 2, fmt: str | None = None, overwrite: bool = False,
          resume: bool = False) -> None:
    with OutputFile(out, top_k=top_k, fmt=fmt, overwrite=overwrite, resume=resume) as f:
        for p in preds:
            f.write(p)


def python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter, in this test's folder (as a rerun of a batch)."""
    return subprocess.run([sys.executable, "-c", code, *args], text=True, capture_output=True, timeout=60)


# --- refusing, overwriting, starting afresh ---------------------------------------


def test_existing_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    out.write_text("precious\n")
    with pytest.raises(OutputError, match="already exists: use --overwrite .* or --resume"):
        OutputFile(out)
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]  # no lock sidecar


@pytest.mark.parametrize(("name", "content"), [
    ("out.csv", b"input,label,score,index,error,label_2,score_2,index_2\n"),
    ("out.csv", b"input,label,score,index,error\n"),  # another --top-k: nothing to lose either
    ("out.tsv", b"input\tlabel\tscore\tindex\terror\n"),
    ("out.jsonl", b""),
    ("out.json", b"[\n"),
    ("out.json", b"[]\n"),
    ("out.json", b"[\n\n]\n"),  # what a resume that kept no row leaves
    ("out.parquet", b""),  # what a run killed before its first row leaves, its journal empty
])
def test_a_file_without_rows_is_taken_by_a_plain_rerun(tmp_path: Path, name: str,
                                                       content: bytes) -> None:
    out = tmp_path / name
    out.write_bytes(content)  # what a run killed before its first row leaves
    with OutputFile(out, top_k=2):
        assert out.read_bytes() == content  # untouched until a row comes
    assert out.read_bytes() == content
    write(out, CAT)
    assert inputs(out) == ["a.jpg"]


def test_overwrite_keeps_the_old_file_until_the_first_row(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    out.write_text("precious\n")
    with OutputFile(out, overwrite=True) as f:
        assert f.done == set()
        assert out.read_text() == "precious\n"
    assert out.read_text() == "precious\n"  # nothing classified, nothing lost
    write(out, CAT, top_k=1, overwrite=True)
    assert out.read_text() == "input,label,score,index,error\na.jpg,tabby cat,0.75,281,\n"


def test_a_new_file_without_rows_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    with OutputFile(out):
        assert out.read_text() == "input,label,score,index,error\n"
    assert not out.exists()


def test_bad_arguments_and_destinations(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot be used together"):
        OutputFile(tmp_path / "out.csv", overwrite=True, resume=True)
    with pytest.raises(OutputError, match="cannot write .*no such file or directory"):
        OutputFile(tmp_path / "missing" / "out.csv")
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        OutputFile(tmp_path / "d.csv", overwrite=True)
    assert not (tmp_path / "out.csv").exists()


def test_explicit_format_overrides_the_extension(tmp_path: Path) -> None:
    out = tmp_path / "results.txt"
    write(out, CAT, fmt="jsonl")
    assert json.loads(out.read_text()) == CAT.to_dict()


# --- resuming ---------------------------------------------------------------------


def test_resume_of_a_missing_or_empty_file_starts_it(tmp_path: Path) -> None:
    for out in (tmp_path / "new.csv", tmp_path / "empty.csv"):
        if out.name == "empty.csv":
            out.write_bytes(b"")
        with OutputFile(out, top_k=2, resume=True) as f:
            assert f.done == set()
            f.write(CAT)
        assert out.read_text().splitlines()[0] == "input,label,score,index,error,label_2,score_2,index_2"
        assert read_rows(out) == [CAT.to_dict()]


@pytest.mark.parametrize(("fmt", "torn"), [
    ("jsonl", b'{"input": "c.jpg", "lab'),
    ("csv", b"c.jpg,tabby ca"),
    ("csv", b'"c'),  # torn inside a quoted name
    ("tsv", b"c.jpg\t"),
])
def test_resume_drops_a_torn_last_row(tmp_path: Path, fmt: str, torn: bytes) -> None:
    out = tmp_path / f"out.{fmt}"
    write(out, CAT, DOG)
    whole = out.read_bytes()
    out.write_bytes(whole + torn)
    with OutputFile(out, top_k=2, resume=True) as f:
        assert f.done == {str(tmp_path / "a.jpg"), str(tmp_path / "c.jpg")}
        assert f.dropped_torn_row
        assert out.read_bytes() == whole
        f.write(Prediction.failed("d.jpg", "x"))
    assert inputs(out) == ["a.jpg", "c.jpg", "d.jpg"]


@pytest.mark.parametrize(("fmt", "last", "message"), [
    ("jsonl", b'{"input": "c.jpg", "lab\n', "line 3 is not an ofacls JSON row"),
    ("jsonl", b'{"input": "c.jpg", "label": null}\n', 'line 3 is not an ofacls JSON row .*"error"'),
    ("csv", b"c.jpg,cat\n", "line 4 is not an ofacls row"),
    # a name with a newline cut after it: no newline ends a row there
    ("csv", b'"c\n', "line 4 opens a quoted field that is never closed"),
    ("tsv", b"c.jpg\tcat\n", "line 4 is not an ofacls row"),
    ("json", b'{"input": "d.jpg", "error": null}\n', r"line 5 is not an ofacls JSON array \(after its end"),
])
def test_resume_refuses_a_complete_last_line_that_is_not_a_row(tmp_path: Path, fmt: str, last: bytes,
                                                               message: str) -> None:
    out = tmp_path / f"out.{fmt}"
    write(out, CAT, DOG)
    out.write_bytes(out.read_bytes() + last)
    before = out.read_bytes()
    with pytest.raises(OutputError, match=message):
        OutputFile(out, top_k=2, resume=True)
    assert out.read_bytes() == before


def test_a_resumed_json_array_is_valid_from_the_start(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    write(out, CAT, DOG)
    whole = out.read_bytes()
    with OutputFile(out, top_k=2, resume=True) as f:
        assert len(f.done) == 2 and out.read_bytes() == whole  # nothing to cut, nothing rewritten
        f.write(BAD)
        assert inputs(out) == ["a.jpg", "c.jpg", "b.jpg"]
    # a row torn by a writer that died mid-write (a JSON array's rows are written
    # with the `]` after them, but a write can stop short): the array is closed again
    out.write_bytes(whole[: whole.rindex(b"\n]")] + b',\n{"input": "d.jpg", "lab')
    with OutputFile(out, top_k=2, resume=True) as f:
        assert f.dropped_torn_row and json.loads(out.read_bytes()) == [CAT.to_dict(), DOG.to_dict()]
        f.write(BAD)
    assert inputs(out) == ["a.jpg", "c.jpg", "b.jpg"]
    write(out, BAD, overwrite=True)
    with OutputFile(out, top_k=2, resume=True) as f:  # no row kept: `[` `]`, until a row comes
        assert f.done == set() and json.loads(out.read_bytes()) == []
        f.write(CAT)
    assert inputs(out) == ["a.jpg"]


def test_a_json_array_ofacls_did_not_write_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    out.write_text(json.dumps([CAT.to_dict()], indent=2))
    with pytest.raises(OutputError, match=f"^{out} line 2 is not an ofacls JSON row$"):
        OutputFile(out, top_k=2, resume=True)
    out.write_text(json.dumps(CAT.to_dict()) + "\n")
    with pytest.raises(OutputError, match=r"line 1 is not an ofacls JSON array \(before its `\[`"):
        OutputFile(out, top_k=2, resume=True)


# --- Parquet and its journal --------------------------------------------------------


def journal(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def test_parquet_rows_go_to_a_journal_that_close_turns_into_the_file(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "out.parquet"
    with OutputFile(out, top_k=2) as f:
        f.write(CAT)
        f.write(BAD)
        assert out.read_bytes() == b""  # OUT only holds the lock until the end
        assert [json.loads(line) for line in journal(out).read_text().splitlines()] == \
            [CAT.to_dict(), BAD.to_dict()]
        assert inputs(out) == ["a.jpg", "b.jpg"]  # read_rows reads the journal meanwhile
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]
    assert pq.read_table(out).to_pylist() == [CAT.to_dict(), BAD.to_dict()]


def test_a_parquet_journal_left_behind_is_refused_overwritten_or_resumed(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    out.touch()  # as a killed run leaves them
    journal(out).write_text(json_lines(CAT, BAD) + '{"input": "c.jpg", "lab')
    with pytest.raises(OutputError, match=f"^{out} is unfinished \\({journal(out)} holds the rows of a run "
                                          "that did not end\\): use --resume to finish it or --overwrite"):
        OutputFile(out)
    with OutputFile(out, top_k=2, overwrite=True):
        pass  # nothing written: the journal stays as it was
    assert inputs(out) == ["a.jpg", "b.jpg"]
    with OutputFile(out, top_k=2, resume=True) as f:
        assert f.done == {str(tmp_path / "a.jpg")} and f.dropped_rows == 1 and f.dropped_torn_row
        f.write(DOG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]
    assert read_rows(out) == [CAT.to_dict(), DOG.to_dict()]
    journal(out).write_text(json_lines(BAD))
    write(out, DOG, overwrite=True)  # the first row empties the journal
    assert read_rows(out) == [DOG.to_dict()] and not journal(out).exists()


def test_a_finished_parquet_file_is_resumed_through_a_new_journal(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    write(out, CAT, BAD)
    with pytest.raises(OutputError, match="already exists: use --overwrite"):
        OutputFile(out)
    before = out.read_bytes()
    with OutputFile(out, top_k=2, resume=True) as f:
        assert f.done == {str(tmp_path / "a.jpg")} and f.dropped_rows == 1
        assert out.read_bytes() == before and inputs(out) == ["a.jpg"]
        f.write(DOG)
    assert inputs(out) == ["a.jpg", "c.jpg"]
    with OutputFile(out, top_k=2, resume=True) as f:  # nothing left to do: OUT written as it was
        assert len(f.done) == 2
    assert inputs(out) == ["a.jpg", "c.jpg"] and not journal(out).exists()


def test_a_parquet_file_ofacls_did_not_write_is_refused(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "out.parquet"
    pq.write_table(pa.table({"name": ["a.jpg"], "size": [3]}), out)
    before = out.read_bytes()
    with pytest.raises(OutputError, match=f"^{out} row 1 is not an ofacls row"):
        OutputFile(out, resume=True)
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["out.parquet"]


@pytest.mark.parametrize("which", ["out", "journal"])
def test_a_parquet_file_or_its_journal_deleted_under_the_run(tmp_path: Path, which: str) -> None:
    out = tmp_path / "out.parquet"
    f = OutputFile(out, top_k=2)
    f.write(CAT)
    (out if which == "out" else journal(out)).unlink()
    name = out if which == "out" else journal(out)
    with pytest.raises(OutputError, match=f"^{name} was deleted while this run was writing it$"):
        f.write(DOG)
    f.close()


def json_lines(*preds: Prediction) -> str:
    return "".join(json.dumps(p.to_dict()) + "\n" for p in preds)


def test_resume_with_only_a_torn_header(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    out.write_bytes(b"input,lab")
    write(out, CAT, top_k=1, resume=True)
    assert out.read_text() == "input,label,score,index,error\na.jpg,tabby cat,0.75,281,\n"


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_resume_drops_failed_and_repeated_rows(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"out.{fmt}"
    again = Prediction("./a.jpg", "lynx", 0.25, [("lynx", 0.25)], indices=[287])  # a.jpg once more
    write(out, CAT, BAD, again, DOG, BAD)
    out.chmod(0o640)
    with OutputFile(out, top_k=2, resume=True) as f:
        assert f.done == {str(tmp_path / "a.jpg"), str(tmp_path / "c.jpg")}
        assert f.dropped_rows == 3
        assert inputs(out) == ["a.jpg", "c.jpg"]
        f.write(BAD)  # retried, failed again: one row for it now
    assert read_rows(out) == [CAT.to_dict(), DOG.to_dict(), BAD.to_dict()]
    assert out.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no .tmp left


def test_resume_refuses_a_different_top_k(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    write(out, CAT, top_k=3)
    before = out.read_bytes()
    with pytest.raises(OutputError, match="columns for --top-k 3, not 5: resume with --top-k 3"):
        OutputFile(out, top_k=5, resume=True)
    assert out.read_bytes() == before


def test_resume_tolerates_a_bom(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    out.write_bytes(b"\xef\xbb\xbfinput,label,score,index,error\na.jpg,cat,0.5,1,\n")
    write(out, BAD, top_k=1, resume=True)
    assert inputs(out) == ["a.jpg", "b.jpg"]
    assert out.read_bytes().startswith(b"\xef\xbb\xbf")


def test_resume_through_a_symlink_rewrites_the_file_it_names(tmp_path: Path) -> None:
    real = tmp_path / "data" / "out.csv"
    real.parent.mkdir()
    write(real, BAD, CAT)
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    with OutputFile(link, resume=True, top_k=2) as f:
        assert f.done == {str(tmp_path / "a.jpg")}
    assert link.is_symlink() and inputs(real) == ["a.jpg"]


def test_a_dangling_symlink_is_written_through(tmp_path: Path) -> None:
    link = tmp_path / "link.csv"
    link.symlink_to("data/out.csv")
    (tmp_path / "data").mkdir()
    write(link, CAT)
    assert link.is_symlink() and inputs(tmp_path / "data" / "out.csv") == ["a.jpg"]


# --- which inputs are done ----------------------------------------------------------


def test_input_key_is_the_real_path_or_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"x")
    (tmp_path / "alias").symlink_to("pics")
    (tmp_path / "pics" / "b.png").symlink_to("a.png")
    real = str(tmp_path / "pics" / "a.png")
    for name in ("pics/a.png", "./pics/a.png", "pics//a.png", "alias/a.png", "pics/b.png",
                 "pics/../pics/a.png", real, "alias/../pics/a.png"):
        assert input_key(name) == real == os.path.realpath(name), name
    assert input_key("missing/x.png") == str(tmp_path / "missing" / "x.png")
    assert input_key("x.png") == str(tmp_path / "x.png") and input_key("/") == "/"
    url = "https://example.com/a/../b.jpg?x=1"
    assert input_key(url) == url
    keys = InputKeys()
    names = [f"pics/{n}" for n in ("a.png", "b.png", "c.png", "..", ".")] + ["alias/a.png", "", "pics/"]
    assert [keys(n) for n in names] == [os.path.realpath(n) for n in names]


def test_resume_knows_inputs_by_identity_not_spelling(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pics").mkdir()
    out = tmp_path / "out.jsonl"
    url = "http://127.0.0.1:9/a.jpg"
    write(out, Prediction("pics/a.jpg", "cat", 0.5, [("cat", 0.5)]),
          Prediction(url, "dog", 0.5, [("dog", 0.5)]))
    with OutputFile(out, resume=True) as f:
        assert f.done == {str(tmp_path / "pics" / "a.jpg"), url}
        assert f.is_done("./pics/a.jpg") and f.is_done(str(tmp_path / "pics/a.jpg"))
        assert f.is_done(url) and not f.is_done("pics/b.jpg")
    assert inputs(out) == ["pics/a.jpg", url]  # as they were given


def xattrs_work(folder: Path) -> bool:
    probe = folder / ".probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.fixture
def two_folders(tmp_path: Path) -> tuple[Path, Path]:
    if not xattrs_work(tmp_path):
        pytest.skip("this filesystem keeps no user extended attributes")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    return a, b


def test_a_resume_from_another_folder_is_refused_while_names_are_relative(
        tmp_path: Path, two_folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two_folders
    out = tmp_path / "out.csv"
    monkeypatch.chdir(a)
    write(out, CAT, BAD)  # a.jpg and b.jpg, in a
    before = out.read_bytes()
    monkeypatch.chdir(b)  # b's a.jpg is another file, not done
    with pytest.raises(OutputError, match=f"^{out} names its inputs relative to {a}: resume from that "
                                          "folder$"):
        OutputFile(out, top_k=2, resume=True)
    assert out.read_bytes() == before
    monkeypatch.chdir(a)
    with OutputFile(out, top_k=2, resume=True) as f:
        assert f.done == {str(a / "a.jpg")}


def test_absolute_names_and_urls_resume_from_any_folder(tmp_path: Path, two_folders: tuple[Path, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two_folders
    out = tmp_path / "out.jsonl"
    url = "http://127.0.0.1:9/y.jpg"
    monkeypatch.chdir(a)
    write(out, Prediction(str(a / "x.jpg"), "cat", 0.5, [("cat", 0.5)]),
          Prediction(url, "dog", 0.5, [("dog", 0.5)]))
    monkeypatch.chdir(b)
    with OutputFile(out, resume=True) as f:
        assert f.done == {str(a / "x.jpg"), url}
        f.write(CAT)  # a.jpg, relative to b: b is OUT's folder now
    monkeypatch.chdir(a)
    with pytest.raises(OutputError, match=f"relative to {b}: resume from that folder$"):
        OutputFile(out, resume=True)


def test_where_no_folder_is_recorded_names_are_relative_to_this_one(
        tmp_path: Path, two_folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two_folders
    out = tmp_path / "out.csv"
    monkeypatch.chdir(a)
    write(out, CAT)
    os.removexattr(out, "user.ofacls.cwd")  # copied without it, or written by ofacls 0.1
    monkeypatch.chdir(b)
    with OutputFile(out, top_k=2, resume=True) as f:
        assert f.done == {str(b / "a.jpg")}
    # and a folder that is gone was moved, names and all: they are relative to here
    monkeypatch.chdir(a)
    write(out, CAT, overwrite=True)
    monkeypatch.chdir(tmp_path)
    a.rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    with OutputFile(out, top_k=2, resume=True) as f:
        assert f.done == {str(tmp_path / "moved" / "a.jpg")}


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh folder whose path has the same short length wherever pytest keeps
    its own (deeper under xdist), for a test whose memory grows with it."""
    folder = Path(tempfile.mkdtemp(prefix="ofacls-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_resuming_a_big_file_streams(short_tmp: Path) -> None:
    """200,000 rows (one failed near the start, so all are copied by the atomic
    rewrite): resumed with memory for the done keys, not the rows. (Its speed,
    about 1 s alone, is a benchmark's business, not a shared machine's test.)
    The keys are absolute paths, so the folder's path length is held fixed."""
    header = ",".join(["input", "label", "score", "index", "error"]
                      + [f"{c}_{i}" for i in range(2, 6) for c in ("label", "score", "index")])
    rest = ",".join(f"label number {i},0.0{i},{i}" for i in range(2, 6))
    lines = [header, "pics/d0/bad.jpg,,,,not an image" + "," * 12]
    lines += [f"pics/d{i % 100}/image_{i:07d}.jpg,tabby cat,0.5,281,,{rest}" for i in range(200_000)]
    out = short_tmp / "big.csv"
    out.write_text("\n".join(lines) + "\n")
    size = out.stat().st_size
    code = """
import sys
from ofacls.outfile import OutputFile
def peak():  # this process's own peak (ru_maxrss would count the parent's, from before exec)
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024
before = peak()
with OutputFile(sys.argv[1], top_k=5, resume=True) as f:
    print(len(f.done), f.dropped_rows, peak() - before)
"""
    result = subprocess.run([sys.executable, "-c", code, str(out)], cwd=short_tmp, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    done, dropped, grew = result.stdout.split()
    assert (int(done), int(dropped)) == (200_000, 1)
    # The done keys take ~28 MB (200k paths of ~50 characters, and the set); the
    # file is ~27 MB, so holding it in memory as well would break this bound.
    assert int(grew) < 1.5 * size, (grew, size)
    assert out.stat().st_size == size - len(lines[1]) - 1


# --- locking ----------------------------------------------------------------------

HOLD = """
import sys, time
from ofacls.outfile import OutputFile
f = OutputFile(sys.argv[1], overwrite=True)
print("locked", flush=True)
time.sleep(60)
"""

TRY = """
import sys
from ofacls.errors import OutputError
from ofacls.outfile import OutputFile
try:
    with OutputFile(sys.argv[1], resume=True, top_k=2) as f:
        print("opened")
except OutputError as e:
    print(e)
"""


def test_second_run_in_another_process_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    with OutputFile(out, top_k=2) as f:
        f.write(CAT)
        result = python(TRY, str(out))
        assert result.stdout.strip() == f"{out} is being written by another ofacls run (pid {os.getpid()})"
        assert read_rows(out) == [CAT.to_dict()]
    assert python(TRY, str(out)).stdout.strip() == "opened"


def test_the_lock_follows_the_file_not_its_name(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    write(out, CAT)
    (tmp_path / "soft.csv").symlink_to(out)
    os.link(out, tmp_path / "hard.csv")
    (tmp_path / "sub").mkdir()
    with OutputFile(out, top_k=2, resume=True):
        for other in ("soft.csv", "hard.csv", "sub/../out.csv"):
            result = python(TRY, str(tmp_path / other))
            assert result.stdout.strip().endswith(f"by another ofacls run (pid {os.getpid()})")
            with pytest.raises(OutputError, match="being written by another ofacls run"):
                OutputFile(tmp_path / other, resume=True, top_k=2)


def test_the_lock_holds_across_a_resume_that_rewrites(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    write(out, BAD, CAT)
    ino = out.stat().st_ino
    with OutputFile(out, top_k=2, resume=True) as f:
        assert out.stat().st_ino != ino  # rewritten: a new file in OUT's place
        assert python(TRY, str(out)).stdout.strip().endswith(f"another ofacls run (pid {os.getpid()})")
        f.write(DOG)
    assert inputs(out) == ["a.jpg", "c.jpg"]


def test_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with OutputFile(out):
        with pytest.raises(OutputError, match="being written by another ofacls run"):
            OutputFile(out, overwrite=True)
        with pytest.raises(OutputError, match="being written by another ofacls run"):
            OutputFile(out)  # the lock is checked first, before "already exists"
    with OutputFile(out, resume=True):
        pass


def test_a_killed_writer_leaves_no_lock(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert python(TRY, str(out)).stdout.strip() == (
            f"{out} is being written by another ofacls run (pid {holder.pid})")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    out.write_text("input,label,score,index,error,label_2,score_2,index_2\n")
    assert python(TRY, str(out)).stdout.strip() == "opened"


def test_close_is_idempotent(tmp_path: Path) -> None:
    f = OutputFile(tmp_path / "out.csv")
    f.close()
    f.close()


# --- streams ----------------------------------------------------------------------

STREAM = """
import sys
from ofacls.prediction import Prediction
from ofacls.outfile import OutputFile
print("before", flush=True)
with OutputFile(sys.argv[1], fmt=sys.argv[2] or None) as f:
    f.write(Prediction("a.jpg", "tabby", 0.5, [("tabby", 0.5)], indices=[281]))
"""


@pytest.mark.parametrize(("fmt", "expect"), [
    ("", "before\ninput,label,score,index,error\na.jpg,tabby,0.5,281,\n"),
    ("tsv", "before\ninput\tlabel\tscore\tindex\terror\na.jpg\ttabby\t0.5\t281\t\n"),
    ("jsonl", 'before\n{"input": "a.jpg", "label": "tabby", "score": 0.5, "index": 281, '
              '"top_k": [{"label": "tabby", "score": 0.5, "index": 281}], "error": null}\n'),
])
def test_dash_streams_rows_to_stdout(fmt: str, expect: str) -> None:
    result = python(STREAM, "-", fmt)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expect


def test_a_json_array_on_stdout_is_complete() -> None:
    result = python(STREAM, "-", "json")
    assert json.loads(result.stdout.removeprefix("before\n"))[0]["index"] == 281


def test_non_regular_files_are_streamed_without_lock_or_resume(tmp_path: Path) -> None:
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    write(fifo, CAT, top_k=1)  # exists, yet no --overwrite is needed; csv by default
    assert reader.communicate(timeout=10)[0] == "input,label,score,index,error\na.jpg,tabby cat,0.75,281,\n"
    with pytest.raises(OutputError, match="cannot resume .*: not a regular file"):
        OutputFile(fifo, fmt="csv", resume=True)
    with OutputFile(os.devnull) as f:
        f.write(CAT)
    assert f.fmt == "csv"


CLOSED_PIPE = """
import sys
from ofacls.errors import OutputError
from ofacls.prediction import Prediction
from ofacls.outfile import OutputFile
try:
    with OutputFile("-") as f:
        for i in range(100_000):
            f.write(Prediction.failed(f"{i}.jpg", "x"))
except BrokenPipeError:
    sys.stderr.write("broken pipe\\n")
except OutputError as e:
    sys.stderr.write(f"OutputError: {e}\\n")
"""


def test_a_closed_stdout_pipe_is_a_broken_pipe_not_an_output_error() -> None:
    proc = subprocess.Popen([sys.executable, "-c", CLOSED_PIPE], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"input,label,score,index,error\n"
    proc.stdout.close()
    assert proc.stderr.read().decode().startswith("broken pipe\n")
    proc.wait(timeout=30)


INTERRUPTED = """
import sys, time
from ofacls.prediction import Prediction
from ofacls.outfile import OutputFile
with OutputFile(sys.argv[1]) as f:
    f.write(Prediction("a.jpg", "tabby", 0.5, [("tabby", 0.5)], indices=[281]))
    print("written", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("name", ["out.json", "out.parquet"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_json_or_parquet_file_is_complete(tmp_path: Path, name: str, signum: int) -> None:
    """Ctrl-C closes the file; a JSON array is whole after every row, so even a kill
    leaves it valid; a killed Parquet file's rows are in its journal, which a
    resume turns into the file."""
    out = tmp_path / name
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED, str(out)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "written\n"
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode != 0 and ("KeyboardInterrupt" in stderr) == (signum == signal.SIGINT)
    assert inputs(out) == ["a.jpg"]
    write(out, DOG, resume=True)
    assert inputs(out) == ["a.jpg", "c.jpg"] and not journal(out).exists()


FILL = """
import sys
from ofacls.errors import OutputError
from ofacls.outfile import OutputFile
from ofacls.prediction import Prediction
written = 0
with OutputFile(sys.argv[1]) as f:
    try:
        for i in range(10_000):
            f.write(Prediction(f"{i:05d}-" + "x" * 100 + ".jpg", "cat", 0.5, [("cat", 0.5)], indices=[1]))
            written += 1
    except OutputError as e:
        print(written, e)
"""


def file_size_limit(limit: int) -> Callable[[], None]:
    """For preexec_fn: writes past `limit` bytes fail with EFBIG, as on a full disk
    (SIGXFSZ ignored, or it would kill the process instead)."""
    def limit_it() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_it


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_a_write_that_fails_is_taken_back_in_every_format(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"out.{fmt}"
    proc = subprocess.run([sys.executable, "-c", FILL, str(out)], text=True, capture_output=True,
                          timeout=60, preexec_fn=file_size_limit(4000))
    written, message = proc.stdout.split(" ", 1)
    name = journal(out) if fmt == "parquet" else out
    assert message == f"cannot write {name}: file too large\n", proc.stderr
    assert 10 < int(written) < 40
    if fmt == "json":
        assert len(json.loads(out.read_bytes())) == int(written)  # valid JSON, every row written
    else:
        assert name.read_bytes().endswith(b"\n")  # no torn row
    assert len(read_rows(out)) == int(written)
    if fmt == "parquet":
        with pytest.raises(OutputError, match="is unfinished .*: use --resume to finish it"):
            OutputFile(out)
    with OutputFile(out, resume=True) as f:
        assert len(f.done) == int(written) and not f.dropped_torn_row
        f.write(CAT)
    assert len(read_rows(out)) == int(written) + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# --- faults of OUT itself ---------------------------------------------------------


def test_a_full_device_is_an_output_error() -> None:
    with OutputFile("/dev/full") as f:
        with pytest.raises(OutputError, match="^cannot write /dev/full: no space left on device$"):
            f.write(CAT)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "small"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_is_an_output_error_and_resume_finishes_the_file(small_tmpfs: Path) -> None:
    out = small_tmpfs / "out.jsonl"
    written = 0
    with OutputFile(out) as f:
        with pytest.raises(OutputError, match=f"^cannot write {out}: no space left on device$"):
            for i in range(10_000):
                f.write(Prediction(f"{i:05d}-" + "x" * 200 + ".jpg", "cat", 0.5, [("cat", 0.5)]))
                written += 1
        with pytest.raises(OutputError, match="an earlier write failed"):
            f.write(CAT)
    assert written > 50
    subprocess.run(["mount", "-o", "remount,size=1m", str(small_tmpfs)], check=True)
    with OutputFile(out, resume=True) as f:
        assert len(f.done) == written
        f.write(CAT)
    assert len(read_rows(out)) == written + 1


def test_a_resume_without_room_for_its_rewrite_leaves_out_as_it_was(small_tmpfs: Path) -> None:
    out = small_tmpfs / "out.csv"
    write(out, BAD, *[Prediction(f"{i:04d}-" + "x" * 200 + ".jpg", "cat", 0.5, [("cat", 0.5)])
                      for i in range(100)])  # ~22 kB, the failed row first: all of it is rewritten
    before = out.read_bytes()
    fd = os.open(small_tmpfs / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"x" * 4096):
            pass
    except OSError:  # the tmpfs is full
        pass
    finally:
        os.close(fd)
    with pytest.raises(OutputError, match=f"^cannot write {out}: no space left on device$"):
        OutputFile(out, top_k=2, resume=True)
    assert out.read_bytes() == before
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler", "out.csv"]  # no .tmp left


@pytest.mark.parametrize("fault", ["deleted", "truncated", "replaced", "appended"])
def test_out_changed_under_the_run_is_an_output_error(tmp_path: Path, fault: str) -> None:
    out = tmp_path / "out.csv"
    f = OutputFile(out, top_k=2)
    f.write(CAT)
    if fault == "deleted":
        out.unlink()
    elif fault == "truncated":
        os.truncate(out, 10)
    elif fault == "replaced":
        (tmp_path / "other.csv").write_text("x\n")
        os.replace(tmp_path / "other.csv", out)
    else:
        with open(out, "a") as other:
            other.write("x\n")
    message = {"deleted": "was deleted", "truncated": r"was truncated \(to 10 bytes of the 100 written\)",
               "replaced": "was replaced by another file",
               "appended": "was written to by another program"}[fault]
    with pytest.raises(OutputError, match=f"^{out} {message} while this run was writing it$"):
        f.write(DOG)
    f.close()  # quietly: the fault is reported once


@pytest.mark.parametrize("name", ["out.csv", "out.json"])
def test_out_changed_after_the_last_row_is_found_at_close(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    f = OutputFile(out)
    f.write(CAT)
    os.truncate(out, 5)
    with pytest.raises(OutputError, match=f"^{out} was truncated .* while this run was writing it$"):
        f.close()
    f = OutputFile(out, overwrite=True)
    f.write(CAT)
    out.unlink()
    with pytest.raises(OutputError, match=f"^{out} was deleted while this run was writing it$"):
        f.close()


# --- through the CLI ----------------------------------------------------------------


def test_cli_output_faults_and_formats(model: Path, tmp_path: Path) -> None:
    image = str(small_image(tmp_path / "a.png"))
    env = cli_env(model)
    full = run_cli(["batch", image, "-o", "/dev/full"], env=env)
    assert (full.returncode, full.stderr) == (2, "ofacls: cannot write /dev/full: no space left on device\n")
    out = tmp_path / "out.parquet"
    made = run_cli(["batch", image, image, "-o", str(out), "-q"], env=env)
    assert made.returncode == 0, made.stderr
    rows = read_rows(out)
    assert [r["input"] for r in rows] == [image, image] and isinstance(rows[0]["index"], int)
    other = str(small_image(tmp_path / "b.png", "coffee.png"))
    resumed = run_cli(["batch", image, other, "-o", str(out), "--resume"], env=env)
    assert resumed.returncode == 0 and "done 1, failed 0, skipped 1" in resumed.stderr
    assert [r["input"] for r in read_rows(out)] == [image, other]  # the repeated row dropped
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png", "out.parquet"]  # no journal left
    tsv = run_cli(["batch", image, "-o", "-", "-f", "tsv", "-q"], env=env)
    assert tsv.stdout.splitlines()[0].split("\t")[:5] == ["input", "label", "score", "index", "error"]


def test_cli_into_a_closed_pipe_stops_quietly(model: Path, tmp_path: Path) -> None:
    images = [str(small_image(tmp_path / "a.png"))] * 12
    proc = subprocess.Popen([sys.executable, "-m", "ofacls", "batch", *images, "-o", "-", "-b", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(model))
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"input,label")
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert (proc.returncode, stderr) == (0, "")


def test_cli_knows_an_input_however_it_is_named_and_only_in_its_folder(
        model: Path, tmp_path: Path, two_folders: tuple[Path, Path]) -> None:
    a, b = two_folders
    small_image(a / "imgs" / "x.png")
    small_image(b / "imgs" / "x.png", "horse.png")  # the same relative name, another image
    env, out = cli_env(model), str(tmp_path / "out.ndjson")
    first = run_cli(["batch", "imgs", "-o", out, "-q"], env=env, cwd=a)
    assert first.returncode == 0, first.stderr
    again = run_cli(["batch", "./imgs", "imgs/x.png", str(a / "imgs"), "-o", out, "--resume"],
                    env=env, cwd=a)
    assert again.returncode == 0 and "done 0, failed 0, skipped 3," in again.stderr, again.stderr
    elsewhere = run_cli(["batch", "imgs", "-o", out, "--resume"], env=env, cwd=b)
    assert (elsewhere.returncode, elsewhere.stderr) == (
        2, f"ofacls: {out} names its inputs relative to {a}: resume from that folder\n")
    assert inputs(Path(out)) == ["imgs/x.png"]


def test_cli_parquet_without_pyarrow_names_the_extra(model: Path, tmp_path: Path) -> None:
    shim = tmp_path / "shim" / "pyarrow"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no pyarrow here')\n")
    image = str(small_image(tmp_path / "a.png"))
    result = run_cli(["batch", image, "-o", str(tmp_path / "out.parquet")],
                     env=cli_env(model, PYTHONPATH=str(tmp_path / "shim")))
    assert (result.returncode, result.stderr) == (
        2, "ofacls: Parquet output needs pyarrow: pip install 'ofacls[parquet]'\n")
    assert not (tmp_path / "out.parquet").exists()


def test_cli_full_disk_mid_run_is_one_line_and_resume_finishes(model: Path, small_tmpfs: Path,
                                                               tmp_path: Path) -> None:
    filler = small_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill the 64k tmpfs, then free two pages: room for about 30 rows
        while os.write(fd, b"x" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_size - 8192)
    names = copies(small_image(tmp_path / "a.png"), tmp_path / "imgs", 60)
    env, out = cli_env(model), small_tmpfs / "out.csv"
    full = run_cli(["batch", *names, "-o", str(out), "-b", "8"], env=env)
    assert (full.returncode, full.stderr) == (2, f"ofacls: cannot write {out}: no space left on device\n")
    written = len(read_rows(out))
    assert 10 < written < 60
    subprocess.run(["mount", "-o", "remount,size=1m", str(small_tmpfs)], check=True)
    resumed = run_cli(["batch", *names, "-o", str(out), "--resume", "-q"], env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert inputs(out) == names


@pytest.mark.parametrize("fault", ["deleted", "truncated"])
def test_cli_out_changed_under_the_run_is_exit_2_at_the_next_row(model: Path, tmp_path: Path,
                                                                 fault: str) -> None:
    image = str(small_image(tmp_path / "a.png"))
    out = tmp_path / "out.csv"
    server = HTTPTestServer().start()
    try:  # the second input hangs until the server stops: OUT is changed in between
        proc = subprocess.Popen([sys.executable, "-m", "ofacls", "batch", image, server.hang("/slow.png"),
                                 "-o", str(out), "-b", "1", "--timeout", "120"],
                                env=cli_env(model), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_text().count("\n") == 2):
            assert time.monotonic() < deadline and proc.poll() is None, "no first row"
            time.sleep(0.05)
        if fault == "deleted":
            out.unlink()
        else:
            os.truncate(out, 0)
    finally:
        server.stop()
    _, stderr = proc.communicate(timeout=60)
    problem = "was deleted" if fault == "deleted" else r"was truncated \(to 0 bytes of the \d+ written\)"
    assert proc.returncode == 2, stderr
    assert stderr.splitlines() == [line for line in stderr.splitlines()
                                   if line.startswith("ofacls: ")]  # one line, no traceback
    assert re.fullmatch(f"ofacls: {out} {problem} while this run was writing it\n", stderr), stderr


def test_cli_a_full_stdout_is_exit_2_in_one_line(model: Path, tmp_path: Path) -> None:
    image = str(small_image(tmp_path / "a.png"))
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "ofacls", "batch", image, "-o", "-"], stdout=full,
                              stderr=subprocess.PIPE, text=True, env=cli_env(model), timeout=120)
    assert (proc.returncode, proc.stderr) == (2, "ofacls: cannot write to stdout: no space left on device\n")


@pytest.mark.parametrize(("redirect", "bad_input", "output", "code"), [
    ("2>&-", True, "out.csv", 1),  # stderr closed: the failed input still makes it 1
    ("2>/dev/full", False, "/dev/full", 2),  # stderr full: a full OUT still makes it 2
])
def test_cli_stderr_trouble_never_changes_the_exit_code(model: Path, tmp_path: Path, redirect: str,
                                                        bad_input: bool, output: str, code: int) -> None:
    image = str(small_image(tmp_path / "a.png"))
    args = ["batch", image, *([str(tmp_path / "nope.png")] if bad_input else []), "-o", output]
    command = shlex.join([sys.executable, "-m", "ofacls", *args]) + " " + redirect
    proc = subprocess.run(command, shell=True, cwd=tmp_path, env=cli_env(model), capture_output=True,
                          timeout=120)
    assert proc.returncode == code, proc.stderr
    if bad_input:
        assert [r["error"] is None for r in read_rows(tmp_path / output)] == [True, False]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("out.csv", b"input,label,score,index,error\na.png,cat,0.5,1,\nb.png,cat,high,1,\nc.png,,,,x\n",
     "line 3 is not an ofacls row"),
    ("out.jsonl", b'{"input": "a.png", "error": null}\n{"input": "b.png", "label": "cat"}\n',
     'line 2 is not an ofacls JSON row (no "error" field)'),
    ("out.tsv", b"name\tsize\na.png\t3\n", "is not an ofacls TSV file"),
])
def test_cli_resume_refuses_a_file_that_is_not_a_batchs(model: Path, tmp_path: Path, name: str,
                                                        content: bytes, message: str) -> None:
    out = tmp_path / name
    out.write_bytes(content)
    small_image(tmp_path / "a.png")  # an input that exists: OUT is what is refused
    result = run_cli(["batch", "a.png", "-o", str(out), "--resume", "-k", "1"], env=cli_env(model),
                     cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(f"ofacls: {out} {message}"), result.stderr
    assert result.stderr.count("\n") == 1
    assert out.read_bytes() == content
