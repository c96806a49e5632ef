"""Preprocessing parity: bytes -> PIL -> tensor exactly as ModelScope's OFA does it.

The oracle is the recipe written out in numpy: EXIF transpose (paths and bytes
only), frame 0, convert("RGB") (alpha dropped, not composited), PIL's own
bicubic resize to S x S, /255, then (x - mean) / std per channel.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from cli_helpers import jpeg_with_malformed_exif
from ofa_factory import IMAGES_DIR
from PIL import Image, ImageOps

from ofacls import images
from ofacls.classifier import Classifier
from ofacls.errors import ImageError
from ofacls.images import DEFAULT_MAX_PIXELS, PixelBudget, normalise, open_image, to_pixels
from ofacls.model.config import TaskConfig

np = pytest.importorskip("numpy")

HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def preprocessor(size: int = 480, imagenet: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Classifier:
    """A Classifier with no model: preprocess needs only the task settings."""
    task = TaskConfig(patch_image_size=size, imagenet_default_mean_and_std=imagenet)
    return Classifier(model=None, trie=None, prompt_ids=[], task=task,  # type: ignore[arg-type]
                      device=torch.device("cpu"), dtype=torch.float32, max_pixels=max_pixels)


def reference(img: Image.Image, size: int, mean_std: tuple = HALF) -> np.ndarray:
    """The recipe on an already-opened (and, where due, transposed) image, in float64."""
    mean, std = (np.asarray(v, dtype=np.float64) for v in mean_std)
    rgb = img.convert("RGB").resize((size, size), Image.BICUBIC)
    x = np.asarray(rgb, dtype=np.float64) / 255.0  # (S, S, 3)
    return ((x - mean) / std).transpose(2, 0, 1)


def assert_close(tensor: torch.Tensor, expected: np.ndarray) -> None:
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == expected.shape
    np.testing.assert_allclose(tensor.numpy(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", ["chelsea.png", "camera.png", "grace_hopper.jpg", "large.jpg",
                                  "coffee.png"])
@pytest.mark.parametrize("size", [480, 384, 64])
def test_tensor_is_pil_bicubic_over_255_normalised_by_half(name: str, size: int) -> None:
    path = IMAGES_DIR / name
    with Image.open(path) as img:
        expected = reference(ImageOps.exif_transpose(img), size)
    assert_close(preprocessor(size).preprocess(path), expected)


def test_imagenet_statistics_when_the_configuration_asks_for_them() -> None:
    raw = {"model": {"type": "ofa", "patch_image_size": 256,
                     "imagenet_default_mean_and_std": True}}
    task = TaskConfig.from_dict(raw)
    assert task.mean_std == IMAGENET
    assert TaskConfig.from_dict({"model": {"type": "ofa"}}).mean_std == HALF
    path = IMAGES_DIR / "chelsea.png"
    with Image.open(path) as img:
        expected = reference(img, 256, IMAGENET)
    assert_close(preprocessor(256, imagenet=True).preprocess(path), expected)
    # and to_pixels + normalise themselves, given the statistics
    with Image.open(path) as img:
        assert_close(normalise(to_pixels(img.convert("RGB"), 256), *IMAGENET), expected)


@pytest.mark.parametrize("mean_std", [HALF, IMAGENET])
def test_normalise_gives_every_8_bit_value_exactly_what_float_arithmetic_does(mean_std: tuple
                                                                               ) -> None:
    """The table lookup returns, bit for bit, v / 255 then (x - mean) / std in float32,
    the arithmetic the reference runs on the CPU, for every value in every channel."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in mean_std)
    every = torch.arange(256, dtype=torch.uint8).repeat(2, 3, 8, 1)  # (2, 3, 8, 256)
    every[1] = every[1].flip(-1)
    want = every.to(torch.float32).div(255).sub(mean).div(std)
    got = normalise(every, *mean_std)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # a channel-last view (as to_pixels returns) is indexed by its logical layout
    assert torch.equal(normalise(every[0].permute(1, 2, 0).contiguous().permute(2, 0, 1), *mean_std),
                       want[0])


