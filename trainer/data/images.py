"""Image data sets that need no download.

Every data set here yields ``(image, label)`` with ``image`` a float tensor of shape
``(channels, image_size, image_size)`` in ``[0, 1]`` and ``label`` an ``int``.

- ``digits``: scikit-learn's handwritten digits (8x8, shipped with the package), upsampled.
- ``shapes``: coloured circles, squares and triangles rendered with PIL, deterministic for a
  seed. Deliberately simple: the richer scene generator for CLIP lives in ``scenes.py``.
- a folder: an ImageFolder tree (``root/class/img.png``, optionally with ``train/`` and
  ``test/`` or ``val/`` sub-trees) or a folder of MNIST IDX files.
- a file: one IDX image file (``*idx3-ubyte`` or ``*.gz``).

Where a source has no train/test split of its own, a seeded 80/20 split is used, so that
``train=True`` and ``train=False`` with the same seed are complementary.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from switchml.extras import needs

with needs("train", "the trainer's image data"):
    from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

BUILTIN = ("digits", "shapes")
#: Fraction of a source without its own split that goes to the training set.
TRAIN_FRACTION = 0.8
SHAPE_NAMES = ("circle", "square", "triangle")

# IDX type codes (third byte of the magic number) to numpy big-endian dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _split_indices(n: int, train: bool, seed: int) -> np.ndarray:
    """Indices of the train or test part of a seeded 80/20 permutation of ``range(n)``."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * TRAIN_FRACTION))
    return np.sort(perm[:cut] if train else perm[cut:])


def _to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert a ``(C, H, W)`` image to ``channels`` channels (1 = luma, 3 = RGB)."""
    c = img.shape[0]
    if c == channels:
        return img
    if channels == 1 and c == 3:
        # ITU-R 601 luma, the same weights as PIL's convert("L").
        w = torch.tensor([0.299, 0.587, 0.114], dtype=img.dtype).view(3, 1, 1)
        return (img * w).sum(0, keepdim=True)
    if channels == 3 and c == 1:
        return img.expand(3, -1, -1).clone()
    raise ValueError(f"cannot convert {c} channels to {channels}")


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a ``(C, H, W)`` float image to ``size x size``, clamped to [0, 1]."""
    if img.shape[-2:] == (size, size):
        return img
    down = img.shape[-1] > size or img.shape[-2] > size
    out = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False, antialias=down)[0]
    return out.clamp_(0.0, 1.0)


class TensorImages(Dataset):
    """Images held in memory as a ``(N, C, H, W)`` tensor (uint8 or float in [0, 1]) with labels.

    Resizing and channel conversion happen per item, so a large source (MNIST) stays uint8.
    """

    def __init__(self, images: torch.Tensor, labels: Sequence[int] | torch.Tensor, image_size: int, channels: int):
        if images.ndim == 3:
            images = images[:, None]
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        img = _resize(_to_channels(img, self.channels), self.image_size)
        return img, int(self.labels[i])


# --------------------------------------------------------------------------- digits


def digits_dataset(image_size: int = 32, channels: int = 1, train: bool = True, seed: int = 0) -> TensorImages:
    """scikit-learn's 1,797 handwritten digits (values 0..16), upsampled to ``image_size``."""
    with needs("train", "the digits data set"):
        from sklearn.datasets import load_digits

    d = load_digits()
    idx = _split_indices(len(d.images), train, seed)
    images = torch.from_numpy(d.images[idx].astype(np.float32) / 16.0)[:, None]
    # Upsample once here rather than per item: the whole set is ~1 MB at 32x32.
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return TensorImages(images, d.target[idx].tolist(), image_size, channels)


# --------------------------------------------------------------------------- shapes


