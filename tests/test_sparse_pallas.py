"""Pallas TPU sparse attention (pallas_kernels/sparse_attention_tpu.py) against the XLA gather path.

The XLA path (pallas_kernels/sparse_attention.py) is itself checked against
full attention in tests/test_dsa.py. Everything here runs in Pallas TPU
interpret mode on CPU (`interpret=True`; each pallas_call costs ~0.3-1 s and
each jitted check ~1-2 s of XLA compile), so shapes are tiny: B <= 2, T <= 8,
k <= 20, 1-2 programs per call. Inputs and selections come from numpy (eager
jax ops would each compile). Selections are duplicate-free top-k of random
scores over the causally visible keys, so early queries have invalid slots
(fewer than k visible keys) and one query has none (lse -inf, zero output).

TPU legality: the Pallas -> Mosaic lowering is checked by lowering for platform
"tpu" under an abstract v5e mesh; tests/test_tpu_compile.py runs Mosaic's full
compiler (libtpu, part of the dev set-up) for v5e and v5p slices without a TPU.

Tolerances: f32 out / lse 1e-5 abs+rel, f32 grads 1e-4 abs+rel; bf16 inputs are
compared with the XLA path run on the same values upcast to f32, at 2e-2 for
out / lse and 5e-2 for grads (bf16 rounding of p and ds before the matmuls).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from kernel_checks import affine, alibi
from platforms import lower_for
from sparse_cases import check_against_xla, inputs, pos, select, value_and_vjp

from pallas_kernels import sparse_attention as xla_sparse
from pallas_kernels import sparse_attention_tpu as sparse_tpu

BS = sparse_tpu.BlockSizes


_inputs, _select, _pos, _value_and_vjp = inputs, select, pos, value_and_vjp


def _check(q, k, v, idx, valid, *, block_sizes, **kw):
    """The TPU kernel (interpret mode) against the XLA path; see sparse_cases.check_against_xla."""
    return check_against_xla(sparse_tpu.sparse_attention, q, k, v, idx, valid, block_sizes=block_sizes,
                             interpret=True, **kw)


# ----------------------------------------------------------------------------- numerics


def test_gqa_invalid_slots_and_empty_query():
    # 4 q heads / 2 kv heads. Queries at positions -1, 1, 3, ..., 13 see 0, 2, 4, ... keys: with k=8
    # the first four have invalid slots and query 0 has nothing valid. 2 programs x 1 chunk. A two-parameter
    # bias (per-head slope and offset) checks the kernels' lane-broadcast [H, P * 128] parameter table.
    B, T, S = 1, 8, 16
    q, k, v = _inputs(B, T, S, 4, 2, 128, jnp.float32)
    q_pos, kv_pos = _pos(B, T, -1, 2), _pos(B, S)
    idx, valid = _select(q_pos, kv_pos, 8)
    assert not bool(valid[0, 0].any()) and bool(valid[0, -1].all())
    out, lse, _ = _check(q, k, v, idx, valid, q_pos_BT=q_pos, kv_pos_BS=kv_pos, **affine(4),
                         block_sizes=BS(block_q=4, block_k=8))
    assert bool(jnp.all(jnp.isneginf(lse[:, 0]))) and bool(jnp.all(out[:, 0] == 0))
    assert bool(jnp.all(jnp.isfinite(lse[:, 1:])))


def test_mqa_alibi_chunks_batch_rows_and_segments():
    # MQA (4 q heads / 1 kv head) with ALiBi, a custom scale and a v head dim of 64 (q/k: 128), as in
    # MLA-style DSA. k=20 in chunks of 8 (padded to 24, 3 chunks) and 2 tokens per program, so the
    # double buffer runs across chunks and tokens; B=2 (each row indexes its own batch's keys) and
    # 8 tokens in 2 pallas_calls of 4 (lax.map forward, lax.scan backward scatter-adding each segment).
    B, T, S = 2, 4, 40
    q, k, v = _inputs(B, T, S, 4, 1, 128, jnp.float32, seed=3, Dv=64)
    q_pos, kv_pos = _pos(B, T, 15, 8), _pos(B, S)
    idx, valid = _select(q_pos, kv_pos, 20, seed=4)
    assert not bool(valid[:, 0].all()) and bool(valid[:, -1].all())
    slopes = 2.0 ** (-8.0 * jnp.arange(1, 5, dtype=jnp.float32) / 4)
    _check(q, k, v, idx, valid, q_pos_BT=q_pos, kv_pos_BS=kv_pos, **alibi(slopes), scale=0.1,
           block_sizes=BS(block_q=2, block_k=8, tokens_per_call=4))


def test_bf16_gqa_alibi():
    # 4 q heads / 2 kv heads, k=16 in 2 chunks of 8, one program of 4 tokens.
    B, T, S = 1, 4, 32
    q, k, v = _inputs(B, T, S, 4, 2, 128, jnp.bfloat16, seed=7)
    q_pos, kv_pos = _pos(B, T, 10, 7), _pos(B, S)
    idx, valid = _select(q_pos, kv_pos, 16, seed=8)
    slopes = jnp.asarray([0.25, 0.125, 0.0625, 0.03125], jnp.float32)
    _check(q, k, v, idx, valid, q_pos_BT=q_pos, kv_pos_BS=kv_pos, **alibi(slopes),
           block_sizes=BS(block_q=4, block_k=8))


def test_unselected_rows_are_never_loaded():
    # K/V rows that no query validly selects hold NaN, and every invalid slot points at such a row.
    # Any load of them would poison out / lse / dq (0 * NaN, or NaN scores); dk / dv rows of them
    # must be exactly 0. The XLA path, run on clean copies, gives the expected values.
    B, T, S = 1, 8, 32
    q, k, v = _inputs(B, T, S, 4, 2, 128, jnp.float32, seed=9)
    q_pos, kv_pos = _pos(B, T, -1, 3), _pos(B, S)
    idx, valid = (np.asarray(x) for x in _select(q_pos, kv_pos, 8, seed=10))
    used = np.zeros((B, S), bool)  # rows some query validly selects
    for b in range(B):
        used[b, idx[b][valid[b]]] = True
    assert 0 < used.sum() < S and not valid.all()
    idx = jnp.asarray(np.where(valid, idx, int(np.argmin(used[0])))).astype(jnp.int32)
    valid = jnp.asarray(valid)
    poison = lambda x: jnp.where(jnp.asarray(used)[:, :, None, None], x, jnp.nan)  # noqa: E731
    kw = dict(idx_BTk=idx, valid_BTk=valid, q_pos_BT=q_pos, kv_pos_BS=kv_pos,
              **alibi(jnp.full((4,), 0.1, jnp.float32)))
    ours = functools.partial(sparse_tpu.sparse_attention, block_sizes=BS(block_q=4, block_k=8), interpret=True, **kw)
    ref = functools.partial(xla_sparse.sparse_attention, **kw)
    do = jnp.ones((B, T, 4, 128), jnp.float32)
    dlse = jnp.asarray(np.broadcast_to(np.asarray(valid).any(-1)[..., None], (B, T, 4)), jnp.float32)
    out, lse, (dq, dk, dv) = _value_and_vjp(ours, q, poison(k), poison(v), do, dlse)
    out_r, lse_r, (dq_r, dk_r, dv_r) = _value_and_vjp(ref, q, k, v, do, dlse)
    np.testing.assert_allclose(out, out_r, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, lse_r, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dq, dq_r, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(dk, dk_r, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(dv, dv_r, atol=1e-4, rtol=1e-4)
    assert np.all(np.asarray(dk)[~used] == 0) and np.all(np.asarray(dv)[~used] == 0)


def _race_detector():
    """(interpret params that detect races, a context asserting a race is / is not reported), per jax version.

    jax >= 0.12: public `InterpretParams(on_race="raise")`, a race fails the kernel's call.
    jax 0.10 / 0.11: no `on_race`; the detector records races in the interpreter's (private) state.
    """
    fields = {f.name for f in dataclasses.fields(pltpu.InterpretParams)}
    if "on_race" in fields:
        @contextlib.contextmanager
        def expect(race: bool):
            if race:
                with pytest.raises(Exception, match="RACE DETECTED"):
                    yield
            else:
                yield

        return pltpu.InterpretParams(detect_races=True, on_race="raise"), expect
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    except ImportError:
        pytest.fail(f"jax {jax.__version__}: neither InterpretParams.on_race nor the interpreter's race state")

    @contextlib.contextmanager
    def expect(race: bool):
        yield
        state = getattr(ipc, "races", None)
        assert state is not None and hasattr(state, "races_found"), f"jax {jax.__version__}: race state moved"
        assert state.races_found == race

    return pltpu.InterpretParams(detect_races=True), expect


def test_no_dma_races(monkeypatch):
    # The interpreter's race detector (vector clocks over every load, store and DMA) on the forward and
    # the backward kernel with 2 programs x 2 tokens x 2 chunks, i.e. double-buffer slot reuse; and,
    # as a control, a single-buffered pipeline (the next chunk's copies overwrite the slot about to be
    # read) that it must flag. The detector state is reset per kernel.
    params, expect = _race_detector()
    B, T, S = 1, 4, 24
    q, k, v = _inputs(B, T, S, 2, 1, 128, jnp.float32, seed=11)
    q_pos, kv_pos = _pos(B, T, 16, 2), _pos(B, S)
    idx, valid = _select(q_pos, kv_pos, 16, seed=12)

    def fn(q, k, v):
        return sparse_tpu.sparse_attention(q, k, v, idx, valid, q_pos_BT=q_pos, kv_pos_BS=kv_pos,
                                           block_sizes=BS(block_q=2, block_k=8))

    with pltpu.force_tpu_interpret_mode(params):
        with expect(race=False):
            (out, lse), vjp = jax.vjp(fn, q, k, v)  # the forward kernel runs here
            jax.block_until_ready(out)
        with expect(race=False):
            grads = jax.block_until_ready(vjp((jnp.ones_like(out), jnp.ones_like(lse))))
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)

        def single_buffered(idx_ref, k_hbm, v_hbm, kbuf, vbuf, sem, st):
            def copies(step, start):
                t, c = step // st.n_chunks, step % st.n_chunks
                base = (pl.program_id(0) * st.block_q + t) * st.k_pad + c * st.chunk
                sparse_tpu._row_copies(idx_ref, k_hbm, v_hbm, kbuf, vbuf, sem, base=base, slot=0, st=st, start=start)

            def fetch(t, c):
                step = t * st.n_chunks + c
                copies(step, False)
                pl.when(step + 1 < st.block_q * st.n_chunks)(lambda: copies(step + 1, True))
                return 0

            return fetch, lambda: copies(0, True)

        monkeypatch.setattr(sparse_tpu, "_pipeline", single_buffered)
        with expect(race=True):
            jax.block_until_ready(fn(q, k, v))


def test_under_shard_map():
    # Batch rows split over 2 (fake CPU) devices, 2 pallas_calls per shard: the outputs (out_struct)
    # and the backward's scan carries (like_vma) must carry the manual mesh axis.
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (conftest sets 8 fake CPU devices)")
    B, T, S = 2, 4, 24
    q, k, v = _inputs(B, T, S, 4, 2, 128, jnp.float32, seed=13)
    q_pos, kv_pos = _pos(B, T, 16, 2), _pos(B, S)
    idx, valid = _select(q_pos, kv_pos, 8, seed=14)
    mesh = jax.make_mesh((2,), ("data",))
    spec = jax.sharding.PartitionSpec("data")

    def loss(attn, q, k, v, idx, valid, q_pos, kv_pos):
        out, lse = attn(q, k, v, idx, valid, q_pos_BT=q_pos, kv_pos_BS=kv_pos)
        return (out * out).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

    ours = functools.partial(sparse_tpu.sparse_attention, interpret=True,
                             block_sizes=BS(block_q=2, block_k=8, tokens_per_call=2))
    grad = jax.shard_map(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2)), mesh=mesh, in_specs=(spec,) * 7,
                         out_specs=(spec,) * 3)
    args = [jax.device_put(x, jax.NamedSharding(mesh, spec)) for x in (q, k, v, idx, valid, q_pos, kv_pos)]
    grads = jax.jit(grad)(*args)
    grads_r = jax.jit(jax.grad(functools.partial(loss, xla_sparse.sparse_attention), argnums=(0, 1, 2)))(
        q, k, v, idx, valid, q_pos, kv_pos)
    for name, g, gr in zip("qkv", grads, grads_r):
        np.testing.assert_allclose(g, gr, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


# ----------------------------------------------------------------------------- validation


def test_bad_block_sizes_raise():
    with pytest.raises(ValueError, match="block_k=12 must be a multiple of 8"):
        BS(block_k=12)
    with pytest.raises(ValueError, match="block_q must be a positive int or None"):
        BS(block_q=0)
    with pytest.raises(ValueError, match="block_k must be a positive int"):
        BS(block_k=None)
    with pytest.raises(ValueError, match="tokens_per_call=6 must be a multiple of block_q=4"):
        BS(block_q=4, tokens_per_call=6)
    assert BS(block_q=3, block_k=16, tokens_per_call=9).block_k == 16


def test_bad_inputs_raise():
    B, T, S = 1, 8, 16
    q, k, v = _inputs(B, T, S, 4, 2, 128, jnp.float32)
    q_pos, kv_pos = _pos(B, T, 8), _pos(B, S)
    idx, valid = _select(q_pos, kv_pos, 8)

    def call(q=q, k=k, v=v, idx=idx, valid=valid, q_pos=q_pos, kv_pos=kv_pos, **kw):
        return sparse_tpu.sparse_attention(q, k, v, idx, valid, q_pos_BT=q_pos, kv_pos_BS=kv_pos, interpret=True,
                                           **kw)

    q3, k3, v3 = _inputs(B, T, S, 3, 2, 128, jnp.float32)
    with pytest.raises(ValueError, match="multiple of kv heads 2"):
        call(q=q3, k=k3, v=v3)
    with pytest.raises(ValueError, match=r"idx \(1, 8, 4\) / valid \(1, 8, 8\) must both be \(1, 8, k\)"):
        call(idx=idx[..., :4])
    with pytest.raises(ValueError, match="valid_BTk must be a bool array, got int32"):
        call(valid=valid.astype(jnp.int32))
    with pytest.raises(ValueError, match="idx_BTk must be an integer array, got float32"):
        call(idx=idx.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"q_pos \(1, 4\)"):
        call(q_pos=q_pos[:, :4])
    with pytest.raises(ValueError, match="dtypes must match"):
        call(k=k.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="k >= 1"):
        call(idx=idx[..., :0], valid=valid[..., :0])
    with pytest.raises(ValueError, match="block_sizes must be sparse_attention_tpu.BlockSizes"):
        call(block_sizes=(8, 128))
    # k vs the chunk / SMEM / VMEM budgets
    with pytest.raises(ValueError, match=r"tokens_per_call=16384 x k=8 indices exceed .* at most 12288 tokens"):
        call(block_sizes=BS(block_q=8, tokens_per_call=16384))
    big_idx = jnp.zeros((B, T, 100_000), jnp.int32)
    with pytest.raises(ValueError, match=r"k=100000 selections per query \(padded to 100096\) exceed"):
        call(idx=big_idx, valid=big_idx > 0)
    big_idx = jnp.zeros((B, T, 8192), jnp.int32)
    with pytest.raises(ValueError, match=r"BlockSizes.block_q=8 needs ~\d+ MiB of VMEM .* lower block_q"):
        call(idx=big_idx, valid=big_idx > 0, block_sizes=BS(block_q=8))


def test_auto_block_sizes():
    # Small k: 8 tokens per program; DSA-sized k=2048 with K*D=576 bf16 rows: the backward's dk/dv
    # blocks shrink block_q; the SMEM budget cuts the tokens into pallas_calls of 48.
    st = sparse_tpu._static(1, 64, 256, 4, 2, 128, 128, 16, jnp.float32, None, False, BS(), False)
    assert (st.block_q, st.chunk, st.n_chunks, st.tokens_per_call) == (8, 16, 1, 64)
    st = sparse_tpu._static(1, 4096, 8192, 16, 1, 576, 512, 2048, jnp.bfloat16, None, False, BS(), False)
    assert (st.block_q, st.chunk, st.n_chunks, st.tokens_per_call) == (1, 128, 16, 48)


# ----------------------------------------------------------------------------- TPU lowering


def _loss_fn(B, T, S, H, K, D, k, block_sizes=None):
    q_pos, kv_pos = _pos(B, T, S - T), _pos(B, S)
    idx, valid = _select(q_pos, kv_pos, k)
    slopes = jnp.full((H,), 0.1, jnp.float32)

    def loss(q, kk, v):
        out, lse = sparse_tpu.sparse_attention(q, kk, v, idx, valid, q_pos_BT=q_pos, kv_pos_BS=kv_pos,
                                               **alibi(slopes), block_sizes=block_sizes)
        return out.astype(jnp.float32).sum() + lse.sum()

    return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_mosaic_for_tpu(dtype):
    # No TPU here: lowering for platform "tpu" under an abstract v5e mesh runs the real Pallas -> Mosaic
    # lowering (block shapes, DMA shapes, supported primitives) of both kernels. Mosaic's compiler runs in
    # tests/test_tpu_compile.py. GQA, ALiBi, 2 chunks per query, 3 pallas_call segments.
    B, T, S, H, K, D, k = 1, 48, 512, 4, 2, 128, 256
    grad = _loss_fn(B, T, S, H, K, D, k, BS(block_q=2, tokens_per_call=16))
    mlir = lower_for("tpu", grad, *_inputs(B, T, S, H, K, D, dtype))
    assert mlir.count("tpu_custom_call") == 2  # forward (in lax.map) and backward (in lax.scan)
    assert "sparse_attention_fwd" in mlir and "sparse_attention_bwd" in mlir
