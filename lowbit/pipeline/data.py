"""Calibration and held-out inputs given on the command line: image folders and .npy/.npz arrays."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import LowbitError
from ..models.images import imagenet_preprocess, load_image_folder

ARRAY_SUFFIXES = (".npy", ".npz")
# Array names looked for in an .npz that holds more than one array.
NPZ_KEYS = ("x", "calib")
# How a .npy array, a pickle (protocol 2 and later) and an .npz (zip) archive begin.
PICKLE_OR_ARRAY_MAGIC = (b"\x93NUMPY", b"\x80", b"PK\x03\x04")

Preprocess = Callable[[Image.Image], np.ndarray]


@dataclass(frozen=True)
class Inputs:
    """A batch of preprocessed float32 model inputs (N, C, H, W) and where it came from.

    `photos` says which source photo each sample was cut from (crops of one photo are correlated, so agreement
    intervals resample photos); None when unknown, as for a .npy/.npz, whose samples are then treated as
    independent.
    """

    x: np.ndarray
    source: str
    photos: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.photos is not None and np.shape(self.photos) != (len(self.x),):
            raise ValueError(f"{self.source}: {np.shape(self.photos)} photo ids for {len(self.x)} samples")

    def __len__(self) -> int:
        return len(self.x)

    def select(self, part: slice, source: str) -> Inputs:
        """Some of the samples, with their photo ids."""
        return Inputs(self.x[part], source, None if self.photos is None else self.photos[part])

    def describe_photos(self) -> str:
        """'13 photos' or 'photos unknown: samples treated as independent', for the report."""
        if self.photos is None:
            return "photos unknown: samples treated as independent"
        n = len(np.unique(self.photos))
        return f"{n} photo{'s' if n != 1 else ''}"


def is_array_file(path: Path) -> bool:
    return path.suffix.lower() in ARRAY_SUFFIXES


def _starts_with(path: Path, prefixes: tuple[bytes, ...]) -> bool:
    with open(path, "rb") as f:
        return f.read(max(map(len, prefixes))).startswith(prefixes)


def load_array_file(path: Path) -> np.ndarray:
    """Read a .npy, or an .npz with one array (or one named `x`/`calib`); never unpickles anything."""
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.keys())
                if len(names) == 1:
                    key = names[0]
                else:
                    key = next((k for k in NPZ_KEYS if k in names), None)
                    if key is None:
                        raise LowbitError(f"{path}: the .npz holds arrays {names}; expected exactly one array, "
                                          f"or one named {' or '.join(map(repr, NPZ_KEYS))}")
                return archive[key]
        return np.load(path, allow_pickle=False)
    except LowbitError:
        raise
    except ValueError as e:
        # numpy reads a file without the .npy magic as a pickle: random bytes would be called "Python objects".
        if "allow_pickle" in str(e) and _starts_with(path, PICKLE_OR_ARRAY_MAGIC):
            raise LowbitError(f"{path}: holds Python objects, not a numeric array; pickled data is refused "
                              "because loading it can run arbitrary code. Save a float32 array instead.") from e
        raise LowbitError(f"{path}: cannot read the array (corrupt or truncated?): {e}") from e
    except Exception as e:  # numpy and zipfile raise OSError, EOFError, BadZipFile, ... for broken files
        raise LowbitError(f"{path}: cannot read the array (corrupt or truncated?): {e}") from e


def validate_inputs(x: np.ndarray, where: str) -> np.ndarray:
    """Float, 4-D (N, C, H, W), non-empty and finite; returned as contiguous float32."""
    if not np.issubdtype(x.dtype, np.floating):
        raise LowbitError(f"{where}: the array has dtype {x.dtype}; expected preprocessed float32 inputs")
    if x.ndim != 4:
        raise LowbitError(f"{where}: the array has shape {x.shape}; expected 4 dimensions (N, C, H, W)")
    if len(x) == 0:
        raise LowbitError(f"{where}: the array is empty (shape {x.shape}); give at least one sample")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        samples = np.unique(np.nonzero(bad)[0])
        raise LowbitError(f"{where}: {int(bad.sum())} NaN/Inf values in {len(samples)} sample(s) (first: "
                          f"{samples[:5].tolist()}); clean the data")
    return x


def check_input_shape(x: np.ndarray, expected: tuple[int, ...], where: str) -> None:
    """`x` must be (N, *expected[1:])."""
    if tuple(x.shape[1:]) != tuple(expected[1:]):
        want = ", ".join(map(str, expected[1:]))
        raise LowbitError(f"{where}: inputs have shape {tuple(x.shape)}, but the model takes (N, {want})")


def imagenet_preprocess_for(shape: tuple[int, ...], where: str) -> Preprocess:
    """ImageNet-style preprocessing (resize, center crop, normalize) to a model's (1, 3, H, H) input."""
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]:
        raise LowbitError(f"{where}: cannot turn images into inputs of shape {tuple(shape)}: image folders need a "
                          "square 3-channel input (N, 3, H, H); pass a preprocessed .npy/.npz instead")
    size = int(shape[2])
    # Keep the usual 224/256 crop ratio at every size.
    return partial(imagenet_preprocess, size=size, resize=max(size, round(size * 256 / 224)))


