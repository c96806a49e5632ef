"""What an untrusted image file claims, checked before Pillow decodes its pixels.

Only ALLOWED_FORMATS are handed to Pillow (it would otherwise run Ghostscript on
a PostScript file named .jpg), and what a file's headers claim is checked
against what decoding it would cost: the scans of a JPEG, the chunks of a PNG,
the blocks of a GIF, the directory and tiles of a TIFF, the encoding of a BMP,
the size of an EXIF block, a WebP's canvas before Pillow allocates it. A
refused file is an ImageError saying why, in one line.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from ofacls.errors import ImageError

if TYPE_CHECKING:
    from PIL import Image

# The formats ofacls reads, as Pillow names them (MPO, the JPEG of cameras that
# store a second picture after the first, is opened by Pillow's JPEG plugin).
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
_FORMAT_LIST = "JPEG, PNG, GIF, BMP, WebP, TIFF"

# How many leading bytes sniff_format needs to tell every allowed format apart,
# and check_head to name the other formats Pillow knows.
SNIFF_BYTES = 12
HEAD_BYTES = 16

# Pillow's own signatures for the allowed formats (TIFF: its PREFIXES, both
# byte orders, classic and BigTIFF, and the two swapped ones it also accepts).
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"MM*\x00", "TIFF"), (b"II\x00*", "TIFF"),
    (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),
)

# Real progressive JPEGs have about ten scans (libjpeg's default script has 10,
# mozjpeg's a dozen); each scan is a pass over the whole image, so a file of
# bare 10-byte scan headers costs ~4 ms a scan at 64 MP (5000 of them: 19 s).
# libtiff refuses JPEG data with more than 100 scans by default; so do we (100
# scans of a 169 MP image decode in under a second).
MAX_JPEG_SCANS = 100
# Scans are counted on to this many, so the message can say how many there are.
_COUNT_JPEG_SCANS = 1 << 16
# Pillow walks a JPEG's segments, a PNG's chunks, a GIF's blocks in Python (and
# keeps each JPEG segment), so a file of empty ones costs ~1 s and ~130 MB per
# 5 MB; real files have tens to a few thousand.
_MAX_JPEG_SEGMENTS = 4096
_MAX_PNG_CHUNKS = 1 << 16
_MAX_GIF_BLOCKS = 1 << 16
# A TIFF directory's entries, and the numbers in them that Pillow unpacks into
# Python objects (~90 bytes each): libtiff's own 8 KB strips give 131k numbers
# for a 179 MP RGB image.
_MAX_TIFF_ENTRIES = 4096
_MAX_TIFF_VALUES = 1 << 19
# A tile larger than this many pixels is refused unless the image itself is
# nearly that large: libtiff decodes a whole tile into one buffer, so a 150-byte
# file claiming 40960 x 40960 tiles takes 1.6 GB however small its image.
_MAX_SMALL_TILE = 1 << 22
# Pillow decodes run-length encoded BMPs in Python, about 60 ns a pixel at worst
# (an end-of-line code pads its row byte by byte): a 33 KB file claiming 64 MP
# takes 4 s. RLE BMPs are small palette images; this caps one at ~1 s.
_MAX_RLE_BMP_PIXELS = 1 << 24
# Turning an image upright rewrites its EXIF block, every number in it unpacked
# into Python: a 40 MB block took 47 s and 5 GB. A JPEG's EXIF cannot exceed
# 64 KB (one APP1 segment); PNG and WebP copy theirs from a camera's JPEG.
_MAX_EXIF_BYTES = 1 << 20


def sniff_format(head: bytes) -> str | None:
    """The allowed format (a name in ALLOWED_FORMATS) that bytes starting with
    `head` would be opened as, or None: from the first SNIFF_BYTES bytes, so a
    download can be refused before the rest of it arrives."""
    head = bytes(head[:SNIFF_BYTES])  # any buffer, e.g. a memoryview
    for signature, fmt in _SIGNATURES:
        if head.startswith(signature):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def check_head(head: bytes) -> str:
    """The allowed format a file starting with `head` (its first HEAD_BYTES
    bytes, or all of a shorter file) is opened as; ImageError naming the format
    otherwise. A reader can call it before reading the rest of a large file."""
    if not head:
        raise ImageError("empty file")
    fmt = sniff_format(head)
    if fmt is not None:
        return fmt
    other = _other_format(bytes(head[:HEAD_BYTES]))
    if other:
        raise ImageError(f"unsupported image format {other} (ofacls reads {_FORMAT_LIST})")
    raise ImageError(f"not an image (ofacls reads {_FORMAT_LIST})")


# A JPEG, BMP or PNG needs at most ~8 bytes a pixel (BMP's 32-bit pixels, a
# 16-bit RGBA PNG's raw rows, which deflate never grows by more than a few per
# mille; a camera's few MPO frames) for each frame it holds, plus its metadata
# (one APP segment is at most 64 KB, and few files carry hundreds); a WebP holds
# nothing outside the RIFF container its first bytes give the length of. A file
# far larger is padding, which would be read whole for nothing. Checked on files
# over SIZE_CLAIM_FROM bytes, from their first SIZE_CLAIM_HEAD bytes. (GIF and
# TIFF announce neither their frames nor their length up front, so they are not
# checked; a large GIF is read only up to the end of its first frame:
# gif_first_frame.)
SIZE_CLAIM_FROM = 64 << 20
SIZE_CLAIM_HEAD = 1 << 20
_BYTES_PER_PIXEL = 8
_METADATA_BYTES = 16 << 20


def check_size_claim(head: bytes, size: int) -> None:
    """Refuse a JPEG, BMP, PNG or WebP file of `size` bytes far larger than the
    image its first bytes (`head`) describe, before the rest of it is read."""
    claim = _claimed_bytes(head)
    if claim is not None and size > claim[0] + _METADATA_BYTES:
        raise ImageError(f"file is {size >> 20} MB, far more than its {claim[1]} can hold")


def _claimed_bytes(head: bytes) -> tuple[int, str] | None:
    """The most bytes the image whose file starts with `head` can need, and how
    to name that image; None where the format or these bytes don't say."""
    fmt = sniff_format(head)
    if fmt == "WEBP":
        (riff,) = struct.unpack_from("<I", head, 4)
        canvas = webp_size(head)
        name = f"{canvas[0]}x{canvas[1]} WebP image" if canvas else "WebP container"
        return riff + 8, name
    if fmt not in ("JPEG", "BMP", "PNG"):
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(head), formats=[fmt]) as img:
            (w, h), frames = img.size, getattr(img, "n_frames", 1)  # an APNG's, from acTL
    except Exception:
        return None  # no header in these bytes: decoding the whole file reports it
    return frames * (_BYTES_PER_PIXEL * w + 1) * h, f"{w}x{h} {fmt} image"


