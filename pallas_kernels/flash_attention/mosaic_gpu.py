"""Flash attention as Pallas Mosaic GPU kernels (Hopper: TMA + wgmma): forward, dq and dk/dv, with block skipping.

Why. JAX deprecates the Pallas Triton lowering (`gpu.py`) from 0.11 in favour of
Mosaic GPU (`jax.experimental.pallas.mosaic_gpu`). These kernels are the
Mosaic GPU port: same contract and public interface as `gpu.attention`, so
`lc_jax.ops` can switch between them (see `ops._pallas`).

Contract (as `reference.py` / `xla.py` / `tpu.py` / `gpu.py`): masks come from
positions and segment ids (`masks.Mask`: causal, sliding window, chunks; packed
documents), GQA/MQA without repeating K/V in memory (query head h reads kv head
h // (H // K); the dk/dv kernel loops over the G query heads of its kv head), a
`masks.Bias` (ALiBi) computed in-kernel from head h's parameters (GMEM scalars)
and added after the logit soft-cap (`masks.scores`), an f32
log-sum-exp that is -inf (with a zero output) for rows that see no key, bf16 /
f16 / f32 inputs with f32 accumulation, and a `custom_vjp` whose backward also
accepts a cotangent for the log-sum-exp (ds = p * (dp - delta + dlse)).

Design (one warpgroup per CTA by default, 64-row warpgroup tiles; `BlockSizes.warpgroups=2` gives the
forward and dq kernels two compute warpgroups and a producer, see `_drive`).
  * forward / dq: grid (nq, H, B). The q tile (and dO, lse, delta for dq) is
    TMA-copied into shared memory once; the kv blocks in [lo[i], hi[i]) stream
    through a ring of `num_stages` SMEM slots, each filled by TMA copies that
    signal a per-slot barrier; block t + num_stages - 1 is prefetched while
    block t is computed.
  * dk / dv: grid (nk, K, B). The K/V tile stays in SMEM; the loop runs over
    (query head g of the kv head, q block in [q_lo[j], q_hi[j])) steps through
    the same kind of ring. Nothing of size G * S is ever allocated.
  * Matmuls are `plgpu.wgmma` with both operands in SMEM (128-byte swizzle,
    8-row x 128-byte tiles): S = Q K^T and dP = dO V^T read pre-transposed K^T / V^T
    tiles, P V and dS K read natural ones; the dk/dv kernel works on S^T =
    K Q^T so that P^T and dS^T come out of registers in the operand layout.
    P / dS are written to an SMEM tile (`commit_smem`) before their wgmma.
    dq, dk, dv accumulate in wgmma accumulator refs across the whole loop;
    the output accumulator of the forward is rescaled in registers.
  * f32 inputs: Hopper tensor cores take f32 only as TF32 (10-bit mantissa).
    Every f32 operand is instead split into three bf16 terms (x ~= hi + mid +
    lo, 24 mantissa bits) and a @ b is the six bf16 products with i + j < 3
    (the BF16_BF16_F32_X6 algorithm), accumulated in f32: f32-grade results at
    6x the MMAs and 1.5x the SMEM of f32. Inputs are split in the wrapper, P
    and dS in-kernel. 16-bit inputs use one term (one wgmma per product).
Block skipping: the wrapper summarises positions / segment ids per block
(`masks.block_visible`, any over the batch) into int32 [lo, hi) block ranges
(kv blocks per q block, q blocks per kv block), read by the kernels as GMEM
scalars; the loops never issue a TMA for a block outside them. Blocks inside a
range that are fully masked are visited and masked element-wise. Each range
also carries its first run of fully visible blocks (`masks.block_full`, all
over the batch: for causal attention every block but the diagonal one), which
the loop can walk in a phase of its own without computing the mask
(`BlockSizes.skip_full_masks`). `visited_blocks` reports the work from the
very same ranges.

Element-wise work. A 64 x 64 step's two wgmmas at D=128 take about as long
on an H100 / H200 as its ~4096 exps, mask terms and rescales on the CUDA
cores, and these kernels do not overlap the two (one warpgroup, synchronous
wgmma). Hence two switches, off until a GPU check has passed them: the
mask-free phase, and MUFU approximations for exp / log / tanh on 16-bit inputs
(`BlockSizes.approx_math`, Mosaic GPU's `approx_math`; f32 inputs need
libdevice's accurate functions for their 1e-5 contract).

Shared memory (a Hopper block has 227 KiB) bounds the configurations; with
the default 64 x 64 blocks the forward / dq / dk-dv kernels take about
bf16 D=64: 61 / 85 / 109 KiB, bf16 D=128: 109 / 157 / 197 KiB (two-slot
rings), f32 D=64: 165 / 165 / 213 KiB (the backward with one slot). f32 at
D=128 fits the forward only; the backward raises a ValueError at trace time
(`_pick_stages`), as does an explicit `num_stages` that does not fit.

Written for what jax 0.10.2 can check without a GPU. The GPU interpreter
(`InterpretGPUParams`, private in jax 0.10) runs these very kernels on CPU,
simulating SMEM, TMA copies, barriers and wgmma, over the whole grid; it does
not support `transpose_ref` operands, register (A) operands, `run_state`
accumulators or layout casts. Hence SMEM-only operands, pre-transposed K^T /
V^T / Q^T / dO^T copies made by the wrapper (the backward streams both
orientations of K, resp. Q and dO), fresh accumulators per P V product, and
`_hint`, which applies a register layout (pure metadata) only when compiling.
The interpreter runs wgmma synchronously, so the `wgmma_wait` / `commit_smem`
fences are checked by reasoning only. A production variant would keep P in
registers as the wgmma A operand, use `transpose_ref` instead of the copies,
and use producer/consumer warpgroup specialisation everywhere (`warpgroups=2`
has it in the forward and dq kernels; the interpreter runs the three warpgroups
as host threads). Lowering for "cuda" runs
on a CPU host (tests check it); compiling to a cubin and running need a GPU.

Lengths are padded up to the block sizes in the wrapper; padded keys get
segment id -1 and padded queries -2, so neither is ever visible. Layout stays
[B, len, heads, D] in HBM (TMA handles the strided head axis); per-row
statistics are [B, H, T] f32.

Laid out as project rule: block sizes -> kernel bodies -> kernel wrappers with
shape validation -> custom_vjp -> public wrapper.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention.masks import (
    CAUSAL,
    Bias,
    Mask,
    block_full,
    block_visible,
    check_qkv,
    head_row,
    pad_axis,
    pad_positions,
    scores,
)

try:  # private in jax 0.10: the Mosaic GPU interpreter (SMEM / TMA / barrier / wgmma simulation on CPU)
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:  # pragma: no cover - other jax versions
    InterpretGPUParams = None

_TILE = 64  # wgmma M tile (one warpgroup) and the 128-byte swizzle width of 16-bit values
_MAX_N = 256  # wgmma N limit
_SWIZZLE = 128  # bytes
_SMEM_LIMIT = 227 * 1024  # H100 / H200 dynamic shared memory per block
_REDUCTION_SCRATCH = plgpu.CompilerParams().reduction_scratch_bytes  # SMEM Mosaic reserves for reductions
_F32_PARTS = 3  # bf16 terms per f32 value (see module docstring)
_HEAD_DIMS = (64, 128)


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (sm_90): wgmma is Hopper-only (Blackwell has tcgen05 MMAs)."""
    if jax.default_backend() != "gpu":
        return False
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def use_by_default() -> bool:
    """Whether `lc_jax.ops` runs these kernels for impl='pallas': on Hopper, once jax (>= 0.11) deprecates Triton."""
    return tuple(jax.__version_info__[:2]) >= (0, 11) and on_hopper()


