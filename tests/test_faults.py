"""Fault injection: bad and odd inputs, misbehaving servers, interruptions.

Every input gets exactly one row with a one-line error, the run goes on, the
exit code is 1 and stderr carries no traceback; odd but valid images classify;
Ctrl-C, kill -9 and a second concurrent run never leave a broken or mixed file.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    LABELS,
    assert_one_line_errors,
    cli_env,
    copies,
    invoke,
    jpeg_with_malformed_exif,
    one_torch_thread,  # noqa: F401  (autouse fixture)
    small_image,
    without_root,
)
from httpserver import HTTPTestServer, answer, refused_url
from ofa_factory import IMAGES_DIR
from PIL import Image

from ofacls.formats import parquet_journal, read_rows

BOMB_SIDE = 20_000  # 400 MP: over the default limit of 2 x 89.5 MP
SUMMARY_PREFIX = "ofacls: done "

NOT_AN_IMAGE = "not an image (ofacls reads JPEG, PNG, GIF, BMP, WebP, TIFF)"


@pytest.fixture(scope="module")
def good_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_image(tmp_path_factory.mktemp("good") / "good.png", "chelsea.png")


def png_bomb(path: Path, side: int = BOMB_SIDE) -> Path:
    """A valid 1-bit black PNG of side x side pixels: ~50 KB on disk, whose header
    alone says it would take side**2 bytes (and three times that as RGB) decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


