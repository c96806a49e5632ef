"""Hostile image files: each is refused before it can cost much, in one clear line,
or (an animation of very many frames) classified from its first frame alone.

Every file is made here, byte by byte where Pillow would not write it: a
PostScript file named .jpg (Pillow would hand it to Ghostscript), headers that
claim a giant image, a 145-byte TIFF claiming a 40960 x 40960 tile (1.6 GB to
decode), a progressive JPEG of 5000 bare scans (19 s to decode), tens of
thousands of animation frames, a 33 KB run-length BMP claiming 64 MP (4 s in
Pillow's Python decoder), an 8 MB EXIF block on a photo to turn upright (47 s
and 5 GB at 40 MB), a sparse 1000 MB file named .jpg, and a 16 x 16 JPEG, BMP, PNG,
animated PNG or WebP padded to 1000 MB (refused), and an animated GIF padded
to 1000 MB (read up to the end of its first frame only).
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import LABELS, assert_one_line_errors, cli_env
from httpserver import HTTPTestServer
from ofa_factory import IMAGES_DIR
from PIL import Image

from ofacls.errors import ImageError
from ofacls.formats import read_rows
from ofacls.images import open_image
from ofacls.sources.expand import Source, read_source
from ofacls.sources.vetting import ALLOWED_FORMATS, check_head, gif_first_frame

FIRST, LATER = (200, 30, 30), (30, 30, 200)  # an animation's first frame, and every other one


# --- hostile files ---------------------------------------------------------------------


def eps() -> bytes:
    """An Encapsulated PostScript file: Pillow's EPS plugin renders it with Ghostscript."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
            b"newpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _tiff(entries: list[tuple[int, int, int, int]], data: bytes) -> bytes:
    """A little-endian TIFF of one directory (tag, type, count, value) and then `data`,
    whose offset the value -1 stands for."""
    n = len(entries)
    data_at = 8 + 2 + 12 * n + 4
    packed = b"".join(struct.pack("<HHII", tag, kind, count, data_at if value == -1 else value)
                      for tag, kind, count, value in sorted(entries))
    return b"II*\x00" + struct.pack("<IH", 8, n) + packed + b"\x00" * 4 + data


def tiff_giant_tile(tile: int = 40960, side: int = 16) -> bytes:
    """A 16 x 16 deflate TIFF in one tile of `tile` x `tile` pixels: libtiff decodes a
    whole tile into one buffer (1.6 GB here) however small the image."""
    # a tile small enough to fill holds all its bytes; a giant one only the image's
    data = zlib.compress(bytes(tile * tile if tile <= 1024 else side * side), 9)
    return _tiff([(256, 3, 1, side), (257, 3, 1, side), (258, 3, 1, 8), (259, 3, 1, 8),
                  (262, 3, 1, 1), (277, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile),
                  (324, 4, 1, -1), (325, 4, 1, len(data))], data)


def _jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def jpeg_scans(scans: int = 5000, side: int = 8000) -> bytes:
    """A progressive grayscale JPEG of `scans` bare scan headers (10 bytes each): each is
    a pass over every block of the image, ~4 ms at 64 MP."""
    return (b"\xff\xd8" + _jpeg_segment(0xDB, b"\x00" + b"\x01" * 64)
            + _jpeg_segment(0xC2, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00")
            + _jpeg_segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")
            + _jpeg_segment(0xDA, b"\x01\x01\x00\x00\x00\x00") * scans + b"\xff\xd9")


def gif_frames(n: int = 100_000) -> bytes:
    """A 1 x 1 GIF of `n` frames: the first FIRST, the others LATER (palette 0 and 1)."""
    head = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + bytes(FIRST) + bytes(LATER)
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02"
    # LZW at 2 bits: clear code, the pixel's palette index, end code
    first, later = descriptor + b"\x44\x01\x00", descriptor + b"\x4c\x01\x00"
    return head + first + later * (n - 1) + b"\x3b"


def apng_frames(n: int = 50_000) -> bytes:
    """A 1 x 1 animated PNG of `n` frames: the first FIRST, the others LATER."""
    def pixel(rgb: tuple[int, int, int]) -> bytes:
        return zlib.compress(b"\x00" + bytes(rgb))

    def control(seq: int) -> bytes:
        return _png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, 1, 1, 0, 0, 1, 10, 0, 0))

    out = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)),
           _png_chunk(b"acTL", struct.pack(">II", n, 0)), control(0),
           _png_chunk(b"IDAT", pixel(FIRST))]
    later = pixel(LATER)
    for seq in range(1, 2 * n - 1, 2):
        out += [control(seq), _png_chunk(b"fdAT", struct.pack(">I", seq + 1) + later)]
    return b"".join(out + [_png_chunk(b"IEND", b"")])