def render_shape_image(rng: np.random.Generator, image_size: int, supersample: int = 4) -> tuple[Image.Image, int]:
    """One RGB image of one or two coloured shapes on a dark background; label = first shape.

    Rendered at ``supersample`` times the size and box-filtered down, for anti-aliased edges.
    """
    s = image_size * supersample
    bg = tuple(int(v) for v in rng.integers(0, 64, size=3))
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    n_shapes = int(rng.integers(1, 3))
    label = 0
    for k in range(n_shapes):
        kind = int(rng.integers(0, len(SHAPE_NAMES)))
        if k == 0:
            label = kind
        # Bright, saturated colours, so shapes stand out from the dark background.
        hue = rng.random()
        rgb = _hsv_to_rgb(hue, 0.6 + 0.4 * rng.random(), 0.7 + 0.3 * rng.random())
        size = s * (0.45 - 0.15 * k) * (0.7 + 0.3 * rng.random())
        cx = rng.uniform(size / 2, s - size / 2)
        cy = rng.uniform(size / 2, s - size / 2)
        r = size / 2
        box = (cx - r, cy - r, cx + r, cy + r)
        if kind == 0:
            draw.ellipse(box, fill=rgb)
        elif kind == 1:
            draw.rectangle(box, fill=rgb)
        else:
            angle = rng.uniform(0, 2 * math.pi)
            pts = [(cx + r * math.cos(angle + j * 2 * math.pi / 3), cy + r * math.sin(angle + j * 2 * math.pi / 3)) for j in range(3)]
            draw.polygon(pts, fill=rgb)
    return img.resize((image_size, image_size), Image.Resampling.BOX), label


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


class ShapesDataset(Dataset):
    """Procedural shapes, rendered on demand; item ``i`` depends only on (seed, split, i)."""

    def __init__(self, n: int, image_size: int = 32, channels: int = 3, train: bool = True, seed: int = 0):
        self.n = n
        self.image_size = image_size
        self.channels = channels
        self.split = 0 if train else 1
        self.seed = seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self.split, i])
        img, label = render_shape_image(rng, self.image_size)
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return _to_channels(t, self.channels), label


def shapes_dataset(
    image_size: int = 32, channels: int = 3, train: bool = True, seed: int = 0, n: int | None = None
) -> ShapesDataset:
    """The procedural shapes set: 4,096 training or 1,024 test images unless ``n`` is given."""
    return ShapesDataset(n if n is not None else (4096 if train else 1024), image_size, channels, train, seed)