# Runs a command and writes its peak RSS to argv[1]. A small launcher, because
# Linux carries ru_maxrss across exec: a child forked straight from pytest (torch
# loaded) would report pytest's own peak.
_LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))  # KiB on Linux
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(args: list[str], env: dict[str, str], cwd: Path, report: Path
                 ) -> tuple[int, str, str, int]:
    """`python -m ofacls ARGS`: (exit code, stdout, stderr, peak RSS in bytes)."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(report),
                           sys.executable, "-m", "ofacls", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr, int(report.read_text())


# --- bad files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory: pytest.TempPathFactory, good_png: Path) -> tuple[Path, dict]:
    """A folder of bad inputs, and what each one's row must say (None: classified)."""
    root = tmp_path_factory.mktemp("faults")
    d = root / "bad"
    d.mkdir()
    expect: dict[str, str | None] = {}

    def add(name: str, error: str | None) -> Path:
        expect[f"bad/{name}"] = error
        return d / name

    add("good.png", None).write_bytes(good_png.read_bytes())
    add("empty.jpg", "empty file").write_bytes(b"")
    jpeg = (IMAGES_DIR / "grace_hopper.jpg").read_bytes()
    # half a JPEG: PIL decodes what is there (grey below), as the reference does
    add("half.jpg", None).write_bytes(jpeg[: len(jpeg) // 2])
    # too little left to decode anything: a clear error
    add("stub.jpg", "cannot decode image: Truncated File Read").write_bytes(jpeg[:200])
    add("text.jpg", NOT_AN_IMAGE).write_text("hello, I am text\n")
    add("bad_exif.jpg", "cannot decode image: struct.error: required argument is not an "
                        "integer").write_bytes(jpeg_with_malformed_exif())
    add("multipage.tif", "cannot decode the image: it is damaged, or not the format its first "
                             "bytes claim").write_bytes(
        (IMAGES_DIR / "multipage_rgb.tif").read_bytes())
    png_bomb(add("bomb.png", "image is 20000x20000 = 400 MP, over the 179 MP limit "
                             "(--max-pixels)"))
    os.symlink("nowhere.png", add("dangling.png", "dangling symlink"))
    os.symlink("selfloop.png", add("selfloop.png", "symlink loop"))
    (d / "loop").mkdir()
    os.symlink("..", d / "loop" / "up")  # a directory loop: walked once, no rows of its own
    (d / "readme.md").write_text("skipped: not an image extension")
    return root, expect  # an unreadable file: test_unreadable_file


def test_one_row_per_bad_input_and_the_run_goes_on(model: Path, bad_folder: tuple[Path, dict]
                                                   ) -> None:
    root, expect = bad_folder
    heic = root / "photo.heic"  # no HEIF plugin: named explicitly, since walks skip .heic
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    code, stdout, stderr, rss = run_measured(
        ["batch", "bad", "photo.heic", "missing.png", "-o", "rows.csv", "-k", "2"],
        env=cli_env(model), cwd=root, report=root / "rss")
    assert code == 1 and stdout == ""
    assert_one_line_errors(stderr)
    *told, summary = stderr.splitlines()
    good = sum(e is None for e in expect.values())
    failed = len(expect) - good + 2  # + photo.heic and missing.png
    assert summary.startswith(f"{SUMMARY_PREFIX}{good}, failed {failed}, skipped 0, ")
    # each failed input named once as it comes, up to a limit, then where the rest are
    from ofacls.cli.feedback import TOLD_AT_MOST

    if failed > TOLD_AT_MOST:
        assert told.pop() == "ofacls: more inputs failed; their rows in rows.csv say why"
    assert len(told) == len(set(told)) == min(failed, TOLD_AT_MOST)
    rows = read_rows(root / "rows.csv")
    want = {**dict(sorted(expect.items())), "photo.heic": NOT_AN_IMAGE,
            "missing.png": "no such file or directory"}
    assert [r["input"] for r in rows] == list(want)
    for row in rows:
        error = want[row["input"]]
        assert row["error"] == error, row
        if error is None:
            assert row["label"] in LABELS and len(row["top_k"]) == 2
        else:
            assert row["label"] is None and row["top_k"] == []
    # the bomb was refused from its header: a decode would need 400 MB at least
    assert rss < 1_000 * 2**20, f"peak RSS {rss / 2**20:.0f} MB"


def test_the_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = png_bomb(tmp_path / "bomb.png")
    code = ("import sys\n"
            "from ofacls.images import open_image\n"
            "from ofacls.errors import ImageError\n"
            "try:\n"
            "    open_image(open(sys.argv[1], 'rb').read())\n"
            "except ImageError as e:\n"
            "    print(e)\n"
            # VmHWM: this process's own peak (ru_maxrss would include pytest's)
            "print([int(line.split()[1]) * 1024 for line in open('/proc/self/status')\n"
            "       if line.startswith('VmHWM:')][0])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True,
                          text=True, check=True)
    message, rss = proc.stdout.splitlines()
    assert message == "image is 20000x20000 = 400 MP, over the 179 MP limit (--max-pixels)"
    assert int(rss) < 200 * 2**20  # Python + PIL alone; the pixels would be 400 MB


def test_max_pixels_moves_the_limit(model: Path, tmp_path: Path) -> None:
    img = small_image(tmp_path / "small.png", size=(300, 200))  # 60 000 pixels
    result = invoke(["predict", str(img), "--json", "--max-pixels", "50000"], model=model)
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"] == (
        "image is 300x200 = 0.06 MP, over the 0.05 MP limit (--max-pixels)")
    result = invoke(["predict", str(img), "--json", "--max-pixels", "60000"], model=model)
    assert result.exit_code == 0 and json.loads(result.stdout)["error"] is None
    bomb = png_bomb(tmp_path / "bomb.png", side=1000)  # 1 MP
    result = invoke(["predict", str(bomb), "--json", "--max-pixels", "999999"], model=model)
    assert "over the 1 MP limit" in json.loads(result.stdout)["error"]


def test_unreadable_file(model: Path, good_png: Path, open_cwd: Path) -> None:
    shutil.copytree(model, open_cwd / "model")
    for name in ("secret.png", "good.png"):
        (open_cwd / name).write_bytes(good_png.read_bytes())
    args = ["batch", "secret.png", "good.png", "-q"]
    # once as the test's own user, so every module the run imports is imported
    # (a process that gave up root cannot read root's site-packages)
    assert invoke([*args, "-o", "first.csv"], model=open_cwd / "model").exit_code == 0
    (open_cwd / "secret.png").chmod(0)
    with without_root():
        result = invoke([*args, "-o", "o.csv"], model=open_cwd / "model")
    assert result.exit_code == 1, result.output
    assert [r["error"] for r in read_rows(open_cwd / "o.csv")] == ["permission denied", None]

NAMES = ["with space.png", "comma,name.png", 'double"quote.png', "single'quote.png",
         "new\nline.png", "carriage\rreturn.png", "tab\tname.png", "ünïcødé 猫.png",
         "emoji 🐈.png", "=formula.png"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_odd_file_names_round_trip(model: Path, good_png: Path, tmp_path: Path,
                                   fmt: str) -> None:
    folder = tmp_path / "names"
    folder.mkdir()
    names = list(NAMES)
    for name in names:
        (folder / name).write_bytes(good_png.read_bytes())
    raw = b"latin1-\xe9t\xe9.png"  # not UTF-8: must come back byte for byte
    with open(os.fsencode(folder) + b"/" + raw, "wb") as f:
        f.write(good_png.read_bytes())
    names.append(os.fsdecode(raw))
    out = tmp_path / f"names.{fmt}"
    result = invoke(["batch", str(folder), "-o", str(out), "-q"], model=model)
    assert result.exit_code == 0, result.stderr
    rows = read_rows(out)
    assert [r["input"] for r in rows] == [f"{folder}/{n}" for n in sorted(names)]
    assert all(r["error"] is None for r in rows)
    # each row opens the very file it names
    assert all(os.path.exists(r["input"]) for r in rows)


# --- odd but valid images ------------------------------------------------------------------


ODD_IMAGES = ["24mp.jpg", "animated.gif", "cmyk.jpg", "exif_rotated.jpg", "gray16.png",
              "image.bmp", "image.webp", "la.png", "one_pixel.png", "palette_transparent.png",
              "really_a_png.jpg", "upper.JPEG", "wide_5000x3.png"]


def _odd_images(folder: Path) -> None:
    """Saves ODD_IMAGES into `folder`."""
    folder.mkdir()
    with Image.open(IMAGES_DIR / "chelsea.png") as im:
        base = im.convert("RGB").resize((64, 48), Image.BICUBIC)
    base.convert("CMYK").save(folder / "cmyk.jpg")
    gray16 = Image.new("I;16", (64, 48))
    gray16.putdata([(x * 1000 + y * 37) % 65536 for y in range(48) for x in range(64)])
    gray16.save(folder / "gray16.png")
    pal = base.quantize(16)
    pal.save(folder / "palette_transparent.png", transparency=bytes([0] * 4 + [255] * 12))
    base.convert("LA").save(folder / "la.png")
    frames = [base, base.rotate(180), base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:],
                   duration=40, loop=0)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "one_pixel.png")
    Image.linear_gradient("L").resize((5000, 3)).convert("RGB").save(folder / "wide_5000x3.png")
    (folder / "exif_rotated.jpg").write_bytes((IMAGES_DIR / "exif_rotated.jpg").read_bytes())
    base.save(folder / "image.webp")
    base.save(folder / "image.bmp")
    base.save(folder / "really_a_png.jpg", format="PNG")
    base.save(folder / "upper.JPEG", format="JPEG")
    # 24 MP: far below the pixel limit, must just work
    Image.radial_gradient("L").resize((6000, 4000)).convert("RGB").save(
        folder / "24mp.jpg", quality=60)