def _riff_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + b"\x00" * (len(data) % 2)


def _webp(canvas: tuple[int, int], frames: list[bytes]) -> bytes:
    """An animated WebP of these frames (each a VP8L chunk placed at 0, 0)."""
    w, h = canvas
    vp8x = _riff_chunk(b"VP8X", b"\x02\x00\x00\x00" + (w - 1).to_bytes(3, "little")
                       + (h - 1).to_bytes(3, "little"))
    anmf = [_riff_chunk(b"ANMF", b"\x00" * 12 + (10).to_bytes(3, "little") + b"\x00" + f)
            for f in frames]
    body = b"WEBP" + vp8x + _riff_chunk(b"ANIM", b"\x00" * 6) + b"".join(anmf)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _vp8l(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), rgb).save(buf, "WEBP", lossless=True)
    return buf.getvalue()[12:]  # the VP8L chunk, after the RIFF header


def webp_frames(n: int = 50_000) -> bytes:
    """A 1 x 1 animated WebP of `n` frames: the first FIRST, the others LATER."""
    return _webp((1, 1), [_vp8l(FIRST)] + [_vp8l(LATER)] * (n - 1))


def png_exif(exif_bytes: int, orientation: int = 6) -> bytes:
    """A 64 x 48 PNG whose eXIf block (of about `exif_bytes`) asks to be turned upright
    and holds one array of 16-bit numbers, all of which a rewrite unpacks."""
    values = exif_bytes // 2
    exif = (b"II*\x00" + struct.pack("<IH", 8, 2)
            + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
            + struct.pack("<HHII", 0x0111, 3, values, 8 + 2 + 24 + 4) + b"\x00" * 4
            + (bytes(range(256)) * (2 * values // 256 + 1))[:2 * values])
    raw = b"".join(b"\x00" + b"\x80" * 64 * 3 for _ in range(48))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0))
            + _png_chunk(b"eXIf", exif) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def bmp_rle(w: int, h: int, rows: bytes | None = None,
            colour: tuple[int, int, int] = (0, 0, 0)) -> bytes:
    """An 8-bit run-length encoded BMP, palette index 1 = `colour`. By default each row
    is one pixel and an end-of-line code, which Pillow pads byte by byte in Python."""
    data = (rows if rows is not None else b"\x01\x01\x00\x00" * h) + b"\x00\x01"
    palette = b"\x00" * 4 + bytes(colour[::-1]) + b"\x00" + b"\x00" * 4 * 254
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 1, len(data), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + palette + data


def giant_headers(side: int = 30_000) -> dict[str, bytes]:
    """Files of each allowed format whose header claims side x side pixels (900 MP)."""
    gif = b"GIF89a" + struct.pack("<HHBBB", side, side, 0, 0, 0) + b"\x2c" + struct.pack(
        "<HHHHB", 0, 0, side, side, 0) + b"\x08\x01\x00\x00\x3b"
    bmp_info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 24, 0, 0, 2835, 2835, 0, 0)
    jpeg = (b"\xff\xd8" + _jpeg_segment(0xDB, b"\x00" + b"\x01" * 64)
            + _jpeg_segment(0xC0, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00")
            + _jpeg_segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")
            + _jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\xff\xd9")
    return {
        "PNG": b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2,
                                                                       0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b""),
        "JPEG": jpeg,
        "GIF": gif,
        "BMP": b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + bmp_info,
        "TIFF": _tiff([(256, 4, 1, side), (257, 4, 1, side), (258, 3, 1, 8), (259, 3, 1, 1),
                       (262, 3, 1, 1), (273, 4, 1, -1), (277, 3, 1, 1), (278, 4, 1, side),
                       (279, 4, 1, 16)], b"\x00" * 16),
        # 16384 x 16384 is as large as a WebP gets: 268 MP
        "WEBP": _webp((16384, 16384), [_vp8l(FIRST)]),
    }


def sparse(path: Path, size: int = 1000 * 2**20, head: bytes = b"") -> Path:
    """A file of `size` bytes that takes no disk: `head`, then a hole."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def encode(images: list[Image.Image], fmt: str, **options: object) -> bytes:
    """These images saved as one file of `fmt` (an animation where there are several)."""
    buf = io.BytesIO()
    images[0].save(buf, fmt, save_all=len(images) > 1, append_images=images[1:], **options)
    return buf.getvalue()


def small_image(fmt: str, size: tuple[int, int] = (16, 16), frames: int = 1) -> bytes:
    return encode([Image.new("RGB", size, FIRST)] + [Image.new("RGB", size, LATER)] * (frames - 1), fmt)


@pytest.mark.parametrize(("fmt", "frames", "name"), [
    ("JPEG", 1, "16x16 JPEG image"), ("BMP", 1, "16x16 BMP image"), ("PNG", 1, "16x16 PNG image"),
    ("PNG", 3, "16x16 PNG image"), ("WEBP", 1, "16x16 WebP image")])
def test_a_header_padded_far_past_its_image_is_refused_unread(
        tmp_path: Path, fmt: str, frames: int, name: str) -> None:
    padded = sparse(tmp_path / f"padded.{fmt.lower()}", head=small_image(fmt, frames=frames))
    with pytest.raises(ImageError, match=f"^file is 1000 MB, far more than its {name} can hold$"):
        read_source(Source(str(padded), str(padded), False))


@pytest.mark.parametrize("fmt", ["BMP", "PNG"])
def test_a_large_file_its_image_fills_is_read(tmp_path: Path, fmt: str) -> None:
    # 24 MP, uncompressed: 72 MB either way, over the size at which the claim is checked
    big = tmp_path / f"big.{fmt.lower()}"
    Image.new("RGB", (6000, 4000), FIRST).save(big, fmt, **({"compress_level": 0} if fmt == "PNG" else {}))
    assert big.stat().st_size > 64 * 2**20
    assert len(read_source(Source(str(big), str(big), False))) == big.stat().st_size


# --- the allowlist: nothing but the README's formats reaches Pillow -----------------------


FAKE_GS = "#!/bin/sh\necho \"$0 $*\" >> '{marker}'\nexit 1\n"


def fake_ghostscript(folder: Path) -> tuple[dict[str, str], Path]:
    """An environment whose PATH starts with a `gs` that leaves a marker file when run."""
    bin_dir, marker = folder / "bin", folder / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(FAKE_GS.format(marker=marker))
    (bin_dir / "gs").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}, marker


def test_a_fake_ghostscript_first_on_path_is_what_pillow_would_run(tmp_path: Path) -> None:
    """The check below can fail: Pillow, left to itself, runs the marker's gs on EPS."""
    env, marker = fake_ghostscript(tmp_path)
    (tmp_path / "x.jpg").write_bytes(eps())
    code = ("import sys\nfrom PIL import Image\n"
            "try:\n    Image.open(sys.argv[1]).load()\nexcept Exception:\n    pass\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.jpg")],
                   env={**os.environ, **env}, check=True, timeout=60)
    assert marker.exists()


