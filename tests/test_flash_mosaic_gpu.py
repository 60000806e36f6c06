"""Pallas Mosaic GPU flash attention (pallas_kernels/flash_attention/mosaic_gpu.py) against reference.py.

Without a GPU the kernels run in jax's Mosaic GPU interpreter (`interpret=True`:
the same kernels, with SMEM, TMA copies, barriers and wgmma simulated on CPU,
over the whole grid), so shapes are small: T <= 192 with 64-row blocks, which
still gives multi-block grids, multi-step K/V rings and block skipping.
`test_kernels_lower_for_cuda` runs the real Pallas -> Mosaic GPU lowering of
all three kernels on the CPU host (no cubin); `test_compiled_on_gpu` runs the
compiled kernels over the whole feature matrix and is skipped unless the default
device is a Hopper GPU (f32 at 2e-4 / 2e-3, as in test_flash_gpu.py: on an
H200 the f32 output came within 1e-5 of the f32 ground truth at D = 64, but the
whole matrix has not yet passed at 1e-5).

Tolerances: f32 out / lse 1e-5 abs+rel, f32 grads 1e-4 abs+rel (f32 inputs go
through the kernels' three-term bf16 split, so these also check that split);
bf16 inputs are compared with the reference run on the same values upcast to
f32, at 2e-2 for out / lse and 5e-2 for grads (bf16 rounding of p and ds
before the matmuls).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from kernel_checks import affine, alibi, check_against_reference, value_and_vjp
from platforms import lower_for

from pallas_kernels.flash_attention import mosaic_gpu as flash_mgpu
from pallas_kernels.flash_attention import reference
from pallas_kernels.flash_attention.masks import Mask

pytestmark = pytest.mark.skipif(flash_mgpu.InterpretGPUParams is None,
                                reason="this jax has no Mosaic GPU interpreter")


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """After an exception inside an interpreted kernel the interpreter's global state is stale: reset it."""
    yield
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    interpret_pallas_call.reset_gpu_interpret_mode_state()


def _bs(bq=64, bk=64, stages=None, skip=True, approx=False):
    """Block sizes; the interpreter tests walk fully visible blocks in the mask-free phase (the default
    kernel masks every block: `test_unmasked_loop_matches_masked_loop_exactly` compares the two)."""
    return flash_mgpu.BlockSizes(block_q=bq, block_k=bk, num_stages=stages, skip_full_masks=skip, approx_math=approx)


def _inputs(B, T, S, H, K, D, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, K, D), jnp.float32).astype(dtype)
    return q, k, v


def _check(q, k, v, *, block_sizes=None, interpret=True, check_zero_dlse=False, tol=None, **kw):
    """`kernel_checks.check_against_reference` of the kernel (interpreted unless `interpret=False`)."""
    return check_against_reference(
        lambda q, k, v: flash_mgpu.attention(q, k, v, block_sizes=block_sizes, interpret=interpret, **kw),
        lambda q, k, v: reference.attention(q, k, v, **kw), q, k, v, tol=tol, check_zero_dlse=check_zero_dlse)


def _arange(B, T, start=0):
    return jnp.broadcast_to(jnp.arange(start, start + T, dtype=jnp.int32), (B, T))


# ----------------------------------------------------------------------------- numerics (GPU interpreter)


def test_causal():
    # 2 x 2 blocks: the upper-right kv block is skipped, the diagonal ones are masked element-wise.
    q, k, v = _inputs(1, 128, 128, 2, 2, 64, jnp.float32)
    pos = _arange(1, 128)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, block_sizes=_bs(), check_zero_dlse=True)


def test_sliding_window_single_stage_ring():
    # 3 x 3 blocks, window 40: each q block sees at most its own and the previous kv block;
    # a one-slot K/V ring (fetch, wait, compute).
    q, k, v = _inputs(1, 192, 192, 2, 1, 64, jnp.float32)
    pos = _arange(1, 192)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=40), block_sizes=_bs(stages=1))


def test_bidirectional_window_three_stage_ring():
    q, k, v = _inputs(1, 192, 192, 2, 2, 64, jnp.float32)
    pos = _arange(1, 192)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(causal=False, window=90), block_sizes=_bs(stages=3))


def test_mqa_batch_2():
    q, k, v = _inputs(2, 64, 64, 3, 1, 64, jnp.float32)
    pos = _arange(2, 64)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, block_sizes=_bs())