# --------------------------------------------------------------------------- IDX (MNIST)


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (MNIST's format), gzip-compressed or not, into a numpy array.

    Layout: two zero bytes, a type code, the number of dimensions, then each dimension as a
    big-endian uint32, then the data in big-endian order.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: {len(body)} data bytes, expected {expected} for shape {dims}")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzip if ``compress`` or the name ends in ``.gz``)."""
    path = Path(path)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    arr = np.asarray(array)
    if arr.dtype not in codes:
        raise ValueError(f"IDX cannot hold dtype {arr.dtype}")
    code = codes[arr.dtype]
    payload = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload += arr.astype(np.dtype(_IDX_DTYPES[code])).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(payload)


def _find_idx(folder: Path, split: str, kind: str) -> Path | None:
    """The IDX file of ``split`` (train/test) and ``kind`` (images/labels) in an MNIST folder."""
    prefixes = ("train",) if split == "train" else ("t10k", "test")
    tag = "idx3" if kind == "images" else "idx1"
    for f in sorted(folder.iterdir()):
        name = f.name.lower()
        if f.is_file() and tag in name and kind in name and name.startswith(prefixes):
            return f
    return None


def _labels_for(image_file: Path) -> Path | None:
    """The labels file beside an images file, by MNIST's naming (images -> labels, idx3 -> idx1)."""
    cand = image_file.with_name(image_file.name.replace("images", "labels").replace("idx3", "idx1"))
    return cand if cand != image_file and cand.exists() else None


def idx_dataset(path: str | Path, image_size: int, channels: int, train: bool, seed: int) -> TensorImages:
    """MNIST-style IDX data: a folder with train/t10k files, or one images file (seeded split).

    Labels come from the matching ``labels`` file when there is one, else are all 0.
    """
    path = Path(path)
    if path.is_dir():
        split = "train" if train else "test"
        img_file = _find_idx(path, split, "images")
        if img_file is None:
            raise FileNotFoundError(f"no {split} images IDX file in {path}")
        images = read_idx(img_file)
        lab_file = _find_idx(path, split, "labels")
        labels = read_idx(lab_file) if lab_file is not None else np.zeros(len(images), np.int64)
        idx = np.arange(len(images))
    else:
        images = read_idx(path)
        lab_file = _labels_for(path)
        labels = read_idx(lab_file) if lab_file is not None else np.zeros(len(images), np.int64)
        idx = _split_indices(len(images), train, seed)
    if images.ndim == 4 and images.shape[-1] in (1, 3):  # (N, H, W, C) -> (N, C, H, W)
        images = images.transpose(0, 3, 1, 2)
    if images.ndim not in (3, 4):
        raise ValueError(f"IDX images must have 3 or 4 dimensions, got shape {images.shape}")
    t = torch.from_numpy(np.ascontiguousarray(images[idx]))
    if t.dtype != torch.uint8:
        t = t.float()
        t = t / 255.0 if t.max() > 1.0 else t
    return TensorImages(t, labels[idx].astype(np.int64).tolist(), image_size, channels)


# --------------------------------------------------------------------------- ImageFolder


class _FolderView(Dataset):
    """An ImageFolder (or a subset of it) resized and converted to ``channels``."""

    def __init__(self, folder, indices: Sequence[int] | None, image_size: int, channels: int):
        self.folder = folder
        self.indices = list(indices) if indices is not None else list(range(len(folder)))
        self.image_size = image_size
        self.channels = channels
        self.classes = folder.classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        pil, label = self.folder[self.indices[i]]
        pil = pil.convert("L" if self.channels == 1 else "RGB")
        t = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
        return _resize(t, self.image_size), int(label)


def image_folder_dataset(path: str | Path, image_size: int, channels: int, train: bool, seed: int) -> Dataset:
    """An ImageFolder tree; uses its ``train``/``test`` (or ``val``) sub-trees when present."""
    with needs("train", "ImageFolder data"):
        from torchvision.datasets import ImageFolder

    path = Path(path)
    test_dir = next((path / d for d in ("test", "val") if (path / d).is_dir()), None)
    if (path / "train").is_dir() and test_dir is not None:
        return _FolderView(ImageFolder(str(path / "train" if train else test_dir)), None, image_size, channels)
    folder = ImageFolder(str(path))
    return _FolderView(folder, _split_indices(len(folder), train, seed).tolist(), image_size, channels)


def _looks_like_idx_folder(path: Path) -> bool:
    return any("idx3" in f.name.lower() for f in path.iterdir() if f.is_file())


# --------------------------------------------------------------------------- entry point


def image_dataset(name_or_path: str | Path, image_size: int = 32, channels: int = 1, train: bool = True, seed: int = 0) -> Dataset:
    """An image data set by name (``digits``, ``shapes``) or path (ImageFolder, IDX folder or file).

    Items are ``(image, label)``: a ``(channels, image_size, image_size)`` float tensor in
    [0, 1] and an int class. ``seed`` fixes splits (sources without one) and generated content.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    name = str(name_or_path)
    if name == "digits":
        return digits_dataset(image_size, channels, train, seed)
    if name == "shapes":
        return shapes_dataset(image_size, channels, train, seed)
    path = Path(name).expanduser()
    if path.is_file():
        return idx_dataset(path, image_size, channels, train, seed)
    if path.is_dir():
        if _looks_like_idx_folder(path):
            return idx_dataset(path, image_size, channels, train, seed)
        return image_folder_dataset(path, image_size, channels, train, seed)
    raise ValueError(f"unknown data set {name!r}: not one of {BUILTIN} and no such file or folder")


def dataset_labels(ds: Dataset) -> int:
    """Number of classes of a data set from this module (max label + 1), for small classifiers."""
    if isinstance(ds, TensorImages):
        return int(ds.labels.max()) + 1 if len(ds.labels) else 1
    if isinstance(ds, ShapesDataset):
        return len(SHAPE_NAMES)
    if isinstance(ds, _FolderView):
        return len(ds.classes)
    return int(max(int(ds[i][1]) for i in range(len(ds)))) + 1
