"""Fixed sinusoidal embeddings (Vaswani et al., 2017): PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(.)."""

from __future__ import annotations

import jax.numpy as jnp

from lc_jax.positions.base import PositionScheme


def sinusoid_table(pos_BT, d_model: int, base: float = 10000.0):
    half = d_model // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / d_model)
    ang_BTF = pos_BT.astype(jnp.float32)[..., None] * inv_freq
    pe = jnp.stack([jnp.sin(ang_BTF), jnp.cos(ang_BTF)], axis=-1).reshape(*pos_BT.shape, 2 * half)
    if d_model % 2:
        pe = jnp.pad(pe, [(0, 0)] * (pe.ndim - 1) + [(0, 1)])
    return pe


class Sinusoidal(PositionScheme):
    def __init__(self, *, d_model: int, base: float = 10000.0):
        self.d_model = d_model
        self.base = float(base)

    def embed(self, x_BTE, pos_BT):
        return x_BTE + sinusoid_table(pos_BT, self.d_model, self.base).astype(x_BTE.dtype)
