"""Flash attention as Pallas kernels for NVIDIA GPUs (Triton lowering): forward, dq and dk/dv, with block skipping.

Same contract as `reference.py` / `xla.py` / `tpu.py`: masks come from
positions and segment ids (`masks.Mask`: causal, sliding window, chunks;
packed documents), GQA/MQA without repeating K/V in memory (query head h reads
kv head h // (H // K), chosen in the BlockSpec index_map; the dk/dv kernel
loops over the G query heads of its kv head in-kernel, so nothing of size
G * S is ever allocated), a `masks.Bias` (ALiBi) computed in-kernel from head
h's parameters and added after the logit soft-cap (`masks.scores`), an f32
log-sum-exp that is -inf (with a zero output) for rows that see no key, bf16 /
f32 inputs with f32 accumulation, and a `custom_vjp` whose backward also
accepts a cotangent for the log-sum-exp (ds = p * (dp - delta + dlse)).

Kernel structure (the classic Triton flash-attention shape).
  * forward / dq: grid (B, H, nq). Each program owns one query block and keeps
    the whole key row of its (batch, kv head) as a ref ([S, D]); it walks kv
    blocks with `lax.fori_loop(lo[i], hi[i], ...)`, slicing `k_ref[pl.ds(...)]`.
  * dk / dv: grid (B, K, nk). Each program owns one kv block and loops over the
    G query heads of its kv head and the q blocks in [q_lo[j], q_hi[j]).
Block skipping: the wrapper summarises positions / segment ids per block
(`masks.block_visible`, any over the batch) and, for every q block, takes the
first and one-past-last kv block that can be visible (and the transpose for
the dk/dv kernel). These int32 [nq] / [nk] ranges are ordinary (tiny) kernel
inputs; the loops never load a kv block outside them, so blocks beyond the
causal triangle, the sliding window or the chunk cost nothing. Blocks *inside* a range
that happen to be fully masked (e.g. between packed documents) are still
visited and masked element-wise. `visited_blocks` reports the work from the
very same ranges.

Lengths are padded up to the block sizes in the wrapper; padded keys get
segment id -1 and padded queries -2, so neither is ever visible. Layout stays
[B, len, heads, D] (no transposes): the Triton lowering handles the strided
head axis with pointer arithmetic. Per-row statistics (lse, delta) are
[B, H, T] f32.

Lowering. Kernels are written in the portable Pallas style (grid, BlockSpecs,
ref indexing with `pl.ds`, `pl.program_id`, `lax.fori_loop`) and compiled with
the Pallas Triton lowering (`compiler_params=plgpu.CompilerParams(num_warps,
num_stages)` from `jax.experimental.pallas.triton`). The Triton lowering needs
power-of-two load shapes and tl.dot needs every matmul dim >= 16, hence the
BlockSizes checks (and a power-of-two head_dim >= 16 when compiled). f32 dots
use `Precision.HIGHEST` (IEEE, not TF32) so f32 results match the reference.
`interpret=True` runs the same kernels with the generic Pallas interpreter on
any backend (how the CPU tests run).

Mosaic GPU port. JAX deprecates the Pallas Triton lowering from 0.11;
`mosaic_gpu.py` has the same interface and contract written for Mosaic GPU
(TMA-staged K/V rings in shared memory, wgmma matmuls on 64-row warpgroup
tiles, the same [lo, hi) block ranges), and `lc_jax.ops` runs it instead of
this module on Hopper GPUs from jax 0.11.

Laid out as project rule: block sizes -> kernel bodies -> pallas_call wrappers
with shape validation -> custom_vjp -> public wrapper.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.masks import (
    CAUSAL,
    Bias,
    Mask,
    block_visible,
    check_qkv,
    head_row,
    out_struct,
    pad_axis,
    pad_positions,
    scores,
)

_MIN_BLOCK = 16  # tl.dot needs M, N, K >= 16

# ----------------------------------------------------------------------------- block sizes


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query / key block lengths (shared by the forward, dq and dk/dv kernels) and Triton launch knobs.

    block_q and block_k must be powers of two >= 16 (Triton load shapes are
    powers of two; tl.dot needs every dim >= 16). num_warps=None picks 4 for
    head_dim <= 64 and 8 otherwise.
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {v!r}")
            if not _is_pow2(v) or v < _MIN_BLOCK:
                raise ValueError(f"BlockSizes.{name}={v} must be a power of two >= {_MIN_BLOCK} (Triton lowering)")
        if self.num_warps is not None and (
            not isinstance(self.num_warps, int) or isinstance(self.num_warps, bool) or not _is_pow2(self.num_warps)
        ):
            raise ValueError(f"BlockSizes.num_warps must be None or a power of two, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or isinstance(self.num_stages, bool) or self.num_stages < 1:
            raise ValueError(f"BlockSizes.num_stages must be a positive int, got {self.num_stages!r}")


@dataclasses.dataclass(frozen=True)
class _Static:
    mask: Mask
    bias: Bias | None
    scale: float
    soft_cap: float | None
    block_q: int
    block_k: int
    num_warps: int | None
    num_stages: int
    interpret: bool = False  # fixed at trace time, so the VJP's calls match


# ----------------------------------------------------------------------------- kernel bodies

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_HIGHEST = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)  # IEEE f32 on Triton (bf16 inputs: plain bf16 MMA)


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _scores(q, k, qp, qs, kp, ks, params, st: _Static):
    """f32 scores [bq, bk] (soft-capped, then biased), their mask, and tanh(s/cap) for the backward."""
    s = _dot(q, k, _NT) * st.scale
    return scores(s, qp[:, None], kp[None, :], qs[:, None], ks[None, :], params, mask=st.mask, bias=st.bias,
                  soft_cap=st.soft_cap)


def _fwd_kernel(lo_ref, hi_ref, *refs, st: _Static):
    params_ref = None
    if st.bias is not None:
        params_ref, *refs = refs
    q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, o_ref, lse_ref = refs
    h, i = pl.program_id(1), pl.program_id(2)
    bq, bk = st.block_q, st.block_k
    params = head_row(params_ref, h, st.bias)
    q, qp, qs = q_ref[...], qp_ref[...], qs_ref[...]

    def body(j, carry):
        m_prev, l_prev, acc = carry
        kv = pl.ds(pl.multiple_of(j * bk, bk), bk)
        v = v_ref[kv, :]
        s, mask, _ = _scores(q, k_ref[kv, :], qp, qs, kp_ref[kv], ks_ref[kv], params, st)
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m_prev, s.max(axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet
        p = jnp.exp(s - m_use[:, None])
        alpha = jnp.exp(m_prev - m_use)
        l_new = alpha * l_prev + p.sum(axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, _NN)
        return m_new, l_new, acc

    init = (
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, o_ref.shape[-1]), jnp.float32),
    )
    m, l, acc = lax.fori_loop(lo_ref[i], hi_ref[i], body, init)
    empty = l == 0.0
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(safe_l))


def _probs_and_dscores(q, k, v, do, lse, di, qp, qs, kp, ks, params, st: _Static):
    """Recompute p from the saved lse; ds = p * (dp - (delta - dlse)), through the soft-cap, times scale."""
    s, mask, t = _scores(q, k, qp, qs, kp, ks, params, st)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dp = _dot(do, v, _NT)
    ds = p * (dp - di[:, None])
    if t is not None:
        ds = ds * (1.0 - t * t)
    return p, ds * st.scale


def _dq_kernel(lo_ref, hi_ref, *refs, st: _Static):
    params_ref = None
    if st.bias is not None:
        params_ref, *refs = refs
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qp_ref, qs_ref, kp_ref, ks_ref, dq_ref = refs
    h, i = pl.program_id(1), pl.program_id(2)
    bk = st.block_k
    params = head_row(params_ref, h, st.bias)
    q, do, lse, di, qp, qs = q_ref[...], do_ref[...], lse_ref[...], di_ref[...], qp_ref[...], qs_ref[...]

    def body(j, dq):
        kv = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k = k_ref[kv, :]
        _, ds = _probs_and_dscores(q, k, v_ref[kv, :], do, lse, di, qp, qs, kp_ref[kv], ks_ref[kv], params, st)
        return dq + _dot(ds.astype(k.dtype), k, _NN)

    dq = lax.fori_loop(lo_ref[i], hi_ref[i], body, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, *refs, st: _Static, groups: int):
    params_ref = None
    if st.bias is not None:
        params_ref, *refs = refs
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qp_ref, qs_ref, kp_ref, ks_ref, dk_ref, dv_ref = refs
    j = pl.program_id(2)
    bq = st.block_q
    k, v, kp, ks = k_ref[...], v_ref[...], kp_ref[...], ks_ref[...]
    lo, hi = lo_ref[j], hi_ref[j]

    def per_head(g, carry):  # the G query heads that share this kv head
        params = head_row(params_ref, g, st.bias)  # this kv head's block of the table

        def per_q_block(t, carry):
            dk, dv = carry
            rows = pl.ds(pl.multiple_of(t * bq, bq), bq)
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]
            p, ds = _probs_and_dscores(
                q, k, v, do, lse_ref[g, rows], di_ref[g, rows], qp_ref[rows], qs_ref[rows], kp, ks, params, st
            )
            dv = dv + _dot(p.astype(do.dtype), do, _TN)
            dk = dk + _dot(ds.astype(q.dtype), q, _TN)
            return dk, dv

        return lax.fori_loop(lo, hi, per_q_block, carry)

    init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, groups, per_head, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_call wrappers


def _check_blocked_shapes(q, k, v, q_pos, kv_pos, q_seg, kv_seg, st: _Static):
    """Validate the padded [B, len, heads, D] operands the kernels see."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} must all be rank 4 [B, len, heads, D]")
    B, T, H, D = q.shape
    Bk, S, K, Dk = k.shape
    if Bk != B or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k {k.shape} / v {v.shape} must share batch, length and heads (q {q.shape})")
    if Dk != D:
        raise ValueError(f"q head_dim {D} != k head_dim {Dk} (q {q.shape}, k {k.shape})")
    if K == 0 or H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K} (q {q.shape}, k {k.shape})")
    if T % st.block_q:
        raise ValueError(f"padded query length {T} is not a multiple of block_q={st.block_q}")
    if S % st.block_k:
        raise ValueError(f"padded key length {S} is not a multiple of block_k={st.block_k}")
    if not st.interpret:
        for name, d in (("head_dim", D), ("value head_dim", v.shape[3])):
            if not _is_pow2(d) or d < _MIN_BLOCK:
                raise ValueError(f"{name}={d} must be a power of two >= {_MIN_BLOCK} for the Triton lowering")
    for name, x, want in (("q_pos", q_pos, (B, T)), ("q_seg", q_seg, (B, T)),
                          ("kv_pos", kv_pos, (B, S)), ("kv_seg", kv_seg, (B, S))):
        if x.shape != want:
            raise ValueError(f"{name} has shape {x.shape}, expected {want}")


