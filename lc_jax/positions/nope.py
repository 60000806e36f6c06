"""NoPE: no explicit positions; causal masking alone carries order (Kazemnejad et al., 2023).

Optional attention temperature tuning, as Llama 4 applies on its NoPE (global) layers: queries are scaled by
1 + attn_scale * log(floor((p + 1) / floor_scale) + 1) at position p, which is 1 for p < floor_scale - 1 (HF's
formula as written) and grows slowly after, sharpening the softmax over very long contexts. It follows Hugging Face
transformers' `Llama4TextAttention` (`attn_temperature_tuning`, `floor_scale` = 8192, `attn_scale` = 0.1 in
the released configs), where it multiplies the query states of the layers without RoPE; here it multiplies q
in f32, before the kernels' 1 / sqrt(D).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lc_jax import fields
from lc_jax.positions.base import PositionScheme


class NoPE(PositionScheme):
    FIELDS = dict(
        temperature_tuning=False,  # Llama 4: scale q by a slowly growing function of its position
        temperature_floor_scale=8192,  # positions per step of the floor (Llama 4: 8192)
        temperature_attn_scale=0.1,  # the log's weight (Llama 4: 0.1)
    )

    @classmethod
    def check(cls, cfg, *, head_dim: int | None) -> list[str]:
        p = []
        if not isinstance(cfg.get("temperature_tuning", False), bool):
            p.append(f"model.position.temperature_tuning={cfg.temperature_tuning!r}: must be True or False")
        if cfg.get("temperature_tuning", False):
            p += fields.positive("model.position.temperature_floor_scale", cfg.temperature_floor_scale)
            p += fields.positive("model.position.temperature_attn_scale", cfg.temperature_attn_scale,
                                 kind=(int, float))
        return p

    def __init__(self, *, temperature_tuning: bool = False, temperature_floor_scale: int = 8192,
                 temperature_attn_scale: float = 0.1):
        self.temperature_tuning = temperature_tuning
        self.floor_scale = temperature_floor_scale
        self.attn_scale = temperature_attn_scale

    def temperature(self, q_pos_BT: jax.Array) -> jax.Array:
        """f32 [B, T]: the factor on each query (1 everywhere without temperature tuning)."""
        p = q_pos_BT.astype(jnp.float32)
        return 1.0 + self.attn_scale * jnp.log(jnp.floor((p + 1.0) / self.floor_scale) + 1.0)

    def rotate(self, q_BTHD, k_BSKD, q_pos_BT, kv_pos_BS):
        if not self.temperature_tuning:
            return q_BTHD, k_BSKD
        scale_BT11 = self.temperature(q_pos_BT)[:, :, None, None]
        return (q_BTHD.astype(jnp.float32) * scale_BT11).astype(q_BTHD.dtype), k_BSKD
