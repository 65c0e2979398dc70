"""Image data sets for the `neptune` command: nothing is ever downloaded.

- ``digits``: scikit-learn's 1,797 handwritten digits (8x8, 10 classes), shipped
  inside this package; fixed stratified split, 80% train / 20% test.
- ``mnist``, ``cifar10``: read with torchvision from a local ``--data-dir``.
- ``folder``: an ImageFolder (one sub-folder per class); if the folder holds
  ``train/`` and ``test/`` they are used, otherwise a fixed stratified 80/20 split.
"""
import contextlib
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch

DATASETS = ("digits", "mnist", "cifar10", "folder")
_HERE = os.path.dirname(os.path.abspath(__file__))


class DatasetError(Exception):
    """A data set is missing or malformed (reported as one line by the CLI)."""


@dataclass
class ImageData:
    """Images kept as uint8 [N, C, H, W] (converted per batch), labels int64 [N]."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: List[str]
    scale: float = 255.0  # pixel value that maps to 1.0
    mean: List[float] = field(default_factory=list)
    std: List[float] = field(default_factory=list)

    def __len__(self):
        return self.labels.numel()

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> Tuple[int, int]:
        return tuple(self.images.shape[2:])

    def batch(self, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return normalize(self.images[index], self.scale, self.mean, self.std), self.labels[index]

    def subset(self, n: int) -> "ImageData":
        return ImageData(self.images[:n], self.labels[:n], self.classes, self.scale, self.mean, self.std)


def normalize(images_u8: torch.Tensor, scale: float, mean, std) -> torch.Tensor:
    x = images_u8.float() / scale
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def stratified_split(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0):
    """Per class, a fixed random `test_fraction` goes to test. Returns (train_idx, test_idx)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * test_fraction))
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def _with_stats(images: torch.Tensor, labels: torch.Tensor, classes, scale) -> ImageData:
    x = images.float() / scale
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()
    return ImageData(images, labels, list(classes), scale, mean, std)


def load(name: str, data_dir: Optional[str] = None, image_size: Optional[int] = None
         ) -> Tuple[ImageData, ImageData]:
    """(train, test) for a named data set. Raises DatasetError with a one-line reason."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        return _digits()
    if not data_dir:
        raise DatasetError(f"--data-dir is required for {name} (this tool never downloads data)")
    if not os.path.isdir(data_dir):
        raise DatasetError(f"--data-dir {data_dir!r} is not a directory")
    if name == "folder":
        return _folder(data_dir, image_size or 32)
    return _torchvision(name, data_dir)


def _digits():
    path = os.path.join(_HERE, "digits.npz")
    try:
        with np.load(path) as z:
            images, target = z["images"], z["target"]
    except (OSError, KeyError, ValueError) as exc:
        raise DatasetError(f"the embedded digits data ({path}) is missing or corrupt: {exc}")
    tr, te = stratified_split(target, 0.2, seed=0)
    imgs = torch.from_numpy(images).unsqueeze(1)  # [N, 1, 8, 8], values 0..16
    labels = torch.from_numpy(target.astype(np.int64))
    classes = [str(i) for i in range(10)]
    train = _with_stats(imgs[tr], labels[tr], classes, 16.0)
    test = ImageData(imgs[te], labels[te], classes, 16.0, train.mean, train.std)
    return train, test


def _torchvision(name: str, root: str):
    try:
        import torchvision
    except ImportError:
        raise DatasetError(f"reading {name} needs torchvision (pip install torchvision)")
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    out = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=False)
        except (RuntimeError, OSError, ValueError) as exc:
            expect = "MNIST/raw/*-ubyte files" if name == "mnist" else "cifar-10-batches-py/"
            raise DatasetError(f"{name} not found or unreadable under {root!r} (expected {expect}; "
                               f"nothing is downloaded): {str(exc).splitlines()[0]}")
        data = torch.as_tensor(np.asarray(ds.data))
        data = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
        out.append((data.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64),
                    list(ds.classes)))
    train = _with_stats(*out[0], 255.0)
    test = ImageData(out[1][0], out[1][1], out[1][2], 255.0, train.mean, train.std)
    return train, test


@contextlib.contextmanager
def _pil_image(path: str):
    """The PIL image at ``path``, open; any failure to read it is a DatasetError that names
    the file (reading it in the body included)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DatasetError("reading images needs Pillow (pip install pillow)")
    try:
        with Image.open(path) as im:
            yield im
    except FileNotFoundError:
        raise DatasetError(f"image {path!r} does not exist")
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{path!r} is too large to read safely: {exc}")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"{path!r} is not a readable image: {exc}")


def _open_image(path: str, channels: int):
    """The image at ``path`` as a PIL image in mode L (channels=1) or RGB, fully loaded."""
    with _pil_image(path) as im:
        return im.convert("L" if channels == 1 else "RGB")