def load_inputs(path: Path, preprocess: Preprocess | None, what: str) -> Inputs:
    """Load `--calib`/`--eval` data: an image folder (needs `preprocess`) or a .npy/.npz array."""
    if path.is_dir():
        if preprocess is None:
            raise LowbitError(f"{path}: cannot preprocess an image folder without knowing the model's input "
                              f"shape; give the {what} data as a preprocessed .npy/.npz array (N, C, H, W)")
        try:
            x = load_image_folder(path, preprocess)
        except ValueError as e:
            raise LowbitError(str(e)) from e
        # One sample per file: each is its own photo.
        return Inputs(validate_inputs(x, str(path)), f"{len(x)} images in {path}", np.arange(len(x)))
    if not path.exists():
        raise LowbitError(f"{path}: no such file or folder ({what} data is an image folder, .npy or .npz)")
    if not is_array_file(path):
        raise LowbitError(f"{path}: unknown {what} data format {path.suffix!r}; expected an image folder, "
                          "a .npy or an .npz")
    x = validate_inputs(load_array_file(path), str(path))
    return Inputs(x, str(path))


def _sample_digests(x: np.ndarray) -> list[bytes]:
    return [hashlib.sha256(np.ascontiguousarray(sample).tobytes()).digest() for sample in x]


def check_disjoint(calib: Inputs, heldout: Inputs) -> None:
    """Held-out inputs must not repeat calibration inputs, or the fidelity numbers would flatter the model."""
    seen = set(_sample_digests(calib.x))
    shared = sum(d in seen for d in _sample_digests(heldout.x))
    if shared:
        raise LowbitError(f"{shared} of the {len(heldout)} held-out samples ({heldout.source}) also appear in the "
                          f"calibration data ({calib.source}); held-out data must be disjoint from calibration")


def split_heldout(calib: Inputs, fraction: float = 0.2) -> tuple[Inputs, Inputs]:
    """Split the last `fraction` (at least one sample) off the calibration data as held-out data."""
    n = len(calib)
    if n < 2:
        raise LowbitError(f"{calib.source}: a single calibration sample cannot also provide held-out data; "
                          "give more samples or pass --eval")
    n_held = min(max(1, round(n * fraction)), n - 1)
    keep = calib.select(slice(0, n - n_held), f"first {n - n_held} of {n} samples of {calib.source}")
    held = calib.select(slice(n - n_held, n), f"last {n_held} of {n} samples of {calib.source}, split off the "
                        "calibration data since no --eval was given")
    return keep, held