def supports(dtype, head_dim: int) -> bool:
    """Whether the default blocks fit shared memory for training (forward and backward) at this dtype / head dim.

    f32 at head dim 128 does not (the three-term split triples the operands);
    `lc_jax.ops` then keeps the Triton kernels.
    """
    return head_dim in _HEAD_DIMS and not (jnp.dtype(dtype) == jnp.float32 and head_dim == 128)


# ----------------------------------------------------------------------------- block sizes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query / key block lengths (shared by the forward, dq and dk/dv kernels) and the K/V ring depth.

    block_q and block_k must be multiples of 64 in [64, 256]: 64 rows is one
    warpgroup's wgmma tile and the 128-byte swizzle of a 16-bit operand row;
    256 is wgmma's largest N. num_stages is the number of SMEM slots the
    streamed blocks cycle through (2 = prefetch one block ahead); None picks the
    deepest ring (<= 2) that fits in shared memory, per kernel.

    Two switches for the element-wise work, which on Hopper costs about as much
    as the two 64 x 64 x 128 wgmmas of a step. `approx_math`: exp / log / tanh
    as the MUFU approximations (ex2.approx; relative error ~2^-22 for exp, 2^-11
    for tanh) instead of libdevice's accurate sequences, meant for bf16 / f16
    inputs (with f32 inputs and a soft-cap it breaks the 1e-5 contract).
    `skip_full_masks`: blocks whose every pair is visible (`masks.block_full`)
    run a loop without the element-wise mask. Both are off by default until the
    GPU check has run them on hardware (`lc_jax.ops.GPU_VERIFIED` names the
    kernel that passed there); `benchmarks/gpu_check.sh` times them beside it.

    `warpgroups` (1 or 2, same status): compute warpgroups of the forward and
    dq kernels. With 2, each takes block_q / 2 rows of the program's q block
    (so block_q is 128 or 256), both read one K/V ring, and a third, producer
    warpgroup fills that ring (FlashAttention-3's layout: while one warpgroup
    runs its exps, the other's wgmmas run). `block_q_dkv` (None: block_q): the
    q block the dk/dv kernel streams, which keeps one warpgroup; its registers
    hold [block_k, block_q_dkv] score tiles beside the dk / dv accumulators,
    so it wants 64 when the forward wants 128.
    """

    block_q: int = 64
    block_k: int = 64
    num_stages: int | None = None
    approx_math: bool = False
    skip_full_masks: bool = False
    warpgroups: int = 1
    block_q_dkv: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_dkv"):
            v = getattr(self, name)
            if v is None and name == "block_q_dkv":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {v!r}")
            if v % _TILE or v > _MAX_N:
                raise ValueError(f"BlockSizes.{name}={v} must be one of 64, 128, 192, 256 "
                                 "(multiples of the 64-row wgmma tile, at most wgmma's N=256)")
        n = self.num_stages
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4):
            raise ValueError(f"BlockSizes.num_stages must be None or an int in [1, 4], got {n!r}")
        for name in ("approx_math", "skip_full_masks"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BlockSizes.{name} must be True or False, got {getattr(self, name)!r}")
        w = self.warpgroups
        if isinstance(w, bool) or w not in (1, 2):
            raise ValueError(f"BlockSizes.warpgroups must be 1 or 2, got {w!r}")
        if self.block_q % (_TILE * w):
            raise ValueError(f"BlockSizes.block_q={self.block_q} must be a multiple of {_TILE * w} with "
                             f"warpgroups={w} (each warpgroup takes a 64-row wgmma tile): use 128 or 256")


@dataclasses.dataclass(frozen=True)
class _Static:
    mask: Mask
    bias: Bias | None
    scale: float
    soft_cap: float | None
    block_q: int
    block_k: int
    num_stages: int | None
    parts: int  # 16-bit terms per value: 1 for bf16 / f16 inputs, _F32_PARTS for f32
    mma_dtype: Any  # jnp.bfloat16 or jnp.float16
    approx_math: bool
    skip_full_masks: bool
    warpgroups: int  # compute warpgroups of the forward / dq kernels (2: plus a producer)
    block_q_dkv: int  # the q block the dk/dv kernel streams
    interpret: Any = False  # False or an InterpretGPUParams; fixed at trace time, so the VJP's calls match


# ----------------------------------------------------------------------------- kernel bodies

_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma tile (q rows in fwd / dq, kv rows in dk/dv)
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column


def _hint(x, layout, st: _Static):
    """Register layout for the Mosaic GPU lowering (metadata only: values are unchanged).

    Skipped under the GPU interpreter, which has no rule for `layout_cast`.
    """
    return x if st.interpret else plgpu.layout_cast(x, layout)


def _rows(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])


def _cols(x, shape):
    return lax.broadcast_in_dim(x, shape, [1])


def _mma(acc_ref, a_ref, b_ref, parts: int):
    """acc += a @ b where a, b are [parts, ...] SMEM refs of 16-bit terms: the products a_i @ b_j with i + j < parts."""
    for i in range(parts):
        for j in range(parts - i):
            plgpu.wgmma(acc_ref, a_ref.at[i], b_ref.at[j])


def _matmul(a_ref, b_ref, shape, parts: int):
    """f32 [M, N] = a @ b in a fresh wgmma accumulator."""
    def body(acc_ref):
        _mma(acc_ref, a_ref, b_ref, parts)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _store_parts(ref, x, parts: int):
    """Write f32 `x` to the [parts, ...] SMEM ref as 16-bit terms summing to x (the wgmma A operand of P / dS)."""
    for i in range(parts):
        term = x.astype(ref.dtype)
        ref[i] = term
        if i + 1 < parts:
            x = x - term.astype(jnp.float32)


def _scores(s, qp, qs, kp, ks, params, st: _Static, masked: bool):
    """Scaled, soft-capped, biased f32 scores, their mask (None where `masked` is False) and tanh(s/cap).

    All operands are tiles of one shape: [bq, bk] in the forward / dq, [bk, bq] in the dk/dv kernel.
    """
    return scores(s * st.scale, qp, kp, qs, ks, params, mask=st.mask if masked else None, bias=st.bias,
                  soft_cap=st.soft_cap)


def _ring(periods, period, full, stages: int, fetch, compute, carry):
    """Run compute(t, slot, carry, masked) for t in [0, periods * period) while TMA-fetching step
    t + stages - 1 into its ring slot.

    `fetch(t, slot)` issues the copies of step t (each signalling its barrier at `slot`). The slot
    refilled at step t was last read at step t - 1, whose wgmmas `compute` has waited for. `full`
    (a, b) or None: within each period the steps [a, b) see only fully visible blocks and run
    `compute` with masked=False, in a loop of their own; the others run with masked=True.
    `fetch` None: another warpgroup fills the ring (`_drive`).
    """
    n = periods * period
    for t0 in range(stages - 1 if fetch is not None else 0):
        pl.when(t0 < n)(functools.partial(fetch, t0, t0))

    def step(masked: bool):
        def body(t, carry):
            if fetch is not None:
                nxt = t + (stages - 1)
                pl.when(nxt < n)(lambda: fetch(nxt, lax.rem(nxt, stages)))
            return compute(t, lax.rem(t, stages), carry, masked)
        return body

    if full is None:
        return lax.fori_loop(0, n, step(True), carry)
    a, b = full

    def one_period(g, carry):
        base = g * period
        carry = lax.fori_loop(base, base + a, step(True), carry)
        carry = lax.fori_loop(base + a, base + b, step(False), carry)
        return lax.fori_loop(base + b, base + period, step(True), carry)

    return one_period(0, carry) if periods == 1 else lax.fori_loop(0, periods, one_period, carry)


def _drive(st: _Static, stages: int, periods, period, full, fetch, consumer, smem: dict):
    """Run `consumer(wg, stream)` on each compute warpgroup; `stream(compute, carry)` runs the ring.

    One warpgroup: it prefetches its own ring (`_ring`). Two: a producer warpgroup (thread index 2)
    fetches every step into its slot once both compute warpgroups have released the step that last
    used the slot (`consumed` barriers, one arrival per warpgroup and step).
    """
    W = st.warpgroups
    if W == 1:
        consumer(0, lambda compute, carry: _ring(periods, period, full, stages, fetch, compute, carry))
        return
    wg = lax.axis_index("wg")
    n = periods * period
    consumed = smem["consumed_bar"]

    @pl.when(wg == W)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def release_of(t):  # wait until step t - stages, which used t's slot, is released
            slot = lax.rem(t, stages)
            pl.when(t >= stages)(lambda: plgpu.barrier_wait(consumed.at[slot]))
            return slot

        def body(t, carry):
            fetch(t, release_of(t))
            return carry

        lax.fori_loop(0, n, body, 0)
        # Observe the last releases too: the barriers' phases are then balanced when the kernel ends (the GPU
        # interpreter checks that every waiter saw every phase).
        lax.fori_loop(n, n + stages, lambda t, c: (release_of(t), c)[1], 0)

    @pl.when(wg < W)
    def _consumers():
        plgpu.set_max_registers(232, action="increase")

        def stream(compute, carry):
            def released(t, slot, carry, masked):
                carry = compute(t, slot, carry, masked)  # its wgmmas have completed: the slot is free
                plgpu.barrier_arrive(consumed.at[slot])
                return carry
            return _ring(periods, period, full, stages, None, released, carry)

        consumer(wg, stream)


def _full_steps(range_ref, i, st: _Static):
    """(a, b): the steps of block i's loop, counted from its lo, that visit fully visible blocks; or None."""
    if not st.skip_full_masks:
        return None
    lo = range_ref[0, i]
    return range_ref[2, i] - lo, range_ref[3, i] - lo


def _copy_in(src, smem: dict, name: str, slot=None, parts: int | None = None):
    """TMA-copy `src` into SMEM buffer `name` (ring slot `slot`), signalling barrier `name`_bar.

    Operand buffers ([parts, rows, cols] per slot) take one copy per 16-bit term: a 3-D box of the
    tiled, swizzled layout would need more than TMA's 5 strided dims. Their barriers expect `parts` arrivals.
    """
    dst, bar = smem[name], smem[name + "_bar"]
    dst, bar = (dst, bar.at[0]) if slot is None else (dst.at[slot], bar.at[slot])
    for p in range(parts or 1):
        plgpu.copy_gmem_to_smem(src if parts is None else src.at[p], dst if parts is None else dst.at[p], bar)


def _wait(smem: dict, names, slot=None):
    for name in names:
        bar = smem[name + "_bar"]
        plgpu.barrier_wait(bar.at[0] if slot is None else bar.at[slot])


def _barriers(names, n: int, parts: int, operands) -> dict:
    """One barrier array (n slots) per buffer; operand buffers expect one arrival per 16-bit term."""
    return {f"{x}_bar": plgpu.Barrier(num_arrivals=parts if x in operands else 1, num_barriers=n) for x in names}


def _fwd_kernel(kv_range_ref, *refs, st: _Static, groups: int, stages: int, **smem):
    params_ref = None
    if st.bias is not None:
        params_ref, *refs = refs
    q_ref, kT_ref, v_ref, qpos_ref, kvpos_ref, o_ref, lse_ref = refs
    i, h, b = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
    kh = lax.div(h, groups)
    bk, P, rq = st.block_k, st.parts, st.block_q // st.warpgroups  # rq: one warpgroup's query rows
    Dv = o_ref.shape[-1]
    lo, hi = kv_range_ref[0, i], kv_range_ref[1, i]
    params = head_row(params_ref, h, st.bias)

    def fetch(t, slot):
        cols = pl.ds((lo + t) * bk, bk)
        _copy_in(kT_ref.at[:, b, kh, :, cols], smem, "kT", slot, P)
        _copy_in(v_ref.at[:, b, cols, kh], smem, "v", slot, P)
        _copy_in(kvpos_ref.at[b, :, cols], smem, "kvpos", slot)

    def consumer(wg, stream):
        rows = pl.ds(i * st.block_q + wg * rq, rq)
        _copy_in(q_ref.at[:, b, rows, h], smem, "q", wg, P)
        _copy_in(qpos_ref.at[b, :, rows], smem, "qpos", wg)
        _wait(smem, ("q", "qpos"), wg)
        q_s, p_s, shape = smem["q"].at[wg], smem["p"].at[wg], (rq, bk)
        qp, qs = (_hint(smem["qpos"][wg, n], _ROW, st) for n in range(2))  # [rq] vectors, broadcast per step

        def compute(t, slot, carry, masked):
            m_prev, l_prev, acc = carry
            _wait(smem, ("kT", "v", "kvpos"), slot)
            kp, ks = (_hint(smem["kvpos"][slot, n], _COL, st) for n in range(2))
            s = _matmul(q_s, smem["kT"].at[slot], shape, P)
            s, mask, _ = _scores(s, _rows(qp, shape), _rows(qs, shape), _cols(kp, shape), _cols(ks, shape), params,
                                 st, masked)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m_prev, s.max(axis=1))
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet
            p = jnp.exp(s - _rows(m_use, s.shape))
            alpha = jnp.exp(m_prev - m_use)
            l_new = alpha * l_prev + p.sum(axis=1)
            _store_parts(p_s, p, P)
            plgpu.commit_smem()
            pv = _matmul(p_s, smem["v"].at[slot], (rq, Dv), P)
            return m_new, l_new, _rows(alpha, acc.shape) * acc + pv

        init = (
            _hint(jnp.full((rq,), -jnp.inf, jnp.float32), _ROW, st),
            _hint(jnp.zeros((rq,), jnp.float32), _ROW, st),
            _hint(jnp.zeros((rq, Dv), jnp.float32), plgpu.Layout.WGMMA, st),
        )
        m, l, acc = stream(compute, init)
        empty = l == 0.0
        safe_l = jnp.where(empty, 1.0, l)
        o_s, lse_s = smem["o"].at[wg], smem["lse"].at[wg]
        o_s[...] = (acc / _rows(safe_l, acc.shape)).astype(o_ref.dtype)
        lse_s[...] = jnp.where(empty, -jnp.inf, m + jnp.log(safe_l))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, o_ref.at[b, rows, h])
        plgpu.copy_smem_to_gmem(lse_s, lse_ref.at[b, h, rows])
        plgpu.wait_smem_to_gmem(0)

    _drive(st, stages, 1, hi - lo, _full_steps(kv_range_ref, i, st), fetch, consumer, smem)


