"""A small ResNet for MNIST digits, with trained weights shipped in the package.

A different family from MobileNetV2: dense 3x3 convolutions (no depthwise or 1x1
expansions), ReLU rather than ReLU6, max pooling, and residual blocks whose
stride-2 shortcuts are 1x1 projections. Input (N, 1, 28, 28) normalized as in
``lowbit.models.mnist``; output (N, 10) logits. About 78k parameters.

The weights come from ``benchmarks/train_mnist_cnn.py`` (which records the command,
test accuracy and sha256) and are loaded from ``weights/mnist_resnet.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError

MNIST_RESNET_WEIGHTS = Path(__file__).parent / "weights" / "mnist_resnet.safetensors"
_RETRAIN_HINT = "reinstall lowbit, or retrain them with: python benchmarks/train_mnist_cnn.py"

# Channels of the stem and of the three residual stages; the first block of a stage
# with stride 2 halves the feature map (28 -> 14 by the max pool, then 14 -> 7 -> 4).
_STEM_CHANNELS = 16
_STAGES: tuple[tuple[int, int], ...] = ((16, 1), (32, 2), (64, 2))  # (out channels, stride)
NUM_CLASSES = 10


def _conv3x3_bn(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, plus a shortcut, then ReLU (He et al. 2016).

    The shortcut is the identity when the shape is kept, otherwise a strided 1x1
    convolution with BN (a projection shortcut).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3_bn(in_ch, out_ch, stride)
        self.conv2 = _conv3x3_bn(out_ch, out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(y + self.shortcut(x))


class MnistResNet(nn.Module):
    """stem conv (28x28) -> max pool (14x14) -> three residual stages (14, 7, 4) -> global avg pool -> linear."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = _conv3x3_bn(1, _STEM_CHANNELS)
        self.pool = nn.MaxPool2d(2)
        blocks = []
        in_ch = _STEM_CHANNELS
        for out_ch, stride in _STAGES:
            blocks.append(BasicBlock(in_ch, out_ch, stride))
            in_ch = out_ch
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.stem(x)))
        x = self.stages(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def load_mnist_resnet_weights(model: MnistResNet, path: Path = MNIST_RESNET_WEIGHTS) -> None:
    """Load a safetensors state dict into ``model``, naming every missing, unexpected or misshapen tensor."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise LowbitError(f"{path}: the trained MNIST ResNet weights are missing; {_RETRAIN_HINT}")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise LowbitError(f"{path}: not a valid safetensors file (corrupt or truncated?): {e}; {_RETRAIN_HINT}") from e
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        raise LowbitError(f"{path}: the weights do not fit the MNIST ResNet ({'; '.join(problems)}); {_RETRAIN_HINT}")
    model.load_state_dict(state, strict=True)


def mnist_resnet(pretrained: bool = True) -> MnistResNet:
    """Build the MNIST ResNet in eval mode, with its trained weights unless ``pretrained=False``."""
    model = MnistResNet()
    if pretrained:
        load_mnist_resnet_weights(model)
    return model.eval()