def _compiler_params(st: _Static, D: int):
    num_warps = st.num_warps if st.num_warps is not None else (4 if D <= 64 else 8)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=st.num_stages)


def _span(vis_NM):
    """Per row: [lo, hi) = first and one-past-last True column; (0, 0) for an all-False row."""
    M = vis_NM.shape[1]
    any_ = vis_NM.any(axis=1)
    lo = jnp.argmax(vis_NM, axis=1)
    hi = M - jnp.argmax(vis_NM[:, ::-1], axis=1)
    return jnp.where(any_, lo, 0).astype(jnp.int32), jnp.where(any_, hi, 0).astype(jnp.int32)


def _block_ranges(q_pos, kv_pos, q_seg, kv_seg, st: _Static):
    """(kv_lo, kv_hi) int32 [nq] for forward / dq, (q_lo, q_hi) int32 [nk] for dk / dv."""
    B, T = q_pos.shape
    S = kv_pos.shape[1]
    nq, nk = T // st.block_q, S // st.block_k
    vis_NM = block_visible(
        q_pos.reshape(B, nq, st.block_q), kv_pos.reshape(B, nk, st.block_k),
        q_seg.reshape(B, nq, st.block_q), kv_seg.reshape(B, nk, st.block_k),
        mask=st.mask,
    )  # [nq, nk], any over the batch
    return (*_span(vis_NM), *_span(vis_NM.T))