def test_pixels_are_the_resized_8_bit_image() -> None:
    path = IMAGES_DIR / "grace_hopper.jpg"
    clf = preprocessor(96)
    x = clf.pixels(path)
    with Image.open(path) as img:
        want = np.asarray(ImageOps.exif_transpose(img).convert("RGB").resize((96, 96), Image.BICUBIC))
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 96, 96)
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), want)
    assert torch.equal(clf.preprocess(path), normalise(x, *HALF))


def test_exif_orientation_applies_to_paths_and_bytes_but_not_to_pil_images() -> None:
    path = IMAGES_DIR / "exif_rotated.jpg"
    clf = preprocessor(96)
    with Image.open(path) as img:
        assert img.getexif().get(0x0112) == 6 and img.size == (640, 427)
        upright = ImageOps.exif_transpose(img)
        as_stored = img.convert("RGB")
    assert upright.size == (427, 640)
    assert open_image(path.read_bytes()).size == (427, 640)
    assert_close(clf.preprocess(path), reference(upright, 96))
    assert_close(clf.preprocess(str(path)), reference(upright, 96))
    assert_close(clf.preprocess(path.read_bytes()), reference(upright, 96))
    # a PIL image is taken as it is, as ModelScope does
    with Image.open(path) as img:
        from_pil = clf.preprocess(img)
    assert_close(from_pil, reference(as_stored, 96))
    assert not torch.allclose(from_pil, clf.preprocess(path))


@pytest.mark.parametrize("name", ["rgba.png", "la.png"])
def test_alpha_is_dropped_not_composited(name: str) -> None:
    path = IMAGES_DIR / name
    decoded = np.asarray(open_image(path.read_bytes()))
    with Image.open(path) as img:
        raw = np.asarray(img)
    colour = raw[..., :3] if raw.shape[-1] == 4 else np.repeat(raw[..., :1], 3, axis=-1)
    np.testing.assert_array_equal(decoded, colour)
    alpha = raw[..., -1]
    assert (alpha == 0).any(), "the test image should have fully transparent pixels"
    # under full transparency the colour is what is stored, not a white or black backdrop
    hidden = decoded[alpha == 0]
    assert not (hidden == 255).all() and not (hidden == 0).all()
    # the PIL path of preprocess drops alpha the same way
    clf = preprocessor(64)
    with Image.open(path) as img:
        assert_close(clf.preprocess(img), reference(Image.fromarray(colour), 64))


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
def test_palette_with_transparency_converts_like_pil() -> None:
    with Image.open(IMAGES_DIR / "chelsea.png") as im:
        base = im.convert("RGB").resize((60, 40))
    buf = io.BytesIO()
    base.quantize(8).save(buf, format="PNG", transparency=bytes([0, 0, 255, 255, 255, 255, 255,
                                                                 255]))
    decoded = open_image(buf.getvalue())
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(img.convert("RGB")))
    assert decoded.mode == "RGB"


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


# (dtype, format) pairs that Pillow reopens in each of its 16-bit-range modes
SIXTEEN_BIT = {"I;16": ("<u2", "PNG"), "I;16B": (">u2", "TIFF"), "I": ("<i4", "TIFF")}


@pytest.mark.parametrize("mode", SIXTEEN_BIT)
def test_16_bit_gray_photo_looks_like_its_8_bit_version_not_white(mode: str) -> None:
    """ModelScope's convert("RGB") clips 16-bit values at 255: a white image. We scale instead."""
    with Image.open(IMAGES_DIR / "chelsea.png") as im:
        gray = np.asarray(im.convert("L"))
    dtype, fmt = SIXTEEN_BIT[mode]
    data16 = encode((gray.astype(np.uint32) * 257).astype(dtype), fmt)  # 0..255 -> 0..65535
    with Image.open(io.BytesIO(data16)) as img:
        assert img.mode == mode
    x16 = to_pixels(open_image(data16), 64).float()
    x8 = to_pixels(open_image(encode(gray, "PNG")), 64).float()
    torch.testing.assert_close(x16, x8, rtol=0, atol=1)
    assert x16.mean() < 0.9 * 255


