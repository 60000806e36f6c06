"""Pallas GPU (Triton) sparse attention (pallas_kernels/sparse_attention_gpu.py) against the XLA gather path.

The XLA path (pallas_kernels/sparse_attention.py) is itself checked against
full attention in tests/test_dsa.py. Without a GPU everything runs in the
generic Pallas interpreter (`interpret=True`: the same kernels, with the
gathers discharged to XLA gathers and the dk / dv atomics to sequential
read-modify-writes), so shapes are tiny: B <= 2, T <= 8, k <= 24. Inputs and
selections come from numpy (eager jax ops would each compile). Selections are
duplicate-free top-k of random scores over the causally visible keys, so
early queries have invalid slots (fewer than k visible keys) and one query
has none (lse -inf, zero output). The numeric, shard_map, lowering and GPU
tests run both backwards (`BlockSizes.backward`): dk / dv by atomics, and the
key-major kernel over the inverted selection.

GPU legality: `test_kernels_lower_to_triton_for_cuda` runs the real Pallas ->
Triton IR lowering of the kernels on the CPU host (power-of-two shapes,
pointer-tensor gathers, atomics, dynamic loop bounds; no PTX compile), as tests/test_flash_gpu.py
does for the flash kernels (`test_under_shard_map` lowers the compiled path
under shard_map as well); `test_compiled_on_gpu` runs the compiled kernels
and is skipped unless a GPU is the default backend (`make gpu-check` runs it;
it passed on an H200, benchmarks/results/gpu/h200/README.md, run 3).
`test_dsa_picks_the_gpu_kernel` checks DSA's dispatch with a faked backend.

Tolerances: f32 out / lse 1e-5 abs+rel, f32 grads 1e-4 abs+rel; bf16 inputs are
compared with the XLA path run on the same values upcast to f32, at 2e-2 for
out / lse and 5e-2 for grads (bf16 rounding of p and ds before the matmuls).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import affine, alibi
from platforms import abstract_mesh, lower_for
from sparse_cases import check_against_xla, inputs, pos, select, value_and_vjp

from pallas_kernels import sparse_attention as xla_sparse
from pallas_kernels import sparse_attention_gpu as sparse_gpu

BS = sparse_gpu.BlockSizes
# Both ways of summing dk / dv: f32 atomics from the query-major backward, or the key-major kernel over the
# inverted selection (a dq-only query-major pass beside it).
BACKWARDS = pytest.mark.parametrize("backward", sparse_gpu.BACKWARDS)
KERNELS = {"atomic": 2, "key_major": 3}  # Triton calls in a forward + backward


_inputs, _select, _pos, _value_and_vjp = inputs, select, pos, value_and_vjp


def _check(q, k, v, idx, valid, *, block_sizes, interpret=True, tol=None, **kw):
    """The Triton kernel (interpret mode) against the XLA path; see sparse_cases.check_against_xla."""
    return check_against_xla(sparse_gpu.sparse_attention, q, k, v, idx, valid, tol=tol, block_sizes=block_sizes,
                             interpret=interpret, **kw)


# ----------------------------------------------------------------------------- numerics


@BACKWARDS
def test_gqa_invalid_slots_and_empty_query(backward):
    # 4 q heads / 2 kv heads (G=2, padded to 16 in registers). Queries at positions -1, 1, 3, ..., 13 see
    # 0, 2, 4, ... keys: with k=8 (one 16-row chunk, 8 padded slots) the first four have invalid slots and
    # query 0 has nothing valid. 3 tokens per program: 8 tokens padded to 9. A two-parameter bias (per-head
    # slope and offset) checks the kernels' [K, P, Gp] parameter table.
    B, T, S = 1, 8, 16
    q, k, v = _inputs(B, T, S, 4, 2, 64, jnp.float32)
    q_pos, kv_pos = _pos(B, T, -1, 2), _pos(B, S)
    idx, valid = _select(q_pos, kv_pos, 8)
    assert not bool(valid[0, 0].any()) and bool(valid[0, -1].all())
    bs = BS(block_q=3, backward=backward, block_n=2)  # key-major: chunks of 2 selecting queries
    out, lse, _ = _check(q, k, v, idx, valid, q_pos_BT=q_pos, kv_pos_BS=kv_pos, **affine(4), block_sizes=bs)
    assert bool(jnp.all(jnp.isneginf(lse[:, 0]))) and bool(jnp.all(out[:, 0] == 0))
    assert bool(jnp.all(jnp.isfinite(lse[:, 1:])))


@BACKWARDS
def test_mqa_alibi_chunks_batch_rows_odd_head_dims(backward):
    # MQA (4 q heads / 1 kv head) with ALiBi, a custom scale and head dims 48 / 24 (not powers of two:
    # masked to 64 / 32 lanes in registers). k=20 in chunks of 16 (padded to 32, 2 chunks); B=2, so
    # each row indexes its own batch's keys and the dk / dv atomics of both rows share one accumulator.
    B, T, S = 2, 4, 40
    q, k, v = _inputs(B, T, S, 4, 1, 48, jnp.float32, seed=3, Dv=24)
    q_pos, kv_pos = _pos(B, T, 15, 8), _pos(B, S)
    idx, valid = _select(q_pos, kv_pos, 20, seed=4)
    assert not bool(valid[:, 0].all()) and bool(valid[:, -1].all())
    slopes = 2.0 ** (-8.0 * jnp.arange(1, 5, dtype=jnp.float32) / 4)
    _check(
        q,
        k,
        v,
        idx,
        valid,
        q_pos_BT=q_pos,
        kv_pos_BS=kv_pos,
        **alibi(slopes),
        scale=0.1,
        block_sizes=BS(block_q=2, block_k=16, backward=backward),
    )


@BACKWARDS
def test_bf16_gqa_alibi(backward):
    # 4 q heads / 2 kv heads, k=16 in one chunk, default block sizes.
    B, T, S = 1, 4, 32
    q, k, v = _inputs(B, T, S, 4, 2, 64, jnp.bfloat16, seed=7)
    q_pos, kv_pos = _pos(B, T, 10, 7), _pos(B, S)
    idx, valid = _select(q_pos, kv_pos, 16, seed=8)
    slopes = jnp.asarray([0.25, 0.125, 0.0625, 0.03125], jnp.float32)
    _check(q, k, v, idx, valid, q_pos_BT=q_pos, kv_pos_BS=kv_pos, **alibi(slopes), block_sizes=BS(backward=backward))


def test_unpadded_heads_and_dims():
    # 16 q heads / 1 kv head, D = Dv = 32: G and the head dims are already powers of two >= 16, so the
    # kernels take the plain (unmasked) tile loads and stores; two 16-row chunks.
    B, T, S = 1, 4, 24
    q, k, v = _inputs(B, T, S, 16, 1, 32, jnp.float32, seed=5)
    q_pos, kv_pos = _pos(B, T, 12, 3), _pos(B, S)
    idx, valid = _select(q_pos, kv_pos, 24, seed=6)
    st = sparse_gpu._static(B, S, 16, 1, 32, 32, 24, jnp.float32, None, False, BS(block_k=16), True)
    assert (st.groups, st.head_dim, st.n_chunks) == (st.groups_p, st.head_dim_p, 2)
    _check(q, k, v, idx, valid, q_pos_BT=q_pos, kv_pos_BS=kv_pos, block_sizes=BS(block_q=2, block_k=16))


def test_invert_selection_groups_tokens_by_key_row():
    # The key-major backward's index: for every row r, qids[starts[r]:starts[r + 1]] are exactly the tokens
    # whose selection holds r (duplicates kept: each adds its own dk / dv term), and invalid slots (-1) sit
    # after starts[R] under the sentinel key R.
    rng = np.random.default_rng(0)
    R, Np, kp = 10, 7, 5
    rows = rng.integers(-1, R, size=(Np, kp)).astype(np.int32)
    rows[2] = -1  # a token with nothing valid
    qids, starts = (np.asarray(x) for x in jax.jit(sparse_gpu.invert_selection, static_argnums=1)(rows, R))
    assert qids.shape == (Np * kp,) and starts.shape == (R + 2,) and starts[-1] == Np * kp
    for r in range(R):
        want = sorted(t for t in range(Np) for j in range(kp) if rows[t, j] == r)
        assert sorted(qids[starts[r]: starts[r + 1]].tolist()) == want, r
    assert starts[R + 1] - starts[R] == (rows < 0).sum()


@BACKWARDS
def test_unselected_rows_are_never_loaded(backward):
    # K/V rows that no query validly selects hold NaN, and every invalid slot points at such a row.
    # Key 0 is never validly selected either: the kernels gather invalid slots from row 0, masked, so
    # the masks (not the rows' values) must keep them out. Any unmasked use would poison out / lse / dq
    # (0 * NaN, or NaN scores); dk / dv rows of them must be exactly 0. The XLA path, run on clean
    # copies, gives the expected values.
    B, T, S = 1, 8, 32
    q, k, v = _inputs(B, T, S, 4, 2, 32, jnp.float32, seed=9)
    q_pos, kv_pos = _pos(B, T, -1, 3), _pos(B, S)
    idx, valid = (np.asarray(x) for x in _select(q_pos, kv_pos, 8, seed=10))
    valid = valid & (idx != 0)
    used = np.zeros((B, S), bool)  # rows some query validly selects
    for b in range(B):
        used[b, idx[b][valid[b]]] = True
    assert 0 < used.sum() < S and not valid.all() and not used[0, 0]
    idx = jnp.asarray(np.where(valid, idx, int(np.argmin(used[0])))).astype(jnp.int32)
    valid = jnp.asarray(valid)
    poison = lambda x: jnp.where(jnp.asarray(used)[:, :, None, None], x, jnp.nan)  # noqa: E731
    kw = dict(
        idx_BTk=idx, valid_BTk=valid, q_pos_BT=q_pos, kv_pos_BS=kv_pos, **alibi(jnp.full((4,), 0.1, jnp.float32))
    )
    ours = functools.partial(sparse_gpu.sparse_attention, block_sizes=BS(block_q=4, backward=backward),
                             interpret=True, **kw)
    ref = functools.partial(xla_sparse.sparse_attention, **kw)
    do = jnp.ones((B, T, 4, 32), jnp.float32)
    dlse = jnp.asarray(np.broadcast_to(np.asarray(valid).any(-1)[..., None], (B, T, 4)), jnp.float32)
    out, lse, (dq, dk, dv) = _value_and_vjp(ours, q, poison(k), poison(v), do, dlse)
    out_r, lse_r, (dq_r, dk_r, dv_r) = _value_and_vjp(ref, q, k, v, do, dlse)
    np.testing.assert_allclose(out, out_r, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, lse_r, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dq, dq_r, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(dk, dk_r, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(dv, dv_r, atol=1e-4, rtol=1e-4)
    assert np.all(np.asarray(dk)[~used] == 0) and np.all(np.asarray(dv)[~used] == 0)


@BACKWARDS
def test_under_shard_map(backward):
    # Batch rows split over 2 (fake CPU) devices. Interpreted, with check_vma=False: jax 0.10's generic
    # Pallas interpreter loses the varying manual axes inside the kernel's loops (as for the flash GPU
    # kernel in tests/test_ring.py). The compiled path is then traced and lowered for cuda with
    # check_vma=True: the outputs (out_struct) and the zero accumulators the backward aliases into its
    # outputs (like_vma) must carry the manual mesh axis.
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (conftest sets 8 fake CPU devices)")
    B, T, S = 2, 4, 24
    q, k, v = _inputs(B, T, S, 4, 2, 32, jnp.float32, seed=13)
    q_pos, kv_pos = _pos(B, T, 16, 2), _pos(B, S)
    idx, valid = _select(q_pos, kv_pos, 8, seed=14)
    slopes = jnp.full((4,), 0.1, jnp.float32)
    mesh = jax.make_mesh((2,), ("data",))
    spec = jax.sharding.PartitionSpec("data")

    def loss(attn, q, k, v, idx, valid, q_pos, kv_pos):
        out, lse = attn(q, k, v, idx, valid, q_pos_BT=q_pos, kv_pos_BS=kv_pos, **alibi(slopes))
        return (out * out).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

    def sharded_grad(interpret, check_vma, mesh=mesh):
        ours = functools.partial(sparse_gpu.sparse_attention, interpret=interpret, block_sizes=BS(backward=backward))
        fn = jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2))
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 7, out_specs=(spec,) * 3, check_vma=check_vma))

    args = [jax.device_put(x, jax.NamedSharding(mesh, spec)) for x in (q, k, v, idx, valid, q_pos, kv_pos)]
    grads = sharded_grad(True, False)(*args)
    grads_r = jax.jit(jax.grad(functools.partial(loss, xla_sparse.sparse_attention), argnums=(0, 1, 2)))(
        q, k, v, idx, valid, q_pos, kv_pos
    )
    for name, g, gr in zip("qkv", grads, grads_r):
        np.testing.assert_allclose(g, gr, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")
    with abstract_mesh("cuda", axes={"data": 2}) as gpus:  # vma type checks; no GPU needed
        shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.NamedSharding(gpus, spec)) for x in args]
        text = sharded_grad(False, True, gpus).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == KERNELS[backward]


@pytest.mark.parametrize(
    ("backend", "impl", "verified", "want"),
    [("gpu", "pallas", False, "pallas-triton"), ("gpu", "auto", False, "xla"), ("gpu", "auto", True, "pallas-triton"),
     ("gpu", "xla", True, "xla"), ("tpu", "pallas", False, "pallas-tpu")],
)
def test_dsa_picks_the_gpu_kernel(monkeypatch, backend, impl, verified, want):
    # DSA's sparse stage goes through ops.SPARSE: the Triton kernel on a GPU with impl='pallas' (and with 'auto'
    # only once the GPU check has passed it: ops.GPU_VERIFIED). Platform and kernels are faked: only the dispatch
    # is checked.
    from lc_jax import ops

    calls = []
    monkeypatch.setattr(ops, "platform", lambda: backend)
    key = "sparse-pallas-triton"
    passed = ops.GpuPass("NVIDIA H200", "9.0", "", "", "", ops.kernel_digest(key))  # as its code is now
    monkeypatch.setattr(ops, "GPU_VERIFIED", {key: passed} if verified else {})
    for name, mod in (("pallas-triton", ops._sparse_triton), ("pallas-tpu", ops._sparse_tpu)):
        monkeypatch.setattr(mod, "sparse_attention", lambda *a, _n=name, **kw: (calls.append(_n), None))
    monkeypatch.setattr(ops._sparse_xla, "sparse_attention", lambda *a, **kw: (calls.append("xla"), None, None))
    q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
    pos = jnp.zeros((1, 8), jnp.int32)
    ops.sparse_attention(q, q, q, None, None, q_pos_BT=pos, kv_pos_BS=pos, impl=impl)
    assert calls == [want]


# ----------------------------------------------------------------------------- validation


def test_bad_block_sizes_raise():
    with pytest.raises(ValueError, match="block_k=24 must be a power of two >= 16"):
        BS(block_k=24)
    with pytest.raises(ValueError, match="block_k=8 must be a power of two >= 16"):
        BS(block_k=8)
    with pytest.raises(ValueError, match="block_q must be a positive int, got 0"):
        BS(block_q=0)
    with pytest.raises(ValueError, match="block_q must be a positive int, got None"):
        BS(block_q=None)
    with pytest.raises(ValueError, match="num_warps=3 must be a power of two"):
        BS(num_warps=3)
    with pytest.raises(ValueError, match="num_stages must be a positive int"):
        BS(num_stages=0)
    with pytest.raises(ValueError, match=r"backward='dense' is not one of \('atomic', 'key_major'\)"):
        BS(backward="dense")
    with pytest.raises(ValueError, match="block_n=3 must be a power of two"):
        BS(block_n=3)
    assert BS(block_q=3, block_k=32, num_warps=8).block_k == 32


def test_bad_inputs_raise():
    B, T, S = 1, 8, 16
    q, k, v = _inputs(B, T, S, 4, 2, 32, jnp.float32)
    q_pos, kv_pos = _pos(B, T, 8), _pos(B, S)
    idx, valid = _select(q_pos, kv_pos, 8)

    def call(q=q, k=k, v=v, idx=idx, valid=valid, q_pos=q_pos, kv_pos=kv_pos, **kw):
        return sparse_gpu.sparse_attention(q, k, v, idx, valid, q_pos_BT=q_pos, kv_pos_BS=kv_pos, interpret=True, **kw)

    q3, k3, v3 = _inputs(B, T, S, 3, 2, 32, jnp.float32)
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
    with pytest.raises(ValueError, match=r"bias_params_HP must have shape \(4, 1\)"):
        call(**alibi(jnp.ones((2,), jnp.float32)))
    with pytest.raises(ValueError, match="block_sizes must be sparse_attention_gpu.BlockSizes"):
        call(block_sizes=(8, 128))


def test_auto_block_sizes():
    # Small k: the chunk is k rounded up to a power of two >= 16; D=128 bf16: 64-row chunks; MLA-sized
    # f32 / bf16 rows (576 / 512, gathered as 1024 / 512 lanes) shrink the chunk to fit TILE_BYTES.
    st = sparse_gpu._static(1, 256, 4, 2, 128, 128, 8, jnp.float32, None, False, BS(), False)
    assert (st.chunk, st.n_chunks, st.groups_p, st.num_warps) == (16, 1, 16, 4)
    st = sparse_gpu._static(1, 8192, 16, 1, 128, 128, 2048, jnp.bfloat16, None, False, BS(), False)
    assert (st.chunk, st.n_chunks, st.head_dim_p, st.num_warps) == (64, 32, 128, 4)
    st = sparse_gpu._static(1, 8192, 16, 1, 576, 512, 2048, jnp.bfloat16, None, False, BS(), False)
    assert (st.chunk, st.head_dim_p, st.v_head_dim_p, st.num_warps) == (16, 1024, 512, 8)
    st = sparse_gpu._static(1, 64, 4, 2, 64, 64, 20, jnp.float32, None, False, BS(block_k=64), False)
    assert (st.chunk, st.n_chunks) == (32, 1)
    # Key-major chunks: Gn query heads x (Dp + Dvp) f32 lanes per selecting query fit KEY_MAJOR_TILE_BYTES: 4
    # heads of 128 (4 KiB a query) -> 8; 16 heads (16 KiB) -> 2; G = 3 is gathered as 4 heads.
    for H, K, want in ((16, 4, (4, 8)), (16, 1, (16, 2)), (6, 2, (4, 8))):
        st = sparse_gpu._static(1, 64, H, K, 128, 128, 20, jnp.bfloat16, None, False, BS(backward="key_major"), False)
        assert (st.groups_n, st.chunk_n) == want, (H, K)


# ----------------------------------------------------------------------------- real lowering


@BACKWARDS
@pytest.mark.parametrize(
    ("dtype", "H", "K", "D", "Dv"),
    [(jnp.bfloat16, 4, 2, 64, 64), (jnp.float32, 4, 2, 48, 24), (jnp.bfloat16, 16, 1, 128, 64)],
)
def test_kernels_lower_to_triton_for_cuda(dtype, H, K, D, Dv, backward):
    # No GPU needed: lowering for platform "cuda" runs the real Pallas -> Triton IR lowering of both
    # kernels (power-of-two tensor shapes, masked pointer-tensor gathers and stores, atomics, dot
    # precisions), with ALiBi and several chunks: GQA with padded heads (G=2), odd head dims (masked
    # lanes), and MQA with 16 heads (unmasked tiles). It does not run Triton's PTX compiler, so
    # register / shared-memory limits are not checked.
    B, T, S = 1, 8, 64
    q_pos, kv_pos = _pos(B, T, S - T), _pos(B, S)
    idx, valid = _select(q_pos, kv_pos, 40)
    slopes = jnp.full((H,), 0.1, jnp.float32)

    def loss(q, k, v):
        out, lse = sparse_gpu.sparse_attention(
            q,
            k,
            v,
            idx,
            valid,
            q_pos_BT=q_pos,
            kv_pos_BS=kv_pos,
            **alibi(slopes),
            block_sizes=BS(block_q=2, block_k=16, backward=backward),
        )
        return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

    text = lower_for("cuda", jax.grad(loss, argnums=(0, 1, 2)), *_inputs(B, T, S, H, K, D, dtype, Dv=Dv))
    names = {"atomic": ["sparse_attention_gpu_bwd"], "key_major": ["sparse_attention_gpu_bwd_dq",
                                                                   "sparse_attention_gpu_bwd_dkv"]}[backward]
    for name in ("sparse_attention_gpu_fwd", *names):
        assert name in text, name
    assert text.count("__gpu$xla.gpu.triton") == KERNELS[backward]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: compiled Triton kernels")
@BACKWARDS
def test_compiled_on_gpu(backward):
    B, T, S, H, K = 2, 64, 256, 8, 2
    q_pos, kv_pos = _pos(B, T, S - T - 8), _pos(B, S)
    idx, valid = _select(q_pos, kv_pos, 100)
    slopes = 2.0 ** (-8.0 * jnp.arange(1, H + 1, dtype=jnp.float32) / H)
    for D, dtype in ((64, jnp.float32), (128, jnp.bfloat16)):
        q, k, v = _inputs(B, T, S, H, K, D, dtype)
        _check(
            q,
            k,
            v,
            idx,
            valid,
            q_pos_BT=q_pos,
            kv_pos_BS=kv_pos,
            **alibi(slopes),
            block_sizes=BS(backward=backward),
            interpret=False,
            tol=(2e-4, 2e-3) if dtype == jnp.float32 else None,
        )
