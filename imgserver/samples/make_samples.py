"""Generate the built-in sample images served when imgserver has no --root.

Run from the repository root: ``python imgserver/samples/make_samples.py``.
Everything is drawn here with Pillow (no third-party pictures), from fixed
seeds, so the images are free to redistribute.

* ``photo.jpg``: a 1600x1067 photo-like landscape (gradients, shapes, grain).
  The pixels are stored rotated a quarter turn counter-clockwise (1067x1600)
  with EXIF Orientation = 6, so it only looks upright (the sun top-left, the
  "TOP" label readable) when the orientation is applied.
* ``logo.png``: a 512x512 RGBA image with a transparent background and
  semi-transparent shapes.
* ``landscape.webp``: an 1200x800 lossy WebP.
"""

from __future__ import annotations

import os
import random

from PIL import Image, ImageDraw, ImageFilter, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))


def _vertical_gradient(size, top, bottom):
    width, height = size
    column = Image.new("RGB", (1, height))
    for y in range(height):
        t = y / max(1, height - 1)
        column.putpixel((0, y), tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return column.resize(size)


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def upright_photo(size=(1600, 1067), seed=1):
    rng = random.Random(seed)
    width, height = size
    im = _vertical_gradient(size, (40, 90, 170), (250, 190, 140))
    draw = ImageDraw.Draw(im)
    # Sun, top left: shows which way is up.
    draw.ellipse((120, 90, 320, 290), fill=(255, 235, 150))
    # Hills, back to front.
    for i, colour in enumerate([(70, 110, 90), (50, 95, 60), (35, 75, 40)]):
        base = height * (0.55 + 0.13 * i)
        points = [(0, height)]
        for x in range(0, width + 80, 80):
            points.append((x, base - rng.uniform(20, 120)))
        points.append((width, height))
        draw.polygon(points, fill=colour)
    # A lake and a house.
    draw.ellipse((900, 820, 1450, 980), fill=(70, 120, 170))
    draw.rectangle((420, 700, 560, 820), fill=(180, 60, 50))
    draw.polygon([(400, 700), (490, 620), (580, 700)], fill=(90, 40, 30))
    im = im.filter(ImageFilter.GaussianBlur(1.2))
    # Film grain.
    grain = Image.effect_noise(size, 12).convert("RGB")
    im = Image.blend(im, grain, 0.06)
    draw = ImageDraw.Draw(im)
    draw.text((40, 30), "TOP", font=_font(48), fill=(255, 255, 255))
    draw.polygon([(60, 160), (80, 110), (100, 160)], fill=(255, 255, 255))
    return im


def photo():
    upright = upright_photo()
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 undoes this
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    exif[0x010E] = "imgserver sample (generated)"  # ImageDescription
    path = os.path.join(HERE, "photo.jpg")
    stored.save(path, "JPEG", quality=80, exif=exif)
    return path


def logo(size=512):
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    draw.ellipse((32, 32, size - 32, size - 32), outline=(30, 30, 60, 255), width=24)
    draw.ellipse((120, 120, 300, 300), fill=(220, 50, 60, 200))
    draw.ellipse((210, 120, 390, 300), fill=(50, 160, 80, 160))
    draw.ellipse((165, 210, 345, 390), fill=(40, 90, 220, 120))
    path = os.path.join(HERE, "logo.png")
    im.save(path, "PNG", optimize=True)
    return path


def landscape(size=(1200, 800), seed=2):
    rng = random.Random(seed)
    width, height = size
    im = _vertical_gradient(size, (20, 30, 70), (160, 80, 120))
    draw = ImageDraw.Draw(im)
    for _ in range(60):  # stars
        x, y = rng.uniform(0, width), rng.uniform(0, height * 0.5)
        r = rng.uniform(1, 3)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 230))
    draw.ellipse((850, 100, 990, 240), fill=(240, 240, 220))  # moon
    for i in range(12):  # city skyline
        x0 = i * 100 + rng.uniform(-10, 10)
        top = height - rng.uniform(150, 380)
        draw.rectangle((x0, top, x0 + 85, height), fill=(15, 15, 30))
        for wy in range(int(top) + 15, height - 20, 30):
            for wx in range(int(x0) + 10, int(x0) + 80, 22):
                if rng.random() < 0.4:
                    draw.rectangle((wx, wy, wx + 10, wy + 14), fill=(250, 210, 110))
    path = os.path.join(HERE, "landscape.webp")
    im.save(path, "WEBP", quality=80, method=6)
    return path


def main():
    total = 0
    for make in (photo, logo, landscape):
        path = make()
        size = os.path.getsize(path)
        total += size
        with Image.open(path) as im:
            width, height = im.size
            print(
                f"{os.path.basename(path)}: {im.format} {width}x{height} {im.mode}, {size} bytes"
            )
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