def test_postscript_named_jpg_is_refused_without_running_ghostscript(tmp_path: Path) -> None:
    env, marker = fake_ghostscript(tmp_path)
    code = ("import sys\nfrom ofacls.images import open_image\nfrom ofacls.errors import ImageError\n"
            "try:\n    open_image(open(sys.argv[1], 'rb').read())\n"
            "except ImageError as e:\n    print(e)\n")
    (tmp_path / "x.jpg").write_bytes(eps())
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.jpg")],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
                          check=True)
    assert proc.stdout == ("unsupported image format EPS (ofacls reads JPEG, PNG, GIF, BMP, WebP, "
                           "TIFF)\n")
    assert not marker.exists()


def _ppm() -> bytes:
    return b"P6\n2 2\n255\n" + b"\x10\x20\x30" * 4


def _ico() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), FIRST).save(buf, "ICO")
    return buf.getvalue()


@pytest.mark.parametrize(("make", "name"), [(eps, "EPS"), (_ppm, "PPM"), (_ico, "ICO")])
def test_formats_beyond_the_allowlist_are_named_and_refused(make: Callable[[], bytes], name: str
                                                            ) -> None:
    data = make()
    with Image.open(io.BytesIO(data)) as img:  # Pillow itself would open every one
        assert img.format == name
    message = f"unsupported image format {name} (ofacls reads JPEG, PNG, GIF, BMP, WebP, TIFF)"
    for refuse in (lambda: open_image(data), lambda: check_head(data[:16])):
        with pytest.raises(ImageError) as e:
            refuse()
        assert str(e.value) == message


