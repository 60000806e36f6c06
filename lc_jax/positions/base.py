"""The interface every position scheme implements.

A scheme may touch three places, each an identity by default: the token
embeddings (learned, sinusoidal), q and k before attention (the RoPE family),
and a bias inside attention (ALiBi: a `masks.Bias` with fixed per-head parameters
that the kernels consume).
Positions are global token positions, so schemes stay right under packing
(positions restart per document) and ring sharding (shards carry offsets).
"""

from __future__ import annotations

import jax
from flax import nnx

from pallas_kernels.flash_attention.masks import Bias


class PositionScheme(nnx.Module):
    #: Largest position the scheme can represent, or None if unbounded.
    max_position: int | None = None

    def embed(self, x_BTE: jax.Array, pos_BT: jax.Array) -> jax.Array:
        return x_BTE

    def rotate(self, q_BTHD, k_BSKD, q_pos_BT, kv_pos_BS):
        return q_BTHD, k_BSKD

    def bias(self) -> tuple[Bias, jax.Array] | None:
        """(attention bias, its fixed parameters [H, bias.num_params]) or None: what the kernels add to the logits."""
        return None
