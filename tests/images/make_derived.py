"""Regenerate the derived test images in this folder from the copied originals.

    python3 tests/images/make_derived.py

Deterministic for a given Pillow (and its libjpeg/zlib): only resizes, channel
arithmetic and fixed-parameter saves. The committed files are the reference;
goldens were recorded on them, so regenerate only when you also re-record the
goldens (tests/goldens/record.py).

  rgba.png           chelsea.png with an alpha gradient (0..255 left to right,
                     plus a fully transparent and a fully opaque band)
  exif_rotated.jpg   rocket.jpg pixels, saved with EXIF Orientation=6, so
                     ImageOps.exif_transpose rotates it to portrait
  large.jpg          astronaut.png upscaled to 3000x2000 (aspect not kept),
                     JPEG quality 80
  la.png             camera.png (grayscale) with an alpha ramp, mode LA
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def make_rgba() -> None:
    im = Image.open(HERE / "chelsea.png").convert("RGB")
    w, h = im.size
    alpha = Image.linear_gradient("L").rotate(90, expand=True).resize((w, h))  # 255 left .. 0 right
    px = alpha.load()
    for y in range(h):
        for x in range(w):
            if y < h // 8:
                px[x, y] = 0  # fully transparent band (RGB underneath is kept)
            elif y >= h - h // 8:
                px[x, y] = 255
    rgba = im.copy()
    rgba.putalpha(alpha)
    rgba.save(HERE / "rgba.png", optimize=False)


def make_exif_rotated() -> None:
    im = Image.open(HERE / "rocket.jpg").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    im.save(HERE / "exif_rotated.jpg", format="JPEG", quality=90, exif=exif)


def make_large() -> None:
    im = Image.open(HERE / "astronaut.png").convert("RGB")
    big = im.resize((3000, 2000), Image.Resampling.BICUBIC)
    big.save(HERE / "large.jpg", format="JPEG", quality=80)


def make_la() -> None:
    im = Image.open(HERE / "camera.png").convert("L")
    alpha = Image.linear_gradient("L").resize(im.size)  # 0 top .. 255 bottom
    la = Image.merge("LA", (im, alpha))
    la.save(HERE / "la.png", optimize=False)


def main() -> None:
    make_rgba()
    make_exif_rotated()
    make_large()
    make_la()
    for name in ("rgba.png", "exif_rotated.jpg", "large.jpg", "la.png"):
        p = HERE / name
        with Image.open(p) as im:
            print(f"{name}: {im.mode} {im.size} {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
