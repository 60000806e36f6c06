"""DSA's sparse attention as Pallas (Mosaic TPU) kernels: only the selected K/V rows ever leave HBM.

Same contract as `pallas_kernels/sparse_attention.py` (the XLA gather path):
query t attends to its own k selected keys idx[t, :], shared by all heads of
the query; under GQA query head h reads kv head h // (H // K) of those rows
(K/V are never repeated in memory); a `masks.Bias` (ALiBi) is computed
in-kernel (`masks.scores`) from q_pos, the selected keys' kv_pos and the
head's parameters; selections with valid=False are masked; the output
is (out_BTHD, lse_BTH) with an f32 lse that is -inf (and a zero output) where a
query has no valid selection; the `custom_vjp` backward also accepts a
cotangent for lse (ds = p * (dp - delta + dlse)).

Why a kernel. The XLA path gathers [block_q, k, K, D] rows per query block
into a fresh array (written to HBM, read back by the matmuls; again in the
backward). Here each program DMAs the selected rows straight from HBM into
VMEM and consumes them there: nothing T x S and nothing [T, k, D] is built in
the forward.

How. Batch and time are flattened into N = B * T query tokens and K / V into
[B * S, K * D] row tables, so one selected key of one query is one contiguous
row (all kv heads) that a single `pltpu.make_async_copy` moves. The wrapper
turns (idx, valid) into global row numbers b * S + idx, -1 where invalid,
flattened int32, which reach the kernel by scalar prefetch (SMEM); the
selected keys' positions and validity also travel as a small int32 VMEM block
[tokens, chunks, 2, chunk] (vectors are needed for masks and the bias, scalars for
DMA addresses). bf16 tables are [rows, 1, K * D] (`_table_shape`: Mosaic
cannot DMA one packed row to an odd row offset). Each program owns `block_q`
tokens; for each token it walks the k selections in chunks of `block_k` rows
through a two-slot VMEM buffer: while chunk n is computed, the row copies of
chunk n + 1 (the next chunk of the same token or the first of the next token)
are in flight. Invalid slots
are not copied; their buffer rows are zeroed instead, so stale or uninitialised
VMEM (NaN in interpret mode) never meets a zero probability. Per chunk and kv
head the scores of the G = H // K query heads of the group are one [G, D] x
[D, chunk] matmul; an online softmax (m, l, acc) runs over the chunks.

Backward. A second kernel makes the same gathers, recomputes p from the saved
lse, and writes dq per token and the per-selection rows dk_sel / dv_sel
[N, k, K * D] (TPU has no atomics to scatter into [S, K, D] from many
programs); the wrapper scatter-adds them (`.at[].add`, f32) into dk / dv.

Limits that shape the wrapper. Scalar prefetch lives in SMEM (1 MiB on v4+),
so one `pallas_call` takes at most `tokens_per_call` tokens (auto: an SMEM
budget of SMEM_FRACTION of SMEM in int32 indices); longer inputs are cut into
segments, `lax.map` in the forward and a `lax.scan` in the backward that
scatter-adds each segment's dk_sel / dv_sel into an f32 accumulator, which
also bounds the [tokens, k, K * D] intermediates of the backward.
`block_q` (auto: the largest of 8, 4, 2, 1 whose VMEM estimate fits
VMEM_AUTO_FRACTION of VMEM) bounds the per-program dk_sel / dv_sel output blocks.

Checked (tests/test_sparse_pallas.py): values and gradients against the XLA
path in interpret mode, DMA races with the interpreter's detector, the Pallas
-> Mosaic lowering for TPU; tests/test_tpu_compile.py runs Mosaic's full
compiler for v5e and v5p slices without a TPU (deviceless AOT). Not measured: speed
on a TPU. Every selected row costs one DMA descriptor for K and one for V,
issued by the scalar core; at DSA's k = 2048 that issue rate, rather than HBM
bandwidth, may bound the kernel.

Layout as the flash kernels: block sizes -> kernel bodies -> pallas_call
wrappers with shape validation -> custom_vjp -> public wrapper.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention.masks import Bias, like_vma, out_struct, pad_axis, scores
from pallas_kernels.sparse_attention import check_selection

_LANES = 128  # lane width: per-(token, head) statistics are broadcast along it
_SUBLANES = 8
# Budgets, as fractions of the traced-for chip's memories (pltpu.get_tpu_info; 64 MiB VMEM / 1 MiB SMEM if unknown).
SMEM_FRACTION = 3 / 8  # of SMEM for one call's scalar-prefetched indices (96 Ki int32 on v4+)
VMEM_AUTO_FRACTION = 1 / 8  # auto block_q: the largest whose VMEM estimate fits this share
VMEM_MAX_FRACTION = 3 / 4  # an estimate above this share is refused; also the kernels' scoped VMEM limit
AUTO_BLOCK_Q = (8, 4, 2, 1)

# ----------------------------------------------------------------------------- block sizes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Work split of the sparse kernels.

    block_q: query tokens per program (grid step); None picks the largest of
      8, 4, 2, 1 whose VMEM estimate (dominated by the backward's
      [block_q, k, K * D] dk_sel / dv_sel output blocks) fits VMEM_AUTO_FRACTION of VMEM.
    block_k: selected rows per DMA chunk, the double-buffered unit; a multiple
      of 8 (whole sublane tiles). A query's k selections are padded (with
      invalid slots, which move no data) to a multiple of the chunk, which is
      min(block_k, k rounded up to 8). 128 or 256 fill the MXU; the chunk is
      the lane dim of the [G, chunk] score tile and the row dim of dk_sel.
    tokens_per_call: query tokens per pallas_call (a multiple of block_q); None
      takes as many as SMEM_FRACTION of SMEM in scalar-prefetched indices allows.

    Every layout the kernels use is TPU-legal at any of these sizes (no
    interpret-only sizes, unlike the flash kernels' BlockSizes).
    """

    block_q: int | None = None
    block_k: int = 128
    tokens_per_call: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k", "tokens_per_call"):
            v = getattr(self, name)
            if v is None and name != "block_k":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                allowed = "a positive int" + ("" if name == "block_k" else " or None")
                raise ValueError(f"BlockSizes.{name} must be {allowed}, got {v!r}")
        if self.block_k % _SUBLANES:
            raise ValueError(f"BlockSizes.block_k={self.block_k} must be a multiple of {_SUBLANES}")
        if self.block_q is not None and self.tokens_per_call is not None and self.tokens_per_call % self.block_q:
            raise ValueError(f"BlockSizes.tokens_per_call={self.tokens_per_call} must be a multiple of "
                             f"block_q={self.block_q}")


