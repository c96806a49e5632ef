"""The documentation's examples, run as a user would run them, so it cannot drift
from the tool: every `ofacls ...` command line and every Python block of the
README and of each page in docs/ that needs no network, against a tiny model
cached under the default id (put there by `ofacls download` from a local fake
hub, then used offline). And the docs site itself, built with `mkdocs build
--strict`, so a broken link, a missing page or a docstring mkdocstrings cannot
read fails the suite."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cli_helpers import small_image, tiny_model
from fakehub import FakeHub, fast_client_env
from typer.testing import CliRunner

from ofacls.cli import app
from ofacls.hub import DEFAULT_MODEL_ID

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# What an example may need that a test machine has not: the network, a
# cluster, a server that runs until stopped, tools that may be missing, the
# benchmarks' 2 GB OFA-Large-shaped checkpoint (LARGE_CKPT in the docs).
_NOT_HERE = ("https://", "http://", "s3://", "gs://", "--revision", "serve", "--engine ray", "ray start",
             "--install-completion", "pip install", "python -m pytest", ".bench/", "LARGE_CKPT")

_FENCE = re.compile(r"^(?P<indent> {0,3}(?: {4})*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")


def _pages() -> list[Path]:
    """README first, then the docs pages by name."""
    return [README, *sorted(DOCS.glob("*.md"))]


def _code_blocks(text: str) -> list[tuple[str, str]]:
    """A Markdown page's code blocks in page order, as (language, code): fenced
    blocks (``` or ~~~, also inside list items) with their info string's language,
    and indented ones (4 spaces, after a blank line) with ''."""
    blocks: list[tuple[str, str]] = []
    current: list[str] = []  # the indented block being read
    lines = text.splitlines()

    def flush() -> None:
        if current and "\n".join(current).strip():
            blocks.append(("", "\n".join(current).strip("\n")))
        current.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence and not (current and line.startswith("    ")):
            flush()
            indent, mark = len(fence["indent"]), fence["fence"]
            close = re.compile(rf"^\s*{re.escape(mark[0])}{{{len(mark)},}}\s*$")
            code, i = [], i + 1
            while i < len(lines) and not close.match(lines[i]):
                code.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].lstrip())
                i += 1
            blocks.append((fence["lang"].lower(), "\n".join(code)))
            i += 1
            continue
        indented = line.startswith("    ") or (current and not line.strip())
        if indented and (current or i == 0 or not lines[i - 1].strip()):
            current.append(line[4:])
        else:
            flush()
        i += 1
    flush()
    return blocks


def _console_commands(code: str) -> str:
    """A ```console block's commands: its `$ ` lines (and `> ` continuations), the
    output lines left out."""
    commands: list[str] = []
    for line in code.splitlines():
        if line.startswith("$ "):
            commands.append(line[2:])
        elif line.startswith("> ") and commands:
            commands[-1] += "\n" + line[2:]
    return "\n".join(commands)


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


def _examples(text: str) -> tuple[list[str], list[str]]:
    """A page's shell commands and Python programs to run, each in page order.
    An indented block is told apart by what it holds; a fenced one by its language."""
    shell, python = [], []
    for lang, code in _code_blocks(text):
        if lang == "console":
            shell.append(_console_commands(code))
        elif lang in ("bash", "sh", "shell"):
            shell.append(code)
        elif lang in ("python", "py"):
            python.append(code)
        elif lang == "":
            shell.append(code)
            python.append(code)
    return _commands(shell), _python_blocks(python)


def _all_examples() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(page, example) for every page's commands and Python blocks. An example
    that an earlier page already shows word for word is run once, where it first
    appears: the pages share one workspace, as a reader trying them in turn would."""
    commands: dict[str, str] = {}
    programs: dict[str, str] = {}
    for page in _pages():
        cmds, progs = _examples(page.read_text(encoding="utf-8"))
        for c in cmds:
            commands.setdefault(c, page.name)
        for p in progs:
            programs.setdefault(p, page.name)
    return [(p, c) for c, p in commands.items()], [(p, b) for b, p in programs.items()]


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
    # a table of inputs and WebDataset shards
    (work / "table.csv").write_text("id,path,caption\n1,photos/a.jpg,a cat\n2,photos/b.png,a rocket\n")
    for i, member in enumerate(("photos/a.jpg", "photos/b.png")):
        (work / "shards").mkdir(exist_ok=True)
        with tarfile.open(work / "shards" / f"00{i}.tar", "w") as tar:
            tar.add(work / member, arcname=f"{i:06d}.jpg")
    # a calibration's labelled images: enough for a 0.9 coverage (9 at least)
    for i, source in enumerate(["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"] * 3):
        small_image(work / "cal" / ("tabby" if i % 2 else "espresso") / f"{i}.png", source, size=(40 + i, 36))
    bin_dir = root / "bin"  # `ofacls` on PATH, as pip's script
    bin_dir.mkdir()
    (bin_dir / "ofacls").write_text(f"#!/bin/sh\nexec {sys.executable} -m ofacls \"$@\"\n")
    (bin_dir / "ofacls").chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return work, env


def test_code_blocks_are_found_fenced_and_indented() -> None:
    page = ("Text:\n\n    ofacls labels\n\n* a list item:\n\n    ```console\n"
            "    $ ofacls eval val/\n    images 3 (0 failed), labelled 3\n    ```\n\n"
            "```python\nfrom ofacls import Classifier\n```\n\n    ofacls labels\n\n"
            "~~~bash\nofacls download  # note\n~~~\n")
    assert _code_blocks(page) == [("", "ofacls labels"), ("console", "$ ofacls eval val/\n"
                                  "images 3 (0 failed), labelled 3"),
                                  ("python", "from ofacls import Classifier"),
                                  ("", "ofacls labels"), ("bash", "ofacls download  # note")]
    assert _examples(page) == (["ofacls labels", "ofacls eval val/", "ofacls labels", "ofacls download"],
                               ["from ofacls import Classifier"])


def test_the_pages_have_examples_to_run() -> None:
    commands, programs = _examples(README.read_text(encoding="utf-8"))
    assert len(commands) >= 10 and programs
    docs = [_examples(p.read_text(encoding="utf-8")) for p in sorted(DOCS.glob("*.md"))]
    assert sum(len(c) for c, _ in docs) >= 10
    assert any(p for _, p in docs)


# A command that bash would hand to `ofacls` word for word (no pipe, glob, variable
# or redirection) runs in this process, as the installed script would run it, which
# spares a Python and torch start per command. The rest goes through bash and the
# `ofacls` on PATH, and so does `download`: the hub client reads its environment once
# per process.
_IN_PROCESS = re.compile(r"ofacls (?!download\b)[^|&;<>()$`*?\[\]{}~\\\n]*")


def _run(command: str, work: Path, env: dict[str, str]) -> tuple[int, str]:
    """`command` run in `work` under exactly `env`: its exit code and stderr."""
    if _IN_PROCESS.fullmatch(command):
        cwd = Path.cwd()
        os.chdir(work)
        try:
            result = CliRunner().invoke(app, shlex.split(command)[1:], prog_name="ofacls",
                                        env={**{k: None for k in os.environ}, **env})
        finally:
            os.chdir(cwd)
        return result.exit_code, result.stderr + (repr(result.exception) if result.exception else "")
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stderr


def test_every_command_runs(workspace: tuple[Path, dict[str, str]]) -> None:
    work, env = workspace
    failures = []
    for page, command in _all_examples()[0]:
        code, stderr = _run(command, work, env)
        if code != 0:
            failures.append(f"{page}: {command}: exit {code}: {stderr.strip()[-300:]}")
    assert not failures, "\n".join(failures)


def test_commands_run_in_process_only_where_bash_would_pass_them_on_as_they_are() -> None:
    assert _IN_PROCESS.fullmatch("ofacls predict photos/ --labels \"a photo taken indoors,outdoors\"")
    for command in ("ofacls labels | grep -i terrier", "ofacls batch 'shards/{000..001}.tar' -o s.csv",
                    "ofacls predict --json photos/*.jpg", "ofacls download", "find . | ofacls predict -",
                    "ofacls info > info.txt", "ofacls predict $HOME/x.jpg"):
        assert not _IN_PROCESS.fullmatch(command), command


def test_every_python_block_runs(workspace: tuple[Path, dict[str, str]]) -> None:
    work, env = workspace
    for page, block in _all_examples()[1]:
        proc = subprocess.run([sys.executable, "-c", block], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{page}:\n{block}\n{proc.stderr[-2000:]}"


def test_every_docs_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [p.name for p in DOCS.glob("*.md")
               if not re.search(rf":\s*{re.escape(p.name)}\s*$", config, re.M)]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


def test_the_docs_site_builds_strictly(tmp_path: Path) -> None:
    site = tmp_path / "site"
    # the snippets extension reads CHANGELOG.md relative to the repository root
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "WARNING" not in log, log[-3000:]
    for page in DOCS.glob("*.md"):
        built = site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert built.is_file(), f"{page.name} was not built"
    changelog = (site / "changelog" / "index.html").read_text(encoding="utf-8")
    first_heading = next(line for line in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8").splitlines()
                         if line.startswith("## "))
    assert "--8&lt;--" not in changelog and "--8<--" not in changelog
    assert re.sub(r"[\[\]#]", "", first_heading).strip() in changelog
    api = (site / "python-api" / "index.html").read_text(encoding="utf-8")
    for name in ("from_pretrained", "iter_classify", "to_dict", "ModelNotFoundError"):
        assert name in api, f"the API reference lacks {name}"
    assert (site / "serve.png").is_file()
