"""Position schemes and the DSA indexer against the reference code released models use.

Each `reference_*` function below transcribes the cited source line by line (numpy
for torch), so a reader can check it against that source; lc_jax's own code is
never used to compute an expected value. Tolerances: the references compute in
float32 (torch's default), lc_jax in float64, so frequencies agree to ~1e-7
relative; rtol 1e-6 leaves room for that and nothing else.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from lc_jax import config as config_lib
from lc_jax import positions
from lc_jax import state as state_lib
from lc_jax.attention import dsa
from lc_jax.model import Transformer
from lc_jax.positions import hf
from lc_jax.positions.rope import RoPE, p_rope_keep

RTOL = 1e-6


# ----------------------------------------------------------------------------- references, transcribed


def reference_yarn(dim, base, factor, original_max_position_embeddings, beta_fast=None, beta_slow=None,
                   mscale=None, mscale_all_dim=None, attention_factor=None, truncate=True):
    """transformers, src/transformers/modeling_rope_utils.py, `_compute_yarn_parameters` (the body after
    reading the config), with jquesnelle/yarn's `_yarn_find_correction_range` / `_yarn_linear_ramp_mask`."""

    def get_mscale(scale, mscale=1):
        if scale <= 1:
            return 1.0
        return 0.1 * mscale * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = beta_fast or 32
    beta_slow = beta_slow or 1

    def find_correction_dim(num_rotations, dim, base, max_position_embeddings):
        return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    def find_correction_range(low_rot, high_rot, dim, base, max_position_embeddings, truncate):
        low = find_correction_dim(low_rot, dim, base, max_position_embeddings)
        high = find_correction_dim(high_rot, dim, base, max_position_embeddings)
        if truncate:
            low = math.floor(low)
            high = math.ceil(high)
        return max(low, 0), min(high, dim - 1)

    def linear_ramp_factor(min, max, dim):
        if min == max:
            max += 0.001
        linear_func = (np.arange(dim, dtype=np.float32) - min) / (max - min)
        return np.clip(linear_func, 0, 1)

    pos_freqs = base ** (np.arange(0, dim, 2).astype(np.float32) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    low, high = find_correction_range(beta_fast, beta_slow, dim, base, original_max_position_embeddings, truncate)
    inv_freq_extrapolation_factor = 1 - linear_ramp_factor(low, high, dim // 2)
    inv_freq = (inv_freq_interpolation * (1 - inv_freq_extrapolation_factor)
                + inv_freq_extrapolation * inv_freq_extrapolation_factor)
    return inv_freq, attention_factor


def reference_deepseek_softmax_scale_factor(factor, mscale_all_dim):
    """deepseek-ai/DeepSeek-V3, inference/model.py, `MLA.__init__`: softmax_scale *= mscale * mscale."""
    mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
    return mscale * mscale


def reference_llama3(freqs, scale_factor, low_freq_factor, high_freq_factor, old_context_len):
    """meta-llama/llama-models, models/llama3/reference_impl/model.py, `apply_scaling`."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return np.array(new_freqs)


def reference_p_rope_inv_freq(head_dim, max_wavelength, rope_percentage):
    """`apply_p_rope`, appendix of Barbero et al., "Round and Round We Go!" (arXiv:2410.06205):
    the timescales it pads with inf, as inverse frequencies (1 / inf = 0)."""
    rope_angles = int(rope_percentage * head_dim // 2)
    nope_angles = head_dim // 2 - rope_angles
    fraction = 2.0 * np.arange(0, rope_angles) / head_dim
    timescale = max_wavelength**fraction
    timescale = np.pad(timescale, (0, nope_angles), mode="constant", constant_values=(0, np.inf))
    return 1.0 / timescale, rope_angles


def reference_indexer_key_norm(k, weight, bias, eps=1e-6):
    """deepseek-ai/DeepSeek-V3.2-Exp, inference/model.py: `Indexer.k_norm` is its `LayerNorm`,
    F.layer_norm(x.float(), (dim,), weight, bias, eps): biased variance over the last axis."""
    x = k.astype(np.float32)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


# ----------------------------------------------------------------------------- YaRN


YARN_CASES = [  # (dim, base, factor, original length, extra rope_scaling fields)
    (8, 10000.0, 4.0, 64, {}),
    (128, 10000.0, 16.0, 4096, {}),  # YaRN's Llama-2 64K/128K models use s = 16 / 32 over 4096
    (128, 10000.0, 32.0, 4096, {}),
    (128, 1000000.0, 4.0, 32768, {}),  # Qwen2.5 / Qwen3
    (64, 10000.0, 40.0, 4096, {"mscale": 1.0, "mscale_all_dim": 1.0}),  # DeepSeek-V3
    (64, 150000.0, 32.0, 4096, {"truncate": False}),  # gpt-oss
    (96, 10000.0, 8.0, 2048, {"beta_fast": 16.0, "beta_slow": 2.0}),
    (128, 10000.0, 4.0, 4096, {"attention_factor": 1.5}),
]


@pytest.mark.parametrize("dim,base,factor,original,extra", YARN_CASES)
def test_yarn_matches_reference(dim, base, factor, original, extra):
    want, want_attention = reference_yarn(dim, base, factor, original, **extra)
    rope = RoPE(head_dim=dim, theta=base, scaling=dict(name="yarn", factor=factor, original_max_len=original,
                                                        **extra))
    inv, mscale, logit_scale = rope.frequencies()
    np.testing.assert_allclose(inv, want, rtol=RTOL)
    assert mscale == pytest.approx(want_attention, rel=1e-12)
    want_logit = reference_deepseek_softmax_scale_factor(factor, extra["mscale_all_dim"]) \
        if extra.get("mscale_all_dim") else 1.0
    assert logit_scale == pytest.approx(want_logit, rel=1e-12)


def test_yarn_departs_from_the_ratio_ramp_where_the_issue_says():
    # Llama-2 at s = 16 over 4096: the index ramp and the paper's ratio ramp differ in many pairs
    index, _ = reference_yarn(128, 10000.0, 16.0, 4096)
    ratio = RoPE(head_dim=128, scaling=dict(name="yarn_ratio_ramp", factor=16.0, original_max_len=4096))
    rel = np.abs(np.asarray(ratio.frequencies().inv_freq) - index) / index
    assert (rel > 1e-3).sum() >= 10 and rel.max() > 0.3


def test_deepseek_logits_scale_like_the_reference():
    # at position 0 RoPE is the identity, so q . k is scaled only by mscale^2 * logit_scale;
    # DeepSeek-V3 scales every logit by (0.1 ln 40 + 1)^2 in total
    rope = RoPE(head_dim=64, **{k: v for k, v in hf.preset("deepseek-v3-yarn").position.items() if k != "name"})
    q, k = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 3, 1, 64))
    pos = jnp.zeros((1, 3), jnp.int32)
    qr, kr = rope.rotate(q, k, pos, pos)
    want = (0.1 * math.log(40) + 1) ** 2 * jnp.einsum("bthd,bshd->ts", q, k)
    np.testing.assert_allclose(jnp.einsum("bthd,bshd->ts", qr, kr), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- p-RoPE


@pytest.mark.parametrize("head_dim,p", [(16, 0.5), (16, 0.45), (32, 0.3), (20, 0.25), (12, 0.75), (64, 0.1),
                                        (128, 0.25), (10, 0.9)])
def test_p_rope_matches_reference(head_dim, p):
    want, kept = reference_p_rope_inv_freq(head_dim, 10000.0, p)
    assert p_rope_keep(head_dim, p).sum() == kept
    inv = RoPE(head_dim=head_dim, fraction=p, fraction_mode="p_rope").frequencies().inv_freq
    np.testing.assert_allclose(inv, want, rtol=1e-12)


def test_p_rope_truncates_where_rounding_kept_one_more():
    # 0.45 x 16 / 2 = 3.6 pairs: the paper's code keeps 3 (rounding kept 4); 0.3 x 32 / 2 = 4.8 -> 4
    assert p_rope_keep(16, 0.45).sum() == 3 and p_rope_keep(32, 0.3).sum() == 4


# ----------------------------------------------------------------------------- llama3, linear, dynamic


def test_llama3_matches_reference():
    base = 500000.0 ** (-np.arange(0, 128, 2, dtype=np.float64) / 128)
    want = reference_llama3(base, 8.0, 1.0, 4.0, 8192)
    p = hf.preset("llama3.1")
    inv = RoPE(head_dim=p.head_dim, **{k: v for k, v in p.position.items() if k != "name"}).frequencies().inv_freq
    np.testing.assert_allclose(inv, want, rtol=1e-12)


# ----------------------------------------------------------------------------- the indexer's key


def test_indexer_key_is_layernorm_like_the_reference():
    k = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)  # mean 2.5, var 1.25: (k - 2.5) / sqrt(1.25 + 1e-6)
    w, b = np.array([1.0, 2.0, 0.5, 1.0], np.float32), np.array([0.0, 0.1, -0.2, 0.3], np.float32)
    want = reference_indexer_key_norm(k, w, b)
    np.testing.assert_allclose(want[0], np.array([-1.3416402, -0.4472134, 0.4472134, 1.3416402]) * w + b, atol=1e-6)
    np.testing.assert_allclose(dsa.index_key_norm(jnp.asarray(k), w, b), want, rtol=1e-6)

    E, d = 24, 16
    with nnx.use_eager_sharding(False):
        indexer = dsa.Indexer(d_model=E, index_heads=2, index_dim=d, index_rope_dim=0, param_dtype=jnp.float32,
                              rngs=nnx.Rngs(0))
    assert indexer.norm == "layernorm" and indexer.k_bias[...].shape == (d,)
    indexer.k_scale[...] = jax.random.normal(jax.random.PRNGKey(1), (d,))
    indexer.k_bias[...] = jax.random.normal(jax.random.PRNGKey(2), (d,))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, E))
    _, _, k_BTd = indexer(x, jnp.broadcast_to(jnp.arange(5), (2, 5)))
    want = reference_indexer_key_norm(np.asarray(x) @ np.asarray(indexer.wk[...]), np.asarray(indexer.k_scale[...]),
                                      np.asarray(indexer.k_bias[...]))
    np.testing.assert_allclose(k_BTd, want, rtol=1e-5, atol=1e-5)


def test_indexer_rmsnorm_stays_an_option():
    with nnx.use_eager_sharding(False):
        indexer = dsa.Indexer(d_model=8, index_heads=2, index_dim=4, index_rope_dim=0, param_dtype=jnp.float32,
                              rngs=nnx.Rngs(0), index_norm="rmsnorm")
    assert not hasattr(indexer, "k_bias")
    k = jnp.array([[1.0, 2.0, 3.0, 4.0]])  # RMSNorm: k / sqrt(mean(k^2) + eps), mean(k^2) = 7.5
    np.testing.assert_allclose(dsa.index_key_norm(k, jnp.ones(4)), k / np.sqrt(7.5 + 1e-6), rtol=1e-6)
    with pytest.raises(ValueError, match=r"index_norm='batchnorm' is not one of"):
        dsa.Indexer(d_model=8, index_heads=2, index_dim=4, index_rope_dim=0, param_dtype=jnp.float32,
                    rngs=nnx.Rngs(0), index_norm="batchnorm")


# ----------------------------------------------------------------------------- Hugging Face round trip


def _normalise(rope_scaling):
    """A rope_scaling dict as transformers reads it: `type` -> `rope_type`, numbers as floats, yarn's betas."""
    rs = dict(rope_scaling)
    rs["rope_type"] = rs.pop("type", None) or rs["rope_type"]
    if rs["rope_type"] == "yarn":
        rs.setdefault("beta_fast", 32.0)
        rs.setdefault("beta_slow", 1.0)
    return {k: v if isinstance(v, (str, bool)) else float(v) for k, v in rs.items()}


@pytest.mark.parametrize("name", sorted(hf.PRESETS))
def test_presets_round_trip_and_match_transformers(name):
    spec = hf.PRESETS[name]
    p = hf.preset(name)
    back = hf.to_hf(p.position, spec["max_position_embeddings"])
    assert back["rope_theta"] == spec["rope_theta"]
    assert back["max_position_embeddings"] == spec["max_position_embeddings"]
    assert _normalise(back["rope_scaling"]) == _normalise(spec["rope_scaling"])
    again = hf.from_hf(back["rope_scaling"], back["rope_theta"], p.head_dim, back["max_position_embeddings"],
                       layout=p.position["layout"])
    assert again == p.position
    rs = _normalise(spec["rope_scaling"])
    inv = RoPE(head_dim=p.head_dim, **{k: v for k, v in p.position.items() if k != "name"}).frequencies().inv_freq
    if rs["rope_type"] == "yarn":
        extra = {k: rs[k] for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim") if k in rs}
        want, _ = reference_yarn(p.head_dim, spec["rope_theta"], rs["factor"],
                                 rs["original_max_position_embeddings"], **extra)
        np.testing.assert_allclose(inv, want, rtol=RTOL)


@pytest.mark.parametrize("rope_scaling,max_pos,want", [
    (None, 4096, dict(name="none")),
    ({"rope_type": "linear", "factor": 4.0}, 8192, dict(name="linear", factor=4.0)),
    ({"type": "dynamic", "factor": 2.0}, 4096, dict(name="dynamic_ntk", factor=2.0, original_max_len=4096)),
    ({"rope_type": "yarn", "factor": 4.0}, 4096, dict(name="yarn", factor=4.0, original_max_len=4096)),
])
def test_from_hf_fields(rope_scaling, max_pos, want):
    p = hf.from_hf(rope_scaling, 10000.0, 64, max_pos)
    assert {k: p["scaling"][k] for k in want} == want
    back = hf.to_hf(p, max_pos)
    if rope_scaling is None:
        assert back["rope_scaling"] is None
    else:
        assert {k: back["rope_scaling"][k] for k in rope_scaling if k != "type"} == \
            {k: v for k, v in rope_scaling.items() if k != "type"}
    assert hf.from_hf(back["rope_scaling"], back["rope_theta"], 64, back["max_position_embeddings"]) == p


@pytest.mark.parametrize("rope_scaling,match", [
    ({"rope_type": "longrope", "factor": 4.0}, r"rope_type='longrope' is not one of"),
    ({"rope_type": "yarn", "factor": 4.0, "alpha": 1.0}, r"\['alpha'\] for rope_type='yarn': allowed keys"),
    ({"rope_type": "linear"}, r"needs 'factor'"),
])
def test_from_hf_refuses_what_it_cannot_represent(rope_scaling, match):
    with pytest.raises(ValueError, match=match):
        hf.from_hf(rope_scaling, 10000.0, 64, 4096)


def test_to_hf_refuses_scalings_without_a_hf_form():
    for scaling in ({"name": "ntk", "factor": 2.0}, {"name": "yarn_ratio_ramp", "factor": 2.0,
                                                      "original_max_len": 64}):
        with pytest.raises(ValueError, match="has no Hugging Face rope_type"):
            hf.to_hf({"name": "rope", "scaling": scaling})
    assert positions.from_hf is hf.from_hf and positions.to_hf is hf.to_hf


# ----------------------------------------------------------------------------- original_max_len


def _yarn_config():
    c = base.get_config("position=rope")
    c.model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=64, vocab_size=259)
    c.data.seq_len = 64
    c.model.position.scaling.update(name="yarn", factor=4.0)
    return c


@pytest.mark.parametrize("name", ["yarn", "dynamic_ntk", "yarn_ratio_ramp"])
def test_scalings_that_need_the_original_length_refuse_zero(name):
    with pytest.raises(ValueError, match=rf"original_max_len=0: '{name}' needs the pretraining context length"):
        RoPE(head_dim=16, scaling={"name": name, "factor": 2.0, "original_max_len": 0})


def test_every_model_building_path_gets_the_same_frequencies():
    explicit = _yarn_config()
    explicit.model.position.scaling.original_max_len = 64  # = data.seq_len, what resolve fills in
    want = state_lib.build_model(explicit).position.frequencies()
    # the notebook path resolves as training does; the bare config.model path refuses, it cannot know the length
    for got in (state_lib.build_model(_yarn_config()).position.frequencies(),
                RoPE(head_dim=16, **{k: v for k, v in config_lib.resolve(_yarn_config()).model.position.items()
                                     if k in RoPE.FIELDS}).frequencies()):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    with nnx.use_eager_sharding(False), pytest.raises(ValueError, match="original_max_len=0"):
        Transformer.from_config(_yarn_config().model, rngs=nnx.Rngs(0))


def test_saved_configs_from_before_keep_what_they_trained_with():
    old = {"model": {"position": {"scaling": {"name": "yarn", "factor": 2.0, "original_max_len": 64,
                                              "alpha": 1.0, "beta": 32.0}},
                     "attention": {"dsa": {"topk": 8}}}}
    new = config_lib.upgrade_saved(old)
    sc = new["model"]["position"]["scaling"]
    assert sc["name"] == "yarn_ratio_ramp" and sc["beta_slow"] == 1.0 and sc["beta_fast"] == 32.0
    assert "alpha" not in sc and new["model"]["attention"]["dsa"]["index_norm"] == "rmsnorm"
    current = base.get_config("position=rope").to_dict()
    assert config_lib.upgrade_saved(current) == base.get_config("position=rope").to_dict()
