"""The command line: every command in-process through CliRunner and as a
real `python -m ofacls` subprocess, for exit codes and the stdout/stderr split.

The model is always a local folder (--model or OFACLS_MODEL), never the default
id, so nothing here reaches the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import (
    LABELS,
    assert_one_line_errors,
    broken_copy,
    cli_env,
    invoke,
    one_torch_thread,  # noqa: F401  (autouse fixture)
    run_cli,
    small_image,
)
from httpserver import HTTPTestServer
from ofa_factory import imagenet_labels
from PIL import Image

from ofacls import __version__
from ofacls.formats import read_rows

JSON_KEYS = ["input", "label", "score", "index", "top_k", "error"]
ALL_LABELS = imagenet_labels()  # the factory's label file, in class-index order
SUMMARY = re.compile(r"^ofacls: done (\d+), failed (\d+), skipped (\d+), [\d.]+ images/s -> .+$")


@pytest.fixture(scope="module")
def pics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small tree: what a folder walk must find, and what it must skip."""
    root = tmp_path_factory.mktemp("cli-pics")
    small_image(root / "pics" / "a.png", "chelsea.png")
    small_image(root / "pics" / "b.jpg", "camera.png")
    small_image(root / "pics" / "sub" / "c.PNG", "coffee.png", fmt="PNG")
    small_image(root / "pics" / "sub" / "deeper" / "d.gif", "horse.png")
    small_image(root / "pics" / ".hidden" / "e.png", "rocket.jpg")  # hidden folder: skipped
    small_image(root / "pics" / ".f.png", "rocket.jpg")  # hidden file: skipped
    (root / "pics" / "notes.md").write_text("not an image\n")  # other extension: skipped
    return root


WALKED = ["pics/a.png", "pics/b.jpg", "pics/sub/c.PNG", "pics/sub/deeper/d.gif"]


