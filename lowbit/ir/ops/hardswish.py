"""hardswish: x * relu6(x + 3) / 6 (MobileNetV3's activation), computed as an integer table lookup."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .lut import elementwise_op

aten = torch.ops.aten


def hardswish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0


HARDSWISH = elementwise_op("hardswish", "x * relu6(x + 3) / 6", hardswish, F.hardswish,
                           (aten.hardswish.default, aten.hardswish_.default), absorbs_clamp=True)
