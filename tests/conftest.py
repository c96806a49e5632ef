"""Shared pytest fixtures: golden checkpoints built by tests/ofa_factory.py, the
golden answers of ModelScope's pipeline, and the test images."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for any pytest import mode

from httpserver import HTTPTestServer  # noqa: E402
from ofa_factory import (  # noqa: E402
    GOLDEN_SPECS,
    IMAGES_DIR,
    CheckpointSpec,
    build_checkpoint,
    load_golden,
    write_configuration,
)

__all__ = ["load_golden", "GOLDEN_SPECS"]

_WEIGHT_FILES = ("pytorch_model.bin", "config.json", "vocab.json", "merges.txt",
                 "answer2label.json")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class CheckpointCache:
    """Builds each distinct set of weights once per session. A spec that only
    differs in configuration.json (gen_type, beam, ...) gets its own folder
    whose weight/tokenizer files are hard links (or copies) of the first build."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._weights: dict[CheckpointSpec, Path] = {}
        self._folders: dict[tuple[str, CheckpointSpec], Path] = {}

    def get(self, spec: CheckpointSpec, name: str | None = None) -> Path:
        name = name or f"ckpt{len(self._folders)}"
        key = (name, spec)
        if key in self._folders:
            return self._folders[key]
        base = spec.weights_only()
        if base not in self._weights:
            folder = build_checkpoint(self.root / name, spec)
            self._weights[base] = folder
        else:
            src = self._weights[base]
            folder = self.root / name
            if folder.exists():
                folder = self.root / f"{name}-{len(self._folders)}"
            folder.mkdir(parents=True)
            for f in _WEIGHT_FILES:
                _link_or_copy(src / f, folder / f)
            write_configuration(folder, spec)
        self._folders[key] = folder
        return folder


@pytest.fixture(scope="session")
def checkpoint_cache(tmp_path_factory: pytest.TempPathFactory) -> CheckpointCache:
    return CheckpointCache(tmp_path_factory.mktemp("ofa-checkpoints"))


@pytest.fixture(scope="session")
def golden_checkpoint(checkpoint_cache: CheckpointCache) -> Callable[[str], Path]:
    """golden_checkpoint(name) -> model folder for GOLDEN_SPECS[name] (built once)."""
    return lambda name: checkpoint_cache.get(GOLDEN_SPECS[name], name)


@pytest.fixture(scope="session")
def make_checkpoint(checkpoint_cache: CheckpointCache) -> Callable[..., Path]:
    """make_checkpoint(spec=CheckpointSpec(), name=None) -> model folder (cached per spec)."""

    def make(spec: CheckpointSpec | None = None, name: str | None = None) -> Path:
        return checkpoint_cache.get(spec or CheckpointSpec(), name)

    return make


@pytest.fixture(scope="session")
def ckpt_r50_traverse(golden_checkpoint) -> Path:
    return golden_checkpoint("r50_traverse")


@pytest.fixture(scope="session")
def ckpt_r50_generation(golden_checkpoint) -> Path:
    return golden_checkpoint("r50_generation")


@pytest.fixture(scope="session")
def ckpt_r101_generation(golden_checkpoint) -> Path:
    return golden_checkpoint("r101_generation")


@pytest.fixture(scope="session")
def ckpt_r101_traverse(golden_checkpoint) -> Path:
    return golden_checkpoint("r101_traverse")


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CLI tests' tiny model folder (cli_helpers.TINY_SPEC), built once."""
    from cli_helpers import tiny_model

    return tiny_model(tmp_path_factory.mktemp("cli-model") / "tiny")


@pytest.fixture(scope="session")
def images_dir() -> Path:
    """tests/images (originals, derived images, and multipage_rgb.tif, which PIL cannot open)."""
    return IMAGES_DIR


@pytest.fixture(scope="session")
def goldens() -> Callable[[str], dict]:
    """goldens(name) -> the parsed tests/goldens/<name>.json (same as load_golden)."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = load_golden(name)
        return cache[name]

    return get


@pytest.fixture
def http_server() -> Iterator[HTTPTestServer]:
    """A started HTTPTestServer on 127.0.0.1 (tests/httpserver.py), stopped after the test."""
    with HTTPTestServer() as server:
        yield server


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test runs inside its own tmp_path, so relative names are its own."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def open_cwd(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Like cwd, in a folder anyone may enter and write (tmp_path is its owner's
    alone), for the parts of a test run without_root."""
    d = Path(tempfile.mkdtemp(prefix="ofacls-perm-"))
    d.chmod(0o777)
    monkeypatch.chdir(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)
