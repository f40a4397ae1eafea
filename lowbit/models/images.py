"""Real images for calibration and evaluation, taken only from installed packages.

Sources are sample photos bundled with scikit-image, matplotlib and
scikit-learn (read straight from their data folders, so nothing is downloaded)
plus the 20 labelled ImageNet samples bundled with foolbox. Package folders are
located with ``importlib.util.find_spec`` so none of those packages is imported.
"""

from __future__ import annotations

import importlib.util
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# (package, folder inside the package, file names). Only photographs of real
# scenes/objects/textures (grayscale ones are expanded to RGB). Left out:
# synthetic or binary pictures (logos, chessboards, phantom, colour wheel, horse
# silhouette), tiny or multi-frame files, text pages, and motorcycle_right.png,
# a near-duplicate of motorcycle_left.png that would leak across the split.
_NATURAL_SOURCES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "skimage",
        "data",
        (
            "astronaut.png",
            "brick.png",
            "camera.png",
            "cell.png",
            "chelsea.png",
            "clock_motion.png",
            "coffee.png",
            "coins.png",
            "grass.png",
            "gravel.png",
            "hubble_deep_field.jpg",
            "ihc.png",
            "moon.png",
            "motorcycle_left.png",
            "retina.jpg",
            "rocket.jpg",
        ),
    ),
    ("matplotlib", "mpl-data/sample_data", ("grace_hopper.jpg",)),
    ("sklearn", "datasets/images", ("china.jpg", "flower.jpg")),
)

# Crop sampling ranges, as in torchvision's RandomResizedCrop.
_CROP_SCALE = (0.25, 1.0)
_CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))

_FOOLBOX_IMAGENET = re.compile(r"imagenet_(\d+)_(\d+)\.jpg")


def package_dir(package: str) -> Path | None:
    """Install folder of a top-level package, or None if it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")  # also forces the full decode before the file closes


@lru_cache(maxsize=1)
def _load_natural_sources() -> tuple[tuple[str, Image.Image], ...]:
    found: list[tuple[str, Image.Image]] = []
    for package, folder, names in _NATURAL_SOURCES:
        root = package_dir(package)
        for name in names:
            path = root / folder / name if root is not None else None
            if path is None or not path.is_file():
                warnings.warn(
                    f"sample image {package}/{folder}/{name} not found; skipped",
                    stacklevel=3,
                )
                continue
            found.append((f"{package}/{Path(name).stem}", _open_rgb(path)))
    if len(found) < 3:
        raise RuntimeError(
            "too few sample images found (need scikit-image, matplotlib and/or scikit-learn installed)"
        )
    return tuple(sorted(found, key=lambda item: item[0]))


def natural_image_sources() -> list[tuple[str, Image.Image]]:
    """All available source photos as ``(name, RGB image)``, sorted by name.

    Names look like ``"skimage/astronaut"``. Returned images are copies, so
    callers may modify them freely.
    """
    return [(name, img.copy()) for name, img in _load_natural_sources()]


def normalize(img: Image.Image) -> np.ndarray:
    """RGB image -> float32 CHW array scaled to [0, 1] and ImageNet-normalized."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def imagenet_preprocess(
    img: Image.Image, size: int = 224, resize: int = 256
) -> np.ndarray:
    """Standard ImageNet eval transform: shorter side to ``resize``, center crop ``size``.

    Returns a float32 array of shape (3, size, size).
    """
    if resize < size:
        raise ValueError(f"resize ({resize}) must be >= size ({size})")
    w, h = img.size
    # Shorter side becomes exactly `resize`; the longer side keeps the aspect ratio.
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    img = img.convert("RGB").resize((new_w, new_h), Image.Resampling.BILINEAR)
    left = round((new_w - size) / 2.0)
    top = round((new_h - size) / 2.0)
    return normalize(img.crop((left, top, left + size, top + size)))