def test_16_bit_gray_keeps_the_high_byte_and_8_bit_gray_is_untouched() -> None:
    values = (np.arange(40 * 60, dtype=np.uint32).reshape(40, 60) * 1111 + 7) % 65536
    decoded = np.asarray(open_image(encode(values.astype("<u2"), "PNG")))
    np.testing.assert_array_equal(decoded, np.repeat((values >> 8)[..., None], 3, axis=-1))
    with Image.open(IMAGES_DIR / "camera.png") as img:
        assert img.mode == "L"
        np.testing.assert_array_equal(np.asarray(open_image((IMAGES_DIR / "camera.png")
                                                            .read_bytes())),
                                      np.asarray(img.convert("RGB")))


def test_animations_use_their_first_frame() -> None:
    path = IMAGES_DIR / "no_time_for_that_tiny.gif"
    with Image.open(path) as gif:
        assert gif.n_frames > 1
        first = np.asarray(gif.convert("RGB"))
        gif.seek(gif.n_frames // 2)
        later = np.asarray(gif.convert("RGB"))
    assert not np.array_equal(first, later)
    np.testing.assert_array_equal(np.asarray(open_image(path.read_bytes())), first)


def test_pixel_limit_is_checked_from_the_header() -> None:
    data = (IMAGES_DIR / "chelsea.png").read_bytes()  # 451 x 300
    with pytest.raises(ImageError, match=r"^image is 451x300 = 0\.135 MP, over the 0\.1 MP "
                                         r"limit \(--max-pixels\)$"):
        open_image(data, max_pixels=100_000)
    assert open_image(data, max_pixels=451 * 300).size == (451, 300)
    assert open_image(data, max_pixels=None).size == (451, 300)
    with pytest.raises(ImageError, match="MP limit"):
        preprocessor(max_pixels=1000).preprocess(IMAGES_DIR / "chelsea.png")


def test_what_is_not_an_image_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="^empty file$"):
        open_image(b"")
    with pytest.raises(ImageError, match="^cannot decode the image: it is damaged, or not the format"):
        open_image(b"GIF89a but not really")
    with pytest.raises(ImageError, match="^cannot decode the image: it is damaged, or not the format"):
        open_image((IMAGES_DIR / "multipage_rgb.tif").read_bytes())
    jpeg = (IMAGES_DIR / "grace_hopper.jpg").read_bytes()
    # a truncated JPEG decodes as far as it goes (the reference allows truncated images)
    assert open_image(jpeg[: len(jpeg) // 2]).size == (512, 600)


def test_any_decoder_exception_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="^cannot decode image: "):
        open_image(jpeg_with_malformed_exif())


# --- decoding memory across loader threads --------------------------------------------


class _Watched(PixelBudget):
    """A real budget that remembers the most pixels it ever let decode at once."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.peak = 0

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with super().hold(pixels):
            self.peak = max(self.peak, self.used)
            time.sleep(0.02)  # long enough for the other threads to try to join in
            yield


def test_pixel_budget_caps_what_decodes_at_once_and_lets_an_oversize_one_run_alone() -> None:
    budget = _Watched(10)
    sizes = [4, 4, 4, 6, 25, 3, 3, 9]

    def work(n: int) -> int:
        with budget.hold(n):
            return n

    with ThreadPoolExecutor(max_workers=len(sizes)) as pool:
        assert list(pool.map(work, sizes)) == sizes
    assert budget.peak == 25 or budget.peak <= 10  # the 25 only ever decodes alone
    assert budget.used == 0


def test_preprocess_rations_decoding_across_threads(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.open(IMAGES_DIR / "chelsea.png").convert("RGB").resize((100, 100)).save(path)
    budget = _Watched(15_000)  # room for one 100x100 image at a time
    monkeypatch.setattr(images, "DECODE_BUDGET", budget)
    clf = preprocessor(size=32)
    with ThreadPoolExecutor(max_workers=4) as pool:
        outs = list(pool.map(clf.preprocess, [path] * 4))
    assert budget.peak == 10_000 and budget.used == 0
    assert all(torch.equal(o, outs[0]) for o in outs)