def test_odd_but_valid_images_classify(model: Path, tmp_path: Path) -> None:
    _odd_images(tmp_path / "odd")
    with Image.open(tmp_path / "odd" / "animated.gif") as gif:  # as decoded: GIF quantises
        gif.convert("RGB").save(tmp_path / "frame0.png")
        gif.seek(1)
        gif.convert("RGB").save(tmp_path / "frame1.png")
    out = tmp_path / "odd.jsonl"
    result = invoke(["batch", str(tmp_path / "odd"), str(tmp_path / "frame0.png"),
                     str(tmp_path / "frame1.png"), "-o", str(out), "-k", "3"], model=model)
    assert result.exit_code == 0, result.stderr
    assert_one_line_errors(result.stderr)  # no PIL warnings either
    rows = {Path(r["input"]).name: r for r in read_rows(out)}
    assert list(rows) == [*ODD_IMAGES, "frame0.png", "frame1.png"]
    for name, row in rows.items():
        assert row["error"] is None and row["label"] in LABELS, name
    # an animation is classified by its first frame
    gif, frame0, frame1 = (rows[n]["score"] for n in ("animated.gif", "frame0.png", "frame1.png"))
    assert gif == pytest.approx(frame0, rel=1e-5) and gif != pytest.approx(frame1, rel=1e-5)


# --- misbehaving servers ----------------------------------------------------------------------