def _fwd_call(q, k, v, q_pos, kv_pos, q_seg, kv_seg, params, ranges, st: _Static):
    _check_blocked_shapes(q, k, v, q_pos, kv_pos, q_seg, kv_seg, st)
    B, T, H, D = q.shape
    S, K, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // K
    bq = st.block_q
    nq = T // bq
    kv_lo, kv_hi = ranges[0], ranges[1]
    in_specs = [
        pl.BlockSpec((nq,), lambda b, h, i: (0,)),
        pl.BlockSpec((nq,), lambda b, h, i: (0,)),
        pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
        pl.BlockSpec((None, S, None, D), lambda b, h, i: (b, 0, h // G, 0)),
        pl.BlockSpec((None, S, None, Dv), lambda b, h, i: (b, 0, h // G, 0)),
        pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
        pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
        pl.BlockSpec((None, S), lambda b, h, i: (b, 0)),
        pl.BlockSpec((None, S), lambda b, h, i: (b, 0)),
    ]
    args = [kv_lo, kv_hi, q, k, v, q_pos, q_seg, kv_pos, kv_seg]
    if st.bias is not None:  # [H * P] f32
        in_specs.insert(2, pl.BlockSpec((H * st.bias.num_params,), lambda b, h, i: (0,)))
        args.insert(2, params.reshape(-1))
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=(B, H, nq),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, Dv), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
        ],
        out_shape=[out_struct((B, T, H, Dv), q.dtype, q), out_struct((B, H, T), jnp.float32, q)],
        compiler_params=_compiler_params(st, D),
        interpret=st.interpret,
        name="flash_attention_gpu_fwd",
    )(*args)
    return out, lse


def _dq_call(q, k, v, do, lse, di, q_pos, kv_pos, q_seg, kv_seg, params, ranges, st: _Static):
    _check_blocked_shapes(q, k, v, q_pos, kv_pos, q_seg, kv_seg, st)
    B, T, H, D = q.shape
    S, K, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // K
    bq = st.block_q
    nq = T // bq
    if lse.shape != (B, H, T) or di.shape != (B, H, T) or do.shape != (B, T, H, Dv):
        raise ValueError(f"lse {lse.shape} / delta {di.shape} / dout {do.shape} do not match q {q.shape}")
    kv_lo, kv_hi = ranges[0], ranges[1]
    in_specs = [
        pl.BlockSpec((nq,), lambda b, h, i: (0,)),
        pl.BlockSpec((nq,), lambda b, h, i: (0,)),
        pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
        pl.BlockSpec((None, S, None, D), lambda b, h, i: (b, 0, h // G, 0)),
        pl.BlockSpec((None, S, None, Dv), lambda b, h, i: (b, 0, h // G, 0)),
        pl.BlockSpec((None, bq, None, Dv), lambda b, h, i: (b, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
        pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
        pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
        pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
        pl.BlockSpec((None, S), lambda b, h, i: (b, 0)),
        pl.BlockSpec((None, S), lambda b, h, i: (b, 0)),
    ]
    args = [kv_lo, kv_hi, q, k, v, do, lse, di, q_pos, q_seg, kv_pos, kv_seg]
    if st.bias is not None:  # [H * P] f32
        in_specs.insert(2, pl.BlockSpec((H * st.bias.num_params,), lambda b, h, i: (0,)))
        args.insert(2, params.reshape(-1))
    return pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(B, H, nq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
        out_shape=out_struct((B, T, H, D), q.dtype, q),
        compiler_params=_compiler_params(st, D),
        interpret=st.interpret,
        name="flash_attention_gpu_dq",
    )(*args)


def _dkv_call(q, k, v, do, lse, di, q_pos, kv_pos, q_seg, kv_seg, params, ranges, st: _Static):
    _check_blocked_shapes(q, k, v, q_pos, kv_pos, q_seg, kv_seg, st)
    B, T, H, D = q.shape
    S, K, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // K
    bk = st.block_k
    nk = S // bk
    if lse.shape != (B, H, T) or di.shape != (B, H, T) or do.shape != (B, T, H, Dv):
        raise ValueError(f"lse {lse.shape} / delta {di.shape} / dout {do.shape} do not match q {q.shape}")
    q_lo, q_hi = ranges[2], ranges[3]
    # grid (b, kv head, kv block); the G query heads of the kv head are one block on the head axis.
    in_specs = [
        pl.BlockSpec((nk,), lambda b, kh, j: (0,)),
        pl.BlockSpec((nk,), lambda b, kh, j: (0,)),
        pl.BlockSpec((None, T, G, D), lambda b, kh, j: (b, 0, kh, 0)),
        pl.BlockSpec((None, bk, None, D), lambda b, kh, j: (b, j, kh, 0)),
        pl.BlockSpec((None, bk, None, Dv), lambda b, kh, j: (b, j, kh, 0)),
        pl.BlockSpec((None, T, G, Dv), lambda b, kh, j: (b, 0, kh, 0)),
        pl.BlockSpec((None, G, T), lambda b, kh, j: (b, kh, 0)),
        pl.BlockSpec((None, G, T), lambda b, kh, j: (b, kh, 0)),
        pl.BlockSpec((None, T), lambda b, kh, j: (b, 0)),
        pl.BlockSpec((None, T), lambda b, kh, j: (b, 0)),
        pl.BlockSpec((None, bk), lambda b, kh, j: (b, j)),
        pl.BlockSpec((None, bk), lambda b, kh, j: (b, j)),
    ]
    args = [q_lo, q_hi, q, k, v, do, lse, di, q_pos, q_seg, kv_pos, kv_seg]
    if st.bias is not None:  # the [G * P] parameters of kv head kh's query heads
        in_specs.insert(2, pl.BlockSpec((G * st.bias.num_params,), lambda b, kh, j: (kh,)))
        args.insert(2, params.reshape(-1))
    return pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, groups=G),
        grid=(B, K, nk),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bk, None, D), lambda b, kh, j: (b, j, kh, 0)),
            pl.BlockSpec((None, bk, None, Dv), lambda b, kh, j: (b, j, kh, 0)),
        ],
        out_shape=[out_struct((B, S, K, D), k.dtype, q), out_struct((B, S, K, Dv), v.dtype, q)],
        compiler_params=_compiler_params(st, D),
        interpret=st.interpret,
        name="flash_attention_gpu_dkv",
    )(*args)


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, params, ranges, st):
    return _fwd_call(q, k, v, q_pos, kv_pos, q_seg, kv_seg, params, ranges, st)


def _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, params, ranges, st):
    out, lse = _fwd_call(q, k, v, q_pos, kv_pos, q_seg, kv_seg, params, ranges, st)
    return (out, lse), (q, k, v, out, lse, q_pos, kv_pos, q_seg, kv_seg, params, ranges)