def _dscores(s, dp, lse, di, qp, qs, kp, ks, params, st: _Static, masked: bool):
    """Recompute p from the saved lse; ds = p * (dp - (delta - dlse)), through the soft-cap, times scale."""
    s, mask, t = _scores(s, qp, qs, kp, ks, params, st, masked)
    p = jnp.exp(s - lse)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    ds = p * (dp - di)
    if t is not None:
        ds = ds * (1.0 - t * t)
    return p, ds * st.scale


def _dq_kernel(kv_range_ref, *refs, st: _Static, groups: int, stages: int, **smem):
    params_ref = None
    if st.bias is not None:
        params_ref, *refs = refs
    q_ref, do_ref, kT_ref, vT_ref, k_ref, qpos_ref, kvpos_ref, stats_ref, dq_ref = refs
    i, h, b = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
    kh = lax.div(h, groups)
    bk, P, rq = st.block_k, st.parts, st.block_q // st.warpgroups  # rq: one warpgroup's query rows
    D = dq_ref.shape[-1]
    lo, hi = kv_range_ref[0, i], kv_range_ref[1, i]
    params = head_row(params_ref, h, st.bias)

    def fetch(t, slot):
        cols = pl.ds((lo + t) * bk, bk)
        _copy_in(kT_ref.at[:, b, kh, :, cols], smem, "kT", slot, P)
        _copy_in(vT_ref.at[:, b, kh, :, cols], smem, "vT", slot, P)
        _copy_in(k_ref.at[:, b, cols, kh], smem, "k", slot, P)
        _copy_in(kvpos_ref.at[b, :, cols], smem, "kvpos", slot)

    def consumer(wg, stream):
        rows = pl.ds(i * st.block_q + wg * rq, rq)
        _copy_in(q_ref.at[:, b, rows, h], smem, "q", wg, P)
        _copy_in(do_ref.at[:, b, rows, h], smem, "do", wg, P)
        _copy_in(qpos_ref.at[b, :, rows], smem, "qpos", wg)
        _copy_in(stats_ref.at[b, h, :, rows], smem, "stats", wg)
        _wait(smem, ("q", "do", "qpos", "stats"), wg)
        q_s, do_s, ds_s, shape = smem["q"].at[wg], smem["do"].at[wg], smem["ds"].at[wg], (rq, bk)
        qp, qs = (_hint(smem["qpos"][wg, n], _ROW, st) for n in range(2))
        lse, di = (_hint(smem["stats"][wg, n], _ROW, st) for n in range(2))

        def with_acc(dq_acc):
            def compute(t, slot, carry, masked):
                _wait(smem, ("kT", "vT", "k", "kvpos"), slot)
                kp, ks = (_hint(smem["kvpos"][slot, n], _COL, st) for n in range(2))
                s = _matmul(q_s, smem["kT"].at[slot], shape, P)
                dp = _matmul(do_s, smem["vT"].at[slot], shape, P)
                _, ds = _dscores(s, dp, _rows(lse, shape), _rows(di, shape), _rows(qp, shape), _rows(qs, shape),
                                 _cols(kp, shape), _cols(ks, shape), params, st, masked)
                _store_parts(ds_s, ds, P)
                plgpu.commit_smem()
                _mma(dq_acc, ds_s, smem["k"].at[slot], P)
                plgpu.wgmma_wait(0)  # the next step refills a ring slot and the ds tile this wgmma reads
                return carry

            stream(compute, 0)
            return dq_acc[...]

        dq = pl.run_scoped(with_acc, plgpu.ACC((rq, D), jnp.float32))
        dq_s = smem["dq"].at[wg]
        dq_s[...] = dq.astype(dq_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dq_s, dq_ref.at[b, rows, h])
        plgpu.wait_smem_to_gmem(0)

    _drive(st, stages, 1, hi - lo, _full_steps(kv_range_ref, i, st), fetch, consumer, smem)