@dataclasses.dataclass(frozen=True)
class _Static:
    heads: int  # H
    kv_heads: int  # K
    head_dim: int  # D
    v_head_dim: int  # Dv
    scale: float
    bias: Bias | None
    block_q: int
    chunk: int  # C: rows per DMA chunk
    n_chunks: int  # k padded = n_chunks * chunk
    tokens_per_call: int
    vmem_limit: int | None = None  # scoped VMEM limit (bytes) for Mosaic
    interpret: bool = False  # Pallas TPU interpret mode (CPU): fixed at trace time, so the VJP's calls match

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    @property
    def k_pad(self) -> int:
        return self.n_chunks * self.chunk


def _interpret(st: _Static):
    return pltpu.InterpretParams() if st.interpret else False


def _compiler_params(st: _Static):
    return pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=st.vmem_limit)


# ----------------------------------------------------------------------------- kernel bodies

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _row_copies(idx_ref, k_hbm, v_hbm, kbuf, vbuf, sem, *, base, slot, st: _Static, start: bool):
    """Start (or wait for) the row copies of one chunk: rows idx[base : base + C] into buffer `slot`.

    Invalid selections (idx -1) are not copied; at start their buffer rows are zeroed.
    """

    def one(j, carry):
        row = idx_ref[base + j]
        k_copy = pltpu.make_async_copy(k_hbm.at[pl.ds(row, 1)], kbuf.at[slot, pl.ds(j, 1)], sem.at[0, slot])
        v_copy = pltpu.make_async_copy(v_hbm.at[pl.ds(row, 1)], vbuf.at[slot, pl.ds(j, 1)], sem.at[1, slot])

        @pl.when(row >= 0)
        def _copy():
            if start:
                k_copy.start()
                v_copy.start()
            else:
                k_copy.wait()
                v_copy.wait()

        if start:
            @pl.when(row < 0)
            def _zero():
                kbuf[slot, pl.ds(j, 1)] = jnp.zeros((1, *kbuf.shape[2:]), kbuf.dtype)
                vbuf[slot, pl.ds(j, 1)] = jnp.zeros((1, *vbuf.shape[2:]), vbuf.dtype)

        return carry

    lax.fori_loop(0, st.chunk, one, 0)