def _flash_bwd(st, res, g):
    q, k, v, out, lse, q_pos, kv_pos, q_seg, kv_seg, params, ranges = res
    do, dlse = g  # [B, T, H, Dv], [B, H, T]
    do = do.astype(q.dtype)
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # [B, H, T]
    di = delta - dlse.astype(jnp.float32)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows that see nothing have p == 0 anyway
    args = (q, k, v, do, lse_safe, di, q_pos, kv_pos, q_seg, kv_seg, params, ranges, st)
    dq = _dq_call(*args)
    dk, dv = _dkv_call(*args)
    # Bias parameters (ALiBi slopes) are fixed by the scheme, never trained: zero cotangent (as in xla.py / tpu.py).
    dparams = None if params is None else jnp.zeros_like(params)
    return dq, dk, dv, None, None, None, None, dparams, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- public wrapper


def _as_block_sizes(block_sizes) -> BlockSizes:
    """None -> defaults; another implementation's block sizes (e.g. xla/tpu BlockSizes) are re-validated here."""
    if block_sizes is None:
        return BlockSizes()
    if isinstance(block_sizes, BlockSizes):
        return block_sizes
    return BlockSizes(block_q=block_sizes.block_q, block_k=block_sizes.block_k)


def _static(D, mask: Mask, bias: Bias | None, scale, logits_soft_cap, bs: BlockSizes, interpret: bool = False):
    return _Static(
        mask=mask,
        bias=bias,
        scale=float(D**-0.5 if scale is None else scale),
        soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        block_q=bs.block_q,
        block_k=bs.block_k,
        num_warps=bs.num_warps,
        num_stages=bs.num_stages,
        interpret=bool(interpret),
    )


