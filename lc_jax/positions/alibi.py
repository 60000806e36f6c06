"""ALiBi (Press et al., 2022): a per-head linear distance penalty added to the logits, no embeddings.

Slopes form the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8) for n a
power of two. For other n the paper takes the slopes of the closest smaller
power of two m, then every other slope of 2m to fill the remaining n - m.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lc_jax.positions.base import PositionScheme
from pallas_kernels.flash_attention.masks import ALIBI


def _pow2_slopes(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]


def alibi_slopes(num_heads: int) -> np.ndarray:
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    m = 2 ** math.floor(math.log2(num_heads))
    slopes = _pow2_slopes(m)
    if m < num_heads:
        slopes += _pow2_slopes(2 * m)[0::2][: num_heads - m]
    return np.asarray(slopes, np.float32)


class ALiBi(PositionScheme):
    def __init__(self, *, num_heads: int):
        self.num_heads = num_heads

    def bias(self):
        return ALIBI, jnp.asarray(alibi_slopes(self.num_heads))[:, None]
