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
    """A batch of model inputs and where it came from.

    `data` is one array, an image model's preprocessed float32 (N, C, H, W), or arrays by graph input name, all
    with the same N (a text model's int64 `input_ids` and `attention_mask`, [N, seq_len]). Quantizer calls take
    `data` as it is; `.x` is the single array of an image model.

    `photos` says which source photo each sample was cut from (crops of one photo are correlated, so agreement
    intervals resample photos); None when unknown, as for a .npy/.npz, whose samples are then treated as
    independent. `texts` are the sentences a text batch was tokenized from (each one independent).
    """

    data: np.ndarray | dict[str, np.ndarray]
    source: str
    photos: np.ndarray | None = None
    texts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        lengths = {name: len(a) for name, a in self.arrays.items()}
        if not lengths or len(set(lengths.values())) != 1:
            raise ValueError(f"{self.source}: named inputs must all have the same number of samples, got {lengths}")
        n = len(self)
        if self.photos is not None and np.shape(self.photos) != (n,):
            raise ValueError(f"{self.source}: {np.shape(self.photos)} photo ids for {n} samples")
        if self.texts is not None and len(self.texts) != n:
            raise ValueError(f"{self.source}: {len(self.texts)} texts for {n} samples")

    @property
    def named(self) -> bool:
        """True for arrays by input name (a text model's), False for one unnamed array (an image model's)."""
        return isinstance(self.data, dict)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Every array by name; a single unnamed array is called "x"."""
        return dict(self.data) if isinstance(self.data, dict) else {"x": self.data}

    @property
    def x(self) -> np.ndarray:
        """The single input array of an image model."""
        if isinstance(self.data, dict):
            raise LowbitError(f"{self.source}: a text model's inputs are named arrays ({', '.join(self.data)}); "
                              "this step takes a single image array and does not handle text models yet")
        return self.data

    def feed(self, names: list[str]) -> dict[str, np.ndarray]:
        """The arrays keyed by the graph's input `names` (a single unnamed array goes to the only input)."""
        if not isinstance(self.data, dict):
            if len(names) != 1:
                raise LowbitError(f"{self.source}: one array for a model with inputs {names}")
            return {names[0]: self.data}
        missing = [n for n in names if n not in self.data]
        if missing or len(names) != len(self.data):
            raise LowbitError(f"{self.source}: holds inputs {list(self.data)}, but the model takes {names}")
        return {n: self.data[n] for n in names}

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    @property
    def noun(self) -> str:
        return "sentence" if self.texts is not None else "sample"

    def select(self, part: slice, source: str) -> Inputs:
        """Some of the samples, with their photo ids and texts."""
        data = {k: a[part] for k, a in self.data.items()} if isinstance(self.data, dict) else self.data[part]
        texts = None if self.texts is None else self.texts[part]
        return Inputs(data, source, None if self.photos is None else self.photos[part], texts)

    def sample_digests(self) -> list[bytes]:
        """One sha256 per sample, over every array's row (to find samples shared by two sets)."""
        arrays = list(self.arrays.values())
        digests = []
        for i in range(len(self)):
            h = hashlib.sha256()
            for a in arrays:
                h.update(np.ascontiguousarray(a[i]).tobytes())
            digests.append(h.digest())
        return digests

    def digest(self) -> str:
        """sha256 of all the data (for the manifest); an image model's is that of its one array's bytes."""
        if not isinstance(self.data, dict):
            return hashlib.sha256(np.ascontiguousarray(self.data).tobytes()).hexdigest()
        h = hashlib.sha256()
        for name in sorted(self.data):
            a = np.ascontiguousarray(self.data[name])
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def describe_photos(self) -> str:
        """'13 photos', 'photos unknown: samples treated as independent', or for text 'each sentence independent'."""
        if self.texts is not None:
            return "each sentence independent"
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
        text = " (a .txt of sentences is for text models)" if path.suffix.lower() == ".txt" else ""
        raise LowbitError(f"{path}: unknown {what} data format {path.suffix!r}; expected an image folder, "
                          f"a .npy or an .npz{text}")
    x = validate_inputs(load_array_file(path), str(path))
    return Inputs(x, str(path))


def check_disjoint(calib: Inputs, heldout: Inputs) -> None:
    """Held-out inputs must not repeat calibration inputs, or the fidelity numbers would flatter the model."""
    seen = set(calib.sample_digests())
    shared = sum(d in seen for d in heldout.sample_digests())
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
    noun = f"{calib.noun}s"
    keep = calib.select(slice(0, n - n_held), f"first {n - n_held} of {n} {noun} of {calib.source}")
    held = calib.select(slice(n - n_held, n), f"last {n_held} of {n} {noun} of {calib.source}, split off the "
                        "calibration data since no --eval was given")
    return keep, held