def _sample_crop_box(
    width: int, height: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """A random (left, top, right, bottom) box covering 25-100% of the area."""
    area = width * height
    for _ in range(10):
        target_area = area * rng.uniform(*_CROP_SCALE)
        ratio = math.exp(rng.uniform(*_CROP_LOG_RATIO))
        w = round(math.sqrt(target_area * ratio))
        h = round(math.sqrt(target_area / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    # Rare fallback (very elongated images): the largest centered box within the ratio range.
    ratio = min(max(width / height, 3 / 4), 4 / 3)
    if width / height < ratio:
        w, h = width, round(width / ratio)
    else:
        w, h = round(height * ratio), height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def random_crops(
    img: Image.Image,
    n: int,
    rng: np.random.Generator,
    size: int = 224,
    flip: bool = True,
) -> list[np.ndarray]:
    """``n`` random-resized crops of ``img``, each normalized to a (3, size, size) array.

    Each crop covers 25-100% of the image area with aspect ratio 3/4-4/3, is
    resized to ``size`` x ``size`` and, if ``flip``, mirrored with probability 1/2.
    Deterministic given the state of ``rng``.
    """
    img = img.convert("RGB")
    crops = []
    for _ in range(n):
        box = _sample_crop_box(*img.size, rng)
        crop = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
        if flip and rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crops.append(normalize(crop))
    return crops


@dataclass(frozen=True)
class ImageSplit:
    """Calibration and held-out crops drawn from disjoint sets of source images.

    ``calib_photos[i]`` is the index in ``calib_sources`` of the photo crop ``i`` was cut from (likewise for
    the held-out set): crops of one photo are correlated, so agreement intervals resample photos.
    """

    calib: np.ndarray
    heldout: np.ndarray
    calib_sources: list[str]
    heldout_sources: list[str]
    calib_photos: np.ndarray
    heldout_photos: np.ndarray


def _round_robin_order(counts: Sequence[int]) -> np.ndarray:
    """Source index of each crop when ``counts[i]`` crops of source ``i`` are interleaved by source."""
    return np.array([i for j in range(max(counts)) for i, k in enumerate(counts) if j < k], dtype=np.int64)


def _crops_round_robin(
    sources: Sequence[tuple[str, Image.Image]],
    n: int,
    rng: np.random.Generator,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` crops spread as evenly as possible over ``sources``, interleaved by source, and each one's source."""
    counts = [n // len(sources) + (i < n % len(sources)) for i in range(len(sources))]
    per_source = [
        random_crops(img, k, rng, size) for (_, img), k in zip(sources, counts, strict=True)
    ]
    order = _round_robin_order(counts)
    taken = [0] * len(sources)
    ordered = []
    for i in order:
        ordered.append(per_source[i][taken[i]])
        taken[i] += 1
    return np.stack(ordered).astype(np.float32, copy=False), order


def split_sources(
    names: Sequence[str], seed: int = 0, calib_fraction: float = 1 / 3
) -> tuple[list[str], list[str]]:
    """Deterministically split source names into (calibration, held-out), both non-empty."""
    if len(names) < 2:
        raise ValueError("need at least two source images to make disjoint splits")
    order = np.random.default_rng(np.random.SeedSequence([seed, 0])).permutation(
        len(names)
    )
    n_calib = min(max(1, round(len(names) * calib_fraction)), len(names) - 1)
    shuffled = [names[i] for i in order]
    return sorted(shuffled[:n_calib]), sorted(shuffled[n_calib:])


def calibration_and_heldout(
    n_calib: int = 64, n_heldout: int = 192, seed: int = 0, size: int = 224
) -> ImageSplit:
    """Calibration and held-out crop batches from disjoint source images.

    About a third of the source photos feed calibration and the rest feed the
    held-out set, so no held-out input shares a source image with calibration.
    Arrays are float32 of shape (n, 3, size, size); fully determined by ``seed``.
    """
    sources = dict(_load_natural_sources())
    calib_names, heldout_names = split_sources(list(sources), seed)
    calib_rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    heldout_rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    calib, calib_photos = _crops_round_robin(
        [(k, sources[k]) for k in calib_names], n_calib, calib_rng, size
    )
    heldout, heldout_photos = _crops_round_robin(
        [(k, sources[k]) for k in heldout_names], n_heldout, heldout_rng, size
    )
    return ImageSplit(calib, heldout, calib_names, heldout_names, calib_photos, heldout_photos)


def _foolbox_imagenet_files() -> list[tuple[int, int, Path]]:
    """(index, label, path) of foolbox's bundled ImageNet photos, sorted by index."""
    root = package_dir("foolbox")
    if root is None:
        raise ModuleNotFoundError(
            "the labelled ImageNet samples need foolbox: pip install --no-deps foolbox"
        )
    entries = []
    for path in (root / "data").glob("imagenet_*.jpg"):
        match = _FOOLBOX_IMAGENET.fullmatch(path.name)
        if match:
            entries.append((int(match.group(1)), int(match.group(2)), path))
    if not entries:
        raise FileNotFoundError(f"no imagenet_*.jpg samples in {root / 'data'}")
    return sorted(entries)


def foolbox_imagenet_crops(per_image: int = 10, seed: int = 0, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """``per_image`` random-resized crops of each of foolbox's 20 ImageNet photos: in-domain
    evaluation inputs, disjoint from the calibration photos.

    Returns ``(x, photos)``: float32 (20 * per_image, 3, size, size), and each crop's photo (0-19, in the order
    of ``foolbox_imagenet_samples``).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    files = _foolbox_imagenet_files()
    crops = [c for _, _, path in files for c in random_crops(_open_rgb(path), per_image, rng, size)]
    photos = np.repeat(np.arange(len(files)), per_image)
    return np.stack(crops).astype(np.float32, copy=False), photos


def foolbox_imagenet_samples() -> tuple[np.ndarray, np.ndarray]:
    """The 20 labelled ImageNet photos bundled with foolbox (which is not imported).

    Files are ``foolbox/data/imagenet_<index>_<label>.jpg`` (mostly 512x512), so
    the standard resize-256/center-crop-224 transform applies. Returns
    ``(x, labels)``: float32 (20, 3, 224, 224) and int64 (20,) class indices.
    """
    entries = _foolbox_imagenet_files()
    x = np.stack([imagenet_preprocess(_open_rgb(path)) for _, _, path in entries])
    labels = np.array([label for _, label, _ in entries], dtype=np.int64)
    return x.astype(np.float32, copy=False), labels


def load_image_folder(
    path: str | Path, preprocess: Callable[[Image.Image], np.ndarray]
) -> np.ndarray:
    """Load every image in ``path`` (sorted by file name) and stack the preprocessed arrays.

    Raises ValueError for a missing or empty folder and for an unreadable image
    (naming the offending file).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"image folder does not exist or is not a directory: {folder}")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
    arrays = []
    for file in files:
        try:
            img = _open_rgb(file)
        except (OSError, SyntaxError, ValueError) as err:  # PIL's decode failures
            raise ValueError(f"cannot read image {file}: {err}") from err
        arrays.append(np.asarray(preprocess(img), dtype=np.float32))
    return np.stack(arrays)
