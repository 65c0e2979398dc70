"""Digits drawn with fonts: how `neptune predict` does on images a person makes.

    python -m neptune_app.bench.drawn_digits --checkpoint runs/demo/checkpoint.pt [--json FILE]

Renders the digits 0-9 with every TrueType font found (DejaVu by default), at two canvas
sizes, two stroke widths, two margins and both polarities (dark ink on light paper and the
reverse), and reports the accuracy of `neptune_app.train.predict` with the preprocessing it
applies (ink found, cropped, squared, centred, resized the way the training images look)
and without it (the whole image resized).
"""
import argparse
import glob
import itertools
import os
import tempfile
from typing import List, Optional

import numpy as np

from .._io import write_json

FONT_GLOBS = ("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf", "/usr/share/fonts/**/*.ttf")
FONT_NAMES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSansMono.ttf", "DejaVuSansCondensed-Oblique.ttf")


def find_fonts() -> List[str]:
    found = []
    for pattern in FONT_GLOBS:
        found += glob.glob(pattern, recursive=True)
    by_name = {os.path.basename(f): f for f in found}
    chosen = [by_name[n] for n in FONT_NAMES if n in by_name]
    return chosen or sorted(found)[:6]


def render_digit(digit: int, font_path: Optional[str], canvas: int, stroke: float, margin: float,
                 dark_ink: bool):
    """A PIL grayscale image of one digit: glyph height (1 - 2 margin) of the canvas."""
    from PIL import Image, ImageDraw, ImageFont
    fg, bg = (0, 255) if dark_ink else (255, 0)
    target = canvas * (1 - 2 * margin)
    size = int(target)
    for _ in range(3):  # fit the glyph's height to the target
        font = ImageFont.truetype(font_path, size) if font_path else ImageFont.load_default(size)
        x0, y0, x1, y1 = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox(
            (0, 0), str(digit), font=font, stroke_width=int(stroke * size))
        size = max(4, int(size * target / max(1, y1 - y0)))
    font = ImageFont.truetype(font_path, size) if font_path else ImageFont.load_default(size)
    sw = int(stroke * size)
    img = Image.new("L", (canvas, canvas), bg)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = draw.textbbox((0, 0), str(digit), font=font, stroke_width=sw)
    draw.text(((canvas - (x1 - x0)) / 2 - x0, (canvas - (y1 - y0)) / 2 - y0), str(digit), fill=fg,
              font=font, stroke_width=sw, stroke_fill=fg)
    return img


def rendered_set(fonts: List[str]):
    """[(digit, description, image)] over fonts x canvas x stroke x margin x polarity."""
    out = []
    for font, canvas, stroke, margin, dark in itertools.product(
            fonts, (64, 200), (0.0, 0.06), (0.1, 0.25), (True, False)):
        for d in range(10):
            desc = (f"{os.path.basename(font) if font else 'default'} {canvas}px stroke={stroke} "
                    f"margin={margin} {'dark-on-light' if dark else 'light-on-dark'}")
            out.append((d, desc, render_digit(d, font, canvas, stroke, margin, dark)))
    return out


def evaluate(checkpoint: str, preprocess: bool = True, fonts: Optional[List[str]] = None) -> dict:
    from ..train import predict
    fonts = fonts if fonts is not None else find_fonts()
    items = rendered_set(fonts or [None])
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (_, _, img) in enumerate(items):
            p = os.path.join(tmp, f"{i}.png")
            img.save(p)
            paths.append(p)
        results = predict(paths, checkpoint, preprocess=preprocess)
    correct = [r["class"] == str(d) for r, (d, _, _) in zip(results, items)]
    by_polarity = {}
    for ok, (_, desc, _) in zip(correct, items):
        key = desc.rsplit(" ", 1)[1]
        by_polarity.setdefault(key, []).append(ok)
    return {"images": len(items), "accuracy": float(np.mean(correct)),
            "by_polarity": {k: float(np.mean(v)) for k, v in by_polarity.items()},
            "fonts": [os.path.basename(f) for f in fonts] or ["default"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--json")
    a = p.parse_args(argv)
    res = {"with_preprocessing": evaluate(a.checkpoint, True),
           "whole_image_resized": evaluate(a.checkpoint, False)}
    for k, v in res.items():
        print(f"{k}: accuracy {v['accuracy']:.3f} on {v['images']} rendered digits "
              f"({', '.join(f'{p} {acc:.3f}' for p, acc in v['by_polarity'].items())})")
    if a.json:
        write_json(a.json, res)


if __name__ == "__main__":
    main()