def gif_first_frame(read: Callable[[int], bytes]) -> bytes | None:
    """A GIF's bytes from `read` (a file's, at its start) up to the end of its first
    frame, then its trailer: all that decoding that frame reads, so a file padded
    or animated far past it is not read whole. None where the blocks before that
    frame are not a GIF's (the whole file then goes to Pillow, which decides)."""
    out = bytearray(read(13))  # header and logical screen descriptor
    if len(out) < 13:
        return None
    if out[10] & 0x80:  # a global colour table
        out += read(3 << ((out[10] & 7) + 1))
    blocks = 0

    def sub_blocks(counted: bool) -> bool:
        """Append sub-blocks up to their terminator; False where the file ends first."""
        nonlocal blocks
        while size := read(1):
            out.extend(size)
            if not size[0]:
                return True
            blocks += counted
            if blocks > _MAX_GIF_BLOCKS:
                raise _too_many_gif_blocks()
            out.extend(read(size[0]))
        return False

    while intro := read(1):
        out += intro
        if intro == b"!":  # an extension: its label, then its sub-blocks
            out += read(1)
            if not sub_blocks(counted=True):
                break
        elif intro == b",":  # the first image: descriptor, local colour table, LZW data
            out += read(9)
            if len(out) >= 10 and out[-1] & 0x80:
                out += read(3 << ((out[-1] & 7) + 1))
            out += read(1)  # the LZW minimum code size
            return bytes(out) + b";" if sub_blocks(counted=False) else bytes(out)
        else:
            return None
    return bytes(out)  # cut short: decoding says so


def check_structure(data: bytes, fmt: str) -> None:
    """Refuse a file of the allowed format `fmt` whose segments, chunks, blocks
    or directory claim more work than a real file's, before Pillow opens it."""
    _STRUCTURE_CHECKS.get(fmt, _no_check)(data)