@pytest.fixture
def in_pics(pics: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from the folder holding pics/, so inputs are relative as a user types them."""
    monkeypatch.chdir(pics)
    return pics


def json_rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


# --- version, help, import cost ---------------------------------------------------------


def test_version() -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0 and result.stdout == f"ofacls {__version__}\n"
    proc = run_cli(["--version"], env=cli_env())
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"ofacls {__version__}\n", "")


def test_help_names_every_command_and_the_exit_codes() -> None:
    proc = run_cli(["--help"], env=cli_env())
    assert proc.returncode == 0 and proc.stderr == ""
    assert "Usage: python -m ofacls" in proc.stdout
    for command in ("predict", "batch", "download", "labels"):
        assert command in proc.stdout
    assert "Exit codes: 0" in " ".join(proc.stdout.split())
    for command in ("predict", "batch", "download", "labels"):
        result = invoke([command, "--help"])
        assert result.exit_code == 0 and "Usage: ofacls " + command in result.stdout


def test_importing_the_cli_imports_no_heavy_library() -> None:
    code = ("import sys, ofacls.cli; "
            "print(sorted(m for m in ('torch', 'PIL', 'modelscope', 'modelscope_hub', "
            "'numpy', 'tokenizers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cli_env(), check=True)
    assert proc.stdout.strip() == "[]"


# --- predict ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_predict_prints_tsv_when_piped(model: Path, in_pics: Path, k: int) -> None:
    """input, then label and score for each of the top k: the same answers as --json,
    scores printed with 6 significant digits."""
    result = invoke(["predict", "pics/a.png", "pics/b.jpg", "--model", str(model), "-k", str(k)])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [fields[0] for fields in lines] == ["pics/a.png", "pics/b.jpg"]
    for fields in lines:
        assert len(fields) == 1 + 2 * k
        assert fields[1] in LABELS and 0 < float(fields[2]) <= 1
    rows = json_rows(invoke(["predict", "pics/a.png", "pics/b.jpg", "--json", "-k", str(k)],
                            model=model).stdout)
    assert lines == [[r["input"], *(x for t in r["top_k"] for x in (t["label"], f"{t['score']:.6g}"))]
                     for r in rows]


def test_predict_json_schema(model: Path, in_pics: Path) -> None:
    result = invoke(["predict", "pics/a.png", "pics/sub/c.PNG", "--json", "-k", "3"],
                    model=model)
    assert result.exit_code == 0 and result.stderr == ""
    rows = json_rows(result.stdout)
    assert [r["input"] for r in rows] == ["pics/a.png", "pics/sub/c.PNG"]
    for row in rows:
        assert list(row) == JSON_KEYS
        assert row["error"] is None and row["label"] in LABELS
        assert len(row["top_k"]) == 3
        assert all(list(t) == ["label", "score", "index"] for t in row["top_k"])
        assert row["top_k"][0] == {"label": row["label"], "score": row["score"],
                                   "index": row["index"]}
        # the class index is the label's line in `ofacls labels`
        assert all(ALL_LABELS[t["index"]] == t["label"] for t in row["top_k"])
        scores = [t["score"] for t in row["top_k"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-9
        assert len({t["label"] for t in row["top_k"]}) == 3


def test_predict_beam_search(model: Path, in_pics: Path) -> None:
    result = invoke(["predict", "pics/a.png", "--json", "--decode", "beam", "-k", "2"],
                    model=model)
    assert result.exit_code == 0, result.stderr
    (row,) = json_rows(result.stdout)
    assert row["label"] in LABELS and 1 <= len(row["top_k"]) <= 2
    # beam scores are length-normalised log-probabilities
    assert all(t["score"] <= 0 for t in row["top_k"])


def test_predict_reads_a_list_from_stdin(model: Path, in_pics: Path) -> None:
    listing = "\ufeff# what to classify\r\npics/b.jpg\r\n\r\n  pics/a.png  \n"
    result = invoke(["predict", "-", "--json", "-k", "1"], model=model, input=listing)
    assert result.exit_code == 0, result.stderr
    assert [r["input"] for r in json_rows(result.stdout)] == ["pics/b.jpg", "pics/a.png"]


def test_predict_urls_from_a_local_server(model: Path, pics: Path,
                                          http_server: HTTPTestServer) -> None:  # noqa: F811
    good = http_server.serve("/cat.png", (pics / "pics" / "a.png").read_bytes())
    missing = http_server.url("/missing.png")
    result = invoke(["predict", good, missing, "--json"], model=model)
    assert result.exit_code == 1
    ok, bad = json_rows(result.stdout)
    assert ok["input"] == good and ok["label"] in LABELS and ok["error"] is None
    assert bad == {"input": missing, "label": None, "score": None, "index": None, "top_k": [],
                   "error": "HTTP 404 Not Found"}
    assert result.stderr == f"ofacls: {missing}: HTTP 404 Not Found\n"
    # the same picture, read from a file, gets the same answer
    local = json_rows(invoke(["predict", str(pics / "pics" / "a.png"), "--json"],
                             model=model).stdout)[0]
    assert (local["label"], local["score"]) == pytest.approx((ok["label"], ok["score"]))


def test_predict_failures_get_a_line_each_and_exit_1(model: Path, in_pics: Path) -> None:
    result = invoke(["predict", "pics/a.png", "pics/nope.png"], model=model)
    assert result.exit_code == 1
    ok, failed = result.stdout.splitlines()
    assert ok.startswith("pics/a.png\t")
    assert failed == "pics/nope.png\terror: no such file or directory"
    assert result.stderr.splitlines() == ["ofacls: pics/nope.png: no such file or directory"]


def test_predict_in_a_subprocess(model: Path, in_pics: Path) -> None:
    proc = run_cli(["predict", "pics/a.png", "pics/nope.png", "--json", "-k", "2"],
                   env=cli_env(model), cwd=in_pics)
    assert proc.returncode == 1
    rows = json_rows(proc.stdout)
    assert [r["input"] for r in rows] == ["pics/a.png", "pics/nope.png"]
    assert rows[0]["label"] in LABELS and rows[1]["error"] == "no such file or directory"
    assert proc.stderr == "ofacls: pics/nope.png: no such file or directory\n"


def test_predict_on_a_terminal_shows_a_table(model: Path, in_pics: Path) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ofacls", "predict", "pics/a.png", "-k", "3"],
                            stdout=slave, stderr=subprocess.PIPE, cwd=in_pics,
                            env=cli_env(model, COLUMNS="100", NO_COLOR="1"))
    os.close(slave)
    shown = _drain(master, proc)
    assert proc.returncode == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode())
    assert "pics/a.png" in text and "1." in text and "3." in text and "%" in text
    assert "\t" not in text  # not the piped format


def test_predict_into_a_closed_pipe_stops_quietly(model: Path, pics: Path) -> None:
    images = [str(pics / "pics" / "a.png")] * 12
    proc = subprocess.Popen([sys.executable, "-m", "ofacls", "predict", *images, "-b", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(model))
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert first.startswith(images[0].encode() + b"\t")
    assert (proc.returncode, stderr) == (0, "")


# --- batch --------------------------------------------------------------------------------


def test_batch_csv_walks_folders_in_order(model: Path, in_pics: Path) -> None:
    result = invoke(["batch", "pics", "-o", "out.csv", "-k", "3"], model=model)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    (summary,) = result.stderr.splitlines()
    assert SUMMARY.match(summary).groups() == ("4", "0", "0")
    text = (in_pics / "out.csv").read_text(encoding="utf-8")
    assert text.splitlines()[0] == ("input,label,score,index,error,label_2,score_2,index_2,"
                                    "label_3,score_3,index_3")
    rows = read_rows(in_pics / "out.csv")
    assert [r["input"] for r in rows] == WALKED
    # the rows are what predict says about the same files
    expected = json_rows(invoke(["predict", *WALKED, "--json", "-k", "3"], model=model).stdout)
    for row, want in zip(rows, expected, strict=True):
        assert row["label"] == want["label"] and row["error"] is None
        assert [t["label"] for t in row["top_k"]] == [t["label"] for t in want["top_k"]]
        assert [t["score"] for t in row["top_k"]] == pytest.approx(
            [t["score"] for t in want["top_k"]], rel=1e-5)


def test_batch_jsonl_carries_the_same_rows_as_csv(model: Path, in_pics: Path) -> None:
    assert invoke(["batch", "pics", "-o", "same.csv", "-k", "2", "-q"], model=model).exit_code == 0
    result = invoke(["batch", "pics", "-o", "same.jsonl", "-k", "2", "-q"], model=model)
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")
    lines = (in_pics / "same.jsonl").read_text(encoding="utf-8").splitlines()
    assert all(list(json.loads(line)) == JSON_KEYS for line in lines)
    assert read_rows(in_pics / "same.jsonl") == read_rows(in_pics / "same.csv")
    # --format wins over the extension
    result = invoke(["batch", "pics/a.png", "-o", "rows.out", "--format", "jsonl", "-q"],
                    model=model)
    assert result.exit_code == 0
    assert json.loads((in_pics / "rows.out").read_text())["input"] == "pics/a.png"


def test_batch_globs_lists_and_files_keep_the_order_given(model: Path, in_pics: Path,
                                                          http_server: HTTPTestServer  # noqa: F811
                                                          ) -> None:
    url = http_server.serve("/a.png", (in_pics / "pics" / "a.png").read_bytes())
    (in_pics / "list.txt").write_bytes(
        b"\xef\xbb\xbf# a list\r\npics/b.jpg\r\n\r\n" + url.encode() + b"\r\npics/sub/*\r\n")
    result = invoke(["batch", "pics/**/*.gif", "list.txt", "pics/a.png", "pics/*.jpg",
                     "-o", "mixed.csv", "-k", "1"], model=model)
    assert result.exit_code == 0, result.stderr
    assert [r["input"] for r in read_rows(in_pics / "mixed.csv")] == [
        "pics/sub/deeper/d.gif",  # `**` spans folders
        "pics/b.jpg", url, "pics/sub/c.PNG", "pics/sub/deeper/d.gif",  # list.txt's lines
        "pics/a.png", "pics/b.jpg"]


def test_batch_reads_a_list_from_stdin(model: Path, in_pics: Path) -> None:
    result = invoke(["batch", "-", "-o", "stdin.jsonl", "-q"], model=model,
                    input="pics/sub\npics/a.png\n")
    assert result.exit_code == 0, result.stderr
    assert [r["input"] for r in read_rows(in_pics / "stdin.jsonl")] == [
        "pics/sub/c.PNG", "pics/sub/deeper/d.gif", "pics/a.png"]


def test_batch_refuses_an_existing_output(model: Path, in_pics: Path) -> None:
    out = in_pics / "exists.csv"
    out.write_text("precious\n")
    result = invoke(["batch", "pics/a.png", "-o", "exists.csv"], model=model)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == ("ofacls: exists.csv already exists: use --overwrite to replace it "
                             "or --resume to finish it\n")
    assert out.read_text() == "precious\n"
    result = invoke(["batch", "pics/a.png", "-o", "exists.csv", "--overwrite", "--resume"],
                    model=model)
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert out.read_text() == "precious\n"
    result = invoke(["batch", "pics/a.png", "-o", "exists.csv", "--overwrite", "-q"], model=model)
    assert result.exit_code == 0
    assert [r["input"] for r in read_rows(out)] == ["pics/a.png"]


def test_batch_resume_runs_only_the_missing_inputs(model: Path, in_pics: Path,
                                                   tmp_path: Path) -> None:
    poisoned = tmp_path / "first.png"
    small_image(poisoned, "coffee.png")
    fresh = tmp_path / "fresh.png"
    small_image(fresh, "horse.png")
    out = tmp_path / "resumed.csv"
    result = invoke(["batch", str(poisoned), "pics/a.png", "-o", str(out)], model=model)
    assert result.exit_code == 0
    before = out.read_bytes()
    # a rerun of the finished inputs would now fail on this one
    poisoned.write_text("no longer an image")
    # inputs are known by what they name: ./pics/a.png is pics/a.png, done already
    result = invoke(["batch", str(poisoned), "pics/a.png", str(fresh), "./pics/a.png",
                     "-o", str(out), "--resume"], model=model)
    assert result.exit_code == 0, result.stderr
    assert SUMMARY.match(result.stderr.strip()).groups() == ("1", "0", "3")
    data = out.read_bytes()
    assert data.startswith(before)
    rows = read_rows(out)
    assert [r["input"] for r in rows] == [str(poisoned), "pics/a.png", str(fresh)]
    assert all(r["error"] is None for r in rows)
    # and once everything is there, a resume has nothing left to do
    result = invoke(["batch", str(poisoned), "pics/a.png", str(fresh), "./pics/a.png",
                     "-o", str(out), "--resume"], model=model)
    assert SUMMARY.match(result.stderr.strip()).groups() == ("0", "0", "4")
    assert out.read_bytes() == data


def test_batch_with_failures_writes_every_row_and_exits_1(model: Path, in_pics: Path) -> None:
    result = invoke(["batch", "pics/a.png", "pics/missing.png", "pics/*.webp", "empty/",
                     "-o", "fails.jsonl"], model=model)
    assert result.exit_code == 1 and result.stdout == ""
    rows = read_rows(in_pics / "fails.jsonl")
    assert [(r["input"], r["error"]) for r in rows] == [
        ("pics/a.png", None),
        ("pics/missing.png", "no such file or directory"),
        ("pics/*.webp", "no images match this pattern"),
        ("empty/", "no such file or directory")]
    # each failure named once on stderr, before the model loads; then the summary
    *told, summary = result.stderr.splitlines()
    assert told == [f"ofacls: {name}: {error}" for name, error in
                    [(r["input"], r["error"]) for r in rows] if error is not None]
    assert SUMMARY.match(summary).groups() == ("1", "3", "0")


def test_batch_in_a_subprocess(model: Path, in_pics: Path) -> None:
    proc = run_cli(["batch", "pics", "pics/nope.png", "-o", "sub.csv", "-k", "2"],
                   env=cli_env(model), cwd=in_pics)
    assert proc.returncode == 1 and proc.stdout == ""
    told, summary = proc.stderr.splitlines()
    assert told == "ofacls: pics/nope.png: no such file or directory"
    assert SUMMARY.match(summary).groups() == ("4", "1", "0")
    assert [r["input"] for r in read_rows(in_pics / "sub.csv")] == [*WALKED, "pics/nope.png"]
    assert not (in_pics / "sub.csv.lock").exists()


def _drain(master: int, proc: subprocess.Popen) -> bytes:
    """Everything written to a pty until `proc` ends (read on a thread: a pty's buffer is small)."""
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO once the other side is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.wait(timeout=120)
    reader.join(timeout=10)
    os.close(master)
    return b"".join(chunks)


def test_batch_progress_goes_to_a_terminal_stderr_and_never_to_stdout(
        model: Path, in_pics: Path) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ofacls", "batch", "pics", "-o", "tty.csv",
                             "-b", "1"], stdout=subprocess.PIPE, stderr=slave, cwd=in_pics,
                            env=cli_env(model, COLUMNS="100", NO_COLOR="1"))
    os.close(slave)
    shown = _drain(master, proc)
    assert proc.stdout is not None
    assert proc.returncode == 0 and proc.stdout.read() == b""
    assert b"classifying" in shown and b"4/4" in shown  # the bar: done/total
    assert b"ofacls: done 4, failed 0, skipped 0" in shown
    assert not re.search(rb"\x1b\[[0-9;]*m", shown), "NO_COLOR: no colours"
    assert len(read_rows(in_pics / "tty.csv")) == 4