def test_url_faults_are_one_row_each(model: Path, good_png: Path, tmp_path: Path,
                                     http_server: HTTPTestServer) -> None:  # noqa: F811
    s = http_server
    refused = refused_url()
    urls = {
        s.serve("/ok.png", good_png.read_bytes()): None,
        s.serve("/404.png", b"gone", status=404): "HTTP 404 Not Found",
        s.serve("/500.png", b"oops", status=500): "HTTP 500 Internal Server Error",
        s.serve("/page.png", b"<html>hi</html>", content_type="text/html"):
            "not an image: text/html",
        s.hang("/hang.png"): "timed out after 1 s",
        s.endless("/endless.png"): "larger than the 97.7 KB limit",
        s.redirect("/loop1", "/loop2"): "redirect loop",
        refused: "connection refused",
        "file:///etc/passwd": "unsupported URL scheme 'file' (only http and https)",
        "ftp://127.0.0.1/x.png": "unsupported URL scheme 'ftp' (only http and https)",
    }
    s.redirect("/loop2", "/loop1")
    out = tmp_path / "urls.csv"
    started = time.monotonic()
    result = invoke(["batch", *urls, "-o", str(out), "--timeout", "1",
                     "--max-download", "100000"], model=model)
    assert time.monotonic() - started < 30
    assert result.exit_code == 1 and result.stdout == ""
    assert_one_line_errors(result.stderr)
    rows = read_rows(out)
    assert [(r["input"], r["error"]) for r in rows] == list(urls.items())
    assert rows[0]["label"] in LABELS


# --- interruptions and concurrency -----------------------------------------------------------


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory, good_png: Path) -> list[str]:
    """Enough copies of one small image that a run with --batch-size 1 takes a while."""
    return copies(good_png, tmp_path_factory.mktemp("many") / "imgs", 150)


def _start_batch(inputs: list[str], out: Path, model: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ofacls", "batch", *inputs, "-o", str(out),
                             "-b", "1", "-j", "1", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env(model))


