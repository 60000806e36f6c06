"""Learned absolute position embeddings (GPT-2). Cannot represent positions >= max_seq_len."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lc_jax.positions.base import PositionScheme


class Learned(PositionScheme):
    def __init__(self, *, d_model: int, max_seq_len: int, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.max_position = max_seq_len
        init = jax.nn.initializers.normal(stddev=0.1)
        self.table = nnx.Param(
            init(rngs.params(), (max_seq_len, d_model), param_dtype), out_sharding=(None, "embed")
        )

    def embed(self, x_BTE, pos_BT):
        # Positions past the table would be clamped silently by the gather; config
        # validation rejects such lengths before we get here.
        return x_BTE + jnp.take(self.table[...], pos_BT, axis=0).astype(x_BTE.dtype)
