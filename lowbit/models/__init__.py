"""Built-in models and the real data (photos, MNIST digits, text) used to calibrate and evaluate them."""

from lowbit.models.bert import BertConfig, BertEncoder, load_bert_encoder
from lowbit.models.gguf_file import GgufCheckpoint, read_gguf
from lowbit.models.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSplit,
    calibration_and_heldout,
    foolbox_imagenet_crops,
    foolbox_imagenet_samples,
    imagenet_preprocess,
    load_image_folder,
    natural_image_sources,
    random_crops,
)
from lowbit.models.llama import KVCache, LlamaConfig, LlamaDecoder, LoadedDecoder, load_llama_gguf
from lowbit.models.minilm import TextEncoder, load_text_encoder, minilm_l6
from lowbit.models.mnist import mnist_preprocess, mnist_splits
from lowbit.models.mnist_resnet import MnistResNet, mnist_resnet
from lowbit.models.mobilenet_v2 import (
    MobileNetV2,
    mobilenet_v2,
    pretrained_weights_path,
)
from lowbit.models.small_cnn import SmallCNN, small_cnn
from lowbit.models.smollm2 import smollm2_135m
from lowbit.models.zoo import ZOO_PREFIX, ZooEntry, get_zoo_entry, zoo_names

__all__ = [
    "BertConfig",
    "BertEncoder",
    "GgufCheckpoint",
    "KVCache",
    "LlamaConfig",
    "LlamaDecoder",
    "LoadedDecoder",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ZOO_PREFIX",
    "ImageSplit",
    "MnistResNet",
    "MobileNetV2",
    "SmallCNN",
    "TextEncoder",
    "ZooEntry",
    "calibration_and_heldout",
    "foolbox_imagenet_crops",
    "foolbox_imagenet_samples",
    "get_zoo_entry",
    "imagenet_preprocess",
    "load_bert_encoder",
    "load_image_folder",
    "load_llama_gguf",
    "load_text_encoder",
    "minilm_l6",
    "mnist_preprocess",
    "mnist_resnet",
    "mnist_splits",
    "mobilenet_v2",
    "natural_image_sources",
    "pretrained_weights_path",
    "random_crops",
    "read_gguf",
    "small_cnn",
    "smollm2_135m",
    "zoo_names",
]
