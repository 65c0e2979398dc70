"""`make demo`: the main job on the embedded default data set.

Trains Neptune on scikit-learn's digits (shipped in the package), evaluates the
checkpoint, predicts one image file, and prints a short benchmark table.
"""
import os
import sys

import numpy as np

from . import cli


def _sample_png(path: str) -> str:
    """Write one test digit as a 64x64 dark-on-light PNG, like a scan of a handwritten digit."""
    from PIL import Image

    from .data import load
    _, test = load("digits")
    img = test.images[7, 0].numpy().astype(np.float32)
    img = (255 - img * 255 / 16).astype(np.uint8)
    Image.fromarray(img).resize((64, 64), Image.NEAREST).save(path)
    return test.classes[int(test.labels[7])]


def main(out_dir: str = "runs/demo") -> int:
    steps = [
        ["info"],
        ["train", "--dataset", "digits", "--out", out_dir, "--force"],
        ["eval", "--checkpoint", os.path.join(out_dir, "checkpoint.pt")],
    ]
    for args in steps:
        print(f"\n$ neptune {' '.join(args)}", flush=True)
        rc = cli.main(args)
        if rc:
            return rc
    png = os.path.join(out_dir, "sample_digit.png")
    truth = _sample_png(png)
    print(f"\n$ neptune predict {png} --checkpoint {out_dir}/checkpoint.pt   (true class: {truth})", flush=True)
    rc = cli.main(["predict", png, "--checkpoint", os.path.join(out_dir, "checkpoint.pt")])
    if rc:
        return rc
    print("\n$ neptune bench --quick", flush=True)
    return cli.main(["bench", "--quick"])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