def test_quiet_prints_nothing(model: Path, in_pics: Path) -> None:
    result = invoke(["batch", "pics", "-o", "quiet.csv", "--quiet"], model=model)
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")


# --- labels and download ----------------------------------------------------------------


def test_labels(model: Path) -> None:
    expected = json.loads((model / "answer2label.json").read_text())
    result = invoke(["labels", "--model", str(model)])
    assert result.exit_code == 0 and result.stdout.splitlines() == list(expected)
    proc = run_cli(["labels"], env=cli_env(model))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == result.stdout and len(proc.stdout.splitlines()) == 1000


def test_download_of_a_local_folder_prints_it(model: Path) -> None:
    result = invoke(["download", str(model), "--quiet"])
    assert (result.exit_code, result.stdout) == (0, f"{model}\n")


def test_download_from_an_unreachable_hub_exits_3(tmp_path: Path) -> None:
    from fakehub import fast_client_env, unreachable_endpoint

    url = unreachable_endpoint()
    env = fast_client_env(cli_env(MODELSCOPE_ENDPOINT=url, MODELSCOPE_CACHE=str(tmp_path)))
    proc = run_cli(["download", "owner/name"], env=env)
    assert (proc.returncode, proc.stdout) == (3, "")
    error, hint = proc.stderr.splitlines()
    assert error == f"ofacls: cannot reach the ModelScope hub at {url}: connection refused"
    assert hint.startswith("ofacls: hint: this needs the model owner/name once: run `ofacls download")
    assert "--model" not in hint  # only options download itself takes