def test_packed_segments():
    # Three documents of lengths 50, 70, 8 per row; positions restart per document.
    B, T = 2, 128
    lens = [50, 70, 8]
    seg = jnp.asarray(np.repeat(np.arange(3), lens), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(n) for n in lens]), jnp.int32)
    seg, pos = jnp.broadcast_to(seg, (B, T)), jnp.broadcast_to(pos, (B, T))
    q, k, v = _inputs(B, T, T, 2, 1, 64, jnp.float32)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg, block_sizes=_bs())


def test_gqa_8_q_heads_2_kv_heads_with_alibi():
    # Per-head slopes also check the head bookkeeping: query head h = kv head * 4 + g in the dk/dv loop.
    q, k, v = _inputs(1, 64, 64, 8, 2, 64, jnp.float32)
    pos = _arange(1, 64)
    slopes = 2.0 ** (-8.0 * jnp.arange(1, 9, dtype=jnp.float32) / 8)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, **alibi(slopes), block_sizes=_bs())


def test_chunked_with_segments_window_gqa_two_param_bias():
    # Chunks of 48 (not a multiple of the 64-blocks) AND two documents, a window and GQA, with a two-parameter
    # bias (per-head slope and offset: the kernels' [H, P] parameter plumbing).
    seg = jnp.asarray(np.repeat(np.arange(2), [100, 28]), jnp.int32)[None]
    pos = jnp.asarray(np.concatenate([np.arange(100), np.arange(28)]), jnp.int32)[None]
    q, k, v = _inputs(1, 128, 128, 2, 1, 64, jnp.float32)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg, mask=Mask(window=40, chunk=48),
           **affine(2), block_sizes=_bs())


def test_soft_cap_with_alibi_and_scale_head_dim_128():
    q, k, v = _inputs(1, 64, 64, 2, 1, 128, jnp.float32)
    q = q * 4.0  # large logits so the cap actually bites
    pos = _arange(1, 64)
    slopes = jnp.asarray([0.25, 0.0625], jnp.float32)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, logits_soft_cap=5.0, **alibi(slopes),
           scale=0.2, block_sizes=_bs())


def test_lengths_not_multiple_of_block_and_empty_rows():
    # T=50 queries at positions 30..79 against S=40 keys at positions 40..79, padded to one 64-block
    # each; queries at positions < 40 see no key (lse -inf, out 0, zero gradients).
    q, k, v = _inputs(1, 50, 40, 2, 1, 64, jnp.float32)
    out, lse = _check(q, k, v, q_pos_BT=_arange(1, 50, 30), kv_pos_BS=_arange(1, 40, 40),
                      block_sizes=_bs())
    assert bool(jnp.all(jnp.isneginf(lse[:, :10]))) and bool(jnp.all(out[:, :10] == 0))
    assert bool(jnp.all(jnp.isfinite(lse[:, 10:])))


def test_bf16_head_dim_128_block_q_128():
    # block_q=128: two 64-row wgmma groups per warpgroup; q and kv blocks of different sizes.
    q, k, v = _inputs(1, 128, 128, 2, 1, 128, jnp.bfloat16)
    pos = _arange(1, 128)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=100), block_sizes=_bs(128, 64))