def _rows(buf, slot):
    """The gathered rows of buffer `slot` as [C, W]."""
    x = buf[slot]
    return x.reshape(x.shape[0], x.shape[-1])


def _pipeline(idx_ref, k_hbm, v_hbm, kbuf, vbuf, sem, st: _Static):
    """(fetch(t, c) -> slot, prefetch_first()): the double-buffered walk over (token, chunk) steps of a program."""
    nc, C = st.n_chunks, st.chunk
    steps = st.block_q * nc
    tok0 = pl.program_id(0) * st.block_q

    def copies(step, slot, start):
        t, c = step // nc, step % nc
        _row_copies(idx_ref, k_hbm, v_hbm, kbuf, vbuf, sem, base=(tok0 + t) * st.k_pad + c * C, slot=slot, st=st,
                    start=start)

    def fetch(t, c):
        step = t * nc + c
        slot = step % 2

        @pl.when(step + 1 < steps)
        def _next():
            copies(step + 1, 1 - slot, True)

        copies(step, slot, False)
        return slot

    return fetch, lambda: copies(0, 0, True)


def _group_params(params_ref, kh: int, st: _Static) -> tuple:
    """The bias parameters of kv group kh's G query heads: P columns [G, 1] of the lane-broadcast [H, P * 128] table."""
    if st.bias is None:
        return ()
    rows = slice(kh * st.groups, (kh + 1) * st.groups)
    return tuple(params_ref[rows, p * _LANES:p * _LANES + 1] for p in range(st.bias.num_params))


def _chunk_scores(qg, kc, sel, qpos, params, st: _Static):
    """Masked f32 scores [G, C] of one kv group over one chunk; sel [2, C] = (kv_pos, valid) of the chunk."""
    s = lax.dot_general(qg, kc, _NT, preferred_element_type=jnp.float32) * st.scale
    s, _, _ = scores(s, qpos, sel[0:1, :], None, None, params, mask=None, bias=st.bias, soft_cap=None)
    return jnp.where(sel[1:2, :] != 0, s, -jnp.inf)


def _fwd_kernel(idx_ref, qpos_ref, *refs, st: _Static):
    params_ref = None
    if st.bias is not None:
        params_ref, *refs = refs
    q_ref, sel_ref, k_hbm, v_hbm, o_ref, lse_ref, kbuf, vbuf, sem = refs
    K, G, D, Dv = st.kv_heads, st.groups, st.head_dim, st.v_head_dim
    fetch, prefetch_first = _pipeline(idx_ref, k_hbm, v_hbm, kbuf, vbuf, sem, st)
    prefetch_first()

    def token(t, carry):
        q = q_ref[t]  # [H, D]
        qpos = qpos_ref[pl.program_id(0) * st.block_q + t]

        def chunk(c, state):
            slot = fetch(t, c)
            kc, vc, sel = _rows(kbuf, slot), _rows(vbuf, slot), sel_ref[t, c]
            new = []
            for kh in range(K):
                m, l, acc = state[kh]
                params = _group_params(params_ref, kh, st)
                s = _chunk_scores(q[kh * G:(kh + 1) * G], kc[:, kh * D:(kh + 1) * D], sel, qpos, params, st)
                m_new = jnp.maximum(m, s.max(-1, keepdims=True))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = jnp.exp(s - m_use)
                alpha = jnp.exp(m - m_use)
                v = vc[:, kh * Dv:(kh + 1) * Dv]
                pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
                new.append((m_new, alpha * l + p.sum(-1, keepdims=True), alpha * acc + pv))
            return tuple(new)

        init = tuple((jnp.full((G, 1), -jnp.inf, jnp.float32), jnp.zeros((G, 1), jnp.float32),
                      jnp.zeros((G, Dv), jnp.float32)) for _ in range(K))
        state = lax.fori_loop(0, st.n_chunks, chunk, init)
        for kh, (m, l, acc) in enumerate(state):
            safe_l = jnp.where(l == 0, 1.0, l)
            o_ref[t, kh * G:(kh + 1) * G, :] = (acc / safe_l).astype(o_ref.dtype)
            lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(safe_l))
            lse_ref[t, kh * G:(kh + 1) * G, :] = jnp.broadcast_to(lse, (G, _LANES))
        return carry

    lax.fori_loop(0, st.block_q, token, 0)


