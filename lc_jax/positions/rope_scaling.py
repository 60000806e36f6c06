"""RoPE context-extension scalings: each maps the base inverse frequencies to new ones (and logit factors).

Notation: d = rotated width, b = theta, s = scale factor, L = original
(pretraining) context length, inv_freq_i = b^(-2i/d) for i = 0 .. d/2-1, and
wavelength lambda_i = 2 pi / inv_freq_i. Every function returns a `Scaled`:
the new inverse frequencies, `mscale`, which multiplies the rotated dims of q and k
(Hugging Face's `attention_factor`, applied to cos and sin), and `logit_scale`,
which multiplies every logit (DeepSeek's softmax-scale correction). With s = 1
every method returns plain RoPE exactly.

Each method follows the reference code that released models load, cited in its
docstring; `yarn_ratio_ramp` keeps the YaRN paper's literal ramp for ablations.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

SCALINGS = ("none", "linear", "ntk", "dynamic_ntk", "yarn", "yarn_ratio_ramp", "llama3")
#: Methods whose frequencies depend on the pretraining length L (`original_max_len`).
NEEDS_ORIGINAL_LEN = ("dynamic_ntk", "yarn", "yarn_ratio_ramp", "llama3")
#: `model.position.scaling` fields at their unset values; configs/base.py, hf.py and saved-config upgrades share them.
#: factor 0: the method's default (1; llama3: 8); original_max_len 0: data.seq_len (llama3: 8192);
#: beta_fast / beta_slow: rotations bounding YaRN's ramp; mscale, mscale_all_dim, attention_factor: 0 = unset,
#: as in Hugging Face's rope_scaling; truncate: floor/ceil the ramp ends (gpt-oss: False); llama3's band factors.
FIELD_DEFAULTS = dict(name="none", factor=0.0, original_max_len=0, beta_fast=32.0, beta_slow=1.0, mscale=0.0,
                      mscale_all_dim=0.0, attention_factor=0.0, truncate=True, low_freq_factor=1.0,
                      high_freq_factor=4.0)


def check(name: str, factor, sc, *, field: str, factor_field: str, rot_dim: int | None) -> list[str]:
    """Problems with scaling `name` at `factor`, its other fields read from `sc`; `rot_dim` is the rotated width."""
    p = []
    if name not in SCALINGS:
        p.append(f"{field}={name!r}: allowed values are {list(SCALINGS)}")
    if not (isinstance(factor, (int, float)) and (factor == 0 or factor >= 1)):
        p.append(f"{factor_field}={factor!r}: must be >= 1 (0: the method's default)")
    if name in ("yarn", "yarn_ratio_ramp") and not 0 < sc.beta_slow < sc.beta_fast:
        p.append(f"model.position.scaling.beta_slow={sc.beta_slow}, beta_fast={sc.beta_fast}: "
                 "need 0 < beta_slow < beta_fast (rotations over the original context; reference 1 and 32)")
    for f in ("mscale", "mscale_all_dim", "attention_factor"):
        if not (isinstance(sc[f], (int, float)) and sc[f] >= 0):
            p.append(f"model.position.scaling.{f}={sc[f]!r}: must be a number >= 0 (0: unset)")
    if name == "llama3" and not sc.low_freq_factor < sc.high_freq_factor:
        p.append(f"model.position.scaling.low_freq_factor={sc.low_freq_factor} must be < "
                 f"high_freq_factor={sc.high_freq_factor}")
    if name in ("ntk", "dynamic_ntk") and rot_dim is not None and rot_dim <= 2:
        p.append(f"{field}={name!r} needs a rotated width > 2 (the exponent is d / (d - 2))")
    return p


class Scaled(NamedTuple):
    inv_freq: Any
    mscale: float = 1.0  # multiplies the rotated dims of q and of k: logits scale by mscale^2
    logit_scale: float = 1.0  # multiplies every logit (all dims), as a softmax-scale factor would


def none(inv_freq, **_) -> Scaled:
    return Scaled(inv_freq)


def linear(inv_freq, *, factor: float, **_) -> Scaled:
    """Position Interpolation (Chen et al., 2023, arXiv:2306.15595): positions p -> p / s, i.e. inv_freq / s.

    Matches `_compute_linear_scaling_rope_parameters` (huggingface/transformers,
    src/transformers/modeling_rope_utils.py).
    """
    return Scaled(inv_freq / factor)


def ntk(inv_freq, *, factor: float, rot_dim: int, theta: float, **_) -> Scaled:
    """NTK-aware base change (bloc97, 2023; YaRN paper eq. 15): b' = b * s^(d / (d - 2)).

    Matches `_compute_ntk_parameters` (transformers, modeling_rope_utils.py) without a length.
    """
    base = theta * factor ** (rot_dim / (rot_dim - 2))
    return Scaled(base ** (-np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim))


def dynamic_ntk(inv_freq, *, factor: float, rot_dim: int, theta: float, original_max_len: int, current_len,
                **_) -> Scaled:
    """Dynamic NTK (emozilla, 2023; YaRN paper sec. 3.3): the base grows with the current length l,
    b' = b * ((s * l / L) - (s - 1))^(d / (d - 2)), with l = max(current length, L), so nothing
    changes up to L. `current_len` may be traced (max position + 1 of the batch).

    Matches `_compute_dynamic_ntk_parameters` (transformers, modeling_rope_utils.py), where L is
    `max_position_embeddings`. Departure, named: lc_jax caches keys *before* rotation and
    rotates them with the current base at every step, so all keys share one base (Hugging
    Face caches rotated keys, which mixes bases across decoding steps).
    """
    l = jnp.maximum(jnp.asarray(current_len, jnp.float32), original_max_len)
    base = theta * ((factor * l / original_max_len) - (factor - 1)) ** (rot_dim / (rot_dim - 2))
    exponents = -jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim
    return Scaled(base**exponents)


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """0.1 * mscale * ln(s) + 1 for s > 1, else 1 (YaRN eq. 22 with DeepSeek's `mscale` multiplier).

    As `get_mscale` in `_compute_yarn_parameters` (transformers) and `yarn_get_mscale`
    (deepseek-ai/DeepSeek-V3, inference/model.py).
    """
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def yarn_correction_dim(num_rotations: float, rot_dim: int, theta: float, original_max_len: int) -> float:
    """The (fractional) dimension index whose pair turns `num_rotations` times over L tokens.

    Inverts r = L / lambda_i for i: `find_correction_dim` in jquesnelle/yarn,
    scaled_rope/LlamaYaRNScaledRotaryEmbedding.py (`_yarn_find_correction_dim`).
    """
    return (rot_dim * math.log(original_max_len / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))


def yarn_extrapolation_share(rot_dim: int, theta: float, original_max_len: int, beta_fast: float,
                             beta_slow: float, truncate: bool = True) -> np.ndarray:
    """Per pair, the share of the original frequency kept (1: extrapolate, 0: interpolate by s).

    The ramp is linear in the dimension index between low = floor(dim(beta_fast)) and
    high = ceil(dim(beta_slow)), clamped to [0, d - 1] (`_yarn_find_correction_range`,
    `_yarn_linear_ramp_mask` in jquesnelle/yarn; `find_correction_range` and
    `linear_ramp_factor` in transformers' `_compute_yarn_parameters`; `truncate=False`,
    gpt-oss, skips the floor / ceil).
    """
    low = yarn_correction_dim(beta_fast, rot_dim, theta, original_max_len)
    high = yarn_correction_dim(beta_slow, rot_dim, theta, original_max_len)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = np.clip((np.arange(rot_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    return 1.0 - ramp.astype(np.float64)


def yarn(inv_freq, *, factor: float, original_max_len: int, rot_dim: int, theta: float, beta_fast: float = 32.0,
         beta_slow: float = 1.0, mscale: float = 0.0, mscale_all_dim: float = 0.0, attention_factor: float = 0.0,
         truncate: bool = True, **_) -> Scaled:
    """YaRN (Peng et al., 2023, arXiv:2309.00071) as released YaRN models compute it.

    "NTK-by-parts" interpolation plus a temperature. Pairs that turn more than
    beta_fast times over the original context keep their frequency, pairs that turn
    fewer than beta_slow times are interpolated like PI (inv_freq / s), and a ramp
    that is linear in the *dimension index* blends in between:
    inv_freq'_i = (1 - e_i) * inv_freq_i / s + e_i * inv_freq_i (`yarn_extrapolation_share`).

    Reference: jquesnelle/yarn, scaled_rope/LlamaYaRNScaledRotaryEmbedding.py
    (`LlamaYaRNScaledRotaryEmbedding.yarn`), and `_compute_yarn_parameters` in
    huggingface/transformers, src/transformers/modeling_rope_utils.py, line for line.

    Temperature: q and k are scaled by `attention_factor`, or, where it is 0,
    get_mscale(s, mscale) / get_mscale(s, mscale_all_dim) when both are set, else
    get_mscale(s) = 0.1 ln s + 1 (transformers). DeepSeek-V3 sets mscale = mscale_all_dim
    and multiplies its softmax scale by get_mscale(s, mscale_all_dim)^2 in the attention
    (deepseek-ai/DeepSeek-V3, inference/model.py, `MLA.__init__`); that factor is `logit_scale`.
    """
    share = yarn_extrapolation_share(rot_dim, theta, original_max_len, beta_fast, beta_slow, truncate)
    new = np.asarray(inv_freq) / factor * (1 - share) + np.asarray(inv_freq) * share
    if attention_factor:
        q_k_scale = float(attention_factor)
    elif mscale and mscale_all_dim:
        q_k_scale = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    else:
        q_k_scale = yarn_get_mscale(factor)
    logit_scale = yarn_get_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0
    return Scaled(new, q_k_scale, logit_scale)


def yarn_ratio_ramp(inv_freq, *, factor: float, original_max_len: int, beta_fast: float = 32.0,
                    beta_slow: float = 1.0, **_) -> Scaled:
    """The YaRN paper's equations taken literally (arXiv:2309.00071, eqs. 17-18, 22), for ablations.

    The ramp is linear in r_i = L / lambda_i (rotations over the original context),
    gamma(r) = clip((r - beta_slow) / (beta_fast - beta_slow), 0, 1), not in the
    dimension index. This is *not* what released YaRN models use (`yarn` is); it
    moves 11-25 frequencies by up to 67% at common settings. Temperature: 0.1 ln s + 1.
    """
    r = original_max_len * np.asarray(inv_freq) / (2 * math.pi)
    gamma = np.clip((r - beta_slow) / (beta_fast - beta_slow), 0.0, 1.0)
    return Scaled((1 - gamma) * inv_freq / factor + gamma * inv_freq, yarn_get_mscale(factor))


def llama3(inv_freq, *, factor: float = 8.0, original_max_len: int = 8192, low_freq_factor: float = 1.0,
           high_freq_factor: float = 4.0, **_) -> Scaled:
    """Llama 3.1's rule (Meta, 2024): `apply_scaling` in meta-llama/llama-models,
    models/llama3/reference_impl/model.py; `_compute_llama3_parameters` in transformers.

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
    return Scaled(out)


REGISTRY = {"none": none, "linear": linear, "ntk": ntk, "dynamic_ntk": dynamic_ntk, "yarn": yarn,
            "yarn_ratio_ramp": yarn_ratio_ramp, "llama3": llama3}
assert set(REGISTRY) == set(SCALINGS)

#: Method defaults, used where the config leaves factor / original_max_len at 0.
DEFAULTS = {"llama3": {"factor": 8.0, "original_max_len": 8192}}


def resolve(scaling: dict, *, train_seq_len: int | None = None) -> dict:
    """Fill 0-valued factor / original_max_len from the method's defaults (original length: training length).

    A method in NEEDS_ORIGINAL_LEN whose length is still 0 afterwards is an error:
    frequencies must not depend on whether some caller filled the field in.
    """
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
    if name in NEEDS_ORIGINAL_LEN and not out.get("original_max_len"):
        raise ValueError(
            f"model.position.scaling.original_max_len={scaling.get('original_max_len', 0)!r}: {name!r} needs the "
            "pretraining context length (> 0); set it, or pass the config through lc_jax.config.resolve, "
            "which sets it to data.seq_len")
    return out
