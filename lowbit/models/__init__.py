"""Built-in models and the real data (photos, MNIST digits) used to calibrate and evaluate them."""

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
from lowbit.models.mnist import mnist_preprocess, mnist_splits
from lowbit.models.mnist_resnet import MnistResNet, mnist_resnet
from lowbit.models.mobilenet_v2 import (
    MobileNetV2,
    mobilenet_v2,
    pretrained_weights_path,
)
from lowbit.models.small_cnn import SmallCNN, small_cnn
from lowbit.models.zoo import ZOO_PREFIX, ZooEntry, get_zoo_entry, zoo_names

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ZOO_PREFIX",
    "ImageSplit",
    "MnistResNet",
    "MobileNetV2",
    "SmallCNN",
    "ZooEntry",
    "calibration_and_heldout",
    "foolbox_imagenet_crops",
    "foolbox_imagenet_samples",
    "get_zoo_entry",
    "imagenet_preprocess",
    "load_image_folder",
    "mnist_preprocess",
    "mnist_resnet",
    "mnist_splits",
    "mobilenet_v2",
    "natural_image_sources",
    "pretrained_weights_path",
    "random_crops",
    "small_cnn",
    "zoo_names",
]
