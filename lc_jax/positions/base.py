"""The interface every position scheme implements.

A scheme may touch three places, each an identity by default: the token
embeddings (learned, sinusoidal), q and k before attention (the RoPE family),
and a bias inside attention (ALiBi: a `masks.Bias` with fixed per-head parameters
that the kernels consume).
Positions are global token positions, so schemes stay right under packing
(positions restart per document) and ring sharding (shards carry offsets).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
from flax import nnx

from pallas_kernels.flash_attention.masks import Bias


class PositionScheme(nnx.Module):
    #: The scheme's own fields under `model.position`, with their defaults (`name` aside). The config's
    #: `model.position` holds every scheme's fields; `lc_jax.positions.build` hands a scheme only its own.
    FIELDS: ClassVar[dict[str, Any]] = {}
    #: Largest position the scheme can represent, or None if unbounded.
    max_position: int | None = None

    @classmethod
    def check(cls, cfg, *, head_dim: int | None) -> list[str]:
        """One line per problem with this scheme's fields in `cfg` (`model.position`); [] when usable.

        `head_dim` is None when the model's dimensions are themselves invalid (reported elsewhere).
        """
        return []

    @classmethod
    def check_extension(cls, cfg, name: str, factor, *, field: str, factor_field: str,
                        head_dim: int | None) -> list[str]:
        """Problems with extending the context at evaluation by method `name` (`eval.position.scaling`)."""
        return [f"{field}={name!r} needs model.position.name='rope' (got {cfg.name!r}); "
                "scalings stretch RoPE frequencies"]

    def embed(self, x_BTE: jax.Array, pos_BT: jax.Array) -> jax.Array:
        return x_BTE

    def rotate(self, q_BTHD, k_BSKD, q_pos_BT, kv_pos_BS):
        return q_BTHD, k_BSKD

    def bias(self) -> tuple[Bias, jax.Array] | None:
        """(attention bias, its fixed parameters [H, bias.num_params]) or None: what the kernels add to the logits."""
        return None