def _bwd_kernel(idx_ref, qpos_ref, *refs, st: _Static):
    params_ref = None
    if st.bias is not None:
        params_ref, *refs = refs
    (q_ref, do_ref, lse_ref, di_ref, sel_ref, k_hbm, v_hbm,
     dq_ref, dk_ref, dv_ref, kbuf, vbuf, sem) = refs
    K, G, D, Dv = st.kv_heads, st.groups, st.head_dim, st.v_head_dim
    fetch, prefetch_first = _pipeline(idx_ref, k_hbm, v_hbm, kbuf, vbuf, sem, st)
    prefetch_first()

    def token(t, carry):
        q, do = q_ref[t], do_ref[t]  # [H, D], [H, Dv]
        lse, di = lse_ref[t][:, 0:1], di_ref[t][:, 0:1]  # [H, 1]
        qpos = qpos_ref[pl.program_id(0) * st.block_q + t]

        def chunk(c, dqs):
            slot = fetch(t, c)
            kc, vc, sel = _rows(kbuf, slot), _rows(vbuf, slot), sel_ref[t, c]
            new = []
            for kh in range(K):
                rows = slice(kh * G, (kh + 1) * G)
                params = _group_params(params_ref, kh, st)
                qg, dog = q[rows], do[rows]
                k, v = kc[:, kh * D:(kh + 1) * D], vc[:, kh * Dv:(kh + 1) * Dv]
                s = _chunk_scores(qg, k, sel, qpos, params, st)
                p = jnp.exp(s - lse[rows])  # masked s = -inf -> p = 0
                dp = lax.dot_general(dog, v, _NT, preferred_element_type=jnp.float32)
                ds = p * (dp - di[rows]) * st.scale  # [G, C]
                new.append(dqs[kh] + lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32))
                dk_ref[t, c, :, kh * D:(kh + 1) * D] = lax.dot_general(
                    ds.astype(qg.dtype).T, qg, _NN, preferred_element_type=jnp.float32).astype(dk_ref.dtype)
                dv_ref[t, c, :, kh * Dv:(kh + 1) * Dv] = lax.dot_general(
                    p.astype(dog.dtype).T, dog, _NN, preferred_element_type=jnp.float32).astype(dv_ref.dtype)
            return tuple(new)

        dqs = lax.fori_loop(0, st.n_chunks, chunk, tuple(jnp.zeros((G, D), jnp.float32) for _ in range(K)))
        for kh, dq in enumerate(dqs):
            dq_ref[t, kh * G:(kh + 1) * G, :] = dq.astype(dq_ref.dtype)
        return carry

    lax.fori_loop(0, st.block_q, token, 0)


# ----------------------------------------------------------------------------- pallas_call wrappers


def _check_call_shapes(q, k, v, idx, sel, q_pos, st: _Static):
    """Validate one call's operands: q [Tc, H, D], k [R, K*D], v [R, K*Dv], idx [Tc*kp], sel [Tc, nc, 2, C]."""
    Tc, H, D = q.shape
    if (H, D) != (st.heads, st.head_dim) or Tc != st.tokens_per_call:
        raise ValueError(f"q {q.shape} must be ({st.tokens_per_call}, {st.heads}, {st.head_dim})")
    if k.shape != _table_shape(k.shape[0], st.kv_heads * D, k.dtype):
        raise ValueError(f"k rows {k.shape} must be {_table_shape(k.shape[0], st.kv_heads * D, k.dtype)}")
    if v.shape != _table_shape(k.shape[0], st.kv_heads * st.v_head_dim, v.dtype):
        raise ValueError(f"v rows {v.shape} must be {_table_shape(k.shape[0], st.kv_heads * st.v_head_dim, v.dtype)}")
    if idx.shape != (Tc * st.k_pad,) or idx.dtype != jnp.int32:
        raise ValueError(f"idx {idx.shape} {idx.dtype} must be int32 ({Tc * st.k_pad},)")
    if sel.shape != (Tc, st.n_chunks, 2, st.chunk) or sel.dtype != jnp.int32:
        raise ValueError(f"sel {sel.shape} {sel.dtype} must be int32 ({Tc}, {st.n_chunks}, 2, {st.chunk})")
    if q_pos.shape != (Tc,):
        raise ValueError(f"q_pos {q_pos.shape} must be ({Tc},)")
    if Tc % st.block_q:
        raise ValueError(f"tokens per call {Tc} is not a multiple of block_q={st.block_q}")