def test_every_allowed_format_still_opens() -> None:
    with Image.open(IMAGES_DIR / "chelsea.png") as im:
        base = im.convert("RGB").resize((40, 30))
    for fmt in ALLOWED_FORMATS:
        buf = io.BytesIO()
        base.save(buf, fmt)
        assert check_head(buf.getvalue()[:16]) == fmt
        assert open_image(buf.getvalue()).size == (40, 30), fmt
    # a camera's MPO (a JPEG with a second picture after it) is read by the JPEG plugin
    buf = io.BytesIO()
    base.save(buf, "MPO", save_all=True, append_images=[base.rotate(180)])
    assert open_image(buf.getvalue()).size == (40, 30)


# --- what a header claims is checked before decoding -------------------------------------


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_a_header_claiming_a_giant_image_is_refused_from_the_header(fmt: str) -> None:
    data = giant_headers()[fmt]
    assert len(data) < 400
    side = 16384 if fmt == "WEBP" else 30_000
    mp = "268" if fmt == "WEBP" else "900"
    with pytest.raises(ImageError) as e:
        open_image(data)
    assert str(e.value) == f"image is {side}x{side} = {mp} MP, over the 179 MP limit (--max-pixels)"


@pytest.mark.parametrize(("make", "message"), [
    (tiff_giant_tile, "image has oversized TIFF tiles (40960x40960 for a 16x16 image)"),
    (jpeg_scans, "image has too many scans (progressive JPEG with 5000 scans, over the limit of "
                 "100)"),
    (lambda: png_exif(8 * 2**20), "EXIF block is 8388652 bytes, over the 1 MB limit"),
    (lambda: bmp_rle(8000, 8000), "run-length encoded BMP is 8000x8000 = 64 MP, over the 16.8 MP "
                                  "limit for that encoding"),
])
def test_what_would_cost_seconds_or_gigabytes_to_decode_is_refused(make: Callable[[], bytes],
                                                                   message: str) -> None:
    with pytest.raises(ImageError) as e:
        open_image(make())
    assert str(e.value) == message


def test_the_refusals_cost_neither_memory_nor_time(tmp_path: Path) -> None:
    """In a fresh process (no torch), every hostile file above is refused within
    a few MB of Python and Pillow themselves, each in well under a second."""
    files = {f"giant.{fmt.lower()}": data for fmt, data in giant_headers().items()}
    files.update({"tile.tif": tiff_giant_tile(), "scans.jpg": jpeg_scans(),
                  "exif.png": png_exif(8 * 2**20), "rle.bmp": bmp_rle(8000, 8000),
                  "eps.jpg": eps()})
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    code = ("import sys, time\nfrom ofacls.images import open_image\n"
            "from ofacls.errors import ImageError\n"
            "for path in sys.argv[1:]:\n"
            "    data = open(path, 'rb').read()\n"
            "    start = time.perf_counter()\n"
            "    try:\n        open_image(data)\n        print('decoded', path)\n"
            "    except ImageError:\n        pass\n"
            "    print(f'{time.perf_counter() - start:.3f}')\n"
            "print([int(line.split()[1]) * 1024 for line in open('/proc/self/status')\n"
            "       if line.startswith('VmHWM:')][0])\n")
    proc = subprocess.run([sys.executable, "-c", code, *(str(tmp_path / n) for n in files)],
                          capture_output=True, text=True, timeout=120, check=True)
    *times, rss = proc.stdout.split()
    assert len(times) == len(files), proc.stdout  # nothing decoded
    assert max(float(t) for t in times) < 1.0
    # Python + Pillow + the largest file (8 MB) read twice; a decode would take 1.6 GB
    assert int(rss) < 150 * 2**20, f"peak RSS {int(rss) / 2**20:.0f} MB"


