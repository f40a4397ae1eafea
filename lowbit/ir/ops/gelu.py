"""gelu: x * Φ(x) in its exact erf form (BERT's activation), computed as an integer table lookup.

An 8-bit input takes 256 values, so the table is exact on the integer grid: no
polynomial for erf (I-BERT's) is needed where the input is 8-bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import erf

from .lut import elementwise_op
from .registry import UnsupportedAttr

aten = torch.ops.aten


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _erf_form_only(ctx: Any, fx: Any) -> None:
    if ctx.arg(fx, 1, "approximate", "none") != "none":
        raise UnsupportedAttr("gelu with approximate='tanh'; only the exact erf form is supported")


GELU = elementwise_op("gelu", "x * (1 + erf(x / sqrt(2))) / 2 (the exact erf form)", gelu, F.gelu,
                      (aten.gelu.default, aten.gelu_.default), check=_erf_form_only)