def _dkv_kernel(q_range_ref, *refs, st: _Static, groups: int, stages: int, **smem):
    params_ref = None
    if st.bias is not None:
        params_ref, *refs = refs
    k_ref, v_ref, qT_ref, q_ref, doT_ref, do_ref, qpos_ref, kvpos_ref, stats_ref, dk_ref, dv_ref = refs
    j, kh, b = lax.axis_index("k"), lax.axis_index("h"), lax.axis_index("b")
    bq, bk, P = st.block_q_dkv, st.block_k, st.parts
    D, Dv = dk_ref.shape[-1], dv_ref.shape[-1]
    cols = pl.ds(j * bk, bk)  # this program's keys: the rows of its S^T tiles
    _copy_in(k_ref.at[:, b, cols, kh], smem, "k", parts=P)
    _copy_in(v_ref.at[:, b, cols, kh], smem, "v", parts=P)
    _copy_in(kvpos_ref.at[b, :, cols], smem, "kvpos")
    lo, hi = q_range_ref[0, j], q_range_ref[1, j]
    nb = hi - lo  # q blocks per query head; steps run over (head g, q block) pairs

    def head_and_rows(t):  # step t -> (query head kh * G + t // nb, its q block lo + t % nb)
        return kh * groups + lax.div(t, nb), pl.ds((lo + lax.rem(t, nb)) * bq, bq)

    def fetch(t, slot):
        h, rows = head_and_rows(t)
        for name, src in (("qT", qT_ref.at[:, b, h, :, rows]), ("q", q_ref.at[:, b, rows, h]),
                          ("doT", doT_ref.at[:, b, h, :, rows]), ("do", do_ref.at[:, b, rows, h])):
            _copy_in(src, smem, name, slot, P)
        _copy_in(qpos_ref.at[b, :, rows], smem, "qpos", slot)
        _copy_in(stats_ref.at[b, h, :, rows], smem, "stats", slot)

    _wait(smem, ("k", "v", "kvpos"))
    shape = (bk, bq)  # S^T tiles: keys are rows
    kp, ks = (_hint(smem["kvpos"][n], _ROW, st) for n in range(2))

    def with_acc(dk_acc, dv_acc):
        def compute(t, slot, carry, masked):
            _wait(smem, ("qT", "q", "doT", "do", "qpos", "stats"), slot)
            params = head_row(params_ref, head_and_rows(t)[0], st.bias)
            qp, qs = (_hint(smem["qpos"][slot, n], _COL, st) for n in range(2))
            lse, di = (_hint(smem["stats"][slot, n], _COL, st) for n in range(2))
            sT = _matmul(smem["k"], smem["qT"].at[slot], shape, P)
            dpT = _matmul(smem["v"], smem["doT"].at[slot], shape, P)
            pT, dsT = _dscores(sT, dpT, _cols(lse, shape), _cols(di, shape), _cols(qp, shape), _cols(qs, shape),
                               _rows(kp, shape), _rows(ks, shape), params, st, masked)
            _store_parts(smem["pT"], pT, P)
            _store_parts(smem["dsT"], dsT, P)
            plgpu.commit_smem()
            _mma(dv_acc, smem["pT"], smem["do"].at[slot], P)
            _mma(dk_acc, smem["dsT"], smem["q"].at[slot], P)
            plgpu.wgmma_wait(0)  # the next step refills a ring slot and the pT / dsT tiles these wgmmas read
            return carry

        _ring(groups, nb, _full_steps(q_range_ref, j, st), stages, fetch, compute, 0)
        return dk_acc[...], dv_acc[...]

    dk, dv = pl.run_scoped(with_acc, plgpu.ACC((bk, D), jnp.float32), plgpu.ACC((bk, Dv), jnp.float32))
    # dk then dv through one staging tile when D == Dv (it saves the SMEM that f32 inputs need at D=64).
    for x, name, dst in ((dk, "dk", dk_ref), (dv, "dv" if "dv" in smem else "dk", dv_ref)):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous TMA store has read the tile
        smem[name][...] = x.astype(dst.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem[name], dst.at[b, cols, kh])
    plgpu.wait_smem_to_gmem(0)