def _prepare(q_BTHD, k_BSKD, v_BSKD, q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, mask, bias, bias_params_HP,
             scale, logits_soft_cap, block_sizes, interpret):
    """Shape checks, padding to whole blocks and block ranges, shared by the forward and `attention_bwd`.

    Returns ((T, S), padded (q_pos, kv_pos, q_seg, kv_seg), padding functions (rows: pad the T axis, cols: pad
    the S axis), bias params, ranges, static).
    """
    bs = _as_block_sizes(block_sizes)
    B, T, S, H, K, D = check_qkv(q_BTHD, k_BSKD, v_BSKD, bias, bias_params_HP)
    q_pos, kv_pos, q_seg, kv_seg, pad_t, pad_s = pad_positions(
        q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, bs.block_q, bs.block_k, always_segments=True, shape_BTS=(B, T, S))
    st = _static(D, mask, bias, scale, logits_soft_cap, bs, interpret)
    ranges = _block_ranges(q_pos, kv_pos, q_seg, kv_seg, st)
    rows = lambda x: pad_axis(x, 1, pad_t, 0)  # noqa: E731
    cols = lambda x: pad_axis(x, 1, pad_s, 0)  # noqa: E731
    params = None if bias_params_HP is None else jnp.asarray(bias_params_HP, jnp.float32)
    return (T, S), (q_pos, kv_pos, q_seg, kv_seg), (rows, cols), params, ranges, st