def check_opened(img: Image.Image, fmt: str) -> None:
    """Refuse an opened, not yet decoded, TIFF or BMP whose layout or encoding
    would cost more than its pixels are worth."""
    if fmt == "TIFF":
        _check_tiff_layout(img)
    elif fmt == "BMP":
        _check_bmp(img)


def megapixels(pixels: int) -> str:
    """Megapixels to 3 significant digits (so a limit under 1 MP does not read as
    "0 MP"), without an exponent."""
    mp = pixels / 1e6
    return f"{mp:.3g}" if mp < 1000 else f"{mp:.0f}"


def webp_size(data: bytes) -> tuple[int, int] | None:
    """A WebP's canvas size from its first chunk's header (as Pillow reads it), or
    None where that header is too short or of another kind: libwebp refuses those."""
    kind = data[12:16]
    if kind == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if kind == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack_from("<HH", data, 26)
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _other_format(data: bytes) -> str | None:
    """The format Pillow would have taken these bytes for, by its signature
    checks alone (nothing is opened), where it is not an allowed one."""
    from PIL import Image

    Image.init()
    prefix = data[:16]
    for fmt, (_, accept) in Image.OPEN.items():
        # a plugin without a signature check accepts anything: not evidence
        if fmt in ALLOWED_FORMATS or accept is None:
            continue
        try:
            if accept(prefix) is True:
                return fmt
        except (IndexError, TypeError, struct.error):
            continue
    return None


def _no_check(data: bytes) -> None:
    """A BMP's or WebP's headers are parsed in C; what they claim is checked once opened."""

# Any marker but a stuffed 0xFF00, a restart marker or a fill byte: how a scan's
# entropy-coded data ends.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# markers with no length field: TEM, SOI, EOI
_JPEG_BARE = frozenset({0x01, 0xD8, 0xD9})


def _check_jpeg(data: bytes) -> None:
    """Refuse a JPEG with more scans or segments than a real one has.

    Walks the first image's segments by their lengths (so a thumbnail inside
    an APP1 block is not counted) and skips entropy-coded data with a regex;
    stops at the first EOI, where Pillow's decoding stops too."""
    scans = segments = 0
    pos = 2
    while scans < _COUNT_JPEG_SCANS and (m := _JPEG_MARKER.search(data, pos)) is not None:
        marker, pos = data[m.end() - 1], m.end()
        if marker == 0xD9:
            break
        if marker == 0xDA:
            scans += 1
        else:
            # Pillow keeps each segment before the first scan as a Python object
            segments += 1
            if segments > _MAX_JPEG_SEGMENTS:
                raise ImageError(f"image has too many JPEG marker segments (over {_MAX_JPEG_SEGMENTS})")
            if marker in _JPEG_BARE:
                continue
        if pos + 2 > len(data):
            break
        pos += struct.unpack_from(">H", data, pos)[0]
    if scans > MAX_JPEG_SCANS:
        over = "over " if scans >= _COUNT_JPEG_SCANS else ""
        raise ImageError(f"image has too many scans (progressive JPEG with {over}{scans} scans, "
                         f"over the limit of {MAX_JPEG_SCANS})")


def _check_png(data: bytes) -> None:
    """Refuse a PNG with more chunks than a real one has, counted up to IEND
    or, in an animation, the start of its second frame (where Pillow stops)."""
    pos, chunks, seen_data = 8, 0, False
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IEND" or (kind == b"fcTL" and seen_data):
            return
        seen_data = seen_data or kind == b"IDAT"
        chunks += 1
        if chunks > _MAX_PNG_CHUNKS:
            raise ImageError(f"image has too many PNG chunks (over {_MAX_PNG_CHUNKS})")
        pos += 12 + length


def _check_gif(data: bytes) -> None:
    """Refuse a GIF with more extension blocks before its first frame than a
    real one has (Pillow reads them one by one in Python)."""
    pos = 13
    if len(data) > 10 and data[10] & 0x80:  # a global colour table follows
        pos += 3 << ((data[10] & 7) + 1)
    blocks = 0
    while pos < len(data) and data[pos] == 0x21:  # an extension, until the first image
        pos += 2
        while pos < len(data) and (size := data[pos]):
            blocks += 1
            if blocks > _MAX_GIF_BLOCKS:
                raise _too_many_gif_blocks()
            pos += 1 + size
        pos += 1


def _too_many_gif_blocks() -> ImageError:
    return ImageError(f"image has too many GIF blocks before its first frame (over {_MAX_GIF_BLOCKS})")


