"""The README's examples, run as a user would run them, so it cannot drift from
the tool: every `ofacls ...` command line and every Python block of the README
that needs no network, against a tiny model cached under the default id (put
there by `ofacls download` from a local fake hub, then used offline)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import small_image, tiny_model
from fakehub import FakeHub, fast_client_env

from ofacls.hub import DEFAULT_MODEL_ID

README = Path(__file__).resolve().parents[1] / "README.md"

# What a README line may need that a test machine has not: the network, a
# cluster, a server that runs until stopped, tools that may be missing.
_NOT_HERE = ("https://", "http://", "--revision", "serve", "--engine ray", "ray start",
             "--install-completion", "pip install", "python -m pytest", ".bench/")


def _blocks(text: str) -> list[str]:
    """The README's indented code blocks (4 spaces, after a blank line)."""
    blocks, current = [], []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        indented = line.startswith("    ") or (current and not line.strip())
        if indented and (current or i == 0 or not lines[i - 1].strip()):
            current.append(line[4:])
        elif current:
            blocks.append("\n".join(current).strip("\n"))
            current = []
    if current:
        blocks.append("\n".join(current).strip("\n"))
    return [b for b in blocks if b.strip()]


def _commands(blocks: list[str]) -> list[str]:
    out = []
    for block in blocks:
        if "import " in block:
            continue
        if "; do" in block:  # a shell loop: one script
            if not any(n in block for n in _NOT_HERE):
                out.append(block)
            continue
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not re.match(r"^(ofacls|find|cat) ", line) or "ofacls" not in line:
                continue
            if any(n in line for n in _NOT_HERE):
                continue
            if "jq" in line and shutil.which("jq") is None:
                continue
            out.append(line)
    return out


def _python_blocks(blocks: list[str]) -> list[str]:
    return [b for b in blocks if "from ofacls import" in b and not any(n in b for n in _NOT_HERE)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("readme")
    model = tiny_model(root / "model")
    cache = root / "cache"
    env = {**fast_client_env(), "MODELSCOPE_CACHE": str(cache),
           "MODELSCOPE_HOME": str(root / "home")}
    for key in ("OFACLS_MODEL", "OFACLS_CACHE_DIR", "OFACLS_OFFLINE", "MODELSCOPE_ENDPOINT"):
        env.pop(key, None)
    with FakeHub({DEFAULT_MODEL_ID: model}) as hub:
        got = subprocess.run([sys.executable, "-m", "ofacls", "download", "-q"],
                             env={**env, "MODELSCOPE_ENDPOINT": hub.url}, capture_output=True,
                             text=True, timeout=300)
        assert got.returncode == 0, got.stderr
    env["OFACLS_OFFLINE"] = "1"  # from here on, nothing may need the network
    work = root / "work"
    (work / "photos").mkdir(parents=True)
    (work / "shots" / "day").mkdir(parents=True)
    for name, source in (("cat.jpg", "chelsea.png"), ("dog.png", "coffee.png"),
                         ("photo.jpg", "astronaut.png"), ("x.jpg", "rocket.jpg"),
                         ("photos/a.jpg", "chelsea.png"), ("photos/b.png", "rocket.jpg"),
                         ("shots/day/c.png", "coffee.png")):
        small_image(work / name, source)
    (work / "urls.txt").write_text("photos/a.jpg\n")
    # eval's labelled data: class folders by WordNet id and by label, a CSV of rows
    for name, source in (("val/n02123045/a.png", "chelsea.png"), ("val/n02123045/b.png", "coffee.png"),
                         ("val/espresso/c.png", "coffee.png"), ("my_photos/d.png", "rocket.jpg")):
        small_image(work / name, source)
    (work / "labels.csv").write_text("input,label\ncat.jpg,tabby\ndog.png,967\n")
    bin_dir = root / "bin"  # `ofacls` on PATH, as pip's script
    bin_dir.mkdir()
    (bin_dir / "ofacls").write_text(f"#!/bin/sh\nexec {sys.executable} -m ofacls \"$@\"\n")
    (bin_dir / "ofacls").chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return work, env


def test_the_readme_has_examples_to_run() -> None:
    blocks = _blocks(README.read_text(encoding="utf-8"))
    assert len(_commands(blocks)) >= 10
    assert _python_blocks(blocks)


def test_every_readme_command_runs(workspace: tuple[Path, dict[str, str]]) -> None:
    work, env = workspace
    failures = []
    for command in _commands(_blocks(README.read_text(encoding="utf-8"))):
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            failures.append(f"{command}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    assert not failures, "\n".join(failures)


def test_every_readme_python_block_runs(workspace: tuple[Path, dict[str, str]]) -> None:
    work, env = workspace
    for block in _python_blocks(_blocks(README.read_text(encoding="utf-8"))):
        proc = subprocess.run([sys.executable, "-c", block], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{block}\n{proc.stderr[-2000:]}"
