"""SIGTERM, SIGHUP and Ctrl-C stop a batch the same way: rows written are complete,
one line names the signal and the command that resumes, exit 128 + N."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import cli_env, small_image
from httpserver import HTTPTestServer


def _start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ofacls", *args], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_mid_batch_leaves_complete_rows_and_the_resume_command(
        model: Path, tmp_path: Path, signum: int) -> None:
    photo, other = small_image(tmp_path / "a.png"), small_image(tmp_path / "b.png", "coffee.png")
    server = HTTPTestServer().start()
    try:
        hanging = server.hang("/slow.png")
        args = ["batch", str(photo), hanging, str(other), "-o", "out.csv", "--batch-size", "1",
                "--workers", "1", "--model", str(model), "--device", "cpu"]
        proc = _start(args, cli_env(model), tmp_path)
        out = tmp_path / "out.csv"
        # the first image's row is written; the URL holds the run
        _wait_for(lambda: out.exists() and out.read_text().count("\n") >= 2)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        server.stop()
    assert proc.returncode == 128 + signum, stderr
    name = {signal.SIGTERM: "interrupted by SIGTERM", signal.SIGHUP: "interrupted by SIGHUP",
            signal.SIGINT: "interrupted"}[signum]
    (line,) = stderr.splitlines()
    assert line.startswith(f"ofacls: {name}; every row written is complete: continue with `")
    command = line.split("`")[1]
    assert command == shlex.join(["ofacls", *args, "--resume"])
    rows = out.read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(str(photo))  # header + one complete row
    # the command it printed finishes the batch: every input exactly once (the URL's
    # server is gone now, so its row is an error)
    again = subprocess.run([sys.executable, "-m", "ofacls", *shlex.split(command)[1:]],
                           env=cli_env(model), cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 1, again.stderr
    rows = out.read_text().splitlines()[1:]
    assert sorted(r.split(",")[0] for r in rows) == sorted([str(photo), hanging, str(other)])


def test_a_signal_before_the_first_row_leaves_out_a_plain_rerun_accepts(
        model: Path, tmp_path: Path) -> None:
    server = HTTPTestServer().start()
    try:
        args = ["batch", server.hang("/slow.png"), "-o", "out.csv", "--model", str(model),
                "--device", "cpu"]
        proc = _start(args, cli_env(model), tmp_path)
        _wait_for(lambda: server.requests != [])  # the model is loaded, the URL asked for
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        server.stop()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    photo = small_image(tmp_path / "a.png")
    rerun = subprocess.run([sys.executable, "-m", "ofacls", "batch", str(photo), "-o", "out.csv",
                            "--model", str(model), "--device", "cpu"], env=cli_env(model),
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert (tmp_path / "out.csv").read_text().splitlines()[1].startswith(str(photo))


def test_names_that_are_not_utf8_are_printed_not_dropped(model: Path, tmp_path: Path) -> None:
    odd = os.fsdecode(b"caf\xe9.png")
    small_image(tmp_path / odd)
    good = small_image(tmp_path / "b.png")
    proc = subprocess.run([sys.executable, "-m", "ofacls", "predict", odd, str(good), "--model",
                           str(model), "--device", "cpu", "-k", "1"], env=cli_env(model),
                          cwd=tmp_path, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(b"caf\xe9.png\t")  # the name's own bytes, as the shell has them