# --- options --------------------------------------------------------------------------------


def test_labels_option_as_a_list_and_as_a_file(model: Path, in_pics: Path,
                                               tmp_path: Path) -> None:
    subset = ["tench", "goldfish", "great white shark"]
    result = invoke(["predict", "pics/a.png", "pics/b.jpg", "--json", "-k", "3",
                     "--labels", ",".join(subset)], model=model)
    assert result.exit_code == 0, result.stderr
    for row in json_rows(result.stdout):
        assert sorted(t["label"] for t in row["top_k"]) == sorted(subset)
        # the trie is rebuilt from the subset: probabilities over it sum to one
        assert sum(t["score"] for t in row["top_k"]) == pytest.approx(1.0)
    listing = tmp_path / "labels.txt"
    listing.write_text("\ufeff# two fish\ntench\n\n  goldfish \n", encoding="utf-8")
    result = invoke(["predict", "pics/a.png", "--json", "-k", "5", "--labels", str(listing)],
                    model=model)
    assert result.exit_code == 0, result.stderr
    (row,) = json_rows(result.stdout)
    assert {t["label"] for t in row["top_k"]} == {"tench", "goldfish"}
    # a string the model does not have makes the set the user's own: indices are places
    result = invoke(["predict", "pics/a.png", "--json", "--labels", "tench,not a label"], model=model)
    assert result.exit_code == 0, result.stderr
    (row,) = json_rows(result.stdout)
    assert {(t["label"], t["index"]) for t in row["top_k"]} == {("tench", 0), ("not a label", 1)}
    result = invoke(["predict", "pics/a.png", "--labels", " , "], model=model)
    assert result.exit_code == 2 and "names no labels" in result.stderr