def test_under_the_limits_the_same_kinds_of_file_decode() -> None:
    """The limits sit above what real files hold: a tile a little larger than its
    image, 100 scans, a 1 MB EXIF block, a 16 MP run-length BMP."""
    assert open_image(tiff_giant_tile(tile=32, side=16)).size == (16, 16)
    assert open_image(jpeg_scans(scans=100, side=64)).size == (64, 64)
    assert open_image(png_exif(2**20 - 64)).size == (48, 64)  # turned upright (orientation 6)
    row = b"\xff\x01" * 16 + b"\x10\x01" + b"\x00\x00"  # 16 x 255 + 16 = 4096 pixels
    assert open_image(bmp_rle(4096, 4096, rows=row * 4096)).size == (4096, 4096)
    rows = (b"\x03\x01\x00\x00") * 2  # two rows of three pixels of palette colour 1
    assert open_image(bmp_rle(3, 2, rows=rows, colour=FIRST)).getpixel((2, 1)) == FIRST


# --- animations: the first frame only -----------------------------------------------------


@pytest.mark.parametrize("make", [gif_frames, apng_frames, webp_frames])
def test_an_animation_of_very_many_frames_is_classified_by_its_first(make: Callable[[], bytes]
                                                                     ) -> None:
    data = make()
    with Image.open(io.BytesIO(data)) as img:
        assert getattr(img, "n_frames", 1) >= 50_000
        img.seek(1)
        assert img.convert("RGB").getpixel((0, 0)) == LATER
    start = time.perf_counter()
    decoded = open_image(data)
    assert time.perf_counter() - start < 2.0
    assert decoded.size == (1, 1) and decoded.getpixel((0, 0)) == FIRST


def _gifs() -> dict[str, bytes]:
    """GIFs whose first frame comes in each way the format allows: a global or a
    local colour table, extensions before it (comment, transparency, looping),
    interlaced rows, frames after it."""
    photo = Image.open(IMAGES_DIR / "chelsea.png").convert("RGB").resize((64, 48))
    return {
        "still": encode([photo], "GIF"),
        "animated": encode([photo, Image.new("RGB", photo.size, LATER)], "GIF",
                           comment=b"a comment", loop=0, duration=40),
        "local palettes": encode([photo.quantize(16), photo.quantize(200)], "GIF"),
        "transparent": encode([photo.convert("P")], "GIF", transparency=0),
        "interlaced": encode([photo], "GIF", interlace=True),
        "many frames": gif_frames(1000),
    }


@pytest.mark.parametrize("name", list(_gifs()))
def test_a_gifs_first_frame_alone_decodes_to_the_same_pixels(name: str) -> None:
    data = _gifs()[name]
    first = gif_first_frame(io.BytesIO(data).read)
    assert first is not None and len(first) <= len(data)
    assert open_image(first).tobytes() == open_image(data).tobytes()


def test_a_large_gif_is_read_only_up_to_its_first_frame(tmp_path: Path) -> None:
    data = _gifs()["animated"]
    padded = sparse(tmp_path / "padded.gif", head=data)
    read = read_source(Source(str(padded), str(padded), False))
    assert len(read) < len(data)  # the second frame, and the 1000 MB after it, unread
    assert open_image(read).tobytes() == open_image(data).tobytes()


def test_gif_first_frame_leaves_what_is_not_a_gifs_blocks_to_pillow() -> None:
    head = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0, 0, 0)
    assert gif_first_frame(io.BytesIO(head + b"\x00garbage").read) is None
    cut = _gifs()["still"][:200]  # cut short inside its image data: decoding says so
    assert gif_first_frame(io.BytesIO(cut).read) == cut
    comments = head + b"\x21\xfe" + b"\x01x" * 70_000 + b"\x00"
    with pytest.raises(ImageError, match="^image has too many GIF blocks before its first frame"):
        gif_first_frame(io.BytesIO(comments).read)


