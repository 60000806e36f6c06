"""RoPE context-extension scalings: each maps the base inverse frequencies to new ones (and a logit factor).

Notation: d = rotated width, b = theta, s = scale factor, L = original
(pretraining) context length, inv_freq_i = b^(-2i/d) for i = 0 .. d/2-1, and
wavelength lambda_i = 2 pi / inv_freq_i. Every function returns
(inv_freq, mscale) where mscale multiplies both q and k, so logits scale by mscale^2.
With s = 1 every method returns plain RoPE exactly.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

SCALINGS = ("none", "linear", "ntk", "dynamic_ntk", "yarn", "llama3")


def none(inv_freq, **_):
    return inv_freq, 1.0


def linear(inv_freq, *, factor: float, **_):
    """Position Interpolation (Chen et al., 2023, arXiv:2306.15595): positions p -> p / s, i.e. inv_freq / s."""
    return inv_freq / factor, 1.0


def ntk(inv_freq, *, factor: float, rot_dim: int, theta: float, **_):
    """NTK-aware base change (bloc97, 2023; YaRN paper eq. 15): b' = b * s^(d / (d - 2))."""
    base = theta * factor ** (rot_dim / (rot_dim - 2))
    return base ** (-np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim), 1.0


def dynamic_ntk(inv_freq, *, factor: float, rot_dim: int, theta: float, original_max_len: int, current_len, **_):
    """Dynamic NTK (emozilla, 2023; YaRN paper sec. 3.3): the base grows with the current length l,
    b' = b * ((s * l / L) - (s - 1))^(d / (d - 2)), with l = max(current length, L), so nothing
    changes up to L. `current_len` may be traced (max position + 1 of the batch).

    KV cache: lc_jax caches keys *before* rotation and rotates them with the current base at
    every step, so all keys share one base (Hugging Face caches rotated keys, which mixes bases).
    """
    l = jnp.maximum(jnp.asarray(current_len, jnp.float32), original_max_len)
    base = theta * ((factor * l / original_max_len) - (factor - 1)) ** (rot_dim / (rot_dim - 2))
    exponents = -jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim
    return base**exponents, 1.0


def yarn_ramp(r, alpha: float, beta: float):
    """gamma(r) = 0 for r < alpha, 1 for r > beta, linear in between (YaRN eq. 18)."""
    return np.clip((r - alpha) / (beta - alpha), 0.0, 1.0)


def yarn_mscale(factor: float) -> float:
    """YaRN's attention temperature: sqrt(1/t) = 0.1 ln(s) + 1 (eq. 22), applied to q and k."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def yarn(inv_freq, *, factor: float, original_max_len: int, alpha: float = 1.0, beta: float = 32.0, **_):
    """YaRN (Peng et al., 2023, arXiv:2309.00071): "NTK-by-parts" interpolation plus a temperature.

    With r_i = L / lambda_i rotations over the original context, dims that rotate
    many times (r > beta) keep their frequency, dims that rotate less than alpha
    times are interpolated like PI (inv_freq / s), and the ramp gamma blends between:
    inv_freq'_i = (1 - gamma(r_i)) * inv_freq_i / s + gamma(r_i) * inv_freq_i.
    """
    r = original_max_len * np.asarray(inv_freq) / (2 * math.pi)
    gamma = yarn_ramp(r, alpha, beta)
    return (1 - gamma) * inv_freq / factor + gamma * inv_freq, yarn_mscale(factor)


def llama3(inv_freq, *, factor: float = 8.0, original_max_len: int = 8192, low_freq_factor: float = 1.0,
           high_freq_factor: float = 4.0, **_):
    """Llama 3.1's rule (Meta, 2024; `apply_scaling` in the llama-models reference code).

    Wavelengths shorter than L / high_freq_factor keep their frequency, longer than
    L / low_freq_factor are divided by `factor`, and in between
    smooth = (L / lambda - low) / (high - low) blends:
    inv_freq' = (1 - smooth) * inv_freq / factor + smooth * inv_freq.
    """
    with np.errstate(divide="ignore"):  # p-RoPE's zeroed frequencies have infinite wavelength
        wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original_max_len / low_freq_factor, original_max_len / high_freq_factor
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = np.where(wavelen < high_wavelen, inv_freq, np.where(wavelen > low_wavelen, inv_freq / factor, blended))
    return out, 1.0


REGISTRY = {"none": none, "linear": linear, "ntk": ntk, "dynamic_ntk": dynamic_ntk, "yarn": yarn, "llama3": llama3}

#: Method defaults, used where the config leaves factor / original_max_len at 0.
DEFAULTS = {"llama3": {"factor": 8.0, "original_max_len": 8192}}


def resolve(scaling: dict, *, train_seq_len: int | None = None) -> dict:
    """Fill 0-valued factor / original_max_len from the method's defaults (original length: training length)."""
    out = dict(scaling)
    name = out.get("name", "none")
    for key in ("factor", "original_max_len"):
        if not out.get(key):
            if key in DEFAULTS.get(name, {}):
                out[key] = DEFAULTS[name][key]
            elif key == "original_max_len" and train_seq_len:
                out[key] = train_seq_len
            elif key == "factor":
                out[key] = 1.0
    return out
