"""Pallas TPU flash attention (pallas_kernels/flash_attention/tpu.py) against reference.py.

Everything runs in TPU interpret mode on CPU (`pltpu.force_tpu_interpret_mode`),
which costs ~10-20 ms per grid step, so shapes are tiny: T <= 256, blocks of
32-128. Blocks below 128 need `BlockSizes(allow_unaligned=True)` (interpret
mode only); one case uses the TPU-legal default 128 x 128 blocks.

Tolerances: f32 out / lse 1e-5 abs+rel, f32 grads 1e-4 abs+rel; bf16 inputs
are compared with the reference run on the same values upcast to f32, at 2e-2
for out / lse and 5e-2 for grads (bf16 rounding of p and ds before the matmuls).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from kernel_checks import affine, alibi, check_against_reference, value_and_vjp
from platforms import lower_for

from pallas_kernels.flash_attention import reference
from pallas_kernels.flash_attention import tpu as flash_tpu
from pallas_kernels.flash_attention.masks import Mask


@pytest.fixture(autouse=True)
def _interpret():
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        yield


def _small(bq, bk):
    return flash_tpu.BlockSizes(block_q=bq, block_k=bk, allow_unaligned=True)


def _inputs(B, T, S, H, K, D, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, K, D), jnp.float32).astype(dtype)
    return q, k, v


def _check(q, k, v, *, block_sizes, check_zero_dlse=False, tol=None, **kw):
    """`kernel_checks.check_against_reference` of the interpreted kernel (the default in this file)."""
    return check_against_reference(lambda q, k, v: flash_tpu.attention(q, k, v, block_sizes=block_sizes, **kw),
                                   lambda q, k, v: reference.attention(q, k, v, **kw), q, k, v, tol=tol,
                                   check_zero_dlse=check_zero_dlse)


def _arange(B, T, start=0):
    return jnp.broadcast_to(jnp.arange(start, start + T, dtype=jnp.int32), (B, T))


# ----------------------------------------------------------------------------- numerics


def test_causal_default_blocks():
    # TPU-legal 128 x 128 blocks, 2 x 2 blocks; also checks a zero lse cotangent.
    q, k, v = _inputs(1, 256, 256, 2, 2, 64, jnp.float32)
    pos = _arange(1, 256)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, block_sizes=None, check_zero_dlse=True)


def test_sliding_window():
    q, k, v = _inputs(1, 192, 192, 2, 1, 64, jnp.float32)
    pos = _arange(1, 192)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=40), block_sizes=_small(32, 32))


def test_bidirectional_window():
    q, k, v = _inputs(1, 128, 128, 2, 2, 64, jnp.float32)
    pos = _arange(1, 128)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(causal=False, window=24), block_sizes=_small(32, 32))


def test_gqa_8_q_heads_2_kv_heads():
    q, k, v = _inputs(1, 128, 128, 8, 2, 64, jnp.float32)
    pos = _arange(1, 128)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, block_sizes=_small(64, 64))


def test_mqa():
    q, k, v = _inputs(2, 64, 64, 4, 1, 64, jnp.float32)
    pos = _arange(2, 64)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, block_sizes=_small(32, 32))


def test_packed_segments():
    # Three documents of lengths 50, 70, 8 per row; positions restart per document.
    B, T = 2, 128
    lens = [50, 70, 8]
    seg = jnp.asarray(np.repeat(np.arange(3), lens), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(n) for n in lens]), jnp.int32)
    seg, pos = jnp.broadcast_to(seg, (B, T)), jnp.broadcast_to(pos, (B, T))
    q, k, v = _inputs(B, T, T, 2, 1, 64, jnp.float32)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg,
           block_sizes=_small(32, 32))


def test_alibi():
    q, k, v = _inputs(1, 128, 128, 4, 2, 64, jnp.float32)
    pos = _arange(1, 128)
    slopes = 2.0 ** (-8.0 * jnp.arange(1, 5, dtype=jnp.float32) / 4)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, **alibi(slopes), block_sizes=_small(64, 64))


def test_soft_cap_with_alibi_and_scale():
    q, k, v = _inputs(1, 128, 128, 2, 1, 64, jnp.float32)
    q = q * 4.0  # large logits so the cap actually bites
    pos = _arange(1, 128)
    slopes = jnp.asarray([0.25, 0.0625], jnp.float32)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, logits_soft_cap=5.0, **alibi(slopes),
           scale=0.2, block_sizes=_small(64, 64))


def test_chunked_with_segments_window_gqa_two_param_bias():
    # Chunks of 40 (not a multiple of the 32-blocks) AND two documents, a window and GQA, with a two-parameter
    # bias (per-head slope and offset: the kernels' [H, P] parameter plumbing).
    B, T = 1, 128
    seg = jnp.asarray(np.repeat(np.arange(2), [90, 38]), jnp.int32)[None]
    pos = jnp.asarray(np.concatenate([np.arange(90), np.arange(38)]), jnp.int32)[None]
    q, k, v = _inputs(B, T, T, 4, 2, 64, jnp.float32)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg, mask=Mask(window=30, chunk=40),
           **affine(4), block_sizes=_small(32, 32))


def test_lengths_not_multiple_of_block_and_empty_rows():
    # T=100 queries at positions 60..159 against S=90 keys at positions 70..159:
    # both padded to 128 (blocks of 64); queries at positions < 70 see no key (lse -inf, out 0).
    q, k, v = _inputs(1, 100, 90, 2, 1, 64, jnp.float32)
    out, lse = _check(q, k, v, q_pos_BT=_arange(1, 100, 60), kv_pos_BS=_arange(1, 90, 70),
                      block_sizes=_small(64, 64))
    assert bool(jnp.all(jnp.isneginf(lse[:, :10]))) and bool(jnp.all(out[:, :10] == 0))
    assert bool(jnp.all(jnp.isfinite(lse[:, 10:])))


def test_default_blocks_with_short_unaligned_length():
    # T=70 with the TPU-legal default 128 blocks: one padded block.
    q, k, v = _inputs(1, 70, 70, 2, 1, 64, jnp.float32)
    pos = _arange(1, 70)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=30), block_sizes=None)


def test_head_dim_128():
    q, k, v = _inputs(1, 128, 128, 2, 1, 128, jnp.float32)
    pos = _arange(1, 128)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, block_sizes=_small(64, 64))


def test_bf16():
    q, k, v = _inputs(1, 128, 128, 4, 2, 64, jnp.bfloat16)
    pos = _arange(1, 128)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=80), block_sizes=_small(64, 64))


def test_under_jit():
    q, k, v = _inputs(1, 64, 64, 2, 1, 64, jnp.float32)
    pos = _arange(1, 64)
    bs = _small(32, 32)
    f = jax.jit(lambda q, k, v: flash_tpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, block_sizes=bs)[0].sum())
    g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    fr = lambda q, k, v: reference.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos)[0].sum()  # noqa: E731
    gr = jax.jit(jax.grad(fr, argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, gr):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- block skipping


def test_sliding_window_visits_about_two_blocks_per_query_block():
    # 8K tokens, 128-blocks, window 128: each q block needs its own and the previous kv block.
    T, bs = 8192, flash_tpu.BlockSizes()
    pos = _arange(2, T)
    visited, total = flash_tpu.visited_blocks(pos, pos, mask=Mask(window=128), block_sizes=bs)
    n = T // 128
    assert total == 2 * n * n
    assert visited == 2 * (2 * n - 1)
    # Causal alone: the lower triangle; packed documents: only the diagonal blocks of each document.
    visited_c, _ = flash_tpu.visited_blocks(pos, pos, block_sizes=bs)
    assert visited_c == 2 * n * (n + 1) // 2
    seg = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) // 128, (2, T))
    visited_s, _ = flash_tpu.visited_blocks(pos, pos, seg, seg, block_sizes=bs)
    assert visited_s == 2 * n
    # Chunks of 1024 at 4K with 256 x 512 blocks: 6 of each chunk's 4 x 2 block pairs (the first two q blocks
    # end before the chunk's second kv block), so 24 of 128 pairs per row, against 72 for causal alone.
    pos4k = _arange(1, 4096)
    chunk_bs = flash_tpu.BlockSizes(256, 512)
    assert flash_tpu.visited_blocks(pos4k, pos4k, mask=Mask(chunk=1024), block_sizes=chunk_bs) == (24, 128)
    assert flash_tpu.visited_blocks(pos4k, pos4k, block_sizes=chunk_bs) == (72, 128)


def test_skipped_blocks_are_never_computed():
    # Keys past the real ones carry NaN values and a segment no query has. If the kernels
    # touched those blocks, 0 * NaN would poison out / dq / dk / dv; block skipping must avoid them.
    B, T, S_real, S = 1, 64, 64, 128
    q, k, v = _inputs(B, T, S, 2, 1, 64, jnp.float32)
    k = k.at[:, S_real:].set(jnp.nan)
    v = v.at[:, S_real:].set(jnp.nan)
    pos = _arange(B, T)
    kv_pos = _arange(B, S)
    q_seg = jnp.zeros((B, T), jnp.int32)
    kv_seg = jnp.where(jnp.arange(S) < S_real, 0, 7)[None].astype(jnp.int32)
    bs = _small(32, 32)
    kw = dict(q_pos_BT=pos, kv_pos_BS=kv_pos, q_seg_BT=q_seg, kv_seg_BS=kv_seg, mask=Mask(causal=False))
    visited, total = flash_tpu.visited_blocks(pos, kv_pos, q_seg, kv_seg, mask=Mask(causal=False), block_sizes=bs)
    assert (visited, total) == (4, 8)

    def ours(q, k, v):
        return flash_tpu.attention(q, k, v, block_sizes=bs, **kw)

    kw_r = dict(kw, kv_pos_BS=kv_pos[:, :S_real], kv_seg_BS=kv_seg[:, :S_real])
    ref = lambda q, k, v: reference.attention(q, k, v, **kw_r)  # noqa: E731
    ones_o, ones_l = jnp.ones(q.shape, jnp.float32), jnp.ones(q.shape[:3], jnp.float32)
    out, lse, (dq, dk, dv) = value_and_vjp(ours, q, k, v, ones_o, ones_l)
    out_r, lse_r, (dq_r, dk_r, dv_r) = value_and_vjp(ref, q, k[:, :S_real], v[:, :S_real], ones_o, ones_l)
    np.testing.assert_allclose(out, out_r, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, lse_r, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dq, dq_r, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(dk[:, :S_real], dk_r, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(dv[:, :S_real], dv_r, atol=1e-4, rtol=1e-4)
    assert bool(jnp.all(dk[:, S_real:] == 0)) and bool(jnp.all(dv[:, S_real:] == 0))


# ----------------------------------------------------------------------------- validation


def test_bad_block_sizes_raise():
    with pytest.raises(ValueError, match="block_q=100"):
        flash_tpu.BlockSizes(block_q=100)
    with pytest.raises(ValueError, match="block_k=64 must be a multiple of 128"):
        flash_tpu.BlockSizes(block_k=64)
    with pytest.raises(ValueError, match="block_k=12 must be a multiple of 8"):
        flash_tpu.BlockSizes(block_k=12, allow_unaligned=True)
    with pytest.raises(ValueError, match="positive int"):
        flash_tpu.BlockSizes(block_q=0)
    assert flash_tpu.BlockSizes(block_q=64, block_k=32, allow_unaligned=True).block_k == 32


def test_bad_shapes_raise():
    q, k, v = _inputs(1, 64, 64, 3, 2, 64, jnp.float32)
    pos = _arange(1, 64)
    with pytest.raises(ValueError, match="multiple of kv heads 2"):
        flash_tpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos)
    q, k, v = _inputs(1, 64, 64, 2, 1, 64, jnp.float32)
    with pytest.raises(ValueError, match=r"q_pos \(1, 32\)"):
        flash_tpu.attention(q, k, v, q_pos_BT=pos[:, :32], kv_pos_BS=pos)
    with pytest.raises(ValueError, match="given together"):
        flash_tpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=pos)


def test_foreign_block_sizes_are_revalidated():
    from pallas_kernels.flash_attention import xla

    pos = _arange(1, 1024)
    # xla.BlockSizes(256, 512) are TPU-legal; (100, 512) are not.
    assert flash_tpu.visited_blocks(pos, pos, block_sizes=xla.BlockSizes()) == (6, 8)
    with pytest.raises(ValueError, match="block_q=100"):
        flash_tpu.visited_blocks(pos, pos, block_sizes=xla.BlockSizes(block_q=100))


def test_kernels_lower_to_mosaic_for_tpu():
    # No TPU here: lowering for platform "tpu" under an abstract v5e mesh runs the real Pallas -> Mosaic
    # lowering (block-shape (8, 128) rules, supported primitives) of all three kernels. Mosaic's backend
    # compiler runs in tests/test_tpu_compile.py.
    B, T, H, K, D = 1, 200, 4, 2, 64
    pos = np.asarray(_arange(B, T))  # numpy: a jax array would commit the lowering to this host's CPU
    slopes = np.full((H,), 0.1, np.float32)

    def loss(q, k, v):
        out, lse = flash_tpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=150), **alibi(slopes),
                                       logits_soft_cap=30.0)
        return out.astype(jnp.float32).sum() + lse.sum()

    q, k, v = _inputs(B, T, T, H, K, D, jnp.bfloat16)
    small = flash_tpu.BlockSizes(64, 64, allow_unaligned=True)
    f = lambda q, k, v: flash_tpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, block_sizes=small)[0]  # noqa: E731
    with pltpu.force_tpu_interpret_mode(None):  # the real lowering, not this module's interpreter
        text = lower_for("tpu", jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
        assert text.count("tpu_custom_call") == 3  # fwd, dq, dkv
        # Interpret-only block sizes are rejected by the real lowering: why BlockSizes guards them.
        with pytest.raises(ValueError, match="divisible by 8 and 128"):
            lower_for("tpu", f, q, k, v)
