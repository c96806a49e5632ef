"""Bytes -> PIL -> tensor, exactly as ModelScope's OFA preprocessor does it.

Reference behaviour: open the bytes, apply the EXIF orientation, take frame 0,
convert to RGB (alpha dropped, not composited), squash to S x S with PIL's own
bicubic (a=-0.5, antialiased, 8-bit output; torch/cv2 bicubic differ well past
1e-4), scale to [0, 1], normalise per channel.

One deliberate divergence, for 16-bit grayscale only: the reference's
convert("RGB") clips such pixels at 255, so a 16-bit photo becomes a blank white
image; we first bring them to 8 bits (the high byte). Every 8-bit mode converts
exactly as the reference does.

Files may be hostile: before any pixel is decoded, vetting.py checks what a
file's headers claim against what decoding it would cost, and only the first
frame of an animation is decoded.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ofacls.errors import ImageError
from ofacls.sources.vetting import (
    HEAD_BYTES,
    check_exif,
    check_head,
    check_opened,
    check_structure,
    megapixels,
    webp_size,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

# PIL's own bomb guard is twice Image.MAX_IMAGE_PIXELS (89.5 MP); ours is a
# per-call argument, so users can raise or lower it without touching globals.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

# The modes Pillow opens 16-bit grayscale in ("I" for some formats and older
# Pillow; its values are then taken as 16-bit too, and clipped to that range).
_SIXTEEN_BIT_GRAY = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def _pil() -> tuple:
    from PIL import Image, ImageFile, ImageOps

    # The reference decodes truncated files as far as they go; we enforce our own
    # pixel limit in open_image, so PIL's process-wide guard is switched off here.
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    Image.MAX_IMAGE_PIXELS = None
    return Image, ImageOps


def open_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an upright RGB PIL image; ImageError on anything else."""
    return _decode(_open(data, max_pixels))


def load_pixels(data: bytes, size: int, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
                ) -> torch.Tensor:
    """open_image then to_pixels, with the decoding rationed across threads.

    A decoded image takes ~12 bytes per pixel until it is resized (the file's
    own layout, the RGB copy, the rotated copy): four loader threads on four
    81 MP PNGs peaked at 3.9 GB. DECODE_BUDGET lets threads decode together
    only while their images' pixels add up to at most its limit (2.4 GB
    there with the default --max-pixels as the limit, 1.4 GB with ours)."""
    img = _open(data, max_pixels)
    w, h = img.size
    with DECODE_BUDGET.hold(w * h):
        return to_pixels(_decode(img), size)


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """The image with only its header read, refused if over `max_pixels` or if
    its headers claim more work than its pixels are worth."""
    Image, _ = _pil()
    fmt = check_head(data[:HEAD_BYTES])
    if fmt == "WEBP":
        # Pillow allocates a WebP's canvas as it opens it
        size = webp_size(data)
        if size is not None:
            _check_pixels(size, max_pixels)
    check_structure(data, fmt)
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.UnidentifiedImageError:
        raise ImageError("cannot decode the image: it is damaged, or not the format its first "
                         "bytes claim") from None
    except Exception as e:
        raise _decode_error(e) from None
    _check_pixels(img.size, max_pixels)
    check_opened(img, fmt)
    return img


def _check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(f"image is {w}x{h} = {megapixels(w * h)} MP, over the "
                         f"{megapixels(max_pixels)} MP limit (--max-pixels)")



def _decode(img: Image.Image) -> Image.Image:
    """An opened image's pixels, upright, as RGB."""
    _, ImageOps = _pil()
    try:
        img.load()  # frame 0 only, of an animation too
    except Exception as e:
        raise _decode_error(e) from None
    check_exif(img)
    try:
        # In place: the same pixels as the reference's copy, without holding a
        # second full-size image.
        ImageOps.exif_transpose(img, in_place=True)
        if img.mode in _SIXTEEN_BIT_GRAY:
            # The high byte (v >> 8), not round(v / 257): it is how Pillow itself
            # decodes 16-bit RGB(A) and gray+alpha PNGs, so a gray picture gets the
            # same pixels whichever of those layouts it was saved in.
            img = img.convert("I").point([v >> 8 for v in range(65536)], "L")
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as e:
        raise _decode_error(e) from None


class PixelBudget:
    """How many pixels may be decoding at once, across threads.

    `hold(n)` waits until n more pixels fit under the limit; an image larger
    than the whole limit waits until it can decode alone. Waiting threads are
    not starved for long: the batch runner loads a bounded window ahead and
    consumes in order, so the small images drain while a large one waits."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


# ~1.5 GB of decoding at once: five 24 MP photos together, 100 MP scans one by
# one (an image over it, allowed up to --max-pixels, decodes alone).
DECODE_BUDGET = PixelBudget(128_000_000)


def _decode_error(e: Exception) -> ImageError:
    """A one-line ImageError for whatever PIL raised on these bytes.

    Any type, not just OSError/ValueError: PIL's parsers raise others on crafted
    files (exif_transpose raises struct.error rewriting a malformed EXIF block,
    found by fuzzing), and one bad file must not end a batch."""
    kind = type(e).__qualname__
    if type(e).__module__ != "builtins":
        kind = f"{type(e).__module__}.{kind}"
    expected = isinstance(e, (OSError, ValueError, SyntaxError, EOFError))
    detail = str(e) if expected else f"{kind}: {e}"
    return ImageError(f"cannot decode image: {' '.join(detail.split())}")


def to_pixels(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> the reference's resized image, (3, size, size) uint8.

    Kept in 8 bits until `normalise`, on the model's device: a quarter of the
    bytes of float32 to stack, pin and copy per batch."""
    import torch

    Image, _ = _pil()
    if img.mode != "RGB":
        img = img.convert("RGB")
    # torchvision's Resize on a PIL image is exactly this call (aspect not kept)
    img = img.resize((size, size), Image.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return x.permute(2, 0, 1)


def normalise(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (..., 3, S, S) pixels -> float32 (v / 255 - mean) / std per channel,
    on the pixels' device.

    By lookup in a 256-entry table per channel computed on the CPU, so every
    device gets the CPU's values bit for bit: CUDA divides by a scalar as a
    multiply by its reciprocal, one ulp off for some values."""
    import torch

    v = torch.arange(256, dtype=torch.float32).div(255)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1)
    table = v.sub(m).div(s).to(pixels.device)  # (3, 256)
    plane = pixels.shape[:-3] + pixels.shape[-2:]
    return torch.stack([table[c].index_select(0, pixels[..., c, :, :].flatten().int()).view(plane)
                        for c in range(3)], dim=-3)
