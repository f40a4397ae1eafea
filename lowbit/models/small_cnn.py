"""A tiny random-weight CNN that packs most layer patterns a quantizer must handle.

Input (N, 3, 32, 32), output (N, 10) logits. The weights are meaningless; what
matters is coverage: BN folding, explicit padding, depthwise/grouped convs,
ReLU/ReLU6/clamp, residual add, concat, max/avg/adaptive pooling, flatten,
view, dropout and two Linear layers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SMALL_CNN_INPUT_SHAPE: tuple[int, int, int, int] = (1, 3, 32, 32)
SMALL_CNN_NUM_CLASSES = 10


def _conv_bn(
    in_ch: int,
    out_ch: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_ch),
    )


class SmallCNN(nn.Module):
    """Feature map sizes are noted per stage for a 32x32 input."""

    def __init__(self, num_classes: int = SMALL_CNN_NUM_CLASSES) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 16, 3, padding=1)  # 16x32x32
        self.pad = nn.ZeroPad2d(1)
        self.padded_conv = _conv_bn(
            16, 16, 3, padding=0
        )  # 16x32x32 thanks to the explicit pad
        self.relu6 = nn.ReLU6()
        self.depthwise = _conv_bn(16, 16, 3, padding=1, groups=16)
        self.maxpool = nn.MaxPool2d(2)  # 16x16x16
        self.grouped = _conv_bn(16, 32, 3, padding=1, groups=2)  # 32x16x16
        self.branch_a = _conv_bn(32, 16, 1)
        self.branch_b = _conv_bn(32, 16, 3, padding=0)  # preceded by F.pad
        self.avgpool = nn.AvgPool2d(2)  # 32x8x8
        self.down = _conv_bn(32, 64, 3, stride=2, padding=1)  # 64x4x4
        self.global_pool = nn.AdaptiveAvgPool2d(1)  # 64x1x1
        self.local_pool = nn.MaxPool2d(2)  # 64x2x2
        self.fc1 = nn.Linear(64 + 64 * 2 * 2, 32)
        self.dropout = nn.Dropout(0.25)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.relu6(self.padded_conv(self.pad(x)))
        x = x + self.depthwise(x)  # residual add of a signed BN output
        x = self.maxpool(x)
        # BN output is signed, so the clamp exercises both saturation ends (hardtanh).
        x = torch.clamp(self.grouped(x), -1.0, 1.0)
        a = F.relu(self.branch_a(x))
        b = F.relu(self.branch_b(F.pad(x, (1, 1, 1, 1))))
        x = torch.cat([a, b], dim=1)
        x = self.avgpool(x)
        x = F.relu(self.down(x))
        # Head: a global and a coarse spatial summary, flattened two different ways.
        g = torch.flatten(self.global_pool(x), 1)
        s = self.local_pool(x)
        s = s.view(s.size(0), -1)
        x = torch.cat([g, s], dim=1)
        x = self.dropout(F.relu(self.fc1(x)))
        return self.fc2(x)


def smooth_noise(
    n: int, seed: int | np.random.SeedSequence, shape: tuple[int, ...] = (3, 32, 32)
) -> np.ndarray:
    """``n`` spatially correlated noise images, roughly zero-mean and unit-variance.

    Low-resolution Gaussian noise upsampled bilinearly plus a little pixel noise:
    closer to natural-image statistics than white noise, so activation ranges
    (and therefore calibration) are less degenerate.
    """
    rng = np.random.default_rng(seed)
    c, h, w = shape
    coarse = torch.from_numpy(
        rng.standard_normal((n, c, max(h // 4, 1), max(w // 4, 1)))
    )
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    fine = torch.from_numpy(rng.standard_normal((n, c, h, w)))
    x = smooth + 0.3 * fine
    x = x / x.std()
    return x.numpy().astype(np.float32)


@torch.no_grad()
def _set_statistics(model: SmallCNN, seed: int) -> None:
    """Give BN layers non-trivial params/stats and centre the logits.

    Default BN (gamma=1, beta=0, mean=0, var=1) is an identity in eval mode,
    which would let a broken BN fold go unnoticed. Running stats come from a
    train-mode pass so activations stay in a sane range through the network.
    Centring and scaling the logits makes the predicted class depend on the
    input instead of on random biases, so top-1 agreement is a meaningful test.
    """
    x = torch.from_numpy(smooth_noise(64, np.random.SeedSequence([seed, 99])))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.2)
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the stats exactly
    model.train()
    model(x)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
            # Perturb the stats slightly so they differ from the exact batch moments.
            m.running_mean.add_(0.05 * torch.randn_like(m.running_mean))
            m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.8, 1.25))
    model.eval()
    logits = model(x)
    scale = 1.0 / logits.std(dim=0).clamp_min(1e-6)
    model.fc2.weight.mul_(scale[:, None])
    model.fc2.bias.sub_(logits.mean(dim=0)).mul_(scale)


def small_cnn(seed: int = 0) -> SmallCNN:
    """Build the test CNN deterministically from ``seed``, in eval mode.

    The global torch RNG is forked so callers' random state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN()
        _set_statistics(model, seed)
    return model.eval()