def attention(
    q_BTHD,
    k_BSKD,
    v_BSKD,
    *,
    q_pos_BT,
    kv_pos_BS,
    q_seg_BT=None,
    kv_seg_BS=None,
    mask: Mask = CAUSAL,
    bias: Bias | None = None,
    bias_params_HP=None,
    scale=None,
    logits_soft_cap=None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
):
    """Pallas GPU (Triton) flash attention; returns (out_BTHD, lse_BTH). Differentiable in q, k, v (and via lse).

    `interpret=True` runs every kernel (forward and backward) in the generic Pallas interpreter, on any backend.
    """
    (T, _), (q_pos, kv_pos, q_seg, kv_seg), (rows, cols), params, ranges, st = _prepare(
        q_BTHD, k_BSKD, v_BSKD, q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, mask, bias, bias_params_HP, scale,
        logits_soft_cap, block_sizes, interpret)
    out, lse = _flash(rows(q_BTHD), cols(k_BSKD), cols(v_BSKD), q_pos, kv_pos, q_seg, kv_seg, params, ranges, st)
    return out[:, :T], lse.transpose(0, 2, 1)[:, :T]


def attention_bwd(q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BTH, do_BTHD, dlse_BTH, *, q_pos_BT, kv_pos_BS,
                  q_seg_BT=None, kv_seg_BS=None, mask: Mask = CAUSAL, bias: Bias | None = None,
                  bias_params_HP=None, scale=None, logits_soft_cap=None, block_sizes: BlockSizes | None = None,
                  interpret: bool = False):
    """(dq, dk, dv) of one key shard given the rows' final out and lse (ring attention; see xla.attention_bwd)."""
    (T, S), (q_pos, kv_pos, q_seg, kv_seg), (rows, cols), params, ranges, st = _prepare(
        q_BTHD, k_BSKD, v_BSKD, q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, mask, bias, bias_params_HP, scale,
        logits_soft_cap, block_sizes, interpret)
    res = (rows(q_BTHD), cols(k_BSKD), cols(v_BSKD), rows(out_BTHD), rows(lse_BTH).transpose(0, 2, 1), q_pos, kv_pos,
           q_seg, kv_seg, params, ranges)
    dq, dk, dv = _flash_bwd(st, res, (rows(do_BTHD), rows(dlse_BTH).transpose(0, 2, 1)))[:3]
    return dq[:, :T], dk[:, :S], dv[:, :S]


def visited_blocks(q_pos_BT, kv_pos_BS, q_seg_BT=None, kv_seg_BS=None, *, mask: Mask = CAUSAL,
                   block_sizes: BlockSizes | None = None):
    """(visited, total) (batch row, q block, kv block) triples walked by the forward / dq kernels (per head).

    Computed from the same [lo, hi) ranges the kernels loop over; the ranges are
    shared by the batch, so visited = B * sum_i (hi_i - lo_i) and total = B * nq * nk.
    """
    bs = _as_block_sizes(block_sizes)
    B, T = q_pos_BT.shape
    S = kv_pos_BS.shape[1]
    q_pos, kv_pos, q_seg, kv_seg, _, _ = pad_positions(
        q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, bs.block_q, bs.block_k, always_segments=True, shape_BTS=(B, T, S))
    st = _static(1, mask, None, None, None, bs)
    kv_lo, kv_hi, _, _ = _block_ranges(q_pos, kv_pos, q_seg, kv_seg, st)
    nq, nk = q_pos.shape[1] // bs.block_q, kv_pos.shape[1] // bs.block_k
    return B * int((kv_hi - kv_lo).sum()), B * nq * nk