def _table_shape(R: int, W: int, dtype) -> tuple[int, ...]:
    """Shape of a K or V row table in HBM: [R, W]; [R, 1, W] for packed dtypes (bf16).

    A packed dtype holds two rows per 32-bit sublane, and Mosaic refuses a
    one-row DMA at an arbitrary row offset of a tiled dim ("offsets along tiled
    dimensions must be aligned to tiles"). With a unit second-minor dim every
    row is its own tile, the row index runs along an untiled dim, and the VMEM
    buffer [2, C, 1, W] is reshaped to [C, W] on load.
    """
    return (R, W) if jnp.dtype(dtype).itemsize >= 4 else (R, 1, W)


def _common_specs(st: _Static):
    """Scratch (two-slot row buffers, DMA semaphores [K|V, slot]) and the per-token sel / bias parameter specs."""
    C = st.chunk
    P = 0 if st.bias is None else st.bias.num_params
    return dict(
        sel=pl.BlockSpec((st.block_q, st.n_chunks, 2, C), lambda i, *_: (i, 0, 0, 0)),
        params=pl.BlockSpec((st.heads, P * _LANES), lambda i, *_: (0, 0)),
        hbm=pl.BlockSpec(memory_space=pl.ANY),
    )


def _row_buffer(x, st: _Static):
    """Two-slot VMEM buffer for one chunk of gathered rows of table x: [2, C, W], or [2, C, 1, W] (packed dtypes)."""
    return pltpu.VMEM((2, st.chunk, *x.shape[1:]), x.dtype)


def _scratch(k, v, st: _Static):
    return [_row_buffer(k, st), _row_buffer(v, st), pltpu.SemaphoreType.DMA((2, 2))]


def _fwd_call(q, k, v, idx, sel, q_pos, params, st: _Static):
    """One segment: out [Tc, H, Dv], lse rows [Tc, H, 128] f32."""
    _check_call_shapes(q, k, v, idx, sel, q_pos, st)
    Tc, H, D = q.shape
    Dv, bq = st.v_head_dim, st.block_q
    specs = _common_specs(st)
    in_specs = [pl.BlockSpec((bq, H, D), lambda i, *_: (i, 0, 0)), specs["sel"], specs["hbm"], specs["hbm"]]
    args = [q, sel, k, v]
    if st.bias is not None:
        in_specs.insert(0, specs["params"])
        args.insert(0, params)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        interpret=_interpret(st),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(Tc // bq,),
            in_specs=in_specs,
            out_specs=[pl.BlockSpec((bq, H, Dv), lambda i, *_: (i, 0, 0)),
                       pl.BlockSpec((bq, H, _LANES), lambda i, *_: (i, 0, 0))],
            scratch_shapes=_scratch(k, v, st),
        ),
        out_shape=[out_struct((Tc, H, Dv), q.dtype, q), out_struct((Tc, H, _LANES), jnp.float32, q)],
        compiler_params=_compiler_params(st),
        name="sparse_attention_fwd",
    )(idx, q_pos, *args)


def _bwd_call(q, k, v, do, lse_rows, di_rows, idx, sel, q_pos, params, st: _Static):
    """One segment: dq [Tc, H, D] and the per-selection rows dk_sel [Tc, nc, C, K*D], dv_sel [Tc, nc, C, K*Dv]."""
    _check_call_shapes(q, k, v, idx, sel, q_pos, st)
    Tc, H, D = q.shape
    Dv, bq, nc, C = st.v_head_dim, st.block_q, st.n_chunks, st.chunk
    if do.shape != (Tc, H, Dv) or lse_rows.shape != (Tc, H, _LANES) or di_rows.shape != (Tc, H, _LANES):
        raise ValueError(f"do {do.shape} / lse {lse_rows.shape} / di {di_rows.shape} must be "
                         f"({Tc}, {H}, {Dv}) / ({Tc}, {H}, {_LANES}) x 2")
    specs = _common_specs(st)

    def per_token(width):
        return pl.BlockSpec((bq, H, width), lambda i, *_: (i, 0, 0))

    def per_sel(width):
        return pl.BlockSpec((bq, nc, C, width), lambda i, *_: (i, 0, 0, 0))

    in_specs = [per_token(D), per_token(Dv), per_token(_LANES), per_token(_LANES), specs["sel"], specs["hbm"],
                specs["hbm"]]
    args = [q, do, lse_rows, di_rows, sel, k, v]
    if st.bias is not None:
        in_specs.insert(0, specs["params"])
        args.insert(0, params)
    return pl.pallas_call(
        functools.partial(_bwd_kernel, st=st),
        interpret=_interpret(st),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(Tc // bq,),
            in_specs=in_specs,
            out_specs=[per_token(D), per_sel(k.shape[-1]), per_sel(v.shape[-1])],
            scratch_shapes=_scratch(k, v, st),
        ),
        out_shape=[out_struct((Tc, H, D), q.dtype, q), out_struct((Tc, nc, C, k.shape[-1]), k.dtype, q),
                   out_struct((Tc, nc, C, v.shape[-1]), v.dtype, q)],
        compiler_params=_compiler_params(st),
        name="sparse_attention_bwd",
    )(idx, q_pos, *args)


