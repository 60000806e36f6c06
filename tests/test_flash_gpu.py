"""Pallas GPU (Triton) flash attention (pallas_kernels/flash_attention/gpu.py) against reference.py.

Without a GPU everything runs in the generic Pallas interpreter (`interpret=True`),
so shapes are tiny: T <= 128, blocks of 16-64. `test_kernels_lower_to_triton_for_cuda`
runs the real Pallas -> Triton IR lowering of all three kernels on the CPU host
(no PTX compile); `test_compiled_on_gpu` runs the compiled kernels and is skipped
unless a GPU is the default backend.

Tolerances: f32 out / lse 1e-5 abs+rel, f32 grads 1e-4 abs+rel; bf16 inputs
are compared with the reference run on the same values upcast to f32, at 2e-2
for out / lse and 5e-2 for grads (bf16 rounding of p and ds before the matmuls).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import affine, alibi, check_against_reference, value_and_vjp
from platforms import lower_for

from pallas_kernels.flash_attention import gpu as flash_gpu
from pallas_kernels.flash_attention import reference
from pallas_kernels.flash_attention.masks import Mask


def _bs(bq, bk):
    return flash_gpu.BlockSizes(block_q=bq, block_k=bk)


def _inputs(B, T, S, H, K, D, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, K, D), jnp.float32).astype(dtype)
    return q, k, v


def _check(q, k, v, *, block_sizes, interpret=True, check_zero_dlse=False, tol=None, **kw):
    """`kernel_checks.check_against_reference` of the kernel (interpreted unless `interpret=False`)."""
    return check_against_reference(
        lambda q, k, v: flash_gpu.attention(q, k, v, block_sizes=block_sizes, interpret=interpret, **kw),
        lambda q, k, v: reference.attention(q, k, v, **kw), q, k, v, tol=tol, check_zero_dlse=check_zero_dlse)


def _arange(B, T, start=0):
    return jnp.broadcast_to(jnp.arange(start, start + T, dtype=jnp.int32), (B, T))


# ----------------------------------------------------------------------------- numerics


def test_causal():
    q, k, v = _inputs(1, 64, 64, 2, 2, 64, jnp.float32)
    pos = _arange(1, 64)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, block_sizes=_bs(32, 16), check_zero_dlse=True)


def test_sliding_window():
    q, k, v = _inputs(1, 128, 128, 2, 1, 64, jnp.float32)
    pos = _arange(1, 128)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=40), block_sizes=_bs(32, 32))


def test_bidirectional_window():
    q, k, v = _inputs(1, 64, 64, 2, 2, 64, jnp.float32)
    pos = _arange(1, 64)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(causal=False, window=24), block_sizes=_bs(16, 16))


def test_gqa_8_q_heads_2_kv_heads():
    q, k, v = _inputs(1, 64, 64, 8, 2, 64, jnp.float32)
    pos = _arange(1, 64)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, block_sizes=_bs(32, 32))


def test_mqa():
    q, k, v = _inputs(2, 64, 64, 4, 1, 64, jnp.float32)
    pos = _arange(2, 64)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, block_sizes=_bs(32, 32))


def test_packed_segments():
    # Three documents of lengths 50, 70, 8 per row; positions restart per document.
    B, T = 2, 128
    lens = [50, 70, 8]
    seg = jnp.asarray(np.repeat(np.arange(3), lens), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(n) for n in lens]), jnp.int32)
    seg, pos = jnp.broadcast_to(seg, (B, T)), jnp.broadcast_to(pos, (B, T))
    q, k, v = _inputs(B, T, T, 2, 1, 64, jnp.float32)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg,
           block_sizes=_bs(32, 32))


def test_alibi():
    q, k, v = _inputs(1, 64, 64, 4, 2, 64, jnp.float32)
    pos = _arange(1, 64)
    slopes = 2.0 ** (-8.0 * jnp.arange(1, 5, dtype=jnp.float32) / 4)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, **alibi(slopes), block_sizes=_bs(32, 32))


def test_chunked_with_segments_window_gqa_two_param_bias():
    # Chunks of 24 (not a multiple of the 16-blocks) AND two documents, a window and GQA, with a two-parameter
    # bias (per-head slope and offset: the kernels' [H, P] parameter plumbing, dk/dv's per-group table too).
    seg = jnp.asarray(np.repeat(np.arange(2), [40, 24]), jnp.int32)[None]
    pos = jnp.asarray(np.concatenate([np.arange(40), np.arange(24)]), jnp.int32)[None]
    q, k, v = _inputs(1, 64, 64, 4, 2, 64, jnp.float32)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg, mask=Mask(window=20, chunk=24),
           **affine(4), block_sizes=_bs(16, 16))


def test_soft_cap_with_alibi_and_scale():
    q, k, v = _inputs(1, 64, 64, 2, 1, 64, jnp.float32)
    q = q * 4.0
    pos = _arange(1, 64)
    slopes = jnp.asarray([0.25, 0.0625], jnp.float32)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, logits_soft_cap=5.0, **alibi(slopes),
           scale=0.2, block_sizes=_bs(32, 32))


def test_lengths_not_multiple_of_block_and_empty_rows():
    # T=50 queries at positions 30..79 against S=40 keys at positions 40..79:
    # padded to 64 (blocks of 32); queries at positions < 40 see no key (lse -inf, out 0).
    q, k, v = _inputs(1, 50, 40, 2, 1, 64, jnp.float32)
    out, lse = _check(q, k, v, q_pos_BT=_arange(1, 50, 30), kv_pos_BS=_arange(1, 40, 40),
                      block_sizes=_bs(32, 32))
    assert bool(jnp.all(jnp.isneginf(lse[:, :10]))) and bool(jnp.all(out[:, :10] == 0))
    assert bool(jnp.all(jnp.isfinite(lse[:, 10:])))


def test_head_dim_128():
    q, k, v = _inputs(1, 64, 64, 2, 1, 128, jnp.float32)
    pos = _arange(1, 64)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, block_sizes=_bs(32, 32))


def test_bf16():
    q, k, v = _inputs(1, 128, 128, 4, 2, 64, jnp.bfloat16)
    pos = _arange(1, 128)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=80), block_sizes=_bs(64, 64))


def test_under_jit_default_blocks():
    q, k, v = _inputs(1, 48, 48, 2, 1, 64, jnp.float32)  # one padded 64-block
    pos = _arange(1, 48)
    f = jax.jit(lambda q, k, v: flash_gpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, interpret=True)[0].sum())
    g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    fr = lambda q, k, v: reference.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos)[0].sum()  # noqa: E731
    gr = jax.jit(jax.grad(fr, argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, gr):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- block skipping


def test_sliding_window_visits_about_two_blocks_per_query_block():
    # 8K tokens, 64-blocks, window 64: each q block needs its own and the previous kv block.
    T, bs = 8192, _bs(64, 64)
    pos = _arange(2, T)
    visited, total = flash_gpu.visited_blocks(pos, pos, mask=Mask(window=64), block_sizes=bs)
    n = T // 64
    assert total == 2 * n * n
    assert visited == 2 * (2 * n - 1)
    # Causal alone: the lower triangle; packed equal-length documents: the diagonal blocks only.
    visited_c, _ = flash_gpu.visited_blocks(pos, pos, block_sizes=bs)
    assert visited_c == 2 * n * (n + 1) // 2
    seg = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) // 64, (2, T))
    visited_s, _ = flash_gpu.visited_blocks(pos, pos, seg, seg, block_sizes=bs)
    assert visited_s == 2 * n
    # Chunks of 1024 at 4K with 256 x 512 blocks: each chunk's q blocks 0-1 need kv block 0, q blocks 2-3 kv blocks
    # 0-1: 24 of 128 pairs, against 72 for causal alone.
    pos4k = _arange(1, 4096)
    assert flash_gpu.visited_blocks(pos4k, pos4k, mask=Mask(chunk=1024), block_sizes=_bs(256, 512)) == (24, 128)
    assert flash_gpu.visited_blocks(pos4k, pos4k, block_sizes=_bs(256, 512)) == (72, 128)


def test_skipped_blocks_are_never_loaded():
    # Keys past the real ones carry NaN values and a segment no query has. If the kernels
    # loaded those blocks, 0 * NaN would poison out / dq / dk / dv; the [lo, hi) ranges must avoid them.
    B, T, S_real, S = 1, 32, 32, 64
    q, k, v = _inputs(B, T, S, 2, 1, 64, jnp.float32)
    k = k.at[:, S_real:].set(jnp.nan)
    v = v.at[:, S_real:].set(jnp.nan)
    pos = _arange(B, T)
    kv_pos = _arange(B, S)
    q_seg = jnp.zeros((B, T), jnp.int32)
    kv_seg = jnp.where(jnp.arange(S) < S_real, 0, 7)[None].astype(jnp.int32)
    bs = _bs(16, 16)
    kw = dict(q_pos_BT=pos, kv_pos_BS=kv_pos, q_seg_BT=q_seg, kv_seg_BS=kv_seg, mask=Mask(causal=False))
    assert flash_gpu.visited_blocks(pos, kv_pos, q_seg, kv_seg, mask=Mask(causal=False), block_sizes=bs) == (4, 8)

    def ours(q, k, v):
        return flash_gpu.attention(q, k, v, block_sizes=bs, interpret=True, **kw)

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
    with pytest.raises(ValueError, match="block_q=48 must be a power of two >= 16"):
        flash_gpu.BlockSizes(block_q=48)
    with pytest.raises(ValueError, match="block_k=8 must be a power of two >= 16"):
        flash_gpu.BlockSizes(block_k=8)
    with pytest.raises(ValueError, match="positive int"):
        flash_gpu.BlockSizes(block_q=0)
    with pytest.raises(ValueError, match="positive int"):
        flash_gpu.BlockSizes(block_k=32.0)
    with pytest.raises(ValueError, match="num_warps"):
        flash_gpu.BlockSizes(num_warps=3)
    with pytest.raises(ValueError, match="num_stages"):
        flash_gpu.BlockSizes(num_stages=0)
    assert flash_gpu.BlockSizes(block_q=16, block_k=128).block_k == 128
    # Foreign (e.g. xla / tpu) block sizes are re-validated against the GPU rules.
    from pallas_kernels.flash_attention import xla

    pos = _arange(1, 1024)
    assert flash_gpu.visited_blocks(pos, pos, block_sizes=xla.BlockSizes()) == (6, 8)
    with pytest.raises(ValueError, match="block_q=100"):
        flash_gpu.visited_blocks(pos, pos, block_sizes=xla.BlockSizes(block_q=100))


def test_bad_shapes_raise():
    q, k, v = _inputs(1, 32, 32, 3, 2, 64, jnp.float32)
    pos = _arange(1, 32)
    with pytest.raises(ValueError, match="multiple of kv heads 2"):
        flash_gpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, interpret=True)
    q, k, v = _inputs(1, 32, 32, 2, 1, 48, jnp.float32)
    with pytest.raises(ValueError, match="head_dim=48 must be a power of two"):  # compiled path only
        flash_gpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos)
    q, k, v = _inputs(1, 32, 32, 2, 1, 64, jnp.float32)
    with pytest.raises(ValueError, match=r"q_pos \(1, 16\)"):
        flash_gpu.attention(q, k, v, q_pos_BT=pos[:, :16], kv_pos_BS=pos, interpret=True)
    with pytest.raises(ValueError, match="given together"):
        flash_gpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=pos, interpret=True)


# ----------------------------------------------------------------------------- real lowering


def test_kernels_lower_to_triton_for_cuda():
    # No GPU needed: lowering for platform "cuda" runs the real Pallas -> Triton IR lowering
    # (power-of-two load shapes, supported primitives, dot precisions) of all three kernels,
    # with GQA, a window, chunks, sink tokens, packed segments, ALiBi and soft-cap. It does not run
    # Triton's PTX compiler.
    B, T, H, K, D = 1, 100, 8, 2, 64
    pos = _arange(B, T)
    seg = pos // 40
    slopes = jnp.full((H,), 0.1, jnp.float32)

    def loss(q, k, v):
        out, lse = flash_gpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg,
                                       mask=Mask(window=50, chunk=30, sink_tokens=3), **alibi(slopes),
                                       logits_soft_cap=30.0, block_sizes=_bs(32, 64))
        return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

    for dtype in (jnp.bfloat16, jnp.float32):
        text = lower_for("cuda", jax.grad(loss, argnums=(0, 1, 2)), *_inputs(B, T, T, H, K, D, dtype))
        for name in ("flash_attention_gpu_fwd", "flash_attention_gpu_dq", "flash_attention_gpu_dkv"):
            assert name in text, name
        assert text.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: compiled Triton kernels")
def test_compiled_on_gpu():
    B, T, H, K = 2, 200, 8, 2
    pos = _arange(B, T)
    seg = pos // 120
    slopes = 2.0 ** (-8.0 * jnp.arange(1, H + 1, dtype=jnp.float32) / H)
    for D, dtype in ((64, jnp.float32), (128, jnp.bfloat16)):
        q, k, v = _inputs(B, T, T, H, K, D, dtype)
        _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg,
               mask=Mask(window=100, chunk=70), **alibi(slopes), logits_soft_cap=20.0, block_sizes=_bs(64, 64),
               interpret=False, tol=(2e-4, 2e-3) if dtype == jnp.float32 else None)
