"""Set-up shared by test_cli.py, test_faults.py and test_images.py: one tiny
model, environments that never reach the network, and the two ways of running
the CLI (in-process through typer's CliRunner, and as a real `python -m ofacls`
subprocess).

The model is built once per session (a few seconds) under pytest's temporary
folder. Every run pins OMP_NUM_THREADS=1: on a shared two-core machine torch's
default of one thread per core makes a tiny model's many small ops wait on each
other (measured: 1.9 s instead of 0.02 s per image under load), and the suite
has to stay within a few minutes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from httpserver import refused_url
from ofa_factory import IMAGES_DIR, CheckpointSpec, build_checkpoint, imagenet_labels
from PIL import Image
from typer.testing import CliRunner, Result

from ofacls.cli import app

# Small and shallow: what is tested here is the plumbing around the model, not it.
TINY_SPEC = CheckpointSpec(d_model=32, heads=2, ffn=64, enc_layers=1, dec_layers=1,
                           resnet="resnet18", seed=7)
# configuration.json's patch_image_size, lowered from 480: the ResNet trunk's cost
# grows with its square, and the CLI does not care about the size.
TINY_IMAGE_SIZE = 64

LABELS = frozenset(imagenet_labels())
_ENV_TO_DROP = ("OFACLS_MODEL", "OFACLS_OFFLINE", "OFACLS_DEBUG", "NO_COLOR", "FORCE_COLOR",
                "MODELSCOPE_ENDPOINT", "MODELSCOPE_CACHE")
def tiny_model(folder: Path) -> Path:
    """Build the tiny model of the CLI tests into `folder` (conftest's `model` fixture)."""
    build_checkpoint(folder, TINY_SPEC)
    conf = folder / "configuration.json"
    data = json.loads(conf.read_text(encoding="utf-8"))
    data["model"]["patch_image_size"] = TINY_IMAGE_SIZE
    conf.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return folder


def broken_copy(model: Path, dest: Path, weights: bytes) -> Path:
    """A copy of `model` whose pytorch_model.bin holds `weights` (other files hard-linked)."""
    dest.mkdir(parents=True)
    for f in model.iterdir():
        if f.name != "pytorch_model.bin":
            os.link(f, dest / f.name)
    (dest / "pytorch_model.bin").write_bytes(weights)
    return dest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread in this process for a module's tests, then restored: a
    module that imports this fixture gets it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli_env(model: Path | None = None, **extra: str) -> dict[str, str]:
    """This process's environment, cleaned of ofacls settings, for a subprocess."""
    env = {k: v for k, v in os.environ.items() if k not in _ENV_TO_DROP}
    env.update(OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8",
               # should anything still ask the hub, it is refused at once
               MODELSCOPE_ENDPOINT=refused_url("").rstrip("/"))
    if model is not None:
        env["OFACLS_MODEL"] = str(model)
    env.update(extra)
    return env


def run_cli(args: Sequence[str], *, env: Mapping[str, str], input: str | None = None,
            cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m ofacls ARGS` in a subprocess, its stdout and stderr kept apart."""
    return subprocess.run([sys.executable, "-m", "ofacls", *args], env=dict(env), input=input,
                          cwd=cwd, capture_output=True, text=True, encoding="utf-8",
                          errors="surrogateescape", timeout=timeout)


def invoke(args: Sequence[str], *, model: Path | None = None, input: str | bytes | None = None,
           env: Mapping[str, str | None] | None = None) -> Result:
    """The CLI in this process through CliRunner; unexpected exceptions propagate."""
    full_env: dict[str, str | None] = {k: None for k in _ENV_TO_DROP}
    full_env.update(OMP_NUM_THREADS="1",
                    OFACLS_MODEL=str(model) if model is not None else None,
                    MODELSCOPE_ENDPOINT=refused_url("").rstrip("/"))
    full_env.update(env or {})
    return CliRunner().invoke(app, list(args), input=input, env=full_env, prog_name="ofacls",
                              catch_exceptions=False)


def assert_one_line_errors(stderr: str) -> None:
    """Every stderr line is one of ours: `ofacls: ...`, no traceback, no library chatter."""
    assert "Traceback" not in stderr
    for line in stderr.splitlines():
        assert line.startswith("ofacls: "), f"unexpected stderr line: {line!r}"


def small_image(path: Path, source: str = "chelsea.png", size: tuple[int, int] = (48, 40),
                fmt: str | None = None) -> Path:
    """A small RGB copy of a test image, so decoding stays cheap."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(IMAGES_DIR / source) as im:
        im.convert("RGB").resize(size, Image.BICUBIC).save(path, format=fmt)
    return path


def copies(src: Path, folder: Path, n: int) -> list[str]:
    """`n` copies of `src` in `folder`, named so they sort in creation order."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        dst = folder / f"img{i:04d}{src.suffix}"
        shutil.copyfile(src, dst)
        names.append(str(dst))
    return names


def jpeg_with_malformed_exif() -> bytes:
    """A JPEG whose EXIF holds ImageWidth as text, with an orientation to apply: PIL's
    exif_transpose then fails re-encoding the block with struct.error (found by fuzzing)."""
    with Image.open(IMAGES_DIR / "rocket.jpg") as im:
        small = im.convert("RGB").resize((32, 24))
    exif = Image.Exif()
    exif[0x010F] = "cam"  # Make, ASCII
    exif[0x0112] = 3  # Orientation: rotate 180
    buf = io.BytesIO()
    small.save(buf, format="JPEG", exif=exif.tobytes())
    data = buf.getvalue()
    make = b"\x01\x0f\x00\x02" if b"MM\x00*" in data else b"\x0f\x01\x02\x00"
    assert data.count(make) == 1
    return data.replace(make, make.replace(b"\x0f", b"\x00"))  # tag 0x010F -> 0x0100


__all__ = ["LABELS", "TINY_SPEC", "assert_one_line_errors", "broken_copy", "cli_env", "copies",
           "invoke", "jpeg_with_malformed_exif", "one_torch_thread", "run_cli", "small_image",
           "tiny_model"]


NOBODY = 65534


@contextmanager
def without_root() -> Iterator[None]:
    """Root reads any file whatever its mode, so a test of unreadable files does
    its reads as nobody (the effective ids only, restored afterwards)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)

