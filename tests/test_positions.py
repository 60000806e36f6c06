"""Position schemes against values worked out by hand from the published formulas.

Worked example used throughout: theta = 10000 and rotated width d = 8, so the
plain inverse frequencies are 10000^(-2i/8) = [1, 0.1, 0.01, 0.001].
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lc_jax import config as config_lib
from lc_jax.positions import rope_scaling
from lc_jax.positions.alibi import alibi_slopes
from lc_jax.positions.nope import NoPE
from lc_jax.positions.rope import RoPE, apply_rope, rope_inv_freq

PLAIN = np.array([1.0, 0.1, 0.01, 0.001])


def _freqs(head_dim=8, current_len=None, **kw):
    scaling = {k: v for k, v in kw.items() if k not in ("fraction", "fraction_mode", "theta")}
    rope = RoPE(head_dim=head_dim, theta=kw.get("theta", 10000.0), fraction=kw.get("fraction", 1.0),
                fraction_mode=kw.get("fraction_mode", "rotary_dims"), scaling=scaling or None)
    inv, mscale, _ = rope.frequencies(current_len)
    return np.asarray(inv, np.float64), mscale


def test_plain_inv_freq():
    np.testing.assert_allclose(rope_inv_freq(8, 10000.0), PLAIN, rtol=1e-12)
    # theta = 500000 (Llama 3), d = 4: [1, 500000^-0.5]
    np.testing.assert_allclose(rope_inv_freq(4, 500000.0), [1.0, 1 / math.sqrt(500000)], rtol=1e-12)


def test_linear_pi():
    inv, m = _freqs(name="linear", factor=4.0)
    np.testing.assert_allclose(inv, PLAIN / 4, rtol=1e-12)
    assert m == 1.0


def test_ntk():
    # b' = 10000 * 4^(8/6) = 63496.04..., inv_i = b'^(-i/4)
    inv, _ = _freqs(name="ntk", factor=4.0)
    np.testing.assert_allclose(inv, [1.0, 0.0629960525, 0.0039685026, 0.00025], rtol=1e-8)
    # d = 16, s = 2: the lowest frequency is interpolated exactly by s (why the exponent is d / (d - 2)).
    inv16, _ = _freqs(head_dim=16, name="ntk", factor=2.0)
    np.testing.assert_allclose(inv16[-1], rope_inv_freq(16, 10000.0)[-1] / 2, rtol=1e-10)


def test_dynamic_ntk_grows_with_length():
    common = dict(name="dynamic_ntk", factor=1.0, original_max_len=64)
    for l in (1, 32, 64):  # up to L nothing changes
        np.testing.assert_allclose(_freqs(current_len=l, **common)[0], PLAIN, rtol=1e-6)
    # l = 2L, s = 1: b' = 10000 * 2^(8/6)
    np.testing.assert_allclose(_freqs(current_len=128, **common)[0], [1.0, 0.0793700526, 0.0062996052, 0.0005],
                               rtol=1e-5)
    # s = 2, l = 2L: b' = 10000 * (2*2 - 1)^(4/3) = 10000 * 3^(4/3)
    b = 10000 * 3 ** (4 / 3)
    np.testing.assert_allclose(_freqs(current_len=128, name="dynamic_ntk", factor=2.0, original_max_len=64)[0],
                               [b ** (-i / 4) for i in range(4)], rtol=1e-5)


def test_yarn_ratio_ramp_is_the_papers_literal_ramp():
    # L = 64: r_i = 64 * inv_i / (2 pi) = [10.186, 1.0186, 0.10186, 0.010186]
    # gamma = clip((r - 1) / 31, 0, 1) = [0.29633, 0.00060, 0, 0]
    inv, m = _freqs(name="yarn_ratio_ramp", factor=4.0, original_max_len=64, beta_slow=1.0, beta_fast=32.0)
    np.testing.assert_allclose(inv, [0.4722399119, 0.0250449798, 0.0025, 0.00025], rtol=1e-8)
    assert m == pytest.approx(0.1 * math.log(4) + 1)  # 1.13863
    # L = 4096, d = 8: every r_i > 32 except the last two -> those follow PI
    inv, _ = _freqs(name="yarn_ratio_ramp", factor=8.0, original_max_len=4096)
    r = 4096 * PLAIN / (2 * math.pi)  # [651.9, 65.19, 6.519, 0.6519]
    g = np.clip((r - 1) / 31, 0, 1)
    np.testing.assert_allclose(inv, (1 - g) * PLAIN / 8 + g * PLAIN, rtol=1e-12)
    assert inv[0] == 1.0 and inv[1] == 0.1 and inv[3] == PLAIN[3] / 8


def test_yarn_worked_example():
    # d = 8, b = 10000, s = 4, L = 64 (jquesnelle/yarn's index ramp):
    # dim(32 rotations) = 8 ln(64 / (64 pi)) / (2 ln 10000) = -0.497 -> floor -1 -> clamp 0
    # dim(1 rotation)   = 8 ln(64 / (2 pi))  / (2 ln 10000) =  1.008 -> ceil 2
    # ramp over i = 0..3: i / 2 -> [0, 0.5, 1, 1]; extrapolation share 1 - ramp = [1, 0.5, 0, 0]
    inv, m = _freqs(name="yarn", factor=4.0, original_max_len=64)
    np.testing.assert_allclose(inv, [1.0, 0.5 * 0.1 / 4 + 0.5 * 0.1, 0.01 / 4, 0.001 / 4], rtol=1e-7)
    assert m == pytest.approx(0.1 * math.log(4) + 1)


def test_yarn_scales_logits_by_mscale_squared():
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 1, 8))
    pos = jnp.arange(5)[None]
    plain = apply_rope(q, pos, PLAIN / 4)
    scaled = apply_rope(q, pos, PLAIN / 4, mscale=1.5)
    np.testing.assert_allclose((scaled * scaled).sum(), 1.5**2 * (plain * plain).sum(), rtol=1e-5)


def test_llama3():
    # defaults factor 8, low 1, high 4, L 8192: wavelengths 2pi/inv = [6.28, 62.8, 628, 6283];
    # < 8192/4 = 2048 keep; the last is between 2048 and 8192: smooth = (8192/6283.19 - 1)/3 = 0.10126
    inv, m = _freqs(name="llama3")
    np.testing.assert_allclose(inv, [1.0, 0.1, 0.01, 0.000213607544], rtol=1e-9)
    assert m == 1.0
    # theta = 500000, d = 128 (Llama 3.1 8B): low-frequency end divided by 8, high end untouched
    inv, _ = _freqs(head_dim=128, theta=500000.0, name="llama3")
    base = rope_inv_freq(128, 500000.0)
    wl = 2 * math.pi / base
    np.testing.assert_allclose(inv[wl < 2048], base[wl < 2048], rtol=1e-12)
    np.testing.assert_allclose(inv[wl > 8192], base[wl > 8192] / 8, rtol=1e-12)


def test_partial_rotary_uses_rotated_width():
    # head_dim 16, fraction 0.5: rotate 8 dims with frequencies of width 8
    rope = RoPE(head_dim=16, fraction=0.5)
    inv = rope.frequencies().inv_freq
    np.testing.assert_allclose(inv, PLAIN, rtol=1e-12)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 2, 16))
    pos = jnp.arange(6)[None] + 3
    q, _ = rope.rotate(x, x[:, :, :1], pos, pos)
    np.testing.assert_array_equal(q[..., 8:], x[..., 8:])
    assert not np.allclose(q[..., :8], x[..., :8])
    # with YaRN on top: width 8 in the ramp too (test_yarn_worked_example)
    rope = RoPE(head_dim=16, fraction=0.5, scaling={"name": "yarn", "factor": 4.0, "original_max_len": 64})
    np.testing.assert_allclose(rope.frequencies()[0], [1.0, 0.0625, 0.0025, 0.00025], rtol=1e-7)


def test_p_rope_keeps_highest_frequencies_of_full_width():
    # head_dim 16, p = 0.5: frequencies 10000^(-i/8), i = 0..7; keep i < 4, zero the rest
    inv, _ = _freqs(head_dim=16, fraction=0.5, fraction_mode="p_rope")
    full = [10000 ** (-i / 8) for i in range(8)]
    np.testing.assert_allclose(inv, full[:4] + [0, 0, 0, 0], rtol=1e-12)


@pytest.mark.parametrize("n,expected", [
    (8, [2.0 ** -(i + 1) for i in range(8)]),  # 2^(-8/8 * k)
    (16, [2.0 ** (-(i + 1) / 2) for i in range(16)]),  # 2^(-8/16 * k)
    # 12 is not a power of two: the 8 slopes of n = 8, then every other slope of n = 16
    (12, [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]),
])
def test_alibi_slopes(n, expected):
    np.testing.assert_allclose(alibi_slopes(n), expected, rtol=1e-6)


SCHEMES = [
    {}, {"name": "linear", "factor": 4.0}, {"name": "ntk", "factor": 4.0},
    {"name": "yarn", "factor": 4.0, "original_max_len": 64}, {"name": "llama3"},
    {"name": "yarn", "factor": 40.0, "original_max_len": 64, "mscale": 1.0, "mscale_all_dim": 1.0},
]


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("scaling", SCHEMES, ids=lambda s: s.get("name", "plain"))
def test_rope_scores_depend_only_on_relative_distance(layout, scaling):
    rope = RoPE(head_dim=16, layout=layout, fraction=0.75, scaling=scaling or None)
    ks = jax.random.split(jax.random.PRNGKey(0), 2)
    q = jax.random.normal(ks[0], (1, 10, 1, 16))
    k = jax.random.normal(ks[1], (1, 10, 1, 16))
    pos = jnp.arange(10)[None]

    def scores(offset):
        qr, kr = rope.rotate(q, k, pos + offset, pos + offset)
        return jnp.einsum("bthd,bshd->ts", qr, kr)

    np.testing.assert_allclose(scores(0), scores(37), atol=2e-4)
    np.testing.assert_allclose(scores(0), scores(1000), atol=2e-3)


@pytest.mark.parametrize("scaling", [
    {"name": "linear", "factor": 1.0}, {"name": "ntk", "factor": 1.0},
    {"name": "yarn", "factor": 1.0, "original_max_len": 64},
    {"name": "yarn_ratio_ramp", "factor": 1.0, "original_max_len": 64},
])
def test_scalings_with_factor_one_are_plain_rope(scaling):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 2, 16))
    pos = jnp.broadcast_to(jnp.arange(7) * 5, (2, 7))
    plain_q, plain_k = RoPE(head_dim=16).rotate(x, x, pos, pos)
    q, k = RoPE(head_dim=16, scaling=scaling).rotate(x, x, pos, pos)
    np.testing.assert_array_equal(q, plain_q)
    np.testing.assert_array_equal(k, plain_k)
    inv, m, logit_scale = RoPE(head_dim=16, scaling=scaling).frequencies()
    np.testing.assert_array_equal(inv, rope_inv_freq(16, 10000.0))
    assert m == 1.0 and logit_scale == 1.0


def test_resolve_defaults():
    assert rope_scaling.resolve({"name": "llama3", "factor": 0, "original_max_len": 0}) == {
        "name": "llama3", "factor": 8.0, "original_max_len": 8192}
    assert rope_scaling.resolve({"name": "yarn", "factor": 0, "original_max_len": 0}, train_seq_len=512) == {
        "name": "yarn", "factor": 1.0, "original_max_len": 512}


def test_nope_temperature_tuning_is_llama4s():
    # Hugging Face transformers' Llama4TextAttention on layers without RoPE:
    # q *= log(floor((p + 1) / floor_scale) + 1) * attn_scale + 1, with floor_scale 8192, attn_scale 0.1.
    pos = jnp.asarray([[0, 8190, 8191, 16382, 16383, 100_000]], jnp.int32)
    want = [1.0 + 0.1 * math.log(math.floor((p + 1) / 8192) + 1) for p in pos[0].tolist()]
    tuned = NoPE(temperature_tuning=True)
    np.testing.assert_allclose(tuned.temperature(pos)[0], want, rtol=1e-6)
    assert want[:2] == [1.0, 1.0] and want[2] == want[3] == 1.0 + 0.1 * math.log(2)
    q = jax.random.normal(jax.random.key(0), (1, 6, 4, 8))
    k = jax.random.normal(jax.random.key(1), (1, 6, 2, 8))
    q2, k2 = tuned.rotate(q, k, pos, pos)
    np.testing.assert_allclose(q2, q * np.asarray(want)[None, :, None, None], rtol=1e-6)
    assert k2 is k  # keys (and so the KV cache) are untouched
    q3, k3 = NoPE().rotate(q, k, pos, pos)
    assert q3 is q and k3 is k


def test_nope_temperature_fields_are_checked():
    c = config_lib.defaults()
    c.model.position.name = "nope"
    c.model.position.temperature_tuning = True
    c.model.position.temperature_floor_scale = 0
    c.model.position.temperature_attn_scale = -1.0
    with pytest.raises(ValueError) as e:
        config_lib.validate(c)
    assert "model.position.temperature_floor_scale=0: must be a positive int" in str(e.value)
    assert "model.position.temperature_attn_scale=-1.0: must be a positive int/float" in str(e.value)