@pytest.fixture
def race_states(monkeypatch):
    """The race detector's state of every kernel interpreted in the test, in order. The interpreter makes a fresh
    one per kernel, so its `get_races()` holds only the last kernel's (jax 0.12 also raises on a race)."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    name = next(n for n in ("RaceDetectionState", "GPURaceDetectionState") if hasattr(gpu_callbacks, n))
    real, states = getattr(gpu_callbacks, name), []

    def make(*args, **kwargs):
        states.append(real(*args, **kwargs))
        return states[-1]

    monkeypatch.setattr(gpu_callbacks, name, make)
    return states


def _race_params():
    """Race detection on, reporting rather than raising where this jax can choose (the states are checked)."""
    on_race = {"on_race": "warn"} if "on_race" in flash_mgpu.InterpretGPUParams.__dataclass_fields__ else {}
    return flash_mgpu.InterpretGPUParams(detect_races=True, **on_race)


@pytest.mark.parametrize("wait_first", [True, False])
def test_the_race_detector_sees_a_read_before_its_copy_lands(race_states, wait_first):
    # The control for the race tests below: a TMA copy into SMEM read before its barrier is waited on is a race.
    def body(x_ref, o_ref, smem, bar):
        plgpu.copy_gmem_to_smem(x_ref, smem, bar.at[0])
        if wait_first:
            plgpu.barrier_wait(bar.at[0])
        y = smem[...] * 2.0
        if not wait_first:
            plgpu.barrier_wait(bar.at[0])
        o_ref[...] = y

    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((64, 64), jnp.float32),
                          scratch_types=[plgpu.SMEM((64, 64), jnp.float32),
                                         plgpu.Barrier(num_arrivals=1, num_barriers=1)],
                          interpret=_race_params())
    assert float(jax.block_until_ready(kernel(jnp.ones((64, 64), jnp.float32))).sum()) == 2 * 64 * 64
    assert len(race_states) == 1 and race_states[0].races_found is not wait_first


def test_pipeline_has_no_races(race_states):
    # The interpreter's happens-before race detector over TMA copies, barriers and SMEM reads,
    # through a two-slot ring in all three kernels. (A missing barrier wait raises in the interpreter.)
    q, k, v = _inputs(1, 128, 128, 2, 1, 64, jnp.bfloat16)
    pos = _arange(1, 128)
    params = _race_params()

    def loss(q, k, v):
        out, lse = flash_mgpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(causal=False), interpret=params,
                                        block_sizes=_bs(stages=2))
        return out.astype(jnp.float32).sum() + lse.sum()

    jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    assert len(race_states) == 3 and not any(s.races_found for s in race_states)  # forward, dq, dk/dv


def test_two_warpgroups_with_a_producer(race_states):
    # warpgroups=2: two compute warpgroups share the K/V ring of the forward and dq kernels and a producer
    # warpgroup fills it. The interpreter runs the three as host threads, and each blocks inside an XLA
    # host callback while it waits on a barrier; XLA's CPU client runs callbacks on a pool as large as
    # the cores, so on 2 cores the third thread can starve (a hang, seen here). The pool's size comes from
    # NPROC (xla/pjrt/cpu/cpu_client.cc), so this test reruns itself in a child process with NPROC=8.
    if "NPROC" not in os.environ:
        this = f"{__file__}::test_two_warpgroups_with_a_producer"
        child = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", this],
            env={**os.environ, "NPROC": "8"}, cwd=Path(__file__).parent.parent, capture_output=True, text=True,
            timeout=900)
        assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
        return
    # bf16, causal, GQA, T=256: 2 q blocks of 128 rows, each split over the two warpgroups; the second walks
    # its fully visible kv blocks in the mask-free phase; a 3-slot ring. (Masks, padding and segments do
    # not depend on the warpgroups: the one-warpgroup tests above cover them.)
    bs = flash_mgpu.BlockSizes(block_q=128, block_k=64, num_stages=3, skip_full_masks=True, warpgroups=2,
                               block_q_dkv=64)
    q, k, v = _inputs(1, 256, 256, 2, 1, 64, jnp.bfloat16)
    pos = _arange(1, 256)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, block_sizes=bs)
    # The race detector over the producer / consumer barriers through a 2-slot ring (a missing wait or
    # release raises).
    params = _race_params()
    q, k, v = _inputs(1, 128, 256, 2, 1, 64, jnp.bfloat16)

    def loss(q, k, v):
        out, lse = flash_mgpu.attention(q, k, v, q_pos_BT=_arange(1, 128), kv_pos_BS=_arange(1, 256),
                                        mask=Mask(causal=False), interpret=params,
                                        block_sizes=dataclasses.replace(bs, num_stages=2))
        return out.astype(jnp.float32).sum() + lse.sum()

    race_states.clear()  # the numeric check's kernels ran without the detector
    jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    assert len(race_states) == 3 and not any(s.races_found for s in race_states)  # forward, dq, dk/dv


# ----------------------------------------------------------------------------- block skipping


def test_sliding_window_visits_about_two_blocks_per_query_block():
    # 8K tokens, 64-blocks, window 64: each q block needs its own and the previous kv block.
    T, bs = 8192, _bs()
    pos = _arange(2, T)
    visited, total = flash_mgpu.visited_blocks(pos, pos, mask=Mask(window=64), block_sizes=bs)
    n = T // 64
    assert total == 2 * n * n
    assert visited == 2 * (2 * n - 1)
    # Causal alone: the lower triangle; packed equal-length documents: the diagonal blocks only.
    visited_c, _ = flash_mgpu.visited_blocks(pos, pos, block_sizes=bs)
    assert visited_c == 2 * n * (n + 1) // 2
    seg = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) // 64, (2, T))
    visited_s, _ = flash_mgpu.visited_blocks(pos, pos, seg, seg, block_sizes=bs)
    assert visited_s == 2 * n
    # Chunks of 1024 at 4K with 256 x 256 blocks (its largest): each chunk is a causal triangle of 4 x 4 blocks,
    # 10 pairs, so 40 of 256 pairs, against 136 for causal alone.
    pos4k = _arange(1, 4096)
    assert flash_mgpu.visited_blocks(pos4k, pos4k, mask=Mask(chunk=1024), block_sizes=_bs(256, 256)) == (40, 256)
    assert flash_mgpu.visited_blocks(pos4k, pos4k, block_sizes=_bs(256, 256)) == (136, 256)


def test_full_block_runs():
    # Causal, 4 x 4 blocks: q block i sees kv blocks [0, i] and all of [0, i) (only the diagonal is masked);
    # kv block j is seen by q blocks [j, 4), fully by (j, 4). Rows: lo, hi, flo, fhi.
    pos = _arange(2, 256)
    seg = jnp.zeros_like(pos)
    st = flash_mgpu._static(jnp.bfloat16, 64, Mask(), None, None, None, _bs())
    kv, q = flash_mgpu._block_ranges(pos, pos, seg, seg, st)
    np.testing.assert_array_equal(kv, [[0, 0, 0, 0], [1, 2, 3, 4], [0, 0, 0, 0], [0, 1, 2, 3]])
    np.testing.assert_array_equal(q, [[0, 1, 2, 3], [4, 4, 4, 4], [1, 2, 3, 3], [4, 4, 4, 3]])
    # A document boundary inside block 1 (a second document from token 100): no pair that touches block 1 is
    # full, so q blocks 1 and 2 have empty runs (at their lo), and q block 3 sees kv block 2 fully.
    seg = jnp.broadcast_to((jnp.arange(256) >= 100).astype(jnp.int32), (2, 256))
    kv, _ = flash_mgpu._block_ranges(pos, pos, seg, seg, st)
    np.testing.assert_array_equal(kv, [[0, 0, 1, 1], [1, 2, 3, 4], [0, 0, 1, 2], [0, 0, 1, 3]])
    # One batch row where a block is not full makes it masked for the whole batch (the ranges are shared).
    seg2 = seg.at[0].set(0)
    kv, _ = flash_mgpu._block_ranges(pos, pos, seg2, seg2, st)
    np.testing.assert_array_equal(kv[2:], [[0, 0, 0, 2], [0, 0, 0, 3]])


def test_unmasked_loop_matches_masked_loop():
    # Fully visible blocks skip the element-wise mask; there it keeps every score, so out, lse and all three
    # gradients match the loop that masks every block to rounding: the two are different programs, which XLA
    # may fuse differently, so 1 bf16 ulp on the bf16 outputs and f32 rounding on the lse; a block masked
    # wrongly or skipped would be off by O(1). (GQA: the dk/dv kernel's per-head periods; a 256-token causal
    # sequence with 64-blocks has 6 full pairs of 10 visited.)
    q, k, v = _inputs(1, 256, 256, 4, 2, 64, jnp.bfloat16)
    pos = _arange(1, 256)
    st = flash_mgpu._static(jnp.bfloat16, 64, Mask(), None, None, None, flash_mgpu.BlockSizes(skip_full_masks=True))
    kv_ranges, _ = flash_mgpu._block_ranges(pos, pos, jnp.zeros_like(pos), jnp.zeros_like(pos), st)
    assert int((kv_ranges[3] - kv_ranges[2]).sum()) == 6  # the mask-free phase really runs
    kd = jax.random.split(jax.random.key(1), 2)
    do = jax.random.normal(kd[0], q.shape, jnp.float32)
    dlse = jax.random.normal(kd[1], q.shape[:3], jnp.float32)

    def run(skip):
        def fn(q, k, v):
            return flash_mgpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, interpret=True,
                                        block_sizes=flash_mgpu.BlockSizes(skip_full_masks=skip))
        return value_and_vjp(fn, q, k, v, do, dlse)

    for a, b in zip(jax.tree.leaves(run(True)), jax.tree.leaves(run(False)), strict=True):
        tol = 1e-6 if a.dtype == jnp.float32 else 2.0**-7
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_skipped_blocks_are_never_loaded():
    # Keys past the real ones carry NaN values and a segment no query has. If the kernels
    # copied those blocks in, 0 * NaN would poison out / dq / dk / dv; the [lo, hi) ranges must avoid them.
    # Their dk/dv programs run zero steps (dk = dv = 0), and so do the forward / dq programs of the
    # second q block, whose segment no key has (out 0, lse -inf, dq 0).
    B, T, S_real, S = 1, 128, 64, 192
    q, k, v = _inputs(B, T, S, 2, 1, 64, jnp.float32)
    k = k.at[:, S_real:].set(jnp.nan)
    v = v.at[:, S_real:].set(jnp.nan)
    pos = _arange(B, T)
    kv_pos = _arange(B, S)
    q_seg = jnp.where(jnp.arange(T) < 64, 0, 5)[None].astype(jnp.int32)
    kv_seg = jnp.where(jnp.arange(S) < S_real, 0, 7)[None].astype(jnp.int32)
    bs = _bs()
    kw = dict(q_pos_BT=pos, kv_pos_BS=kv_pos, q_seg_BT=q_seg, kv_seg_BS=kv_seg, mask=Mask(causal=False))
    assert flash_mgpu.visited_blocks(pos, kv_pos, q_seg, kv_seg, mask=Mask(causal=False), block_sizes=bs) == (1, 6)

    def ours(q, k, v):
        return flash_mgpu.attention(q, k, v, block_sizes=bs, interpret=True, **kw)

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
    assert bool(jnp.all(jnp.isneginf(lse[:, 64:]))) and bool(jnp.all(out[:, 64:] == 0))
    assert bool(jnp.all(dq[:, 64:] == 0))


# ----------------------------------------------------------------------------- validation


def test_bad_block_sizes_raise():
    for field, value in (("block_q", 32), ("block_k", 96), ("block_q", 320)):
        with pytest.raises(ValueError, match=f"BlockSizes.{field}={value} must be one of 64, 128, 192, 256"):
            flash_mgpu.BlockSizes(**{field: value})
    with pytest.raises(ValueError, match="BlockSizes.block_q must be a positive int"):
        flash_mgpu.BlockSizes(block_q=0)
    with pytest.raises(ValueError, match="BlockSizes.block_k must be a positive int"):
        flash_mgpu.BlockSizes(block_k=64.0)
    with pytest.raises(ValueError, match=r"BlockSizes.num_stages must be None or an int in \[1, 4\]"):
        flash_mgpu.BlockSizes(num_stages=0)
    for field, value in (("approx_math", 1), ("skip_full_masks", None)):
        with pytest.raises(ValueError, match=f"BlockSizes.{field} must be True or False, got {value}"):
            flash_mgpu.BlockSizes(**{field: value})
    with pytest.raises(ValueError, match="BlockSizes.warpgroups must be 1 or 2, got 3"):
        flash_mgpu.BlockSizes(block_q=192, warpgroups=3)
    with pytest.raises(ValueError, match="BlockSizes.block_q=64 must be a multiple of 128 with warpgroups=2"):
        flash_mgpu.BlockSizes(warpgroups=2)
    with pytest.raises(ValueError, match="BlockSizes.block_q_dkv=96 must be one of 64, 128, 192, 256"):
        flash_mgpu.BlockSizes(block_q_dkv=96)
    assert flash_mgpu.BlockSizes(block_q=128, block_k=256, num_stages=1).block_k == 256
    # Foreign (e.g. xla / gpu) block sizes are re-validated against the Mosaic GPU rules.
    from pallas_kernels.flash_attention import xla

    pos = _arange(1, 1024)
    assert flash_mgpu.visited_blocks(pos, pos, block_sizes=xla.BlockSizes(block_q=64, block_k=64)) == (136, 256)
    with pytest.raises(ValueError, match="block_q=100"):
        flash_mgpu.visited_blocks(pos, pos, block_sizes=xla.BlockSizes(block_q=100))


def test_bad_shapes_and_dtypes_raise():
    pos = _arange(1, 64)
    q, k, v = _inputs(1, 64, 64, 3, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="multiple of kv heads 2"):
        flash_mgpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, interpret=True)
    q, k, v = _inputs(1, 64, 64, 2, 1, 96, jnp.float32)
    with pytest.raises(ValueError, match="head_dim=96 must be 64 or 128"):
        flash_mgpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, interpret=True)
    q, k, v = _inputs(1, 64, 64, 2, 1, 64, jnp.float32)
    with pytest.raises(ValueError, match=r"q_pos \(1, 16\)"):
        flash_mgpu.attention(q, k, v, q_pos_BT=pos[:, :16], kv_pos_BS=pos, interpret=True)
    with pytest.raises(ValueError, match="given together"):
        flash_mgpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=pos, interpret=True)
    with pytest.raises(ValueError, match="q dtype int8 is not supported"):
        flash_mgpu.attention(q.astype(jnp.int8), k, v, q_pos_BT=pos, kv_pos_BS=pos, interpret=True)
    with pytest.raises(ValueError, match="window must be a positive int"):
        flash_mgpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=0), interpret=True)


def test_f32_split_is_exact_under_jit():
    # f32 operands become three bf16 terms. On an H200 the rounding split r - f32(bf16(r)) compiled to zero
    # (XLA drops the round trip: xla_allow_excess_precision), so f32 inputs ran at bf16 precision. The split
    # masks bits instead: the terms must sum back to x within f32 rounding, and the lower ones must not vanish.
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * np.exp(4 * rng.standard_normal(4096))).astype(np.float32)
    st = flash_mgpu._static(jnp.float32, 64, Mask(), None, None, None, _bs())
    parts = jax.jit(lambda x: flash_mgpu._split(x, st))(jnp.asarray(x))
    assert parts.shape == (3, 4096) and parts.dtype == jnp.bfloat16
    terms = np.asarray(parts.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(terms.sum(0), x, rtol=2.0**-23, atol=0)
    assert np.all(np.abs(terms[1]) > 0) and np.any(terms[2] != 0)


def test_shared_memory_budget_is_checked_when_compiling():
    # f32 inputs are three bf16 terms per value: at head_dim 128 the backward kernels exceed the
    # 227 KiB of SMEM a Hopper block can have, even with a one-slot ring. The check runs at trace
    # time, before any lowering, so it needs no GPU (the interpreter has no such limit).
    q, k, v = _inputs(1, 64, 64, 2, 1, 128, jnp.float32)
    pos = _arange(1, 64)

    def loss(q, k, v):
        return flash_mgpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos)[0].sum()

    jax.eval_shape(lambda q, k, v: flash_mgpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos), q, k, v)  # fwd fits
    with pytest.raises(ValueError, match=r"the dq kernel needs \d+ KiB of shared memory .* \(limit 227 KiB\)"):
        jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    with pytest.raises(ValueError, match="num_stages=2"):
        jax.eval_shape(lambda q: flash_mgpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos,
                                                      block_sizes=_bs(stages=2)), q)


@pytest.mark.parametrize("version, hopper, dtype, D, expected", [
    ((0, 11, 0), True, jnp.bfloat16, 128, "pallas-mosaic-gpu"), ((0, 10, 2), True, jnp.bfloat16, 128, "pallas-triton"),
    ((0, 11, 0), False, jnp.bfloat16, 128, "pallas-triton"),
    ((0, 11, 0), True, jnp.float32, 64, "pallas-mosaic-gpu"),
    ((0, 11, 0), True, jnp.float32, 128, "pallas-triton"),  # its blocks would not fit shared memory
    ((0, 11, 0), True, jnp.bfloat16, 96, "pallas-triton")])
def test_ops_runs_mosaic_gpu_on_hopper_from_jax_0_11(monkeypatch, version, hopper, dtype, D, expected):
    from lc_jax import ops

    monkeypatch.setattr(jax, "__version_info__", version)
    monkeypatch.setattr(flash_mgpu, "on_hopper", lambda: hopper)
    q = jnp.zeros((1, 8, 2, D), dtype)
    call = ops.Call(platform="gpu", dtype=dtype, head_dim=D, q_len=8, kv_len=8)
    assert ops.choose("pallas", call).name == expected
    # The ring takes the Triton kernel: Mosaic GPU declines it with its reason.
    assert ops.choose("pallas", ops.Call(platform="gpu", dtype=dtype, head_dim=D, q_len=8, kv_len=8,
                                         ring=True)).name == "pallas-triton"
    calls = []
    for name, module in (("pallas-triton", ops._gpu), ("pallas-mosaic-gpu", ops._mosaic_gpu)):
        monkeypatch.setattr(module, "attention", lambda *a, block_sizes, _n=name, **kw: calls.append((_n, block_sizes)))
    ops.FLASH[expected].run(q, None, None, block_sizes=None, call=call)
    kernel = ops._mosaic_gpu if expected == "pallas-mosaic-gpu" else ops._gpu
    assert calls == [(expected, kernel.BlockSizes())]


# ----------------------------------------------------------------------------- real lowering


_WG2 = flash_mgpu.BlockSizes(block_q=128, block_k=64, warpgroups=2, block_q_dkv=64, approx_math=True,
                              skip_full_masks=True)


@pytest.mark.parametrize("dtype, D, bs", [(jnp.bfloat16, 64, _bs(skip=False)), (jnp.bfloat16, 128, _bs(128, 64)),
                                          (jnp.bfloat16, 64, _bs(64, 128, 3, approx=True)), (jnp.float32, 64, _bs()),
                                          (jnp.bfloat16, 128, _WG2)], ids=["64", "128", "3slots", "f32", "wg2"])
def test_kernels_lower_for_cuda(dtype, D, bs):
    # No GPU needed: lowering for platform "cuda" runs the real Pallas -> Mosaic GPU lowering of all
    # three kernels (wgmma operand layouts and swizzles, TMA descriptors, register layouts of the
    # masks and softmax), with GQA, a window, chunks, sink tokens, packed segments, ALiBi and soft-cap. It stops at the
    # serialized Mosaic GPU module: no PTX / cubin is produced.
    B, T, H, K = 1, 100, 8, 2
    pos = _arange(B, T)
    seg = pos // 40
    slopes = jnp.full((H,), 0.1, jnp.float32)

    def loss(q, k, v):
        out, lse = flash_mgpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg,
                                        mask=Mask(window=50, chunk=30, sink_tokens=3), **alibi(slopes),
                                        logits_soft_cap=30.0, block_sizes=bs)
        return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

    text = lower_for("cuda", jax.grad(loss, argnums=(0, 1, 2)), *_inputs(B, T, T, H, K, D, dtype))
    for name in ("flash_attention_mgpu_fwd", "flash_attention_mgpu_dq", "flash_attention_mgpu_dkv"):
        assert name in text, name
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 3


@pytest.mark.skipif(not flash_mgpu.on_hopper(), reason="needs a Hopper GPU (sm_90): compiled wgmma / TMA kernels")
@pytest.mark.parametrize("D, dtype, bq, stages, switches", [
    (64, jnp.float32, 64, None, ""), (64, jnp.bfloat16, 64, 1, ""), (128, jnp.bfloat16, 64, None, ""),
    (128, jnp.bfloat16, 128, None, ""), (128, jnp.bfloat16, 64, None, "approx"),
    (128, jnp.bfloat16, 64, None, "approx+skip"), (64, jnp.float32, 64, None, "skip"),
    (128, jnp.bfloat16, 128, None, "approx+skip+wg2"),
])
def test_compiled_on_gpu(D, dtype, bq, stages, switches):
    # The full feature matrix on hardware: GQA, packed segments, causal + window + chunks, ALiBi, soft-cap,
    # lengths that are not a multiple of the block, plus MQA / bidirectional / empty rows below.
    B, T, H, K = 2, 200, 8, 2
    pos = _arange(B, T)
    seg = pos // 120
    slopes = 2.0 ** (-8.0 * jnp.arange(1, H + 1, dtype=jnp.float32) / H)
    tol = (2e-4, 2e-3) if dtype == jnp.float32 else None
    bs = _bs(bq, 64, stages, skip="skip" in switches, approx="approx" in switches)
    if "wg2" in switches:
        bs = dataclasses.replace(bs, warpgroups=2, block_q_dkv=64)
    q, k, v = _inputs(B, T, T, H, K, D, dtype)
    _check(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg,
           mask=Mask(window=100, chunk=70), **alibi(slopes), logits_soft_cap=20.0, block_sizes=bs, interpret=False,
           tol=tol)
    q, k, v = _inputs(1, 150, 130, 4, 1, D, dtype)
    _check(q, k, v, q_pos_BT=_arange(1, 150, 20), kv_pos_BS=_arange(1, 130, 40), mask=Mask(causal=False, window=60),
           block_sizes=bs, interpret=False, tol=tol)
