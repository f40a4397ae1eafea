"""Integer-only helpers shared by the I-BERT kernels (softmax, layer_norm): bit length and floor square root.

Both take non-negative int64 arrays below 2^62 and use only integer comparisons, shifts, additions and
divisions, so every backend can repeat them bit for bit.
"""

from __future__ import annotations

import numpy as np

ISQRT_LIMIT = 1 << 62
# Newton from 2^ceil(L/2) (at most 2 sqrt(n)): the relative error e obeys e' = e^2 / (2 (1 + e)): 1, 0.25, 0.025,
# 3e-4, 5e-8, 1.2e-15 < 2^-31 after 6 steps, so x is then floor(sqrt(n)) (< 2^31); one more step sees no decrease.
ISQRT_MAX_STEPS = 7


def bit_length(n: np.ndarray) -> np.ndarray:
    """The bit length of each non-negative int64 (0 for 0), by a binary search of shifts: integer-only."""
    n = np.asarray(n, dtype=np.int64)
    if np.any(n < 0):
        raise ValueError("bit_length of a negative number")
    lg = np.zeros(n.shape, dtype=np.int64)
    for s in (32, 16, 8, 4, 2, 1):  # lg + s <= 63 at every step: the shift stays defined for int64
        lg += s * ((n >> (lg + s)) != 0)
    return lg + (n != 0)


def isqrt(n: np.ndarray) -> np.ndarray:
    """floor(sqrt(n)) for int64 0 <= n < 2^62, by Newton's iteration x <- (x + n // x) // 2.

    Starting at x0 = 2^ceil(L/2) >= sqrt(n) (L the bit length), the integer Newton step never goes below
    floor(sqrt(n)) (AM-GM, then flooring an integer bound), and it decreases strictly while x > floor(sqrt(n));
    the first step that does not decrease marks x = floor(sqrt(n)). x0 < 2^31, so x + n // x < 2^32: no overflow.
    """
    n = np.asarray(n, dtype=np.int64)
    if np.any(n < 0) or np.any(n >= ISQRT_LIMIT):
        raise ValueError(f"isqrt needs 0 <= n < 2^62, got range [{n.min()}, {n.max()}]")
    x = np.left_shift(np.int64(1), (bit_length(n) + 1) >> 1)
    active = n > 0
    for _ in range(ISQRT_MAX_STEPS):
        y = (x + n // x) >> 1
        active &= y < x
        if not active.any():
            break
        x = np.where(active, y, x)
    else:
        raise AssertionError("isqrt: Newton did not settle within ISQRT_MAX_STEPS")  # the docstring's bound is wrong
    return np.where(n > 0, x, 0)
