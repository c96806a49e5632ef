"""Shared pytest fixtures: golden checkpoints built by tests/ofa_factory.py, the
golden answers of ModelScope's pipeline, and the test images."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for any pytest import mode

if "PYTEST_XDIST_WORKER" in os.environ:
    # xdist runs a worker per core: torch's default of a thread per core in each
    # would make them (and the CLI subprocesses they start) fight over the cores.
    # Set before torch is imported, for this process and every child.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from httpserver import HTTPTestServer  # noqa: E402
from ofa_factory import (  # noqa: E402
    GOLDEN_SPECS,
    IMAGES_DIR,
    CheckpointCache,
    CheckpointSpec,
    load_golden,
)

__all__ = ["load_golden", "GOLDEN_SPECS"]

# Tests that may not run beside each other on xdist's workers: every Ray test
# (test_ray*.py, and tests named for a Ray run elsewhere: one Ray instance at a
# time, two on two cores starve each other's heartbeats), and
# each module's tests together, so that its module-scoped fixtures (a Ray cluster,
# our answers on the golden checkpoints, a server, the docs' workspace) are built
# once. A few long tests that share no fixture of their module run on their own,
# so that the two workers can split the modules they sit in.
_ALONE = ("test_parity.py::test_fp32_parity_under_every_cpu_kernel", "test_benchmarks.py::")
# The longest of those groups and tests, longest first: they are handed out before
# the rest (pyproject turns xdist's own order, by test count, off), so that no worker
# is left running one of them alone at the end.
_LONGEST_FIRST = ("test_engine.py", "test_parity.py", "ray", "test_readme.py",
                  "test_parity.py::test_fp32_parity_under_every_cpu_kernel", "test_faults.py",
                  "test_checkpoints.py", "test_benchmarks.py::")


# Modules whose tests time a server's answers under load it makes itself: while one
# of their tests runs, the other worker starts none (see run_alone_where_timed).
_ALONE_ON_THE_MACHINE = ("test_serve_hostile.py",)


def _xdist_group(item: pytest.Item) -> str | None:
    module = item.path.name
    if module.startswith("test_ray") or "_ray_" in item.name:
        return "ray"
    if any(f"{module}::{item.name}".startswith(alone) for alone in _ALONE):
        return None
    return module


def _rank(item: pytest.Item) -> int:
    """The place in _LONGEST_FIRST of what xdist hands out whole with `item`: its
    group, else the test itself (named there by its start)."""
    unit = _xdist_group(item) or f"{item.path.name}::{item.name}"
    return next((i for i, u in enumerate(_LONGEST_FIRST) if unit == u or "::" in u and unit.startswith(u)),
                len(_LONGEST_FIRST))


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background of a non-interactive shell (`cmd &` in a
    # script) inherits SIGINT ignored, and so would every command it starts; the
    # tests that press Ctrl-C on a command need the signal to arrive. A handler set
    # here is reset to the default in the commands started, where an ignored
    # signal would stay ignored.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: each module's tests keep their order
    for item in items:
        group = _xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def run_alone_where_timed(request: pytest.FixtureRequest,
                          tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Under xdist every test holds the run's machine lock shared, and a test of
    _ALONE_ON_THE_MACHINE holds it alone. Each passes a gate first, which a test
    waiting to run alone keeps closed, so that the other worker's stream of tests
    cannot keep it waiting."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    root = tmp_path_factory.getbasetemp().parent
    alone = request.node.path.name in _ALONE_ON_THE_MACHINE
    with open(root / "machine.gate", "a") as gate, open(root / "machine.lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield  # closing the files lets both go


@pytest.fixture(scope="session")
def checkpoint_cache(tmp_path_factory: pytest.TempPathFactory) -> CheckpointCache:
    """The run's checkpoints: under xdist in the folder above every worker's own;
    in a pytest that a test started, where OFACLS_TEST_CHECKPOINTS says."""
    if os.environ.get("OFACLS_TEST_CHECKPOINTS"):
        return CheckpointCache(Path(os.environ["OFACLS_TEST_CHECKPOINTS"]))
    base = tmp_path_factory.getbasetemp()
    return CheckpointCache((base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "ofa-checkpoints")


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