# TIFF field types Pillow unpacks into a tuple of Python numbers, by size in
# bytes (BYTE, ASCII and UNDEFINED stay bytes; unknown types are skipped).
_TIFF_NUMBER_SIZES = {3: 2, 4: 4, 5: 8, 6: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}


def _check_tiff(data: bytes) -> None:
    """Refuse a TIFF whose first directory has more entries, or more numbers in
    them, than a real one has, before Pillow reads them all into Python."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    try:
        if big:
            (offset,) = struct.unpack_from(order + "Q", data, 8)
            (entries,) = struct.unpack_from(order + "Q", data, offset)
            entry, first = order + "HHQ", offset + 8
        else:
            (offset,) = struct.unpack_from(order + "I", data, 4)
            (entries,) = struct.unpack_from(order + "H", data, offset)
            entry, first = order + "HHI", offset + 2
    except struct.error:
        return  # too short to have a directory: Pillow reports it
    if entries > _MAX_TIFF_ENTRIES:
        raise ImageError(f"image has too many TIFF tags ({entries}, over the limit of "
                         f"{_MAX_TIFF_ENTRIES})")
    step = struct.calcsize(entry) + (8 if big else 4)
    values = 0
    for at in range(first, min(first + entries * step, len(data) - step + 1), step):
        _, kind, count = struct.unpack_from(entry, data, at)
        # Pillow skips a field whose data would run past the file; so do we
        if kind in _TIFF_NUMBER_SIZES and count * _TIFF_NUMBER_SIZES[kind] <= len(data):
            values += count
    if values > _MAX_TIFF_VALUES:
        raise ImageError(f"image has too many TIFF tag values ({values}, over the limit of "
                         f"{_MAX_TIFF_VALUES})")


_STRUCTURE_CHECKS = {"JPEG": _check_jpeg, "PNG": _check_png, "GIF": _check_gif, "TIFF": _check_tiff}


def _check_tiff_layout(img: Image.Image) -> None:
    """Refuse a TIFF whose tiles or strips do not fit its image: tiles far
    larger than the image, or more tiles or strips than cover it."""
    tags = img.tag_v2  # type: ignore[attr-defined]
    w, h = img.size
    planes = tags.get(277, 1) if tags.get(284, 1) == 2 else 1  # one set per sample when planar
    if 324 in tags:
        tw, th = tags.get(322), tags.get(323)
        if not isinstance(tw, int) or not isinstance(th, int) or tw < 1 or th < 1:
            return  # Pillow refuses these itself
        # the last tiles of a row or column may overhang the image by under a tile
        if tw * th > max(_MAX_SMALL_TILE, 2 * w * h):
            raise ImageError(f"image has oversized TIFF tiles ({tw}x{th} for a {w}x{h} image)")
        have, need, what = len(tags[324]), -(-w // tw) * -(-h // th) * planes, "tiles"
    elif 273 in tags:
        rows = tags.get(278, h)
        rows = min(rows, h) if isinstance(rows, int) and rows >= 1 else h
        have, need, what = len(tags[273]), -(-h // max(rows, 1)) * planes, "strips"
    else:
        return
    if isinstance(planes, int) and have > need:
        raise ImageError(f"image has too many TIFF {what} ({have} where a {w}x{h} image needs "
                         f"{need})")


def _check_bmp(img: Image.Image) -> None:
    """Refuse a run-length encoded BMP too large for Pillow's decoder, which is Python."""
    w, h = img.size
    tile = getattr(img, "tile", None)  # an opened file's decoders (ImageFile)
    if tile and tile[0].codec_name == "bmp_rle" and w * h > _MAX_RLE_BMP_PIXELS:
        raise ImageError(f"run-length encoded BMP is {w}x{h} = {megapixels(w * h)} MP, over the "
                         f"{megapixels(_MAX_RLE_BMP_PIXELS)} MP limit for that encoding")


def check_exif(img: Image.Image) -> None:
    """Refuse an EXIF block too large to rewrite (once loaded: a PNG's may follow its pixels)."""
    exif = img.info.get("exif")
    size = len(exif) if isinstance(exif, (bytes, bytearray)) else 0
    raw = img.info.get("Raw profile type exif")
    if isinstance(raw, str):
        size = max(size, len(raw) // 2)  # hex digits
    if size > _MAX_EXIF_BYTES:
        raise ImageError(f"EXIF block is {size} bytes, over the {_MAX_EXIF_BYTES >> 20} MB limit")