# ----------------------------------------------------------------------------- custom_vjp


def _segments(x, st: _Static):
    """[Np, ...] -> [n_calls, tokens_per_call, ...]."""
    return x.reshape(x.shape[0] // st.tokens_per_call, st.tokens_per_call, *x.shape[1:])


def _lse_rows(x_NH):
    return jnp.broadcast_to(x_NH[..., None], (*x_NH.shape, _LANES))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _sparse(q, k, v, idx, sel, q_pos, params, st):
    return _sparse_fwd(q, k, v, idx, sel, q_pos, params, st)[0]


def _sparse_fwd(q, k, v, idx, sel, q_pos, params, st):
    """q [Np, H, D], k/v rows [B*S, K*D(v)], idx [Np, kp] int32 (-1 invalid), sel [Np, nc, 2, C], q_pos [Np]."""

    def call(a):
        q_s, idx_s, sel_s, qp_s = a
        return _fwd_call(q_s, k, v, idx_s.reshape(-1), sel_s, qp_s, params, st)

    segs = tuple(_segments(x, st) for x in (q, idx, sel, q_pos))
    if segs[0].shape[0] == 1:
        out, lse = call(tuple(x[0] for x in segs))
    else:
        out, lse = lax.map(call, segs)
        out, lse = out.reshape(q.shape[0], *out.shape[2:]), lse.reshape(q.shape[0], *lse.shape[2:])
    lse = lse[..., 0]
    return (out, lse), (q, k, v, out, lse, idx, sel, q_pos, params)


def _sparse_bwd(st, res, g):
    q, k, v, out, lse, idx, sel, q_pos, params = res
    do, dlse = g
    do = do.astype(q.dtype)
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [Np, H]
    di = delta - dlse.astype(jnp.float32)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)  # tokens with nothing valid have p == 0 anyway
    R = k.shape[0]

    def step(acc, a):
        dk_acc, dv_acc = acc
        q_s, do_s, lse_s, di_s, idx_s, sel_s, qp_s = a
        dq_s, dk_sel, dv_sel = _bwd_call(q_s, k, v, do_s, _lse_rows(lse_s), _lse_rows(di_s), idx_s.reshape(-1),
                                         sel_s, qp_s, params, st)
        rows = jnp.where(idx_s >= 0, idx_s, R).reshape(-1)  # invalid -> out of range, dropped
        dk_acc = dk_acc.at[rows].add(dk_sel.reshape(rows.shape[0], *k.shape[1:]).astype(jnp.float32), mode="drop")
        dv_acc = dv_acc.at[rows].add(dv_sel.reshape(rows.shape[0], *v.shape[1:]).astype(jnp.float32), mode="drop")
        return (dk_acc, dv_acc), dq_s

    init = like_vma((jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)), q, k, v)  # shard_map-safe
    xs = tuple(_segments(x, st) for x in (q, do, lse_safe, di, idx, sel, q_pos))
    if xs[0].shape[0] == 1:
        (dk, dv), dq = step(init, tuple(x[0] for x in xs))
    else:
        (dk, dv), dq = lax.scan(step, init, xs)
        dq = dq.reshape(q.shape)
    # Bias parameters (ALiBi slopes) are fixed by the scheme, never trained: zero cotangent (as in the flash kernels).
    dparams = None if params is None else jnp.zeros_like(params)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, dparams


_sparse.defvjp(_sparse_fwd, _sparse_bwd)