# --- a batch of hostile files, end to end --------------------------------------------------


# Runs a command and writes its peak RSS to argv[1]. A launcher of its own, since
# Linux carries ru_maxrss across exec: a child forked straight from pytest (torch
# loaded) would report pytest's peak.
_LAUNCHER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))  # KiB on Linux
sys.exit(code)
"""

COPIES = 8


def test_a_batch_of_hostile_files_gives_one_error_row_each_in_bounded_memory(
        model: Path, tmp_path: Path) -> None:
    env, marker = fake_ghostscript(tmp_path)
    folder = tmp_path / "hostile"
    folder.mkdir()
    refused = {  # file name -> its row's error
        "eps.jpg": (eps(), "unsupported image format EPS (ofacls reads JPEG, PNG, GIF, BMP, WebP, "
                           "TIFF)"),
        "giant.png": (giant_headers()["PNG"], "image is 30000x30000 = 900 MP, over the 179 MP "
                                              "limit (--max-pixels)"),
        "giant.webp": (giant_headers()["WEBP"], "image is 16384x16384 = 268 MP, over the 179 MP "
                                                "limit (--max-pixels)"),
        "tile.tif": (tiff_giant_tile(), "image has oversized TIFF tiles (40960x40960 for a 16x16 "
                                        "image)"),
        "scans.jpg": (jpeg_scans(), "image has too many scans (progressive JPEG with 5000 scans, "
                                    "over the limit of 100)"),
        "exif.png": (png_exif(8 * 2**20), "EXIF block is 8388652 bytes, over the 1 MB limit"),
        "rle.bmp": (bmp_rle(8000, 8000), "run-length encoded BMP is 8000x8000 = 64 MP, over the "
                                         "16.8 MP limit for that encoding"),
    }
    animated = {"frames.gif": gif_frames(), "frames.png": apng_frames(), "frames.webp": webp_frames()}
    expect: dict[str, str | None] = {}
    for i in range(COPIES):
        for name, (data, error) in refused.items():
            (folder / f"{i}-{name}").write_bytes(data)
            expect[f"hostile/{i}-{name}"] = error
        for name, data in animated.items():
            (folder / f"{i}-{name}").write_bytes(data)
            expect[f"hostile/{i}-{name}"] = None
        sparse(folder / f"{i}-sparse.jpg")
        expect[f"hostile/{i}-sparse.jpg"] = "not an image (ofacls reads JPEG, PNG, GIF, BMP, WebP, TIFF)"
        sparse(folder / f"{i}-padded.jpg", head=small_image("JPEG"))
        expect[f"hostile/{i}-padded.jpg"] = "file is 1000 MB, far more than its 16x16 JPEG image can hold"
        sparse(folder / f"{i}-padded.png", head=small_image("PNG"))
        expect[f"hostile/{i}-padded.png"] = "file is 1000 MB, far more than its 16x16 PNG image can hold"
        sparse(folder / f"{i}-padded.gif", head=gif_frames(3))
        expect[f"hostile/{i}-padded.gif"] = None  # its first frame is classified
    with HTTPTestServer() as server:
        served = [server.serve(f"/{i}-eps.jpg", eps(), content_type="image/jpeg")
                  for i in range(COPIES)]
        inputs = sorted(expect) + served
        expect.update({url: refused["eps.jpg"][1] for url in served})
        report = tmp_path / "rss"
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(report), sys.executable, "-m",
                               "ofacls", "batch", *inputs, "-o", "out.csv"],
                              env=cli_env(model, **env), cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr
    assert_one_line_errors(proc.stderr)
    rows = read_rows(tmp_path / "out.csv")
    assert [r["input"] for r in rows] == inputs  # one row each, in order
    for row in rows:
        assert row["error"] == expect[row["input"]], row
        if row["error"] is None:
            assert row["label"] in LABELS
    assert not marker.exists(), "Ghostscript was run"
    peak = int(report.read_text())
    assert peak < 2 * 2**30, f"peak RSS {peak / 2**20:.0f} MB"
    # generous: the model's load and a few seconds a file would still pass; one 5000-scan
    # JPEG decoded (19 s here) would not
    assert elapsed < 60, f"{elapsed:.0f} s for {len(inputs)} files"
