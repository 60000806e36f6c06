"""DSA's sparse attention as Pallas kernels for NVIDIA GPUs (Triton lowering): only the selected K/V rows are read.

Same contract as `pallas_kernels/sparse_attention.py` (the XLA gather path) and
`sparse_attention_tpu.py`: query t attends to its own k selected keys
idx[t, :], shared by all heads of the query; under GQA query head h reads kv
head h // (H // K) of those rows (K/V are never repeated in memory); a
`masks.Bias` (ALiBi) is computed in-kernel (`masks.scores`) from q_pos, the
selected keys' kv_pos and the heads' parameters; selections with
valid=False are masked; the output is (out_BTHD, lse_BTH) with an f32 lse that
is -inf (and a zero output) where a query has no valid selection; the
`custom_vjp` backward also accepts a cotangent for lse
(ds = p * (dp - delta + dlse)).

Why a kernel. The XLA path gathers [block_q, k, K, D] rows per query block
into a fresh array (written to HBM, read back by the matmuls; again in the
backward). Here each program gathers the selected rows straight from the K/V
tables in HBM into registers / shared memory with a vector (pointer-tensor)
load and consumes them there: nothing T x S and nothing [T, k, D] is built, in
the forward or the backward.

Work split: one program per (block of `block_q` query tokens, kv head), grid
(N / block_q, K) over the N = B * T flattened tokens. Every query token has
its own selection, so nothing is shared between tokens (unlike flash
attention, where a q block shares its K/V blocks); what *is* shared is one
token's selected rows across the G = H // K query heads of a kv head. A
(token, kv head) program therefore loads each gathered [block_k, D] K/V tile
once and uses it for a [G, D] x [D, block_k] score matmul of all G heads.
(A program per (token, query head) would gather the same rows G times; one
per token over all H heads would make the matmul's M = H but gather K x wider
rows per chunk and drop the kv-head grid parallelism.) The default block_q = 1
gives B * T * K programs, plenty to fill a GPU; larger values only lengthen
each program's loop.

How. Batch and time are flattened into N = B * T tokens and K / V are viewed
as [B * S, K, D] row tables (a free reshape); the wrapper turns (idx, valid)
into global row numbers b * S + idx, -1 where invalid, [N, k_pad] int32, with
k padded to a multiple of the chunk by invalid slots. Per token the kernel
walks the k selections in chunks of `block_k` rows: it loads the chunk's row
numbers, gathers those rows of its kv head with one masked load indexed by a
[block_k, D] pointer tensor (`plgpu.load(ref.at[rows, cols], mask, other=0)`;
invalid slots are masked, so they read no memory and contribute exact zeros,
also where the row they point at holds NaN), and runs an online softmax
(m, l, acc) in f32 over the chunks. Triton needs power-of-two tensor shapes
and tl.dot needs every dim >= 16, so G, D and Dv are padded *in registers* to
Gp, Dp, Dvp = max(16, next power of two) with masked loads / stores (nothing
is padded in HBM; padded query heads load zeros, and their zero do / delta
make their dk / dv contributions exactly zero); the chunk block_k is a power
of two >= 16.

Backward. A second kernel makes the same gathers, recomputes p from the saved
lse, writes dq per token, and adds each chunk's dk / dv rows ([block_k, Dp],
[block_k, Dvp], f32) into [B * S + 1, K, Dp] / [B * S + 1, K, Dvp] f32
accumulators with `plgpu.atomic_add` (zero-initialised inputs aliased to the
outputs); the wrapper slices them to [B * S, K, D] and casts. Invalid slots
add their (zero) rows to the extra dummy row B * S rather than being masked,
because the interpreter's discharge rule for atomics supports no mask.

Key-major backward (`BlockSizes(backward="key_major")`, off by default until
a GPU check times it). The atomics cost one f32 add per selected key, kv head
and dimension. Instead, the wrapper inverts the selection with one sort of the
(key row, token) pairs (`invert_selection`: the tokens that selected row r are
qids[starts[r]:starts[r + 1]]); the query-major kernel then writes dq only, and
a third kernel, one program per (key row, kv head), walks that row's tokens in
chunks of `block_n`, gathers their G query heads' q and do rows (from per-kv-
head [N * G, D] tables, a transposed copy of q and do), recomputes p and ds,
and writes its dk / dv row once. With one key per program the products are
row dots and column sums on the CUDA cores, not matmuls; the kernel moves
G x (D + Dv) gathered elements per (token, key) pair where the forward moves
D + Dv, and a key selected by many tokens (a sink) is one long program. Exact
also for duplicate selections, which the interpreted atomics would lose.

Limits.
  * Atomic contention: keys selected by many queries (attention sinks, recent
    tokens) receive one atomic add per selecting query and kv head;
    Triton's atomics are acq_rel, per element. They dominate the backward
    (run 4 below).
  * The accumulators cost 4 bytes x (B * S + 1) x K x (Dp + Dvp) of HBM in the
    backward (the TPU kernel's f32 scatter target is the same size, unpadded).
  * D (or Dv, G) that is not a power of two wastes the padded lanes of every
    gathered tile (e.g. MLA's D = 576 is gathered as 1024 wide tiles, masked).
  * Interpret mode only: the discharged atomic add is a gather + scatter-set,
    so two *valid* selections of the same key in the same chunk of one query
    would lose one dk / dv contribution (a compiled GPU adds both). Top-k
    selections (DSA's `streaming_topk`) are duplicate-free; invalid slots go
    to the dummy row, where losses do not matter. Interpreted inside
    shard_map it needs check_vma=False (jax 0.10's generic interpreter drops
    the varying mesh axes in the kernel's loops; the flash GPU kernel too).
  * block_k auto: the largest of 64, 32, 16 whose K + V tile,
    block_k x (Dp + Dvp) x itemsize, fits 64 KiB; num_warps auto: 4 for
    Dp <= 128, else 8. Untuned guesses.

Checked (tests/test_sparse_gpu.py), on a CPU host only: values and gradients
(q, k, v under random out / lse cotangents) against the XLA path in the
generic Pallas interpreter (`interpret=True`: the same kernels, with the
gathers discharged to XLA gathers and the atomics to sequential read-modify-
writes), incl. padded and unpadded heads / head dims, NaN rows that must
never be read, and shard_map; the Pallas -> Triton IR lowering for platform
"cuda" (power-of-two shapes, supported primitives, pointer-tensor gathers,
atomics, the vma typing under shard_map), without Triton's PTX compiler.
On a GPU (H200, jax 0.11.2; benchmarks/results/gpu/h200/README.md, run 3):
`test_compiled_on_gpu` passed, compiled at the default block sizes, in f32 at
D = 64 and bf16 at D = 128, values and gradients against the XLA path at
`highest` precision; hence its `lc_jax.ops.GPU_VERIFIED` entry, for the code of
that run (the key-major backward came after it: the next check verifies both). Speed (run 4, T = 65536,
k = 2048, 16 query heads over 4 kv heads of 128, bf16): forward 0.035 s,
forward + backward 0.794 s, of which the atomic dk / dv adds take about 0.76 s
(0.201 s with 1 kv head), against 0.27 s for full causal flash attention; a
key-major backward over the inverted selection would avoid the atomics. Not
checked: the f32 atomics' summation order (dk / dv are not bitwise
deterministic on a GPU).

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
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.gpu import _NN, _NT, _TN, _dot  # f32-accumulating dots, as in flash
from pallas_kernels.flash_attention.masks import Bias, like_vma, out_struct, pad_axis, scores
from pallas_kernels.sparse_attention import check_selection

_MIN_DIM = 16  # tl.dot needs M, N, K >= 16
AUTO_BLOCK_K = (64, 32, 16)
AUTO_BLOCK_N = (64, 32, 16, 8, 4, 2, 1)
TILE_BYTES = 64 << 10  # auto block_k: the gathered K + V tile of one chunk fits this
# auto block_n: the key-major kernel's Q + dO rows of one chunk, in f32 registers (no matmul stages them in
# shared memory), fit this: 32 KiB is a quarter of the register file of a 4-warp program. An untuned guess.
KEY_MAJOR_TILE_BYTES = 32 << 10
BACKWARDS = ("atomic", "key_major")

# ----------------------------------------------------------------------------- block sizes


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _pow2_at_least(n: int, lo: int = _MIN_DIM) -> int:
    """The smallest power of two >= max(n, lo)."""
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Work split of the sparse GPU kernels and Triton launch knobs.

    block_q: query tokens per program (a loop in the kernel), any positive int;
      each token has its own selection, so this shares nothing and 1 (most
      programs) is the default.
    block_k: selected rows per chunk (the gathered tile), a power of two >= 16;
      None picks the largest of 64, 32, 16 whose K + V tile fits TILE_BYTES.
      Never larger than k rounded up to a power of two >= 16; k is padded (with
      invalid slots, which read no memory) to a multiple of it.
    num_warps: a power of two; None picks 4 for a padded head_dim <= 128, else 8.
    num_stages: Triton software-pipelining stages of the chunk loop.
    backward: how dk / dv are summed over the queries that selected a key.
      "atomic" (the default, passed on an H200): the query-major backward adds
      each chunk's rows with f32 atomics. "key_major": the query-major kernel
      writes dq only, and a second kernel, one program per (key, kv head),
      walks the queries that selected that key (the selection inverted by a
      sort) and writes its dk / dv rows once, with no atomics. New, not yet
      run on a GPU.
    block_n: key-major only: selecting queries per gathered chunk, a power of
      two; None picks the largest of 64, 32, ..., 1 whose Q + dO rows of all
      the kv head's query heads fit KEY_MAJOR_TILE_BYTES in f32.
    """

    block_q: int = 1
    block_k: int | None = None
    num_warps: int | None = None
    num_stages: int = 2
    backward: str = "atomic"
    block_n: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k", "num_warps", "num_stages", "block_n"):
            v = getattr(self, name)
            if v is None and name in ("block_k", "num_warps", "block_n"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                allowed = "a positive int" + (" or None" if name in ("block_k", "num_warps", "block_n") else "")
                raise ValueError(f"BlockSizes.{name} must be {allowed}, got {v!r}")
        if self.block_k is not None and (not _is_pow2(self.block_k) or self.block_k < _MIN_DIM):
            raise ValueError(
                f"BlockSizes.block_k={self.block_k} must be a power of two >= {_MIN_DIM} (Triton lowering)"
            )
        if self.block_n is not None and not _is_pow2(self.block_n):
            raise ValueError(f"BlockSizes.block_n={self.block_n} must be a power of two (Triton lowering)")
        if self.backward not in BACKWARDS:
            raise ValueError(f"BlockSizes.backward={self.backward!r} is not one of {BACKWARDS}")
        if self.num_warps is not None and not _is_pow2(self.num_warps):
            raise ValueError(f"BlockSizes.num_warps={self.num_warps} must be a power of two")


@dataclasses.dataclass(frozen=True)
class _Static:
    heads: int  # H
    kv_heads: int  # K
    head_dim: int  # D
    v_head_dim: int  # Dv
    scale: float
    bias: Bias | None
    block_q: int
    chunk: int  # C: selected rows per gathered tile
    n_chunks: int  # k padded = n_chunks * chunk
    num_warps: int
    num_stages: int
    interpret: bool = False  # fixed at trace time, so the VJP's calls match
    backward: str = "atomic"
    chunk_n: int = 1  # key-major backward: selecting queries per gathered chunk

    @property
    def groups(self) -> int:  # G
        return self.heads // self.kv_heads

    @property
    def k_pad(self) -> int:
        return self.n_chunks * self.chunk

    @property
    def groups_p(self) -> int:  # Gp: G in registers (matmul M)
        return _pow2_at_least(self.groups)

    @property
    def groups_n(self) -> int:  # Gn: G in the key-major kernel's rows (no matmul, so no minimum of 16)
        return _pow2_at_least(self.groups, 1)

    @property
    def head_dim_p(self) -> int:  # Dp
        return _pow2_at_least(self.head_dim)

    @property
    def v_head_dim_p(self) -> int:  # Dvp
        return _pow2_at_least(self.v_head_dim)


# ----------------------------------------------------------------------------- kernel bodies

def _grid2(n_rows: int, n_cols: int):
    """Row and column index tensors of an [n_rows, n_cols] tile (Triton: make_range + broadcast)."""
    return (lax.broadcasted_iota(jnp.int32, (n_rows, n_cols), 0), lax.broadcasted_iota(jnp.int32, (n_rows, n_cols), 1))


def _load_tile(ref, t, n_rows: int, n_cols: int, shape):
    """ref[t, :n_rows, :n_cols] (a [bq, n_rows, n_cols] block), zero-padded in registers to `shape`."""
    if (n_rows, n_cols) == shape:
        return ref[t]
    r, c = _grid2(*shape)
    return plgpu.load(ref.at[t, r, c], mask=(r < n_rows) & (c < n_cols), other=0)


def _store_tile(ref, t, val, n_rows: int, n_cols: int):
    """ref[t, :n_rows, :n_cols] = val[:n_rows, :n_cols] (masked: the padded lanes are never written)."""
    if (n_rows, n_cols) == val.shape:
        ref[t] = val
        return
    r, c = _grid2(*val.shape)
    plgpu.store(ref.at[t, r, c], val, mask=(r < n_rows) & (c < n_cols))


def _load_vec(ref, t, n: int, n_p: int):
    """ref[t, :n] (a [bq, n] block) zero-padded to [n_p]."""
    if n == n_p:
        return ref[t]
    g = lax.broadcasted_iota(jnp.int32, (n_p,), 0)
    return plgpu.load(ref.at[t, g], mask=g < n, other=0)


def _store_vec(ref, t, val, n: int):
    if n == val.shape[0]:
        ref[t] = val
        return
    g = lax.broadcasted_iota(jnp.int32, val.shape, 0)
    plgpu.store(ref.at[t, g], val, mask=g < n)


def _gather(table_ref, rows, valid, n_cols: int, n_cols_p: int):
    """Rows `rows` [C] of a [R, n_cols] table as a [C, n_cols_p] tile; invalid rows and padded columns are 0.

    One pointer-tensor load: Triton issues it as a masked gather (masked lanes
    touch no memory); in interpret mode it is a gather followed by a select.
    """
    C = rows.shape[0]
    r = jnp.broadcast_to(jnp.maximum(rows, 0)[:, None], (C, n_cols_p))
    _, c = _grid2(C, n_cols_p)
    mask = jnp.broadcast_to(valid[:, None], (C, n_cols_p))
    if n_cols != n_cols_p:
        mask &= c < n_cols
        c = jnp.minimum(c, n_cols - 1)
    return plgpu.load(table_ref.at[r, c], mask=mask, other=0)


def _chunk(t, c, rows_ref, k_ref, v_ref, kvpos_ref, q, qpos, params, st: _Static):
    """One chunk of token t's selections: (valid [C], row numbers [C], K tile, V tile, masked f32 scores [Gp, C])."""
    C = st.chunk
    rows = rows_ref[t, pl.ds(pl.multiple_of(c * C, C), C)]
    valid = rows >= 0
    kc = _gather(k_ref, rows, valid, st.head_dim, st.head_dim_p)  # [C, Dp]
    vc = _gather(v_ref, rows, valid, st.v_head_dim, st.v_head_dim_p)  # [C, Dvp]
    s = _dot(q, kc, _NT) * st.scale  # [Gp, C]
    if st.bias is not None:
        kpos = plgpu.load(kvpos_ref.at[jnp.maximum(rows, 0)], mask=valid, other=0)  # [C]
        s, _, _ = scores(s, qpos, kpos[None, :], None, None, params, mask=None, bias=st.bias, soft_cap=None)
    return valid, rows, kc, vc, jnp.where(valid[None, :], s, -jnp.inf)


def _group_params(params_ref, st: _Static) -> tuple:
    """This kv head's bias parameters as P columns [Gp, 1] (0 in the padded heads); () without a bias."""
    if st.bias is None:
        return ()
    return tuple(params_ref[p][:, None] for p in range(st.bias.num_params))


def _fwd_kernel(*refs, st: _Static):
    if st.bias is not None:
        params_ref, qpos_ref, kvpos_ref, *refs = refs
    else:
        params_ref = qpos_ref = kvpos_ref = None
    rows_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    G, Gp = st.groups, st.groups_p
    params = _group_params(params_ref, st)

    def token(t, carry):
        q = _load_tile(q_ref, t, G, st.head_dim, (Gp, st.head_dim_p))  # [Gp, Dp]
        qpos = qpos_ref[t] if st.bias is not None else None

        def chunk(c, state):
            m_prev, l_prev, acc = state
            _, _, _, vc, s = _chunk(t, c, rows_ref, k_ref, v_ref, kvpos_ref, q, qpos, params, st)
            m_new = jnp.maximum(m_prev, s.max(axis=1))
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # heads with nothing valid yet
            p = jnp.exp(s - m_use[:, None])
            alpha = jnp.exp(m_prev - m_use)
            return m_new, alpha * l_prev + p.sum(axis=1), alpha[:, None] * acc + _dot(p.astype(vc.dtype), vc, _NN)

        init = (
            jnp.full((Gp,), -jnp.inf, jnp.float32),
            jnp.zeros((Gp,), jnp.float32),
            jnp.zeros((Gp, st.v_head_dim_p), jnp.float32),
        )
        m, l, acc = lax.fori_loop(0, st.n_chunks, chunk, init)
        empty = l == 0.0
        safe_l = jnp.where(empty, 1.0, l)
        _store_tile(o_ref, t, (acc / safe_l[:, None]).astype(o_ref.dtype), G, st.v_head_dim)
        _store_vec(lse_ref, t, jnp.where(empty, -jnp.inf, m + jnp.log(safe_l)), G)
        return carry

    lax.fori_loop(0, st.block_q, token, 0)


def _bwd_kernel(*refs, st: _Static):
    """Query-major backward: dq per token and, with backward="atomic", dk / dv rows by atomic adds."""
    if st.bias is not None:
        params_ref, qpos_ref, kvpos_ref, *refs = refs
    else:
        params_ref = qpos_ref = kvpos_ref = None
    atomic = st.backward == "atomic"
    if atomic:  # dk_ref / dv_ref alias the zero-initialised accumulator inputs (the two refs skipped here).
        rows_ref, q_ref, do_ref, lse_ref, di_ref, k_ref, v_ref, _, _, dq_ref, dk_ref, dv_ref = refs
        dummy = dk_ref.shape[0] - 1  # accumulator row that takes the invalid slots' (zero) rows
    else:
        rows_ref, q_ref, do_ref, lse_ref, di_ref, k_ref, v_ref, dq_ref = refs
    G, Gp, C = st.groups, st.groups_p, st.chunk
    D, Dp, Dv, Dvp = st.head_dim, st.head_dim_p, st.v_head_dim, st.v_head_dim_p
    params = _group_params(params_ref, st)
    _, cols_k = _grid2(C, Dp)
    _, cols_v = _grid2(C, Dvp)

    def token(t, carry):
        q = _load_tile(q_ref, t, G, D, (Gp, Dp))  # [Gp, Dp]
        do = _load_tile(do_ref, t, G, Dv, (Gp, Dvp))  # [Gp, Dvp], 0 in the padded heads
        lse = _load_vec(lse_ref, t, G, Gp)  # finite (the wrapper zeroes -inf)
        di = _load_vec(di_ref, t, G, Gp)  # delta - dlse
        qpos = qpos_ref[t] if st.bias is not None else None

        def chunk(c, dq):
            valid, rows, kc, vc, s = _chunk(t, c, rows_ref, k_ref, v_ref, kvpos_ref, q, qpos, params, st)
            p = jnp.exp(s - lse[:, None])  # masked s = -inf -> p = 0
            dp = _dot(do, vc, _NT)  # [Gp, C]
            ds = p * (dp - di[:, None]) * st.scale
            if atomic:
                dk_rows = _dot(ds.astype(q.dtype), q, _TN)  # [C, Dp]
                dv_rows = _dot(p.astype(do.dtype), do, _TN)  # [C, Dvp]
                acc_rows = jnp.where(valid, rows, dummy)
                plgpu.atomic_add(dk_ref, (jnp.broadcast_to(acc_rows[:, None], (C, Dp)), cols_k), dk_rows)
                plgpu.atomic_add(dv_ref, (jnp.broadcast_to(acc_rows[:, None], (C, Dvp)), cols_v), dv_rows)
            return dq + _dot(ds.astype(kc.dtype), kc, _NN)

        dq = lax.fori_loop(0, st.n_chunks, chunk, jnp.zeros((Gp, Dp), jnp.float32))
        _store_tile(dq_ref, t, dq.astype(dq_ref.dtype), G, D)
        return carry

    lax.fori_loop(0, st.block_q, token, 0)


def _dkv_kernel(*refs, st: _Static):
    """Key-major backward: one key row r and kv head; dk[r] / dv[r] summed over the queries that selected r.

    The G query heads of each selecting query are rows qid * G + member of the
    [N * G, D] q / do tables of this kv head; a chunk gathers `chunk_n` queries
    x Gn heads as M = chunk_n * Gn rows. With one key per program the scores
    are row dots ([M, Dp] x [Dp]) and the sums are column sums, not matmuls:
    the kernel is bound by its gathers, as the forward is.
    """
    if st.bias is not None:
        params_ref, qpos_ref, kvpos_ref, *refs = refs
    else:
        params_ref = qpos_ref = kvpos_ref = None
    starts_ref, qids_ref, q_ref, do_ref, lse_ref, di_ref, k_ref, v_ref, dk_ref, dv_ref = refs
    G, Gn, Cn = st.groups, st.groups_n, st.chunk_n
    D, Dp, Dv, Dvp = st.head_dim, st.head_dim_p, st.v_head_dim, st.v_head_dim_p
    M = Cn * Gn
    m = lax.broadcasted_iota(jnp.int32, (M,), 0)
    slot, member = m // Gn, m % Gn  # row m: the slot-th query of the chunk, query head `member` of the group
    params = () if st.bias is None else tuple(params_ref[p] for p in range(st.bias.num_params))  # each [M]
    r = pl.program_id(0)
    start, end = starts_ref[r], starts_ref[r + 1]
    kr = _load_vec(k_ref, 0, D, Dp).astype(jnp.float32)  # [Dp]
    vr = _load_vec(v_ref, 0, Dv, Dvp).astype(jnp.float32)  # [Dvp]
    kpos = kvpos_ref[0] if st.bias is not None else None
    last = qids_ref.shape[0] - 1

    def chunk(c, acc):
        dk, dv = acc
        j = start + c * Cn + slot  # [M] positions in the inverted selection
        ok = (j < end) & (member < G)
        qid = plgpu.load(qids_ref.at[jnp.minimum(j, last)], mask=ok, other=0)
        qrow = qid * G + jnp.where(ok, member, 0)
        qt = _gather(q_ref, qrow, ok, D, Dp).astype(jnp.float32)  # [M, Dp]
        dot = _gather(do_ref, qrow, ok, Dv, Dvp).astype(jnp.float32)  # [M, Dvp]
        lse = plgpu.load(lse_ref.at[qrow], mask=ok, other=0.0)
        di = plgpu.load(di_ref.at[qrow], mask=ok, other=0.0)
        s = jnp.sum(qt * kr[None, :], axis=1) * st.scale  # [M]
        if st.bias is not None:
            qpos = plgpu.load(qpos_ref.at[qid], mask=ok, other=0)
            s, _, _ = scores(s, qpos, kpos, None, None, params, mask=None, bias=st.bias, soft_cap=None)
        p = jnp.where(ok, jnp.exp(s - lse), 0.0)
        ds = p * (jnp.sum(dot * vr[None, :], axis=1) - di) * st.scale
        return dk + jnp.sum(ds[:, None] * qt, axis=0), dv + jnp.sum(p[:, None] * dot, axis=0)

    init = (jnp.zeros((Dp,), jnp.float32), jnp.zeros((Dvp,), jnp.float32))
    dk, dv = lax.fori_loop(0, (end - start + Cn - 1) // Cn, chunk, init)
    _store_vec(dk_ref, 0, dk.astype(dk_ref.dtype), D)
    _store_vec(dv_ref, 0, dv.astype(dv_ref.dtype), Dv)


# ----------------------------------------------------------------------------- pallas_call wrappers


def _check_call_shapes(q, k, v, rows, q_pos, kv_pos, params, st: _Static):
    """Validate the operands the kernels see: q [Np, H, D], k/v [R, K, D(v)], rows [Np, kp] int32, ..."""
    Np, H, D = q.shape
    K, Dv = st.kv_heads, st.v_head_dim
    if (H, D) != (st.heads, st.head_dim):
        raise ValueError(f"q {q.shape} must be (tokens, {st.heads}, {st.head_dim})")
    if Np % st.block_q:
        raise ValueError(f"padded tokens {Np} is not a multiple of block_q={st.block_q}")
    R = k.shape[0]
    if k.shape != (R, K, D) or v.shape != (R, K, Dv):
        raise ValueError(f"k rows {k.shape} / v rows {v.shape} must be ({R}, {K}, {D}) / ({R}, {K}, {Dv})")
    if rows.shape != (Np, st.k_pad) or rows.dtype != jnp.int32:
        raise ValueError(f"rows {rows.shape} {rows.dtype} must be int32 ({Np}, {st.k_pad})")
    if st.bias is not None:
        if q_pos.shape != (Np,) or kv_pos.shape != (R,):
            raise ValueError(f"q_pos {q_pos.shape} / kv_pos {kv_pos.shape} must be ({Np},) / ({R},)")
        if params.shape != (K, st.bias.num_params, st.groups_p):
            raise ValueError(f"bias params {params.shape} must be ({K}, {st.bias.num_params}, {st.groups_p})")


def _compiler_params(st: _Static):
    return plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)


def _specs(R: int, st: _Static):
    """BlockSpecs on the grid (token block i, kv head h); R = B * S table rows."""
    bq, G = st.block_q, st.groups
    return dict(
        rows=pl.BlockSpec((bq, st.k_pad), lambda i, h: (i, 0)),
        heads=lambda width: pl.BlockSpec((bq, G, width), lambda i, h: (i, h, 0)),  # the G query heads of kv head h
        stats=pl.BlockSpec((bq, G), lambda i, h: (i, h)),
        table=lambda width: pl.BlockSpec((R, None, width), lambda i, h: (0, h, 0)),  # kv head h of every row
        acc=lambda width: pl.BlockSpec((R + 1, None, width), lambda i, h: (0, h, 0)),
        bias=[
            pl.BlockSpec((None, 0 if st.bias is None else st.bias.num_params, st.groups_p), lambda i, h: (h, 0, 0)),
            pl.BlockSpec((bq,), lambda i, h: (i,)),
            pl.BlockSpec((R,), lambda i, h: (0,)),
        ],
    )


def _fwd_call(q, k, v, rows, q_pos, kv_pos, params, st: _Static):
    """out [Np, H, Dv], lse [Np, H] f32."""
    _check_call_shapes(q, k, v, rows, q_pos, kv_pos, params, st)
    Np, H, D = q.shape
    Dv = st.v_head_dim
    sp = _specs(k.shape[0], st)
    in_specs = [sp["rows"], sp["heads"](D), sp["table"](D), sp["table"](Dv)]
    args = [rows, q, k, v]
    if st.bias is not None:
        in_specs, args = sp["bias"] + in_specs, [params, q_pos, kv_pos] + args
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=(Np // st.block_q, st.kv_heads),
        in_specs=in_specs,
        out_specs=[sp["heads"](Dv), sp["stats"]],
        out_shape=[out_struct((Np, H, Dv), q.dtype, q), out_struct((Np, H), jnp.float32, q)],
        compiler_params=_compiler_params(st),
        interpret=st.interpret,
        name="sparse_attention_gpu_fwd",
    )(*args)


def _bwd_call(q, k, v, do, lse, di, rows, q_pos, kv_pos, params, dk_acc, dv_acc, st: _Static):
    """dq [Np, H, D] and, with backward="atomic", the f32 accumulators dk [R + 1, K, Dp], dv [R + 1, K, Dvp]
    (row R: the dummy row); with "key_major", dq alone (pass dk_acc = dv_acc = None)."""
    _check_call_shapes(q, k, v, rows, q_pos, kv_pos, params, st)
    Np, H, D = q.shape
    R, K, Dv = k.shape[0], st.kv_heads, st.v_head_dim
    if do.shape != (Np, H, Dv) or lse.shape != (Np, H) or di.shape != (Np, H):
        raise ValueError(f"do {do.shape} / lse {lse.shape} / di {di.shape} must be ({Np}, {H}, {Dv}) / ({Np}, {H})")
    atomic = st.backward == "atomic"
    acc_shapes = ((R + 1, K, st.head_dim_p), (R + 1, K, st.v_head_dim_p))
    if atomic and (
        (dk_acc.shape, dv_acc.shape) != acc_shapes or dk_acc.dtype != jnp.float32 or dv_acc.dtype != jnp.float32
    ):
        raise ValueError(f"accumulators {dk_acc.shape} / {dv_acc.shape} must be f32 {acc_shapes[0]} / {acc_shapes[1]}")
    sp = _specs(k.shape[0], st)
    acc_specs = [sp["acc"](st.head_dim_p), sp["acc"](st.v_head_dim_p)] if atomic else []
    in_specs = [
        sp["rows"],
        sp["heads"](D),
        sp["heads"](Dv),
        sp["stats"],
        sp["stats"],
        sp["table"](D),
        sp["table"](Dv),
        *acc_specs,
    ]
    args = [rows, q, do, lse, di, k, v] + ([dk_acc, dv_acc] if atomic else [])
    if st.bias is not None:
        in_specs, args = sp["bias"] + in_specs, [params, q_pos, kv_pos] + args
    n_in = len(args)
    out_shape = [out_struct((Np, H, D), q.dtype, q)]
    if atomic:
        out_shape += [out_struct(shape, jnp.float32, q) for shape in acc_shapes]
    return pl.pallas_call(
        functools.partial(_bwd_kernel, st=st),
        grid=(Np // st.block_q, K),
        in_specs=in_specs,
        out_specs=[sp["heads"](D), *acc_specs],
        out_shape=out_shape,
        input_output_aliases={n_in - 2: 1, n_in - 1: 2} if atomic else {},
        compiler_params=_compiler_params(st),
        interpret=st.interpret,
        name="sparse_attention_gpu_bwd" if atomic else "sparse_attention_gpu_bwd_dq",
    )(*args)


def invert_selection(rows, R: int):
    """The selection by key, for the key-major backward: (qids [P], starts [R + 2]) with P = Np * kp.

    qids[starts[r]:starts[r + 1]] are the tokens whose rows hold r, in no particular order; invalid slots (-1)
    sort to the end, under the sentinel key R. One sort of the (key, token) pairs, so O(P log P) work and
    three [P] int32 buffers at most.
    """
    Np, kp = rows.shape
    key = jnp.where(rows >= 0, rows, R).reshape(-1)
    token = lax.broadcasted_iota(jnp.int32, (Np, kp), 0).reshape(-1)
    key_s, qids = lax.sort((key, token), num_keys=1)
    starts = jnp.searchsorted(key_s, jnp.arange(R + 2, dtype=jnp.int32), side="left").astype(jnp.int32)
    return qids, starts


def _dkv_call(q, k, v, do, lse, di, qids, starts, q_pos, kv_pos, params, st: _Static):
    """Key-major dk [R, K, D], dv [R, K, Dv] (k / v dtype) from the inverted selection (`invert_selection`)."""
    Np, H, D = q.shape
    R, K, Dv = k.shape[0], st.kv_heads, st.v_head_dim
    G, M = st.groups, st.chunk_n * st.groups_n
    if qids.ndim != 1 or starts.shape != (R + 2,) or qids.dtype != jnp.int32 or starts.dtype != jnp.int32:
        raise ValueError(f"qids {qids.shape} / starts {starts.shape} must be int32 (P,) / ({R + 2},)")
    # Each kv head's query heads as one [Np * G, D] row table (row qid * G + member): 2-D gathers in the kernel.
    by_kv = lambda x: jnp.moveaxis(x.reshape(Np, K, G, *x.shape[2:]), 1, 0).reshape(K, Np * G, *x.shape[2:])  # noqa: E731
    table = lambda width: pl.BlockSpec((None, Np * G, width), lambda r, h: (h, 0, 0))  # noqa: E731
    row = lambda width: pl.BlockSpec((1, None, width), lambda r, h: (r, h, 0))  # noqa: E731
    stats = pl.BlockSpec((None, Np * G), lambda r, h: (h, 0))
    whole = lambda n: pl.BlockSpec((n,), lambda r, h: (0,))  # noqa: E731
    in_specs = [whole(R + 2), whole(qids.shape[0]), table(D), table(Dv), stats, stats, row(D), row(Dv)]
    args = [starts, qids, by_kv(q), by_kv(do), by_kv(lse), by_kv(di), k, v]
    if st.bias is not None:
        P = st.bias.num_params
        if params.shape != (K, P, st.groups_p):
            raise ValueError(f"bias params {params.shape} must be ({K}, {P}, {st.groups_p})")
        # Row m of a chunk is query head m % Gn of its group: the parameters tiled to [K, P, M].
        tiled = jnp.tile(params[:, :, : st.groups_n], (1, 1, st.chunk_n))
        bias_specs = [
            pl.BlockSpec((None, P, M), lambda r, h: (h, 0, 0)),
            whole(Np),
            pl.BlockSpec((1,), lambda r, h: (r,)),
        ]
        in_specs, args = bias_specs + in_specs, [tiled, q_pos, kv_pos] + args
    return pl.pallas_call(
        functools.partial(_dkv_kernel, st=st),
        grid=(R, K),
        in_specs=in_specs,
        out_specs=[row(D), row(Dv)],
        out_shape=[out_struct((R, K, D), k.dtype, q), out_struct((R, K, Dv), v.dtype, q)],
        compiler_params=_compiler_params(st),
        interpret=st.interpret,
        name="sparse_attention_gpu_bwd_dkv",
    )(*args)


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _sparse(q, k, v, rows, q_pos, kv_pos, params, st):
    return _fwd_call(q, k, v, rows, q_pos, kv_pos, params, st)


def _sparse_fwd(q, k, v, rows, q_pos, kv_pos, params, st):
    """q [Np, H, D], k/v [R, K, D(v)], rows [Np, kp] int32 (-1 invalid), q_pos [Np], kv_pos [R], params [K, P, Gp]."""
    out, lse = _fwd_call(q, k, v, rows, q_pos, kv_pos, params, st)
    return (out, lse), (q, k, v, out, lse, rows, q_pos, kv_pos, params)


def _sparse_bwd(st, res, g):
    q, k, v, out, lse, rows, q_pos, kv_pos, params = res
    do, dlse = g
    do = do.astype(q.dtype)
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [Np, H]
    di = delta - dlse.astype(jnp.float32)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)  # tokens with nothing valid have p == 0 anyway
    R, K = k.shape[:2]
    if st.backward == "key_major":
        (dq,) = _bwd_call(q, k, v, do, lse_safe, di, rows, q_pos, kv_pos, params, None, None, st)
        qids, starts = invert_selection(rows, R)
        dk, dv = _dkv_call(q, k, v, do, lse_safe, di, qids, starts, q_pos, kv_pos, params, st)
    else:
        zeros = tuple(jnp.zeros((R + 1, K, w), jnp.float32) for w in (st.head_dim_p, st.v_head_dim_p))
        acc = like_vma(zeros, q, k, v)  # shard_map-safe
        dq, dk, dv = _bwd_call(q, k, v, do, lse_safe, di, rows, q_pos, kv_pos, params, *acc, st)
        dk = dk[:R, :, : st.head_dim].astype(k.dtype)
        dv = dv[:R, :, : st.v_head_dim].astype(v.dtype)
    # Bias parameters (ALiBi slopes) are fixed by the scheme, never trained: zero cotangent (as in the flash kernels).
    dparams = None if params is None else jnp.zeros_like(params)
    return dq, dk, dv, None, None, None, dparams


_sparse.defvjp(_sparse_fwd, _sparse_bwd)


# ----------------------------------------------------------------------------- public wrapper


def _static(B, S, H, K, D, Dv, k_sel, dtype, scale, bias, bs: BlockSizes, interpret: bool) -> _Static:
    """Validate sizes and pick the automatic chunk and warp count."""
    if k_sel < 1:
        raise ValueError(f"idx/valid must select k >= 1 keys per query, got k={k_sel}")
    if S < 1:
        raise ValueError("k/v must hold at least one key (S >= 1)")
    if D < 1 or Dv < 1:
        raise ValueError(f"head_dim {D} and v head_dim {Dv} must be >= 1")
    if B * S >= 2**31 - 1:
        raise ValueError(f"B*S = {B * S} rows do not fit int32 row numbers")
    Dp, Dvp = _pow2_at_least(D), _pow2_at_least(Dv)
    k_cap = _pow2_at_least(k_sel)  # a chunk never needs more rows than this
    if bs.block_k is None:
        itemsize = jnp.dtype(dtype).itemsize
        C = next((c for c in AUTO_BLOCK_K if c * (Dp + Dvp) * itemsize <= TILE_BYTES), AUTO_BLOCK_K[-1])
    else:
        C = bs.block_k
    C = min(C, k_cap)
    num_warps = bs.num_warps if bs.num_warps is not None else (4 if Dp <= 128 else 8)
    if bs.block_n is None:  # key-major: a chunk gathers Gn query heads' q and do rows per selecting query
        row_bytes = _pow2_at_least(H // K, 1) * (Dp + Dvp) * 4
        chunk_n = next((n for n in AUTO_BLOCK_N if n * row_bytes <= KEY_MAJOR_TILE_BYTES), AUTO_BLOCK_N[-1])
    else:
        chunk_n = bs.block_n
    return _Static(
        heads=H,
        kv_heads=K,
        head_dim=D,
        v_head_dim=Dv,
        scale=float(D**-0.5 if scale is None else scale),
        bias=bias,
        block_q=bs.block_q,
        chunk=C,
        n_chunks=-(-k_sel // C),
        num_warps=num_warps,
        num_stages=bs.num_stages,
        interpret=bool(interpret),
        backward=bs.backward,
        chunk_n=chunk_n,
    )


def sparse_attention(
    q_BTHD,
    k_BSKD,
    v_BSKD,
    idx_BTk,
    valid_BTk,
    *,
    q_pos_BT,
    kv_pos_BS,
    bias: Bias | None = None,
    bias_params_HP=None,
    scale=None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
):
    """Pallas GPU attention of each query to its selected keys; returns (out_BTHD, lse_BTH f32, -inf if none valid).

    Same contract as `pallas_kernels.sparse_attention.sparse_attention`:
    `idx_BTk` (int) indexes the key axis, `valid_BTk` (bool) marks real
    selections; every valid index is attended to (visibility is the selector's
    job). Indices are clipped to [0, S). Differentiable in q, k, v (and via
    lse). `interpret=True` runs both kernels in the generic Pallas interpreter
    (any backend; how the CPU tests run).
    """
    bs = BlockSizes() if block_sizes is None else block_sizes
    if not isinstance(bs, BlockSizes):
        raise ValueError(f"block_sizes must be sparse_attention_gpu.BlockSizes or None, got {type(bs).__name__}")
    B, T, S, H, K, D = check_selection(q_BTHD, k_BSKD, v_BSKD, idx_BTk, valid_BTk, q_pos_BT, kv_pos_BS, bias,
                                       bias_params_HP)
    Dv = v_BSKD.shape[3]
    k_sel = idx_BTk.shape[2]
    st = _static(B, S, H, K, D, Dv, k_sel, q_BTHD.dtype, scale, bias, bs, interpret)
    N = B * T
    Np = -(-N // st.block_q) * st.block_q
    pad_n, pad_k = Np - N, st.k_pad - k_sel

    # Global row numbers into the [B*S, K, D] tables, -1 for invalid (and padded) slots.
    idx = jnp.clip(idx_BTk.astype(jnp.int32), 0, S - 1)
    rows = jnp.where(valid_BTk, idx + (jnp.arange(B, dtype=jnp.int32) * S)[:, None, None], -1)
    rows = pad_axis(pad_axis(rows.reshape(N, k_sel), 1, pad_k, -1), 0, pad_n, -1)  # [Np, kp]
    q = pad_axis(q_BTHD.reshape(N, H, D), 0, pad_n, 0)
    q_pos = kv_pos = params = None
    if bias is not None:
        q_pos = pad_axis(q_pos_BT.astype(jnp.int32).reshape(N), 0, pad_n, 0)
        kv_pos = kv_pos_BS.astype(jnp.int32).reshape(B * S)
        P = bias.num_params
        params = jnp.asarray(bias_params_HP, jnp.float32).reshape(K, H // K, P).transpose(0, 2, 1)
        params = pad_axis(params, 2, st.groups_p - H // K, 0.0)  # [K, P, Gp]
    k = k_BSKD.reshape(B * S, K, D)
    v = v_BSKD.reshape(B * S, K, Dv)
    out, lse = _sparse(q, k, v, rows, q_pos, kv_pos, params, st)
    return out[:N].reshape(B, T, H, Dv), lse[:N].reshape(B, T, H)