def read_image(path: str, channels: int, size: Tuple[int, int]) -> torch.Tensor:
    """A PNG/JPEG/... of any size as uint8 [C, H, W] with the given channels and size."""
    from PIL import Image
    im = _open_image(path, channels).resize((size[1], size[0]), Image.BILINEAR)
    t = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1).contiguous()


def read_drawn_digit(path: str, size: Tuple[int, int], min_contrast: float = 40.0):
    """A photo, scan or drawing of one digit, made to look like the training digits.

    The training digits (scikit-learn's, MNIST) are light strokes on a dark background,
    cropped to the ink and scaled to fill their frame. So: grayscale; background = the
    median of the border pixels, inverted when it is light; ink = what stands out from
    the background by more than 35% of the strongest stroke; cropped to the ink's bounding
    box, padded to a square around its centre (with the training frames' margin),
    resized (Lanczos), and stretched to the full 0-255 range.

    Returns (uint8 [1, H, W], None), or (None, reason) when the image looks empty (no ink
    stands out from the background by ``min_contrast`` grey levels).
    """
    from PIL import Image
    a = np.asarray(_open_image(path, 1), dtype=np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = float(np.median(border))
    if bg > 127:
        a, bg = 255.0 - a, 255.0 - bg
    ink = np.clip(a - bg, 0, None)
    peak = float(ink.max()) if ink.size else 0.0
    if peak < min_contrast:
        return None, f"looks empty (no ink stands out from the background; contrast {peak:.0f}/255)"
    ys, xs = np.nonzero(ink > 0.35 * peak)
    crop = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    frame = max(size)
    # scikit-learn's 8x8 digits fill their frame but for about half a pixel; MNIST puts
    # the digit in a 20x20 box of its 28x28 frame.
    inner = frame * 7 / 8 if frame < 16 else frame * 20 / 28
    side = max(h, w)
    pad = int(round(side * (frame - inner) / (2 * inner)))
    square = np.zeros((side + 2 * pad, side + 2 * pad), dtype=np.float32)
    y0, x0 = pad + (side - h) // 2, pad + (side - w) // 2
    square[y0:y0 + h, x0:x0 + w] = crop
    small = np.asarray(Image.fromarray(square).resize((size[1], size[0]), Image.LANCZOS),
                       dtype=np.float32).clip(0, None)
    small = small * (255.0 / max(float(small.max()), 1e-6))
    return torch.from_numpy(np.clip(np.rint(small), 0, 255).astype(np.uint8)).unsqueeze(0), None


def _folder(root: str, image_size: int):
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

    def scan(d):
        classes = sorted(e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e)))
        items = []
        for ci, c in enumerate(classes):
            for f in sorted(os.listdir(os.path.join(d, c))):
                if f.lower().endswith(exts):
                    items.append((os.path.join(d, c, f), ci))
        return classes, items

    split_dirs = [os.path.join(root, s) for s in ("train", "test")]
    if all(os.path.isdir(d) for d in split_dirs):
        (classes, train_items), (test_classes, test_items) = scan(split_dirs[0]), scan(split_dirs[1])
        if classes != test_classes:
            raise DatasetError(f"{root}: train/ and test/ have different class folders")
    else:
        classes, items = scan(root)
        labels = np.array([c for _, c in items])
        if len(items) == 0:
            raise DatasetError(f"{root!r} holds no images in class sub-folders (e.g. {root}/cat/1.png)")
        tr, te = stratified_split(labels, 0.2, seed=0)
        train_items, test_items = [items[i] for i in tr], [items[i] for i in te]
    if len(classes) < 2:
        raise DatasetError(f"{root!r} needs at least two class sub-folders with images, "
                           f"found {len(classes)}")
    for name, part in (("train", train_items), ("test", test_items)):
        if not part:
            if all(os.path.isdir(d) for d in split_dirs):
                raise DatasetError(f"{os.path.join(root, name)!r} holds no images")
            raise DatasetError(f"{root!r} holds {len(train_items) + len(test_items)} images: too few "
                               f"for its {name} split (a fifth of each class, rounded, is held out "
                               "for testing); add images or give train/ and test/ folders")
    # Grayscale if every sampled image is single-channel.
    with _pil_image(train_items[0][0]) as im:
        channels = 1 if im.mode in ("L", "1", "I;16", "I") else 3
    size = (image_size, image_size)

    def stack(items):
        imgs = torch.stack([read_image(p, channels, size) for p, _ in items])
        return imgs, torch.tensor([c for _, c in items], dtype=torch.int64)

    train = _with_stats(*stack(train_items), classes, 255.0)
    test_imgs, test_labels = stack(test_items)
    return train, ImageData(test_imgs, test_labels, classes, 255.0, train.mean, train.std)