def test_device_cpu_and_bf16_precision(model: Path, in_pics: Path) -> None:
    fp32 = json_rows(invoke(["predict", "pics/a.png", "--json", "--device", "cpu",
                             "--precision", "fp32"], model=model).stdout)[0]
    result = invoke(["predict", "pics/a.png", "--json", "--device", "cpu", "--precision", "bf16"],
                    model=model)
    assert result.exit_code == 0, result.stderr
    bf16 = json_rows(result.stdout)[0]
    assert bf16["label"] in LABELS and bf16["error"] is None
    assert abs(bf16["score"] - fp32["score"]) < 0.1


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(model: Path, in_pics: Path, native: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # the hardware probe is stubbed (like the network elsewhere); the model still runs
    import platform

    import torch
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    args = ["predict", "pics/a.png", "--device", "cpu", "--precision", "bf16"]
    result = invoke(args, model=model)
    assert result.exit_code == 0 and result.stdout.startswith("pics/a.png\t")
    warning = ("ofacls: warning: this CPU has no bf16 instructions (AMX or AVX-512 BF16), so "
               "bf16 runs emulated and is likely slower than fp32\n")
    assert result.stderr == ("" if native else warning)
    assert invoke([*args, "--quiet"], model=model).stderr == ""


@pytest.mark.parametrize(("args", "message"), [
    (["--precision", "fp16", "--device", "cpu"],
     "ofacls: fp16 is not supported on CPU; use fp32 or bf16\n"),
    (["--precision", "fp64"], "ofacls: unknown precision 'fp64' (use auto, fp32, fp16 or bf16)\n"),
    (["--device", "tpu"], None),
])
def test_bad_device_or_precision_is_a_usage_error(model: Path, in_pics: Path, args: list[str],
                                                  message: str | None) -> None:
    result = invoke(["predict", "pics/a.png", *args], model=model)
    assert result.exit_code == 2 and result.stdout == ""
    assert_one_line_errors(result.stderr)
    assert result.stderr.count("\n") == 1
    if message is not None:
        assert result.stderr == message


def test_cuda_on_a_machine_without_it_is_a_usage_error(model: Path, in_pics: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke(["predict", "pics/a.png", "--device", "cuda"], model=model)
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == "ofacls: device 'cuda' requested but CUDA is not available\n"


@pytest.mark.parametrize("args", [
    ["predict", "x.png", "--bogus"],
    ["predict"],
    ["predict", "x.png", "-k", "0"],
    ["predict", "x.png", "--decode", "greedy"],
    ["batch", "x.png"],  # no -o
    ["frobnicate"],
])
def test_bad_usage_exits_2(args: list[str], model: Path) -> None:
    result = invoke(args, model=model)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert_one_line_errors(result.stderr)
    assert result.stderr.rstrip().endswith("--help)")


def test_a_bad_choice_reads_plainly(model: Path) -> None:
    result = invoke(["predict", "x.png", "--decode", "greedy"], model=model)
    assert result.stderr.startswith("ofacls: Invalid value for '--decode': 'greedy' is not one of")


def test_no_arguments_shows_the_help(model: Path) -> None:
    result = invoke([], model=model)
    assert result.exit_code == 2 and "Usage: ofacls" in result.stderr


def test_bad_usage_in_a_subprocess(model: Path) -> None:
    proc = run_cli(["predict", "x.png", "--bogus"], env=cli_env(model))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "ofacls: No such option: --bogus (see python -m ofacls predict --help)\n"


def test_output_options_that_cannot_work_exit_2(model: Path, in_pics: Path) -> None:
    result = invoke(["batch", "pics/a.png", "-o", "out.txt"], model=model)
    assert result.exit_code == 2
    assert result.stderr == ("ofacls: cannot tell the output format from 'out.txt': "
                             "name it .csv, .tsv, .jsonl, .json or .parquet, or pass --format\n")
    result = invoke(["batch", "pics/a.png", "-o", "pics", "--format", "csv"], model=model)
    assert (result.exit_code, result.stderr) == (
        2, "ofacls: pics is a directory (end it with / to write parts of rows into it)\n")
    assert not list(Path("pics").glob("*part-*"))


def test_missing_model_folder_exits_3_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-model"
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    proc = run_cli(["predict", "x.png", "--model", str(missing)], env=cli_env(), cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (3, "")
    assert proc.stderr == f"ofacls: no model folder at {missing}\n"
    # batch: and no OUT left behind that a rerun would then refuse
    result = invoke(["batch", str(tmp_path / "x.png"), "-o", str(tmp_path / "out.csv"),
                     "--model", str(missing)])
    assert result.exit_code == 3
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out.csv.lock").exists()
    result = invoke(["labels", "--model", str(missing)])
    assert (result.exit_code, result.stderr) == (3, f"ofacls: no model folder at {missing}\n")


def test_debug_switch_shows_the_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-model")
    proc = run_cli(["labels", "--model", missing], env=cli_env(OFACLS_DEBUG="1"))
    assert proc.returncode == 3  # the same code as without the switch
    assert "Traceback (most recent call last)" in proc.stderr
    assert f"ModelNotFoundError: no model folder at {missing}" in proc.stderr
    assert proc.stderr.endswith(f"ofacls: no model folder at {missing}\n")
    proc = run_cli(["labels", "--model", missing], env=cli_env(OFACLS_DEBUG="0"))
    assert (proc.returncode, proc.stderr) == (3, f"ofacls: no model folder at {missing}\n")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_checkpoint_exits_3_naming_the_file(model: Path, in_pics: Path, tmp_path: Path,
                                                    damage: str) -> None:
    weights = (model / "pytorch_model.bin").read_bytes()
    data = {"truncated": weights[: len(weights) // 3], "garbage": b"\x00garbage" * 100,
            "empty": b""}[damage]
    broken = broken_copy(model, tmp_path / "broken", data)
    out = tmp_path / "out.csv"
    result = invoke(["batch", "pics/a.png", "-o", str(out), "--model", str(broken)])
    assert result.exit_code == 3 and result.stdout == ""
    assert_one_line_errors(result.stderr)
    assert result.stderr.count("\n") == 1
    assert str(broken / "pytorch_model.bin") in result.stderr
    assert not out.exists()


def test_missing_config_key_exits_3(model: Path, in_pics: Path, tmp_path: Path) -> None:
    broken = broken_copy(model, tmp_path / "broken", (model / "pytorch_model.bin").read_bytes())
    config = json.loads((model / "config.json").read_text())
    del config["d_model"]
    (broken / "config.json").unlink()
    (broken / "config.json").write_text(json.dumps(config))
    result = invoke(["predict", "pics/a.png", "--model", str(broken)])
    assert result.exit_code == 3
    assert result.stderr.startswith(f"ofacls: {broken}: weights do not match config.json; ")
    assert result.stderr.endswith("; config.json lacks d_model, so ModelScope's defaults were used\n")


# --- shell completions ------------------------------------------------------------------------

COMPLETIONS = Path(__file__).resolve().parent.parent / "completions"


def test_completion_scripts_are_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("generate", COMPLETIONS / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert generate.stale() == [], "run: python completions/generate.py"
    for shell, name in generate.FILES.items():
        assert "_OFACLS_COMPLETE=complete_" + shell in (COMPLETIONS / name).read_text()


def test_bash_completion_completes_commands_options_and_choices() -> None:
    if shutil.which("bash") is None or shutil.which("ofacls") is None:
        pytest.skip("needs bash and the ofacls script on PATH")
    script = (f"source {shlex.quote(str(COMPLETIONS / 'ofacls.bash'))}\n"
              "complete_words() { COMP_WORDS=(\"$@\"); COMP_CWORD=$(($# - 1));"
              " _ofacls_completion ofacls; echo \"${COMPREPLY[*]}\"; }\n"
              "complete_words ofacls ba\n"
              "complete_words ofacls batch --ov\n"
              "complete_words ofacls predict --decode ''\n"
              "complete_words ofacls predict --device c\n"
              "complete_words ofacls batch --precision ''\n"
              "complete_words ofacls eval --compare pre\n")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env=cli_env(), timeout=60)
    assert proc.stdout.splitlines() == ["batch", "--overwrite", "exact beam auto", "cpu cuda cuda:0 cuda:1",
                                        "auto fp32 fp16 bf16",
                                        "precision=bf16 precision=fp32 precision=fp16"], proc.stderr


def test_batch_size_and_workers_default_by_device() -> None:
    """Unset, --batch-size and --workers suit the device the model runs on (a GPU
    wants big batches and many decoding threads); given, they are kept as given."""
    import dataclasses

    from ofacls.cli.options import Decode, RunSettings

    unset = RunSettings(model="m", top_k=5, decode=Decode.exact, device="auto", precision="auto",
                        calibration=None,
                        labels=None, batch_size=None, workers=None, timeout=30.0, max_pixels=10,
                        max_download=10, quantize=None, offline=False, quiet=False,
                        cache_dir=None)
    cpu, gpu = unset.options("cpu"), unset.options("cuda")
    assert (cpu.batch_size, cpu.workers) == (4, 4)
    assert gpu.batch_size > cpu.batch_size and 4 <= gpu.workers <= 16
    given = dataclasses.replace(unset, batch_size=2, workers=1)
    for device in ("cpu", "cuda"):
        assert (given.options(device).batch_size, given.options(device).workers) == (2, 1)


# --- what a run that fails early leaves, resume retries, streams ---------------------


@pytest.mark.parametrize("why", [["--device", "cuda:99"], ["--model", "no-such-model-dir/"]])
def test_overwrite_keeps_the_old_output_when_nothing_was_classified(
        model: Path, in_pics: Path, why: list[str]) -> None:
    out = in_pics / "keep.csv"
    out.write_text("precious\n")
    result = invoke(["batch", "pics/a.png", "-o", "keep.csv", "--overwrite", *why], model=model)
    assert result.exit_code in (2, 3) and result.stderr.count("\n") == 1, result.stderr
    assert out.read_text() == "precious\n"


def test_resume_retries_the_inputs_that_failed(model: Path, tmp_path: Path) -> None:
    late = tmp_path / "late.png"
    good = small_image(tmp_path / "good.png")
    out = tmp_path / "out.csv"
    result = invoke(["batch", str(good), str(late), "-o", str(out)], model=model)
    assert result.exit_code == 1
    assert [r["error"] is None for r in read_rows(out)] == [True, False]
    small_image(late, "coffee.png")  # the missing input has arrived
    result = invoke(["batch", str(good), str(late), "-o", str(out), "--resume"], model=model)
    assert result.exit_code == 0, result.stderr
    assert SUMMARY.match(result.stderr.strip()).groups() == ("1", "0", "1")
    rows = read_rows(out)
    assert [r["input"] for r in rows] == [str(good), str(late)]
    assert all(r["error"] is None for r in rows)


def test_batch_to_stdout(model: Path, in_pics: Path) -> None:
    result = invoke(["batch", "pics/a.png", "pics/missing.png", "-o", "-", "-k", "2"], model=model)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0] == "input,label,score,index,error,label_2,score_2,index_2"
    assert [ln.split(",")[0] for ln in lines[1:]] == ["pics/a.png", "pics/missing.png"]
    assert SUMMARY.match(result.stderr.strip().splitlines()[-1]).group(0).endswith("-> stdout")
    result = invoke(["batch", "pics/a.png", "-o", "-", "-f", "jsonl", "-q"], model=model)
    assert result.exit_code == 0 and json_rows(result.stdout)[0]["input"] == "pics/a.png"
    result = invoke(["batch", "pics/a.png", "-o", "-", "--resume"], model=model)
    assert (result.exit_code, result.stderr) == (2, "ofacls: cannot resume stdout: not a regular file\n")
    assert not (in_pics / "-").exists()


@pytest.mark.parametrize("command", [["predict", "pics/a.png"], ["labels"]])
def test_a_full_stdout_is_one_line(model: Path, in_pics: Path, command: list[str]) -> None:
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "ofacls", *command], stdout=full,
                              stderr=subprocess.PIPE, text=True, env=cli_env(model), timeout=120)
    assert (proc.returncode, proc.stderr) == (
        2, "ofacls: cannot write to stdout: no space left on device\n")


def test_a_closed_stdout_is_not_a_crash(model: Path, in_pics: Path) -> None:
    proc = subprocess.run(f"{shlex.quote(sys.executable)} -m ofacls predict pics/a.png >&-",
                          shell=True, stderr=subprocess.PIPE, text=True, env=cli_env(model),
                          timeout=120)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_tsv_lines_escape_tabs_and_newlines_in_names(model: Path, tmp_path: Path) -> None:
    odd = small_image(tmp_path / "a\tb\nc.png")
    result = invoke(["predict", str(odd)], model=model)
    assert result.exit_code == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.split("\t")[0] == str(tmp_path / "a\\tb\\nc.png")


def test_terminal_table_shows_names_verbatim_and_beam_scores_as_log_probs() -> None:
    import io

    from ofacls.prediction import Prediction
    from ofacls.render import table_printer

    out = io.StringIO()
    long_name = "/".join(["a-rather-long-folder-name"] * 8) + "/[red]cat.png"
    table_printer(out, True)(Prediction(long_name, "tabby", 0.9, [("tabby", 0.9), ("[b]x", 0.1)]))
    assert out.getvalue().splitlines()[0] == long_name  # whole, on one line, brackets kept
    assert "[b]x" in out.getvalue() and "90.00%" in out.getvalue()
    out = io.StringIO()
    table_printer(out, False)(Prediction("cat.png", "tabby", 0.0, [("tabby", 0.0), ("lynx", -1.25)]))
    text = out.getvalue()
    assert "0.0000" in text and "-1.2500" in text and "%" not in text
    assert "log-prob / token" in text  # beam tables say what their numbers are


def test_terminal_table_shows_failed_inputs_and_escapes_control_characters() -> None:
    import io

    from ofacls.prediction import Prediction
    from ofacls.render import table_printer

    out = io.StringIO()
    show = table_printer(out, True)
    show(Prediction.failed("evil\x1b]52;c;aGk=\x07.png", "cannot read \x1b[2J"))
    show(Prediction("bad\udcffname.png", "tabby", 0.5, [("tabby", 0.5)]))
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    lines = text.splitlines()
    assert lines[:2] == ["evil\\x1b]52;c;aGk=\\x07.png", "  error: cannot read \\x1b[2J"]
    assert lines[2] == "bad\\xffname.png"


def test_labels_option_naming_a_missing_file(model: Path, in_pics: Path) -> None:
    result = invoke(["predict", "pics/a.png", "--labels", "nofile.txt"], model=model)
    assert (result.exit_code, result.stderr) == (2, "ofacls: --labels nofile.txt: no such file\n")


def test_a_list_on_stdin_streams_into_the_batch(model: Path, tmp_path: Path) -> None:
    """`find ... | ofacls batch -`: the first row is written while the list is still
    open, and NUL-separated names (-0) are taken exactly, spaces and all."""
    first, second = small_image(tmp_path / "one photo.png"), small_image(tmp_path / "b.png")
    out = tmp_path / "out.csv"
    proc = subprocess.Popen([sys.executable, "-m", "ofacls", "batch", "-0", "-", "-o", str(out)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env(model))
    assert proc.stdin is not None
    proc.stdin.write(os.fsencode(first) + b"\0")
    proc.stdin.flush()
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()  # type: ignore[union-attr]
        time.sleep(0.05)
    proc.stdin.write(os.fsencode(second) + b"\0")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    rows = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    assert rows == [str(first), str(second)]


# --- sizes with units ------------------------------------------------------------------------


def test_sizes_take_units() -> None:
    import typer

    from ofacls.cli.options import format_size, parse_size

    assert parse_size("52428800") == 50 * 2**20
    assert parse_size("50MiB") == parse_size("50M") == parse_size("50 mib") == 50 * 2**20
    assert parse_size("50MB") == 50_000_000 and parse_size("2kB") == 2000
    assert parse_size("1.5G") == 3 * 2**29 and parse_size("512k") == 512 * 1024
    assert (format_size(50 * 2**20), format_size(2**34), format_size(1000)) == ("50MiB", "16GiB", "1000")
    for bad in ("", "MB", "50XB", "-5MB", "5 M B", "1e9", "0"):
        with pytest.raises(typer.BadParameter):
            parse_size(bad)


def test_max_download_in_units_end_to_end(model: Path, tmp_path: Path) -> None:
    """A size with units reaches the download limit; a bad one is one usage line."""
    body = (Path(__file__).parent / "images" / "chelsea.png").read_bytes()
    assert 2048 < len(body)
    with HTTPTestServer() as s:
        url = s.serve("/cat.png", body, content_type="image/png")
        small = invoke(["predict", "--json", "--max-download", "2KiB", url], model=model)
        big = invoke(["predict", "--json", "--max-download", "1MB", url], model=model)
    assert small.exit_code == 1 and "larger than the 2 KB limit" in json.loads(small.stdout)["error"]
    assert big.exit_code == 0 and json.loads(big.stdout)["error"] is None
    bad = invoke(["predict", "--max-download", "50XB", url], model=model)
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1
    assert "'50XB' is not a size" in bad.stderr and "(see ofacls predict --help)" in bad.stderr
    assert "[default: 50MiB]" in invoke(["batch", "--help"]).stdout


def test_model_options_are_the_same_on_every_command(model: Path) -> None:
    """download takes --model as every other command does; labels takes the model
    options a script passes to every command."""
    got = invoke(["download", "--model", str(model), "-q"])
    assert got.exit_code == 0 and got.stdout == f"{model}\n", got.stderr
    assert invoke(["download", str(model), "-q"]).stdout == f"{model}\n"
    both = invoke(["download", "some/id", "--model", str(model)])
    assert both.exit_code == 2 and both.stderr == (
        f"ofacls: two models named: some/id and --model {model}; give one\n")
    listed = invoke(["labels", "--model", str(model), "--device", "cpu", "--precision", "fp32"])
    assert listed.exit_code == 0 and listed.stdout.splitlines() == ALL_LABELS


def test_help_is_whole() -> None:
    """Command summaries are whole sentences; the default model id is not broken."""
    top = invoke(["--help"]).stdout
    commands = " ".join(top[top.index("Commands:"):].split())
    assert "..." not in commands and "for every input." in commands
    for command in ("predict", "batch", "eval", "labels", "download", "serve"):
        text = invoke([command, "--help"]).stdout
        assert "[default: damo/ofa_image-classification_imagenet_large_en]" in text, command
        assert not re.search(r"<(str|int|float|list\[str\]|int range|float range)>", text), command


def test_default_size_applies(model: Path, in_pics: Path) -> None:
    got = invoke(["predict", "--json", "pics/a.png"], model=model)
    assert got.exit_code == 0 and json.loads(got.stdout)["error"] is None, got.stderr


def test_labels_option_matches_names_loosely(model: Path, in_pics: Path) -> None:
    got = invoke(["predict", "--json", "--labels", "Tabby,tiger_cat", "pics/a.png"], model=model)
    assert got.exit_code == 0, got.stderr
    assert {t["label"] for t in json.loads(got.stdout)["top_k"]} == {"tabby", "tiger cat"}
    # a near miss makes the set the user's own strings, and a warning names the label meant
    miss = invoke(["predict", "--json", "--labels", "tabby,tiger_kat", "pics/a.png"], model=model)
    assert miss.exit_code == 0 and miss.stderr.count("\n") == 1
    assert ("warning: 'tiger_kat' is not a label of this model (its 'tiger cat'?): the labels are "
            "taken as your own strings") in miss.stderr
    assert [t["index"] for t in json.loads(miss.stdout)["top_k"]] in ([0, 1], [1, 0])


def test_nothing_readable_is_a_usage_error_before_the_model(tmp_path: Path) -> None:
    """A mistyped path as the only input: exit 2 at once, no model load (the model
    named here does not exist either), and no OUT that a corrected rerun would refuse."""
    no_model = str(tmp_path / "no-model")
    for args in (["predict", "nosuch.jpg"], ["batch", "vall/", "-o", "out.csv"], ["eval", "vall/"]):
        proc = run_cli([*args, "--model", no_model], env=cli_env(), cwd=tmp_path)
        what = "evaluate" if args[0] == "eval" else "classify"
        assert (proc.returncode, proc.stdout) == (2, ""), (args, proc.stderr)
        assert proc.stderr.splitlines()[-1] == f"ofacls: nothing to {what}: no input named can be read"
        assert proc.stderr.count("no such file or directory") == 1, proc.stderr
    assert not (tmp_path / "out.csv").exists()


def test_batch_names_failures_as_they_come_and_then_where_the_rest_are(model: Path,
                                                                       tmp_path: Path) -> None:
    """Failures found while classifying (not at expansion) are named once each, up to
    a limit, then one line says where the others are."""
    from ofacls.cli.feedback import TOLD_AT_MOST

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(TOLD_AT_MOST + 3):
        (bad / f"{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG header, no image
    good = small_image(tmp_path / "good.png")
    proc = run_cli(["batch", str(good), str(bad), "-o", "rows.csv"], env=cli_env(model), cwd=tmp_path)
    assert proc.returncode == 1
    *told, more, summary = proc.stderr.splitlines()
    assert len(told) == TOLD_AT_MOST and all(line.startswith(f"ofacls: {bad}/") for line in told)
    assert len(set(told)) == len(told)
    assert more == "ofacls: more inputs failed; their rows in rows.csv say why"
    assert SUMMARY.match(summary)


@pytest.mark.parametrize("name", ["kept.csv", "kept.json"])
def test_resume_keeps_the_failed_rows_of_inputs_not_named_again(model: Path, in_pics: Path,
                                                                name: str) -> None:
    """A resume retries the failed inputs it is given; the failed row of one it is not
    given stays (it was not retried, so dropping it would lose that input)."""
    first = invoke(["batch", "pics/a.png", "pics/nope.png", "-o", name], model=model)
    assert first.exit_code == 1
    again = invoke(["batch", "pics/a.png", "pics/b.jpg", "-o", name, "--resume"], model=model)
    assert again.exit_code == 0, again.stderr
    rows = read_rows(in_pics / name)
    assert [(r["input"], r["error"]) for r in rows] == [
        ("pics/a.png", None), ("pics/nope.png", "no such file or directory"), ("pics/b.jpg", None)]
    if name.endswith(".json"):
        assert len(json.loads((in_pics / name).read_text())) == 3
    # named again, it is retried (and still fails): one row for it, at the end
    third = invoke(["batch", "pics/nope.png", "pics/a.png", "-o", name, "--resume"], model=model)
    assert third.exit_code == 1
    assert [r["input"] for r in read_rows(in_pics / name)] == ["pics/a.png", "pics/b.jpg", "pics/nope.png"]