# ----------------------------------------------------------------------------- kernel wrappers


def _operand(shape, dtype):
    """SMEM in the wgmma operand layout: (8, 128 bytes) tiles with the 128-byte swizzle."""
    tiling = plgpu.TilingTransform((8, _SWIZZLE // jnp.dtype(dtype).itemsize))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(_SWIZZLE)))


def _smem_bytes(smem: dict) -> int:
    """Shared memory the scratch buffers take (each rounded up to the 1 KiB swizzle alignment) plus reductions."""
    total = _REDUCTION_SCRATCH
    for ty in smem.values():
        if not isinstance(ty, plgpu.Barrier):
            nbytes = math.prod(ty.shape) * jnp.dtype(ty.dtype).itemsize
            total += -(-nbytes // 1024) * 1024
    return total


def _pick_stages(name: str, make_smem, st: _Static) -> tuple[int, dict]:
    """The ring depth and scratch dict for one kernel: BlockSizes.num_stages, or the deepest (<= 2) that fits."""
    choices = (st.num_stages,) if st.num_stages is not None else (2, 1)
    for stages in choices:
        smem = make_smem(stages)
        if st.interpret or _smem_bytes(smem) <= _SMEM_LIMIT:
            return stages, smem
    raise ValueError(
        f"the {name} kernel needs {_smem_bytes(smem) / 1024:.0f} KiB of shared memory with "
        f"block_q={st.block_q_dkv if name == 'dk/dv' else st.block_q}, block_k={st.block_k}, "
        f"warpgroups={1 if name == 'dk/dv' else st.warpgroups}, num_stages={stages} and "
        f"{'f32 inputs (3 bf16 terms per value)' if st.parts > 1 else 'bf16/f16 inputs'} "
        f"(limit {_SMEM_LIMIT // 1024} KiB); use smaller blocks or head dims, fewer stages"
        f"{', or bf16 inputs' if st.parts > 1 else ''}")


def _untransposed(shape_PBHDL) -> tuple[int, ...]:
    """Shape of the natural [P, B, len, heads, D] operand of a pre-transposed [P, B, heads, D, len] copy."""
    P, B, heads, D, n = shape_PBHDL
    return P, B, n, heads, D


def _check_blocked_shapes(q_shape, k_shape, v_shape, qpos, kvpos, st: _Static):
    """Validate the padded, split operands the kernels see: q [P, B, T, H, D], k / v [P, B, S, K, D(v)]."""
    if len(q_shape) != 5 or len(k_shape) != 5 or len(v_shape) != 5:
        raise ValueError(f"q {q_shape}, k {k_shape}, v {v_shape} must be rank 5 [parts, B, len, heads, D]")
    P, B, T, H, D = q_shape
    S, K, Dv = k_shape[2], k_shape[3], v_shape[4]
    if P != st.parts or k_shape[:2] != (P, B) or v_shape[:4] != k_shape[:4] or k_shape[4] != D:
        raise ValueError(f"k {k_shape} / v {v_shape} do not match q {q_shape} ({st.parts} parts)")
    if K == 0 or H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
    if T % st.block_q or T % st.block_q_dkv:
        raise ValueError(f"padded query length {T} is not a multiple of block_q={st.block_q} and "
                         f"block_q_dkv={st.block_q_dkv}")
    if S % st.block_k:
        raise ValueError(f"padded key length {S} is not a multiple of block_k={st.block_k}")
    for name, d in (("head_dim", D), ("value head_dim", Dv)):
        if d not in _HEAD_DIMS:
            raise ValueError(f"{name}={d} must be 64 or 128 (64-wide wgmma operand tiles; at 256 the f32 "
                             "accumulators exceed the register file)")
    if qpos.shape != (B, 2, T) or kvpos.shape != (B, 2, S):
        raise ValueError(f"positions / segments {qpos.shape} / {kvpos.shape} must be ({B}, 2, {T}) / ({B}, 2, {S})")
    return P, B, T, H, D, S, K, Dv


def _run(body, name: str, grid, grid_names, out_type, smem: dict, st: _Static, *args, warpgroups: int = 1):
    """Launch a kernel; with 2 compute warpgroups, a third (the producer) joins them on thread axis 'wg'."""
    threads = dict(num_threads=warpgroups + 1, thread_name="wg") if warpgroups > 1 else {}
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=smem,
        grid=grid,
        grid_names=grid_names,
        kernel_name=name,
        compiler_params=plgpu.CompilerParams(approx_math=st.approx_math),
        interpret=st.interpret,
        **threads,
    )(*args)


def _ring_barriers(names, n: int, parts: int, operands, st: _Static) -> dict:
    """The streamed buffers' barriers, plus the `consumed` ones the producer waits on with 2 warpgroups."""
    W = st.warpgroups
    consumed = {} if W == 1 else dict(consumed_bar=plgpu.Barrier(num_arrivals=W, num_barriers=n))
    return {**_barriers(names, n, parts, operands), **consumed}


def _fwd_call(q, kT, v, qpos, kvpos, params, ranges, st: _Static):
    P, B, T, H, D, S, K, Dv = _check_blocked_shapes(q.shape, _untransposed(kT.shape), v.shape, qpos, kvpos, st)
    bq, bk, dt = st.block_q, st.block_k, st.mma_dtype
    out_dtype = jnp.float32 if P > 1 else dt

    W = st.warpgroups
    rq = bq // W  # each compute warpgroup's own tiles: [W, ...]

    def make_smem(n):
        return dict(
            q=_operand((W, P, rq, D), dt), qpos=plgpu.SMEM((W, 2, rq), jnp.int32),
            kT=_operand((n, P, D, bk), dt), v=_operand((n, P, bk, Dv), dt), kvpos=plgpu.SMEM((n, 2, bk), jnp.int32),
            p=_operand((W, P, rq, bk), dt), o=_operand((W, rq, Dv), out_dtype),
            lse=plgpu.SMEM((W, rq), jnp.float32),
            **_barriers(("q", "qpos"), W, P, ("q",)), **_ring_barriers(("kT", "v", "kvpos"), n, P, ("kT", "v"), st),
        )

    stages, smem = _pick_stages("forward", make_smem, st)
    body = functools.partial(_fwd_kernel, st=st, groups=H // K, stages=stages)
    args = [ranges[0], q, kT, v, qpos, kvpos]
    if st.bias is not None:  # [H * P] f32
        args.insert(1, params.reshape(-1))
    out_type = (jax.ShapeDtypeStruct((B, T, H, Dv), out_dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32))
    return _run(body, "flash_attention_mgpu_fwd", (T // bq, H, B), ("q", "h", "b"), out_type, smem, st, *args,
                warpgroups=W)


def _dq_call(q, do, kT, vT, k, qpos, kvpos, stats, params, ranges, st: _Static):
    P, B, T, H, D, S, K, Dv = _check_blocked_shapes(q.shape, k.shape, _untransposed(vT.shape), qpos, kvpos, st)
    if do.shape != (P, B, T, H, Dv) or stats.shape != (B, H, 2, T):
        raise ValueError(f"dout {do.shape} / lse+delta {stats.shape} do not match q {q.shape}")
    bq, bk, dt = st.block_q, st.block_k, st.mma_dtype
    out_dtype = jnp.float32 if P > 1 else dt

    W = st.warpgroups
    rq = bq // W  # each compute warpgroup's own tiles: [W, ...]

    def make_smem(n):
        return dict(
            q=_operand((W, P, rq, D), dt), do=_operand((W, P, rq, Dv), dt), qpos=plgpu.SMEM((W, 2, rq), jnp.int32),
            stats=plgpu.SMEM((W, 2, rq), jnp.float32),
            kT=_operand((n, P, D, bk), dt), vT=_operand((n, P, Dv, bk), dt), k=_operand((n, P, bk, D), dt),
            kvpos=plgpu.SMEM((n, 2, bk), jnp.int32), ds=_operand((W, P, rq, bk), dt),
            dq=_operand((W, rq, D), out_dtype),
            **_barriers(("q", "do", "qpos", "stats"), W, P, ("q", "do")),
            **_ring_barriers(("kT", "vT", "k", "kvpos"), n, P, ("kT", "vT", "k"), st),
        )

    stages, smem = _pick_stages("dq", make_smem, st)
    body = functools.partial(_dq_kernel, st=st, groups=H // K, stages=stages)
    args = [ranges[0], q, do, kT, vT, k, qpos, kvpos, stats]
    if st.bias is not None:  # [H * P] f32
        args.insert(1, params.reshape(-1))
    out_type = jax.ShapeDtypeStruct((B, T, H, D), out_dtype)
    return _run(body, "flash_attention_mgpu_dq", (T // bq, H, B), ("q", "h", "b"), out_type, smem, st, *args,
                warpgroups=W)


def _dkv_call(k, v, qT, q, doT, do, qpos, kvpos, stats, params, ranges, st: _Static):
    P, B, T, H, D, S, K, Dv = _check_blocked_shapes(q.shape, k.shape, v.shape, qpos, kvpos, st)
    if do.shape != (P, B, T, H, Dv) or stats.shape != (B, H, 2, T):
        raise ValueError(f"dout {do.shape} / lse+delta {stats.shape} do not match q {q.shape}")
    bq, bk, dt = st.block_q_dkv, st.block_k, st.mma_dtype
    out_dtype = jnp.float32 if P > 1 else dt

    def make_smem(n):
        ring = dict(qT=_operand((n, P, D, bq), dt), q=_operand((n, P, bq, D), dt),
                    doT=_operand((n, P, Dv, bq), dt), do=_operand((n, P, bq, Dv), dt),
                    qpos=plgpu.SMEM((n, 2, bq), jnp.int32), stats=plgpu.SMEM((n, 2, bq), jnp.float32))
        return dict(
            k=_operand((P, bk, D), dt), v=_operand((P, bk, Dv), dt), kvpos=plgpu.SMEM((2, bk), jnp.int32),
            pT=_operand((P, bk, bq), dt), dsT=_operand((P, bk, bq), dt),
            dk=_operand((bk, D), out_dtype), **({} if Dv == D else dict(dv=_operand((bk, Dv), out_dtype))),
            **ring, **_barriers(("k", "v", "kvpos"), 1, P, ("k", "v")),
            **_barriers(ring, n, P, ("qT", "q", "doT", "do")),
        )

    stages, smem = _pick_stages("dk/dv", make_smem, st)
    body = functools.partial(_dkv_kernel, st=st, groups=H // K, stages=stages)
    args = [ranges[1], k, v, qT, q, doT, do, qpos, kvpos, stats]
    if st.bias is not None:  # [H * P] f32
        args.insert(1, params.reshape(-1))
    out_type = (jax.ShapeDtypeStruct((B, S, K, D), out_dtype), jax.ShapeDtypeStruct((B, S, K, Dv), out_dtype))
    return _run(body, "flash_attention_mgpu_dkv", (S // bk, K, B), ("k", "h", "b"), out_type, smem, st, *args)


def _split(x, st: _Static):
    """[parts, *x.shape] 16-bit terms whose f32 sum is x (parts == 1: x in the MMA dtype).

    All terms but the last keep the top 16 bits of the remainder (a bit mask, so exact in bf16); the
    last is rounded. A rounding split, `r - r.astype(bf16).astype(f32)`, is what XLA on GPU folds to
    zero (`xla_allow_excess_precision` drops the round trip): the H200 run gave bf16-grade f32 results.
    """
    if st.parts == 1:
        return x.astype(st.mma_dtype)[None]
    terms, r = [], x.astype(jnp.float32)
    for i in range(st.parts):
        if i == st.parts - 1:
            terms.append(r.astype(st.mma_dtype))
            break
        bits = lax.bitcast_convert_type(r, jnp.uint32) & jnp.uint32(0xFFFF0000)
        head = lax.bitcast_convert_type(bits, jnp.float32)
        terms.append(head.astype(st.mma_dtype))
        r = r - head
    return jnp.stack(terms)


def _t(x):
    """[P, B, len, heads, D] -> [P, B, heads, D, len]: the pre-transposed copy read as a K^T-style wgmma operand."""
    return x.transpose(0, 1, 3, 4, 2)


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, qpos, kvpos, params, ranges, st):
    return _flash_fwd(q, k, v, qpos, kvpos, params, ranges, st)[0]


def _flash_fwd(q, k, v, qpos, kvpos, params, ranges, st):
    qs, ks, vs = _split(q, st), _split(k, st), _split(v, st)
    out, lse = _fwd_call(qs, _t(ks), vs, qpos, kvpos, params, ranges, st)
    out = out.astype(q.dtype)
    return (out, lse), (q, k, v, out, lse, qpos, kvpos, params, ranges)


def _flash_bwd(st, res, g):
    q, k, v, out, lse, qpos, kvpos, params, ranges = res
    do, dlse = g  # [B, T, H, Dv], [B, H, T]
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # [B, H, T]
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows that see nothing have p == 0 anyway
    stats = jnp.stack([lse_safe, delta - dlse.astype(jnp.float32)], axis=2)  # [B, H, 2, T]
    qs, ks, vs, dos = _split(q, st), _split(k, st), _split(v, st), _split(do.astype(q.dtype), st)
    dq = _dq_call(qs, dos, _t(ks), _t(vs), ks, qpos, kvpos, stats, params, ranges, st)
    dk, dv = _dkv_call(ks, vs, _t(qs), qs, _t(dos), dos, qpos, kvpos, stats, params, ranges, st)
    # Bias parameters (ALiBi slopes) are fixed by the scheme, never trained: zero cotangent (as in xla / tpu / gpu).
    dparams = None if params is None else jnp.zeros_like(params)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, dparams, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- public wrapper


def _as_block_sizes(block_sizes) -> BlockSizes:
    """None -> defaults; another implementation's block sizes (e.g. gpu / xla BlockSizes) are re-validated here."""
    if block_sizes is None:
        return BlockSizes()
    if isinstance(block_sizes, BlockSizes):
        return block_sizes
    return BlockSizes(block_q=block_sizes.block_q, block_k=block_sizes.block_k)


def _interpret_params(interpret):
    if interpret is False or interpret is None:
        return False
    if InterpretGPUParams is None:
        raise ValueError("interpret=True needs jax's Mosaic GPU interpreter "
                         "(jax._src.pallas.mosaic_gpu.interpret), missing in this jax version")
    return InterpretGPUParams() if interpret is True else interpret


def _static(dtype, D, mask: Mask, bias: Bias | None, scale, logits_soft_cap, bs: BlockSizes, interpret=False):
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        raise ValueError(f"q dtype {dtype} is not supported: use bfloat16, float16 or float32")
    parts = _F32_PARTS if dtype == jnp.float32 else 1
    return _Static(
        mask=mask,
        bias=bias,
        scale=float(D**-0.5 if scale is None else scale),
        soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        block_q=bs.block_q,
        block_k=bs.block_k,
        num_stages=bs.num_stages,
        parts=parts,
        mma_dtype=jnp.float16 if dtype == jnp.float16 else jnp.bfloat16,
        approx_math=bs.approx_math,
        skip_full_masks=bs.skip_full_masks,
        warpgroups=bs.warpgroups,
        block_q_dkv=bs.block_q if bs.block_q_dkv is None else bs.block_q_dkv,
        interpret=_interpret_params(interpret),
    )


def _span(vis_NM, full_NM):
    """Per row: [lo, hi) = first and one-past-last visible column, and [flo, fhi) = the first run of
    consecutive fully visible columns (empty, at lo, if none); lo = hi = 0 for a row that sees nothing."""
    M = vis_NM.shape[1]
    any_ = vis_NM.any(axis=1)
    lo = jnp.where(any_, jnp.argmax(vis_NM, axis=1), 0)
    hi = jnp.where(any_, M - jnp.argmax(vis_NM[:, ::-1], axis=1), 0)
    flo = jnp.argmax(full_NM, axis=1)
    gap = ~full_NM & (jnp.arange(M)[None, :] > flo[:, None])
    fhi = jnp.where(gap.any(axis=1), jnp.argmax(gap, axis=1), M)
    has_full = full_NM.any(axis=1)
    return jnp.stack([lo, hi, jnp.where(has_full, flo, lo), jnp.where(has_full, fhi, lo)]).astype(jnp.int32)


def _q_multiple(bs: BlockSizes) -> int:
    """Queries are padded to a multiple of both q blocks (the forward / dq one and the dk/dv one)."""
    return math.lcm(bs.block_q, bs.block_q if bs.block_q_dkv is None else bs.block_q_dkv)


def _block_ranges(q_pos, kv_pos, q_seg, kv_seg, st: _Static):
    """(kv ranges int32 [4, nq] for forward / dq, q ranges int32 [4, nk] for dk / dv): [lo; hi; flo; fhi)
    block indices, [flo, fhi) a run of fully visible blocks inside [lo, hi). The dk/dv kernel's q blocks
    are block_q_dkv long."""
    B, T = q_pos.shape
    S = kv_pos.shape[1]
    nk = S // st.block_k

    def tables(bq):  # [nq, nk] visible (any over the batch) and fully visible (all over the batch)
        nq = T // bq
        blocks = (q_pos.reshape(B, nq, bq), kv_pos.reshape(B, nk, st.block_k),
                  q_seg.reshape(B, nq, bq), kv_seg.reshape(B, nk, st.block_k))
        return block_visible(*blocks, mask=st.mask), block_full(*blocks, mask=st.mask)

    vis_NM, full_NM = tables(st.block_q)
    if st.block_q_dkv != st.block_q:
        vis_NM_dkv, full_NM_dkv = tables(st.block_q_dkv)
    else:
        vis_NM_dkv, full_NM_dkv = vis_NM, full_NM
    return _span(vis_NM, full_NM), _span(vis_NM_dkv.T, full_NM_dkv.T)


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
    interpret: bool | InterpretGPUParams = False,
):
    """Pallas Mosaic GPU flash attention; returns (out_BTHD, lse_BTH). Differentiable in q, k, v (and via lse).

    `interpret=True` (or an `InterpretGPUParams`) runs every kernel, forward and backward, in jax's
    Mosaic GPU interpreter on CPU; otherwise the kernels compile for an sm_90 (Hopper) GPU.
    """
    bs = _as_block_sizes(block_sizes)
    B, T, S, H, K, D = check_qkv(q_BTHD, k_BSKD, v_BSKD, bias, bias_params_HP)
    q_pos, kv_pos, q_seg, kv_seg, pad_t, pad_s = pad_positions(
        q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, _q_multiple(bs), bs.block_k, always_segments=True,
        shape_BTS=(B, T, S))
    st = _static(q_BTHD.dtype, D, mask, bias, scale, logits_soft_cap, bs, interpret)
    ranges = _block_ranges(q_pos, kv_pos, q_seg, kv_seg, st)
    q = pad_axis(q_BTHD, 1, pad_t, 0)
    k = pad_axis(k_BSKD, 1, pad_s, 0)
    v = pad_axis(v_BSKD, 1, pad_s, 0)
    qpos = jnp.stack([q_pos, q_seg], axis=1)  # [B, 2, T]: one TMA copy per block
    kvpos = jnp.stack([kv_pos, kv_seg], axis=1)
    params = None if bias_params_HP is None else jnp.asarray(bias_params_HP, jnp.float32)
    out, lse = _flash(q, k, v, qpos, kvpos, params, ranges, st)
    return out[:, :T], lse.transpose(0, 2, 1)[:, :T]


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
    st = _static(jnp.bfloat16, 64, mask, None, None, None, bs)
    kv_range, _ = _block_ranges(q_pos, kv_pos, q_seg, kv_seg, st)
    nq, nk = q_pos.shape[1] // bs.block_q, kv_pos.shape[1] // bs.block_k
    return B * int((kv_range[1] - kv_range[0]).sum()), B * nq * nk