# ----------------------------------------------------------------------------- public wrapper


def _budgets() -> tuple[int, int]:
    """(VMEM bytes, SMEM bytes) of the TPU the kernels are traced for; 64 MiB / 1 MiB where unknown (interpret)."""
    try:
        info = pltpu.get_tpu_info()
        return int(info.vmem_capacity_bytes), int(info.smem_capacity_bytes)
    except Exception:  # noqa: BLE001  (no TPU backend: interpret mode on CPU)
        return 64 << 20, 1 << 20


def _vmem_estimate(bq, H, D, Dv, K, kp, C, itemsize) -> int:
    """Bytes of VMEM the backward (the larger kernel) needs per program: blocks double-buffered, tile-padded.

    Packed row buffers [2, C, 1, W] take 4 bytes per element (a bf16 row is
    padded to a pair of rows); one f32-sized copy of the chunk's rows is
    counted for Mosaic's internal values.
    """
    rup = lambda x, m: -(-x // m) * m  # noqa: E731
    h, lanes = rup(H, 16), lambda w: rup(w, _LANES)
    rows = lanes(K * D) + lanes(K * Dv)
    blocks = (bq * h * (2 * lanes(D) + lanes(Dv)) * itemsize  # q, dq, do
              + 2 * bq * h * _LANES * 4  # lse, di rows
              + bq * (kp // C) * _SUBLANES * lanes(C) * 4  # sel
              + bq * kp * rows * itemsize)  # dk_sel, dv_sel
    scratch = 2 * C * rows * max(itemsize, 4) + C * rows * 4
    return 2 * blocks + scratch


def _static(B, T, S, H, K, D, Dv, k_sel, dtype, scale, bias, bs: BlockSizes, interpret: bool) -> _Static:
    """Validate sizes against the chunk, SMEM (scalar prefetch) and VMEM budgets; pick the automatic sizes."""
    if k_sel < 1:
        raise ValueError(f"idx/valid must select k >= 1 keys per query, got k={k_sel}")
    if S < 1:
        raise ValueError("k/v must hold at least one key (S >= 1)")
    if D < 1 or Dv < 1:
        raise ValueError(f"head_dim {D} and v head_dim {Dv} must be >= 1")
    if B * S >= 2**31:
        raise ValueError(f"B*S = {B * S} rows do not fit int32 row numbers")
    vmem, smem = _budgets()
    words = int(smem * SMEM_FRACTION) // 4  # int32 indices one call may scalar-prefetch
    vmem_auto, vmem_max = int(vmem * VMEM_AUTO_FRACTION), int(vmem * VMEM_MAX_FRACTION)
    C = min(bs.block_k, -(-k_sel // _SUBLANES) * _SUBLANES)  # >= 8 rows: a 1-row chunk trips Mosaic's matmul
    nc = -(-k_sel // C)
    kp = nc * C
    if kp > words:
        raise ValueError(f"k={k_sel} selections per query (padded to {kp}) exceed the scalar-prefetch budget of "
                         f"{words} indices per call")
    itemsize = jnp.dtype(dtype).itemsize
    est = functools.partial(_vmem_estimate, H=H, D=D, Dv=Dv, K=K, kp=kp, C=C, itemsize=itemsize)
    if bs.block_q is None:
        bq = next((b for b in AUTO_BLOCK_Q if est(b) <= vmem_auto), 1)
        if est(bq) > vmem_max:
            raise ValueError(f"one query token's backward blocks need ~{est(1) >> 20} MiB of VMEM (k={k_sel}, "
                             f"K*D={K * D}); at most {vmem_max >> 20} MiB is allowed")
        bq = min(bq, B * T)
    else:
        bq = bs.block_q
        if est(bq) > vmem_max:
            raise ValueError(f"BlockSizes.block_q={bq} needs ~{est(bq) >> 20} MiB of VMEM (k={k_sel}, "
                             f"K*D={K * D}); at most {vmem_max >> 20} MiB is allowed: lower block_q")
    if bq * kp > words:
        raise ValueError(f"BlockSizes.block_q={bq} x k={kp} indices exceed the scalar-prefetch budget of "
                         f"{words} per call: lower block_q")
    n_tok = -(-(B * T) // bq) * bq
    if bs.tokens_per_call is None:
        tc = min(n_tok, (words // kp) // bq * bq)
    else:
        tc = bs.tokens_per_call
        if tc % bq:
            raise ValueError(f"BlockSizes.tokens_per_call={tc} must be a multiple of block_q={bq}")
        if tc * kp > words:
            raise ValueError(f"BlockSizes.tokens_per_call={tc} x k={kp} indices exceed the scalar-prefetch budget "
                             f"of {words} per call; at most {words // kp} tokens")
        tc = min(tc, n_tok)
    return _Static(heads=H, kv_heads=K, head_dim=D, v_head_dim=Dv, scale=float(D**-0.5 if scale is None else scale),
                   bias=bias, block_q=bq, chunk=C, n_chunks=nc, tokens_per_call=tc,
                   vmem_limit=max(16 << 20, vmem_max), interpret=interpret)


def sparse_attention(q_BTHD, k_BSKD, v_BSKD, idx_BTk, valid_BTk, *, q_pos_BT, kv_pos_BS, bias: Bias | None = None,
                     bias_params_HP=None, scale=None, block_sizes: BlockSizes | None = None, interpret: bool = False):
    """Pallas TPU attention of each query to its selected keys; returns (out_BTHD, lse_BTH f32, -inf if none valid).

    Same contract as `pallas_kernels.sparse_attention.sparse_attention`:
    `idx_BTk` (int) indexes the key axis, `valid_BTk` (bool) marks real
    selections; every valid index is attended to (visibility is the selector's
    job). Indices are clipped to [0, S). Differentiable in q, k, v (and via
    lse). `interpret=True` runs both kernels in Pallas TPU interpret mode.
    """
    bs = BlockSizes() if block_sizes is None else block_sizes
    if not isinstance(bs, BlockSizes):
        raise ValueError(f"block_sizes must be sparse_attention_tpu.BlockSizes or None, got {type(bs).__name__}")
    B, T, S, H, K, D = check_selection(q_BTHD, k_BSKD, v_BSKD, idx_BTk, valid_BTk, q_pos_BT, kv_pos_BS, bias,
                                       bias_params_HP)
    Dv = v_BSKD.shape[3]
    k_sel = idx_BTk.shape[2]
    st = _static(B, T, S, H, K, D, Dv, k_sel, q_BTHD.dtype, scale, bias, bs, interpret)
    N = B * T
    Np = -(-N // st.tokens_per_call) * st.tokens_per_call
    pad_n, pad_k = Np - N, st.k_pad - k_sel

    # Global row numbers into the [B*S, K*D] tables, -1 for invalid (and padded) slots.
    idx = jnp.clip(idx_BTk.astype(jnp.int32), 0, S - 1)
    rows = jnp.where(valid_BTk, idx + (jnp.arange(B, dtype=jnp.int32) * S)[:, None, None], -1)
    rows = pad_axis(pad_axis(rows.reshape(N, k_sel), 1, pad_k, -1), 0, pad_n, -1)  # [Np, kp]
    sel_pos = jax.vmap(lambda p, i: p[i])(kv_pos_BS.astype(jnp.int32), idx).reshape(N, k_sel)
    sel = jnp.stack([sel_pos, valid_BTk.reshape(N, k_sel).astype(jnp.int32)], 1)  # [N, 2, k]
    sel = pad_axis(pad_axis(sel, 2, pad_k, 0), 0, pad_n, 0)
    sel = sel.reshape(Np, 2, st.n_chunks, st.chunk).swapaxes(1, 2)  # [Np, nc, 2, C]
    q = pad_axis(q_BTHD.reshape(N, H, D), 0, pad_n, 0)
    q_pos = pad_axis(q_pos_BT.astype(jnp.int32).reshape(N), 0, pad_n, 0)
    params = None
    if bias is not None:  # [H, P * 128]: parameter p of head h lane-broadcast in columns [128 p, 128 (p + 1))
        P = bias.num_params
        params = jnp.broadcast_to(jnp.asarray(bias_params_HP, jnp.float32)[:, :, None], (H, P, _LANES))
        params = params.reshape(H, P * _LANES)
    k = k_BSKD.reshape(_table_shape(B * S, K * D, k_BSKD.dtype))
    v = v_BSKD.reshape(_table_shape(B * S, K * Dv, v_BSKD.dtype))
    out, lse = _sparse(q, k, v, rows, sel, q_pos, params, st)
    return out[:N].reshape(B, T, H, Dv), lse[:N].reshape(B, T, H)
