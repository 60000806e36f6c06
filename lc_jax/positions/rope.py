"""Rotary position embedding (Su et al., 2021, arXiv:2104.09864).

Pairs of q/k dimensions are rotated by angle p * inv_freq_i, so that q_t . k_s
depends on t - s only. Layout 'half' pairs dim i with i + d/2 (rotate-half,
GPT-NeoX / Llama); 'interleaved' pairs 2i with 2i+1 (the paper, GPT-J).

Two ways to rotate only part of each head:
  * `fraction_mode='rotary_dims'` (partial RoPE, GPT-NeoX `rotary_pct`): rotate the
    first `fraction * head_dim` dims, with frequencies computed from that rotated width;
  * `fraction_mode='p_rope'` (p-RoPE, Barbero et al., 2024, arXiv:2410.06205): frequencies
    from the full width, keep the `fraction` highest and set the lowest to zero, so
    those pairs carry no position (they become NoPE channels).

Context-extension scalings (`scaling.name`: linear, ntk, dynamic_ntk, yarn,
yarn_ratio_ramp, llama3) live in `rope_scaling.py`; they change the frequencies and
may scale q and k. `hf.py` reads and writes Hugging Face `rope_scaling` dictionaries.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lc_jax.positions import rope_scaling
from lc_jax.positions.base import PositionScheme

LAYOUTS = ("half", "interleaved")
FRACTION_MODES = ("rotary_dims", "p_rope")


def rotary_dim(head_dim: int, fraction: float, fraction_mode: str = "rotary_dims") -> int:
    """Rotated width: the fraction of head_dim (rounded down to even), or all of it for p-RoPE."""
    if fraction_mode == "p_rope":
        return head_dim // 2 * 2
    return int(head_dim * fraction) // 2 * 2


def rope_inv_freq(rot_dim: int, theta: float) -> np.ndarray:
    """inv_freq_i = theta^(-2i / rot_dim), i = 0 .. rot_dim/2 - 1 (float64 for exact tests)."""
    return theta ** (-np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)


def p_rope_keep(rot_dim: int, fraction: float) -> np.ndarray:
    """Mask of the frequencies p-RoPE keeps: the highest `fraction` of them (lowest indices i).

    The count truncates, `int(p * head_dim // 2)`, as `apply_p_rope` in the paper's code
    (Barbero et al., "Round and Round We Go! What makes Rotary Positional Encodings
    useful?", arXiv:2410.06205, appendix): p = 0.45 of 16 dims is 3.6 pairs and keeps 3 (rounding kept 4).
    """
    return np.arange(rot_dim // 2) < int(fraction * rot_dim // 2)


def apply_rope(x_BTHD, pos_BT, inv_freq_F, layout: str = "half", mscale: float = 1.0):
    """Rotate the first 2F dims of x by pos * inv_freq (and scale them by mscale); the rest pass through."""
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
        raise ValueError(f"model.position.layout={layout!r} is not one of {LAYOUTS}")
    if mscale != 1.0:
        rot = rot * mscale
    return jnp.concatenate([rot, x_pass], axis=-1).astype(x_BTHD.dtype)


class RoPE(PositionScheme):
    FIELDS = dict(
        theta=10000.0,  # the base of the frequencies
        layout="half",  # half (rotate-half, GPT-NeoX / Llama) | interleaved (the paper, GPT-J)
        fraction=1.0,  # share of each head that rotates
        fraction_mode="rotary_dims",  # rotary_dims (partial RoPE) | p_rope (keep the highest frequencies)
        # Context extension: none | linear | ntk | dynamic_ntk | yarn | yarn_ratio_ramp | llama3
        # (rope_scaling.py; Hugging Face presets: lc_jax.positions.hf.preset). Fields: rope_scaling.FIELD_DEFAULTS.
        scaling=dict(rope_scaling.FIELD_DEFAULTS),
    )

    @classmethod
    def check(cls, cfg, *, head_dim: int | None) -> list[str]:
        p = []
        if not (isinstance(cfg.theta, (int, float)) and cfg.theta > 1):
            p.append(f"model.position.theta={cfg.theta!r}: must be a number > 1")
        if cfg.layout not in LAYOUTS:
            p.append(f"model.position.layout={cfg.layout!r}: allowed values are {list(LAYOUTS)}")
        if not (isinstance(cfg.fraction, (int, float)) and 0 < cfg.fraction <= 1):
            p.append(f"model.position.fraction={cfg.fraction!r}: must be in (0, 1]")
        elif head_dim is not None and head_dim % 2 == 0 and int(head_dim * cfg.fraction) < 2:
            p.append(f"model.position.fraction={cfg.fraction}: rotates fewer than 2 of {head_dim} dims")
        if head_dim is not None and head_dim % 2:
            p.append(f"head_dim={head_dim} must be even for model.position.name='rope'")
        if cfg.fraction_mode not in FRACTION_MODES:
            p.append(f"model.position.fraction_mode={cfg.fraction_mode!r}: allowed values are {list(FRACTION_MODES)}")
        sc = cfg.scaling
        return p + cls.check_extension(cfg, sc.name, sc.factor, field="model.position.scaling.name",
                                       factor_field="model.position.scaling.factor", head_dim=head_dim)

    @classmethod
    def check_extension(cls, cfg, name: str, factor, *, field: str, factor_field: str,
                        head_dim: int | None) -> list[str]:
        rot_dim = None
        if head_dim is not None and isinstance(cfg.fraction, (int, float)) and cfg.fraction_mode in FRACTION_MODES:
            rot_dim = rotary_dim(head_dim, cfg.fraction, cfg.fraction_mode)
        return rope_scaling.check(name, factor, cfg.scaling, field=field, factor_field=factor_field, rot_dim=rot_dim)

    def __init__(self, *, head_dim: int, theta: float = 10000.0, layout: str = "half", fraction: float = 1.0,
                 fraction_mode: str = "rotary_dims", scaling=None):
        if fraction_mode not in FRACTION_MODES:
            raise ValueError(f"model.position.fraction_mode={fraction_mode!r} is not one of {FRACTION_MODES}")
        self.theta, self.layout = float(theta), layout
        self.rot_dim = rotary_dim(head_dim, fraction, fraction_mode)
        self.keep = p_rope_keep(self.rot_dim, fraction) if fraction_mode == "p_rope" else None
        self.scaling = rope_scaling.resolve(dict(scaling or {"name": "none"}))

    def frequencies(self, current_len=None) -> rope_scaling.Scaled:
        """(inv_freq, mscale, logit_scale) after scaling; `current_len` feeds dynamic NTK."""
        s = dict(self.scaling)
        name = s.pop("name")
        scaled = rope_scaling.REGISTRY[name](
            rope_inv_freq(self.rot_dim, self.theta), rot_dim=self.rot_dim, theta=self.theta,
            current_len=current_len, **s)
        if self.keep is not None:
            scaled = scaled._replace(inv_freq=scaled.inv_freq * self.keep)
        return scaled

    def rotate(self, q_BTHD, k_BSKD, q_pos_BT, kv_pos_BS, current_len=None):
        """Rotate q and k; `current_len` (dynamic NTK) defaults to the largest position + 1 seen here."""
        if current_len is None:
            current_len = jnp.maximum(q_pos_BT.max(), kv_pos_BS.max()) + 1
        inv_freq, mscale, logit_scale = self.frequencies(current_len)
        q = apply_rope(q_BTHD, q_pos_BT, inv_freq, self.layout, mscale)
        k = apply_rope(k_BSKD, kv_pos_BS, inv_freq, self.layout, mscale)
        if logit_scale != 1.0:  # every logit, as a softmax-scale factor: on q alone, all dims
            q = (q.astype(jnp.float32) * logit_scale).astype(q.dtype)
        return q, k