def _wait_for_rows(out: Path, proc: subprocess.Popen, n: int = 2, timeout: float = 60) -> None:
    """Wait until OUT holds at least `n` complete lines (header included)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("no rows appeared")


def _assert_complete_prefix(out: Path, inputs: list[str]) -> list[dict]:
    data = out.read_bytes()
    assert data.endswith(b"\n"), "a torn last row"
    rows = read_rows(out)
    assert [r["input"] for r in rows] == inputs[: len(rows)]
    assert all(r["error"] is None for r in rows)
    return rows


def test_ctrl_c_stops_cleanly_with_every_written_row_complete(model: Path, many: list[str],
                                                               tmp_path: Path) -> None:
    out = tmp_path / "interrupted.csv"
    proc = _start_batch(many, out, model)
    _wait_for_rows(out, proc, n=3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stdout) == (130, b"")
    # a command line too long to repeat back (a glob's expansion) is described instead
    said = re.fullmatch(rb"ofacls: interrupted; every row written is complete: continue with the same "
                        rb"command plus --resume \((\d+) of (\d+) done this run\)\n", stderr)
    assert said, stderr
    rows = _assert_complete_prefix(out, many)
    # how far it got: the rows out when the line was written, of every input named
    assert int(said[2]) == len(many) and 1 <= int(said[1]) <= len(rows)
    assert 2 <= len(rows) < len(many)
    assert not out.with_name(out.name + ".lock").exists()


def test_ctrl_c_does_not_wait_for_a_download_in_flight(model: Path, good_png: Path,
                                                       tmp_path: Path,
                                                       http_server: HTTPTestServer  # noqa: F811
                                                       ) -> None:
    hang = http_server.hang("/hang.png")
    out = tmp_path / "hang.jsonl"
    proc = _start_batch([str(good_png), hang], out, model, "--timeout", "120")
    _wait_for_rows(out, proc, n=1)
    deadline = time.monotonic() + 60
    while "/hang.png" not in http_server.requests:
        assert proc.poll() is None and time.monotonic() < deadline, "the URL was never asked for"
        time.sleep(0.01)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - started < 10, "waited for the stuck download"
    assert proc.returncode == 130
    assert stderr == (b"ofacls: interrupted; every row written is complete: continue with "
                      b"`ofacls batch " + str(good_png).encode() + b" " + hang.encode() + b" -o "
                      + str(out).encode() + b" -b 1 -j 1 --timeout 120 --resume` "
                      b"(1 of 2 done this run)\n")
    assert [r["input"] for r in read_rows(out)] == [str(good_png)]


def test_kill_9_then_resume_gives_every_input_exactly_once(model: Path, many: list[str],
                                                          tmp_path: Path) -> None:
    out = tmp_path / "killed.jsonl"
    proc = _start_batch(many, out, model)
    _wait_for_rows(out, proc, n=2)
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = _assert_complete_prefix(out, many)
    assert 2 <= len(done) < len(many)
    # A kill can also land mid-write: a torn last line that --resume must drop.
    with open(out, "ab") as f:
        f.write(json.dumps({"input": many[len(done)], "label": "x"}).encode()[:25])
    result = invoke(["batch", *many, "-o", str(out), "--resume", "-b", "8"], model=model)
    assert result.exit_code == 0, result.stderr
    assert f"skipped {len(done)}," in result.stderr
    rows = read_rows(out)
    assert [r["input"] for r in rows] == many
    assert all(r["error"] is None and r["label"] in LABELS for r in rows)
    assert rows[: len(done)] == done


def _rows_so_far(out: Path) -> int:
    """Rows a run has written to OUT (a Parquet file's: to its journal)."""
    path = Path(parquet_journal(out)) if out.suffix == ".parquet" else out
    return path.read_bytes().count(b'"input"') if path.exists() else 0


@pytest.mark.parametrize("name", ["killed.json", "killed.parquet"])
def test_kill_9_mid_run_then_resume_in_json_and_parquet(model: Path, good_png: Path, tmp_path: Path,
                                                        name: str,
                                                        http_server: HTTPTestServer  # noqa: F811
                                                        ) -> None:
    """kill -9 while a URL holds the run: a JSON array is valid as it stands, a Parquet
    file's rows are in its journal; a plain rerun is refused, and --resume finishes
    the file with every input exactly once."""
    images = copies(good_png, tmp_path / "imgs", 3)
    http_server.hang("/hang")
    url = http_server.sequence("/slow.png", http_server.routes["/hang"], answer(good_png.read_bytes()))
    inputs = [images[0], images[1], url, images[2]]
    out = tmp_path / name
    proc = _start_batch(inputs, out, model, "--timeout", "120")
    deadline = time.monotonic() + 120
    while _rows_so_far(out) < 2 or "/slow.png" not in http_server.requests:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.kill()
    proc.communicate(timeout=30)
    assert [r["input"] for r in read_rows(out)] == images[:2]
    if out.suffix == ".json":
        assert len(json.loads(out.read_bytes())) == 2
        refusal = f"ofacls: {out} already exists: use --overwrite to replace it or --resume to finish it\n"
    else:
        assert out.read_bytes() == b""  # written whole at the end; the rows are in the journal
        refusal = (f"ofacls: {out} is unfinished ({parquet_journal(out)} holds the rows of a run that did "
                   "not end): use --resume to finish it or --overwrite to start afresh\n")
    plain = invoke(["batch", *inputs, "-o", str(out)], model=model)
    assert (plain.exit_code, plain.stderr) == (2, refusal)
    resumed = invoke(["batch", *inputs, "-o", str(out), "--resume"], model=model)
    assert resumed.exit_code == 0, resumed.stderr
    assert "done 2, failed 0, skipped 2" in resumed.stderr
    rows = read_rows(out)
    assert [r["input"] for r in rows] == inputs and all(r["error"] is None for r in rows)
    assert sorted(os.listdir(tmp_path)) == ["imgs", name]  # no journal, no temporary file


def _file_size_limit(limit: int) -> Callable[[], None]:
    """For preexec_fn: writes past `limit` bytes fail with EFBIG, as on a full disk
    (SIGXFSZ ignored, or it would kill the process instead)."""
    def limit_it() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_it


@pytest.mark.parametrize("name", ["full.json", "full.parquet"])
def test_a_full_disk_mid_run_keeps_the_rows_written_then_resume_finishes(
        model: Path, many: list[str], tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    inputs = many[:40]
    full = subprocess.run([sys.executable, "-m", "ofacls", "batch", *inputs, "-o", str(out), "-b", "4"],
                          env=cli_env(model), capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(3000))
    written = Path(parquet_journal(out)) if out.suffix == ".parquet" else out
    assert (full.returncode, full.stderr) == (2, f"ofacls: cannot write {written}: file too large\n")
    rows = read_rows(out)
    assert 3 < len(rows) < len(inputs) and [r["input"] for r in rows] == inputs[: len(rows)]
    if out.suffix == ".json":
        assert len(json.loads(out.read_bytes())) == len(rows)  # valid JSON, every row written in it
    resumed = invoke(["batch", *inputs, "-o", str(out), "--resume", "-b", "8"], model=model)
    assert resumed.exit_code == 0, resumed.stderr
    assert [r["input"] for r in read_rows(out)] == inputs
    assert sorted(os.listdir(tmp_path)) == [name]


@pytest.mark.parametrize(("out", "stdin", "resumable"), [
    ("out.json", False, True),
    ("out.parquet", False, True),
    ("out.jsonl", True, True),
    ("-", False, False),
    ("/dev/null", False, False),
])
def test_the_interrupt_line_offers_only_a_resume_that_works(model: Path, good_png: Path, tmp_path: Path,
                                                            out: str, stdin: bool, resumable: bool,
                                                            http_server: HTTPTestServer  # noqa: F811
                                                            ) -> None:
    hang = http_server.hang("/hang.png")
    inputs = [str(good_png), hang]
    args = ["batch", *(["-"] if stdin else inputs), "-o", out, "-b", "1", "-j", "1", "--timeout", "120"]
    listed = tmp_path / "inputs.lst"
    listed.write_text("".join(f"{i}\n" for i in inputs) if stdin else "")
    with open(listed, "rb") as given:
        proc = subprocess.Popen([sys.executable, "-m", "ofacls", *args], cwd=tmp_path, env=cli_env(model),
                                stdin=given, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while "/hang.png" not in http_server.requests:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    if not resumable:
        assert stderr == b"ofacls: interrupted by SIGTERM\n"
        return
    command = shlex.join(["ofacls", *args, "--resume"])
    again = " with the same inputs on stdin" if stdin else ""
    done = " (1 done this run)" if stdin else " (1 of 2 done this run)"
    assert stderr.decode() in [f"ofacls: interrupted by SIGTERM; every row written is complete: "
                               f"continue with `{command}`{again}{how_far}\n"
                               for how_far in (done, done.replace("(1", "(0"), "")]
    http_server.stop()  # the URL fails now: its row is an error, and the run ends
    result = subprocess.run([sys.executable, "-m", "ofacls", *shlex.split(command)[1:]], cwd=tmp_path,
                            env=cli_env(model), input=listed.read_text(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert [r["input"] for r in read_rows(tmp_path / out)] == inputs


def test_a_second_run_on_the_same_output_is_refused(model: Path, many: list[str], tmp_path: Path,
                                                    http_server: HTTPTestServer) -> None:  # noqa: F811
    out = tmp_path / "shared.csv"
    # the first run's last input answers only once the second run has been refused
    release = threading.Event()

    def held(request: Any) -> None:
        release.wait(120)
        answer(Path(many[0]).read_bytes())(request)

    last = http_server.route("/held.png", held)
    first = _start_batch([*many[:60], last], out, model)
    try:
        _wait_for_rows(out, first, n=2)
        for flags in ([], ["--overwrite"], ["--resume"]):
            second = invoke(["batch", *many[60:], "-o", str(out), *flags], model=model)
            assert second.exit_code == 2 and second.stdout == ""
            assert second.stderr == (f"ofacls: {out} is being written by another ofacls run "
                                     f"(pid {first.pid})\n")
        assert first.poll() is None
        release.set()
        _, stderr = first.communicate(timeout=120)
    finally:
        release.set()
        first.kill()
    assert first.returncode == 0, stderr
    rows = read_rows(out)
    assert [r["input"] for r in rows] == [*many[:60], last]  # nothing of the second run's
    assert len(out.read_text(encoding="utf-8").splitlines()) == 62  # the header, one line a row


# --- bad model folders ---------------------------------------------------------------------


def edited_model(model: Path, dest: Path, files: dict[str, str]) -> Path:
    """A copy of `model` whose named files hold the given text (the others hard-linked)."""
    dest.mkdir(parents=True)
    for f in model.iterdir():
        if f.name not in files:
            os.link(f, dest / f.name)
    for name, text in files.items():
        (dest / name).write_text(text, encoding="utf-8")
    return dest


def with_setting(model: Path, name: str, key: str, value: object) -> dict[str, str]:
    """`model`'s JSON file `name` with the setting at dotted `key` set to `value`."""
    data = json.loads((model / name).read_text(encoding="utf-8"))
    *outer, last = key.split(".")
    section = data
    for part in outer:
        section = section[part]
    section[last] = value
    return {name: json.dumps(data)}


def assert_refused_at_load(folder: Path, image: Path, message: str) -> None:
    """predict exits 3 with `ofacls: MESSAGE` alone, before any image is classified."""
    result = invoke(["predict", str(image), "--json", "--model", str(folder)])
    assert (result.exit_code, result.stdout) == (3, "")
    assert result.stderr == f"ofacls: {message}\n"


# (file, setting, bad value, message after "<file>: ")
BAD_SETTINGS = [
    ("configuration.json", "model.patch_image_size", "big",
     "model.patch_image_size must be a positive integer, not 'big'"),
    ("configuration.json", "model.patch_image_size", 0,
     "model.patch_image_size must be a positive integer, not 0"),
    ("configuration.json", "model.patch_image_size", -64,
     "model.patch_image_size must be a positive integer, not -64"),
    ("configuration.json", "model.patch_image_size", True,
     "model.patch_image_size must be a positive integer, not True"),
    ("configuration.json", "model.patch_image_size", 64.5,
     "model.patch_image_size must be a positive integer, not 64.5"),
    ("configuration.json", "model.max_src_length", "256",
     "model.max_src_length must be a positive integer, not '256'"),
    ("configuration.json", "model.beam_search", "x",
     "model.beam_search must be a JSON object, not 'x'"),
    ("configuration.json", "model.beam_search.beam_size", 0,
     "model.beam_search.beam_size must be a positive integer, not 0"),
    ("configuration.json", "model.beam_search.beam_size", "5",
     "model.beam_search.beam_size must be a positive integer, not '5'"),
    ("configuration.json", "model.beam_search.no_repeat_ngram_size", False,
     "model.beam_search.no_repeat_ngram_size must be a non-negative integer, not False"),
    ("configuration.json", "model.beam_search.max_len_a", -1,
     "model.beam_search.max_len_a must be a non-negative number, not -1"),
    ("configuration.json", "model.beam_search.len_penalty", "1.0",
     "model.beam_search.len_penalty must be a number, not '1.0'"),
    ("configuration.json", "model.beam_search.normalize_scores", "yes",
     "model.beam_search.normalize_scores must be true or false, not 'yes'"),
    ("configuration.json", "model.beam_search.min_len", 17,
     "model.beam_search.min_len 17 is more than max_len_b 16: no answer could end"),
    ("configuration.json", "model.answer2label", 5,
     "model.answer2label must be a file name, not 5"),
    ("configuration.json", "model.prompt", 5, "model.prompt must be a string, not 5"),
    ("configuration.json", "model.imagenet_default_mean_and_std", "false",
     "model.imagenet_default_mean_and_std must be true or false, not 'false'"),
    ("configuration.json", "model.imagenet_default_mean_and_std", 1,
     "model.imagenet_default_mean_and_std must be true or false, not 1"),
    ("config.json", "d_model", "64", "d_model must be a positive integer, not '64'"),
    ("config.json", "encoder_attention_heads", 0,
     "encoder_attention_heads must be a positive integer, not 0"),
    ("config.json", "vocab_size", True, "vocab_size must be a positive integer, not True"),
    ("config.json", "image_bucket_size", [42], "image_bucket_size must be a positive integer, "
                                               "not [42]"),
    ("config.json", "resnet_type", ["resnet18"], "resnet_type must be a string, not ['resnet18']"),
    ("config.json", "attn_scale_factor", 0, "attn_scale_factor must be a positive number, not 0"),
    # the value is quoted cut short: the message stays one line
    ("configuration.json", "model.prompt", {"text": "x" * 100},
     "model.prompt must be a string, not {'text': '" + "x" * 27 + "..."),
]


@pytest.mark.parametrize("name, key, value, message", BAD_SETTINGS,
                         ids=[f"{k}={v!r}"[:40] for _, k, v, _ in BAD_SETTINGS])
def test_a_bad_setting_exits_3_naming_the_file_and_the_setting(
        model: Path, good_png: Path, tmp_path: Path, name: str, key: str, value: object,
        message: str) -> None:
    folder = edited_model(model, tmp_path / "m", with_setting(model, name, key, value))
    assert_refused_at_load(folder, good_png, f"{folder / name}: {message}")


def test_odd_but_valid_settings_still_load(model: Path) -> None:
    from ofacls.model.config import OFAConfig, TaskConfig

    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    task = json.loads((model / "configuration.json").read_text(encoding="utf-8"))
    config.update(some_future_setting={"x": 1}, attn_scale_factor=2)  # an int where a float is
    task["model"].update(answer2label=None, imagenet_default_mean_and_std=None, seed="7",
                         some_future_setting=[1, 2])
    task["model"]["beam_search"].update(max_len_a=0.5, len_penalty=0, some_future_setting="x")
    assert OFAConfig.from_dict(config).attn_scale_factor == 2
    loaded = TaskConfig.from_dict(task)
    # null is no label file: the folder is refused when its labels are read
    assert (loaded.answer2label, loaded.imagenet_default_mean_and_std) == (None, False)
    assert loaded.beam.max_len_a == 0.5 and loaded.beam.beam_size == 5
    task["model"]["beam_search"] = None  # ModelScope's defaults
    assert TaskConfig.from_dict(task).beam.no_repeat_ngram_size == 3


def test_an_image_size_beyond_the_position_grid_is_refused_at_load(
        model: Path, good_png: Path, tmp_path: Path) -> None:
    # 16 px per feature-map cell: the tiny model's 42x42 grid takes at most 672 px
    folder = edited_model(model, tmp_path / "over", with_setting(
        model, "configuration.json", "model.patch_image_size", 673))
    assert_refused_at_load(
        folder, good_png, f"{folder / 'configuration.json'}: model.patch_image_size 673 is too "
        "large for this model: its 43x43 feature map exceeds the 42x42 position grid "
        "(config.json's image_bucket_size); at most 672")
    folder = edited_model(model, tmp_path / "fits", with_setting(
        model, "configuration.json", "model.patch_image_size", 672))
    result = invoke(["predict", str(good_png), "--json", "--model", str(folder)])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["label"] in LABELS


@pytest.mark.parametrize("text", ['{"tench": 0, "goldfish": 1, "tench": 2}',
                                  '["tench", "goldfish", "tench"]'], ids=["object", "list"])
def test_a_label_listed_twice_is_refused(model: Path, good_png: Path, tmp_path: Path,
                                         text: str) -> None:
    folder = edited_model(model, tmp_path / "m", {"answer2label.json": text})
    message = f"{folder / 'answer2label.json'}: label 'tench' is listed twice"
    result = invoke(["labels", "--model", str(folder)])
    assert (result.exit_code, result.stdout, result.stderr) == (3, "", f"ofacls: {message}\n")
    assert_refused_at_load(folder, good_png, message)


def test_labels_a_tokenizer_cannot_tell_apart_are_refused(model: Path, good_png: Path,
                                                          tmp_path: Path) -> None:
    # vocab.json/merges.txt of another model: without the labels' byte tokens every
    # label encodes to nothing, and all of them would collapse into one answer
    special = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    folder = edited_model(model, tmp_path / "m", {"vocab.json": json.dumps(special),
                                                  "merges.txt": "#version: 0.2\n"})
    assert_refused_at_load(folder, good_png, "labels 'tench' and 'goldfish' have the same "
                           "tokens []: vocab.json/merges.txt do not match the labels")


@pytest.mark.parametrize("where", ["label", "prompt"])
def test_token_ids_beyond_the_vocab_size_are_refused_at_load(model: Path, good_png: Path,
                                                              tmp_path: Path, where: str) -> None:
    from ofa_factory import VOCAB_SIZE

    from ofacls.labels import encode_prompt, load_tokenizer, read_label_file
    from ofacls.model.config import TaskConfig

    tokenizer = load_tokenizer(model / "vocab.json", model / "merges.txt")
    labels = read_label_file(model / "answer2label.json").names
    label_ids = {i for e in tokenizer.encode_batch([" " + n for n in labels],
                                                   add_special_tokens=False) for i in e.ids}
    prompt = TaskConfig().prompt
    if where == "label":  # the last token of the first label
        moved, what = tokenizer.encode(" " + labels[0]).ids[-1], f"label {labels[0]!r}"
    else:  # a prompt token no label uses
        moved = next(i for i in encode_prompt(tokenizer, prompt, 256)[1:-1] if i not in label_ids)
        what = "the prompt"
    # a vocab.json that gives one token an id the model's table has no row for: an
    # IndexError inside the model, at the first image (prompt) or at some images (label)
    vocab = json.loads((model / "vocab.json").read_text(encoding="utf-8"))
    vocab[tokenizer.id_to_token(moved)] = VOCAB_SIZE
    folder = edited_model(model, tmp_path / "m", {"vocab.json": json.dumps(vocab)})
    assert_refused_at_load(folder, good_png, f"{what} has token id {VOCAB_SIZE}, but config.json's "
                           f"vocab_size is {VOCAB_SIZE}: vocab.json/merges.txt do not match the "
                           "model")
