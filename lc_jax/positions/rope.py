"""Rotary position embedding (Su et al., 2021).

Pairs of q/k dimensions are rotated by angle p * inv_freq_i, so that q_t . k_s
depends on t - s only. `fraction` < 1 gives partial RoPE (GPT-NeoX): only the
first `fraction * head_dim` dimensions rotate, with frequencies computed from
that rotated width. Layout 'half' pairs dim i with i + d/2 (rotate-half,
Llama/NeoX); 'interleaved' pairs 2i with 2i+1 (the paper, GPT-J).

Context-extension scalings change `inv_freq` (and may add an attention factor);
they plug in through `scaling` (see `lc_jax/positions/scaling.py` once added).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lc_jax.positions.base import PositionScheme

LAYOUTS = ("half", "interleaved")


def rotary_dim(head_dim: int, fraction: float) -> int:
    """Rotated width: fraction of head_dim, rounded down to an even number."""
    return int(head_dim * fraction) // 2 * 2


def rope_inv_freq(rot_dim: int, theta: float) -> np.ndarray:
    """inv_freq_i = theta^(-2i / rot_dim), i = 0 .. rot_dim/2 - 1 (float64 for exact tests)."""
    return theta ** (-np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)


def apply_rope(x_BTHD, pos_BT, inv_freq_F, layout: str = "half", mscale: float = 1.0):
    """Rotate the first 2F dims of x by pos * inv_freq; the rest pass through. Math in f32."""
    F = inv_freq_F.shape[0]
    if F == 0:
        return x_BTHD
    x = x_BTHD.astype(jnp.float32)
    x_rot, x_pass = x[..., : 2 * F], x[..., 2 * F :]
    ang_BTF = pos_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_F, jnp.float32)
    cos, sin = jnp.cos(ang_BTF)[:, :, None, :], jnp.sin(ang_BTF)[:, :, None, :]
    if layout == "half":
        x1, x2 = x_rot[..., :F], x_rot[..., F:]
        rot = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    elif layout == "interleaved":
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rot = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x_rot.shape)
    else:
        raise ValueError(f"rope layout={layout!r} is not one of {LAYOUTS}")
    if mscale != 1.0:
        rot = rot * mscale
    return jnp.concatenate([rot, x_pass], axis=-1).astype(x_BTHD.dtype)


class RoPE(PositionScheme):
    def __init__(self, *, head_dim: int, theta: float = 10000.0, layout: str = "half",
                 fraction: float = 1.0, **_unused):
        self.head_dim = head_dim
        self.theta = float(theta)
        self.layout = layout
        self.rot_dim = rotary_dim(head_dim, fraction)

    def inv_freq(self) -> np.ndarray:
        return rope_inv_freq(self.rot_dim, self.theta)

    def rotate(self, q_BTHD, k_BSKD, q_pos_BT, kv_pos_BS):
        inv_freq = self.inv_freq()
        q = apply_rope(q_BTHD, q_pos_BT, inv_freq, self.layout)
        k = apply_rope(k_BSKD, kv_pos_BS, inv_freq, self.layout)
        return q, k


