"""DSA: learned top-k sparse attention with a lightning indexer (DeepSeek-V3.2, 2025).

A small indexer scores every visible key s for every query t,

    I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s]),        j = 1..H_I indexer heads,

with q_I[t, j] = x_t W_q^I (d_I dims per head), one shared k_I[s] = LayerNorm(x_s W_k^I)
per token, RoPE (rotate-half) on the first `index_rope_dim` dims of both, and
w[t, j] = (x_t W_w)_j * (H_I * d_I)^-1/2.

Reference: `Indexer` in deepseek-ai/DeepSeek-V3.2-Exp, inference/model.py: k = k_norm(wk(x))
with `k_norm` a LayerNorm with weight and bias (eps 1e-6, in f32), RoPE on the leading
`rope_head_dim` dims, non-interleaved in the indexer, and weights_proj(x) * H_I^-1/2 * d_I^-1/2.
Named departures: the indexer's query reads the hidden state x (the reference reads
the MLA query latent, which this model does not have); the indexer's RoPE is plain
RoPE with theta 10000 (the reference shares the model's YaRN-scaled frequencies);
no Hadamard rotation or FP8 quantisation of q and k (the reference uses them for its
FP8 kernel; in exact arithmetic a Hadamard rotation leaves q . k unchanged).
`index_norm='rmsnorm'` keeps the earlier RMSNorm key for ablations. Each query then attends only to its
top-k keys by I (all visible keys when fewer than k are visible); the set is
shared by all heads of the query.

Training has two stages (`warmup_steps`):
  * dense warm-up: the main attention stays dense and the indexer learns to
    imitate it, minimising KL(p_t || softmax(I_t)), where p_t is the main
    attention distribution summed over heads and L1-normalised (stop-gradient);
    `warmup_mode='frozen'` trains only the indexer (retrofit), 'joint' trains the
    LM at the same time (from scratch);
  * sparse: attention over the top-k set only; the KL is taken over that set.
The indexer reads a detached copy of the hidden state, so the KL trains only
the indexer, and the LM loss (through the discrete top-k) never reaches it. The
indexer has its own optimizer (`DSA.optimizer_groups`, which `lc_jax.state.make_optimizer` reads).

Memory. Nothing T x S is ever built: index scores are computed per (query
block, key block) with a streaming top-k that keeps [block_q, k] candidates
(on CPU, `host_topk` instead fills one [block_q, S] row buffer and selects with
numpy's introselect, 3-4x faster than XLA:CPU's top_k), the dense KL
accumulates per key block, and the sparse attention gathers only the selected
rows (pallas_kernels/sparse_attention.py) and hands the KL the probabilities
it needs. Peak memory is O(T * k); compute of the indexer stays
O(T^2 * H_I * d_I), as in DSA, while the main attention drops to O(T * k * H * D).

Speed on a GPU (H200, T = 65536, k = 2048; benchmarks/results/gpu/h200/README.md, run 4): DSA is slower
than full attention. The selection alone (0.37 s) outweighs full attention fwd+bwd (0.27 s): XLA's top_k
reads rows at about 13 G scores/s whatever k, and a radix select in XLA was slower still. The sparse
kernel's backward adds dk/dv by f32 atomics, one per selected key, kv head and dimension (0.76 of its
0.79 s with 4 kv heads). Fixing either needs a kernel: selection fused with the index scores, and a
key-major backward over the inverted selection. Two steps that way, checked on CPU and timed by the
next GPU check: `select='threshold'` (`threshold_topk`: a sampled threshold, then top_k over about 2k
candidates instead of the whole row) and `sparse_attention_gpu.BlockSizes(backward="key_major")`.

Diagnostics (`diagnostics=True`, evaluation): the share of the dense attention
mass inside the selected set ("attention-mass recall"), against the oracle
top-k, the last-k window and a random k keys, and the fraction of selected
keys older than a sliding window of k tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from lc_jax import fields, ops
from lc_jax.attention.base import AttentionVariant, Cost
from lc_jax.positions.rope import apply_rope, rope_inv_freq
from pallas_kernels.flash_attention.masks import (
    CAUSAL,
    Bias,
    Mask,
    block_visible,
    head_params,
    pad_axis,
    pad_positions,
    scores,
)
from pallas_kernels.sparse_attention import default_block_q, gather_rows, query_blocks

WARMUP_MODES = ("joint", "frozen")
INDEX_NORMS = ("layernorm", "rmsnorm")
INDEX_NORM_EPS = 1e-6  # the reference's LayerNorm default
METRICS = ("kl", "recall", "recall_oracle", "recall_window", "recall_random", "older_than_window")
sg = lax.stop_gradient


# ----------------------------------------------------------------------------- the indexer


class Indexer(nnx.Module):
    """q_I (H_I x d_I), one normalised k_I (d_I) and H_I weights per token, from the (detached) hidden state.

    The indexer is small: its parameters split only the model dimension (over fsdp) and are otherwise
    replicated (logical axis None), also over tensor.
    """

    def __init__(self, *, d_model: int, index_heads: int, index_dim: int, index_rope_dim: int, param_dtype,
                 rngs: nnx.Rngs, index_norm: str = "layernorm"):
        if index_norm not in INDEX_NORMS:
            raise ValueError(f"model.attention.dsa.index_norm={index_norm!r} is not one of {INDEX_NORMS}")
        init = jax.nn.initializers.normal(stddev=d_model**-0.5)
        self.heads, self.dim, self.norm = index_heads, index_dim, index_norm
        self.wq = nnx.Param(init(rngs.params(), (d_model, index_heads, index_dim), param_dtype),
                            out_sharding=("embed", None, None))
        self.wk = nnx.Param(init(rngs.params(), (d_model, index_dim), param_dtype), out_sharding=("embed", None))
        self.k_scale = nnx.Param(jnp.ones((index_dim,), param_dtype), out_sharding=(None,))
        if index_norm == "layernorm":
            self.k_bias = nnx.Param(jnp.zeros((index_dim,), param_dtype), out_sharding=(None,))
        self.ww = nnx.Param(init(rngs.params(), (d_model, index_heads), param_dtype),
                            out_sharding=("embed", None))
        self.rope_dim = index_rope_dim

    def __call__(self, x_BTE, pos_BT):
        """(q_I [B, T, H_I, d_I], w [B, T, H_I], k_I [B, T, d_I]) in f32."""
        x = x_BTE.astype(jnp.float32)
        q_BTJd = jnp.einsum("bte,ejd->btjd", x, self.wq[...])
        k_BTd = x @ self.wk[...]
        k_BTd = index_key_norm(k_BTd, self.k_scale[...], self.k_bias[...] if self.norm == "layernorm" else None)
        if self.rope_dim:
            inv_freq = rope_inv_freq(self.rope_dim, 10000.0)
            q_BTJd = apply_rope(q_BTJd, pos_BT, inv_freq)
            k_BTd = apply_rope(k_BTd[:, :, None], pos_BT, inv_freq)[:, :, 0]
        w_BTJ = (x @ self.ww[...]) * (self.heads * self.dim) ** -0.5
        return q_BTJd, w_BTJ, k_BTd


def index_key_norm(k_BTd, scale_d, bias_d=None, eps: float = INDEX_NORM_EPS):
    """LayerNorm over d_I with weight and bias (the reference), or RMSNorm where `bias_d` is None."""
    if bias_d is None:
        return k_BTd * lax.rsqrt(jnp.mean(k_BTd * k_BTd, -1, keepdims=True) + eps) * scale_d
    mean = jnp.mean(k_BTd, -1, keepdims=True)
    var = jnp.mean(jnp.square(k_BTd - mean), -1, keepdims=True)
    return (k_BTd - mean) * lax.rsqrt(var + eps) * scale_d + bias_d


def index_scores(q_BQJd, w_BQJ, k_BKd):
    """I[b, t, s] = sum_j w[b, t, j] * ReLU(q[b, t, j] . k[b, s]) for one block pair: [B, bq, bk] f32."""
    dots = jnp.einsum("bqjd,bkd->bqjk", q_BQJd, k_BKd, preferred_element_type=jnp.float32)
    return jnp.einsum("bqj,bqjk->bqk", w_BQJ, jax.nn.relu(dots))


# ----------------------------------------------------------------------------- blocking helpers


class _Blocks:
    """Queries and keys cut into blocks, with padded positions/segments (padding is never visible)."""

    def __init__(self, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k, mask: Mask = CAUSAL):
        B, T = q_pos.shape
        S = kv_pos.shape[1]
        self.B, self.T, self.S = B, T, S
        self.bq, self.bk = min(block_q, T), min(block_k, S)
        self.qp, self.kp, self.qs, self.ks, self.pad_t, self.pad_s = pad_positions(
            q_pos, kv_pos, q_seg, kv_seg, self.bq, self.bk, always_segments=True)
        self.nq, self.nk = self.qp.shape[1] // self.bq, self.kp.shape[1] // self.bk
        self.attn_mask = mask
        self.qpb, self.qsb = (x.reshape(B, self.nq, self.bq).swapaxes(0, 1) for x in (self.qp, self.qs))
        self.kpb, self.ksb = (x.reshape(B, self.nk, self.bk).swapaxes(0, 1) for x in (self.kp, self.ks))
        self.vis_NM = block_visible(self.qpb.swapaxes(0, 1), self.kpb.swapaxes(0, 1), self.qsb.swapaxes(0, 1),
                                    self.ksb.swapaxes(0, 1), mask=mask)

    def q_blocks(self, x):  # [B, T, ...] -> [nq, B, bq, ...]
        x = pad_axis(x, 1, self.pad_t, 0)
        return x.reshape(self.B, self.nq, self.bq, *x.shape[2:]).swapaxes(0, 1)

    def k_blocks(self, x):  # [B, S, ...] -> [nk, B, bk, ...]
        x = pad_axis(x, 1, self.pad_s, 0)
        return x.reshape(self.B, self.nk, self.bk, *x.shape[2:]).swapaxes(0, 1)

    def unblock(self, x):  # [nq, B, bq, ...] -> [B, T, ...]
        return x.swapaxes(0, 1).reshape(self.B, self.nq * self.bq, *x.shape[3:])[:, : self.T]

    def mask(self, i, j):  # [B, bq, bk] visibility of block pair (i, j)
        return self.attn_mask.visible(self.qpb[i][:, :, None], self.kpb[j][:, None, :], self.qsb[i][:, :, None],
                                      self.ksb[j][:, None, :])

    def key_range(self):  # per query block, the key blocks [lo, hi) that hold every visible key
        any_N = self.vis_NM.any(1)
        lo_N = jnp.where(any_N, jnp.argmax(self.vis_NM, 1), 0)
        return lo_N, jnp.where(any_N, self.nk - jnp.argmax(self.vis_NM[:, ::-1], 1), 0)

    def selection(self, vals, idx):  # per-block top-k (vals, idx) -> (idx [B, T, k], valid): -inf is no key
        vals, idx = self.unblock(vals), self.unblock(idx)
        valid = jnp.isfinite(vals)
        return jnp.where(valid, jnp.minimum(idx, self.S - 1), 0), valid


def _place(x_KG):
    """Bias parameters [K, G] against scores [B, bq, K, G, keys]."""
    return x_KG[None, None, :, :, None]


def _head_mean_probs(q_bQHD, k_bKKD, lse_bQH, qp, kp, bias, params, scale, mask):
    """p[t, s] = mean_h softmax_h(t, s) (the main attention summed over heads, L1-normalised): [B, bq, bk]."""
    B, bq, H, D = q_bQHD.shape
    K = k_bKKD.shape[2]
    s = jnp.einsum("bqkgd,bskd->bqkgs", q_bQHD.reshape(B, bq, K, H // K, D), k_bKKD,
                   preferred_element_type=jnp.float32) * scale
    s, _, _ = scores(s, qp[:, :, None, None, None], kp[:, None, None, None, :], None, None, params, mask=None,
                     bias=bias, soft_cap=None)
    lse = jnp.where(jnp.isfinite(lse_bQH), lse_bQH, 0.0).reshape(B, bq, K, H // K)
    p = jnp.exp(s - lse[..., None]).mean((2, 3))
    return jnp.where(mask, p, 0.0)


def _plogp(p):
    return jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)


# ----------------------------------------------------------------------------- selection: streaming top-k


def streaming_topk(q_BTJd, w_BTJ, k_BSd, *, q_pos_BT, kv_pos_BS, q_seg_BT=None, kv_seg_BS=None, topk: int,
                   block_q: int = 128, block_k: int = 512):
    """Each query's top-k visible keys by index score, one key block at a time; (idx [B, T, k'], valid).

    k' = min(topk, S). Per query block the running candidates [bq, k'] are
    merged with the next key block's scores by `lax.top_k`, so memory is
    O(T * k) however long S is. Key blocks that no query of the block can see
    (causal triangle, other documents) are skipped. Invalid slots (fewer than
    k visible keys) have valid=False.
    """
    bl = _Blocks(q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, block_q, block_k)
    kk = min(topk, bl.S)
    qb, wb, kb = bl.q_blocks(q_BTJd), bl.q_blocks(w_BTJ), bl.k_blocks(k_BSd)
    lo_N, hi_N = bl.key_range()

    def q_block(i):
        def step(j, carry):
            vals, idx = carry
            scores = jnp.where(bl.mask(i, j), index_scores(qb[i], wb[i], kb[j]), -jnp.inf)
            cand = jnp.concatenate([vals, scores], -1)
            cand_idx = jnp.concatenate([idx, jnp.broadcast_to(j * bl.bk + jnp.arange(bl.bk, dtype=jnp.int32),
                                                              scores.shape)], -1)
            vals, pick = lax.top_k(cand, kk)
            return vals, jnp.take_along_axis(cand_idx, pick, -1)

        init = (jnp.full((bl.B, bl.bq, kk), -jnp.inf, jnp.float32), jnp.zeros((bl.B, bl.bq, kk), jnp.int32))
        return lax.fori_loop(lo_N[i], hi_N[i], step, init)

    vals, idx = lax.map(q_block, jnp.arange(bl.nq))
    return bl.selection(vals, idx)


def host_topk(q_BTJd, w_BTJ, k_BSd, *, q_pos_BT, kv_pos_BS, q_seg_BT=None, kv_seg_BS=None, topk: int,
              block_q: int = 128, block_k: int = 512):
    """`streaming_topk`'s contract and result (as a set, unordered), with the selection made on the host.

    Why: XLA:CPU's `top_k` is a single-threaded partial sort that costs 6-50 ns
    per score (the shorter the row the more), about 90% of the streaming
    selection's time on CPU; numpy's introselect (`np.argpartition`) is linear,
    about 2 ns per score. The scores are still computed by XLA, per (query
    block, visible key block), into one [B, block_q, S] buffer that every query
    block reuses (memory O(S * block_q)); a host callback then picks each
    row's k largest among the visible key blocks. For CPU backends only: on an
    accelerator the scores would cross to the host.
    """
    bl = _Blocks(q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, block_q, block_k)
    kk = min(topk, bl.S)
    qb, wb, kb = bl.q_blocks(q_BTJd), bl.q_blocks(w_BTJ), bl.k_blocks(k_BSd)
    lo_N, hi_N = bl.key_range()
    out_shapes = (jax.ShapeDtypeStruct((bl.B, bl.bq, kk), jnp.int32),
                  jax.ShapeDtypeStruct((bl.B, bl.bq, kk), jnp.float32))

    def q_block(buf, i):
        buf = _score_rows(bl, qb, wb, kb, i, lo_N[i], hi_N[i], buf)  # columns outside [lo, hi) are stale: never read
        idx, vals = jax.pure_callback(functools.partial(_host_argtopk, k=kk), out_shapes, buf,
                                      lo_N[i] * bl.bk, hi_N[i] * bl.bk, vmap_method="sequential")
        return buf, (vals, idx)

    buf = jnp.full((bl.B, bl.bq, bl.nk * bl.bk), -jnp.inf, jnp.float32)
    _, (vals, idx) = lax.scan(q_block, buf, jnp.arange(bl.nq))
    return bl.selection(vals, idx)


def _score_rows(bl: _Blocks, qb, wb, kb, i, lo, hi, buf):
    """Query block i's index scores against key blocks [lo, hi), masked, written into its row buffer buf."""

    def step(j, buf):
        scores = jnp.where(bl.mask(i, j), index_scores(qb[i], wb[i], kb[j]), -jnp.inf)
        return lax.dynamic_update_slice(buf, scores, (0, 0, j * bl.bk))

    return lax.fori_loop(lo, hi, step, buf)


def _host_argtopk(buf, lo, hi, *, k: int):
    """(idx, vals) of the k largest of buf[..., lo:hi] per row, unordered; -inf pads ranges shorter than k."""
    lo, hi = int(lo), int(hi)
    x = np.asarray(buf)[..., lo:hi]
    n = hi - lo
    if n > k:
        pick = np.argpartition(x, n - k, axis=-1)[..., n - k:]
        return (pick + lo).astype(np.int32), np.take_along_axis(x, pick, -1).astype(np.float32)
    idx = np.zeros(x.shape[:-1] + (k,), np.int32)
    vals = np.full(x.shape[:-1] + (k,), -np.inf, np.float32)
    idx[..., :n], vals[..., :n] = np.arange(lo, hi, dtype=np.int32), x
    return idx, vals


THRESHOLD_STRIDE = 16  # threshold_topk samples every 16th column of a row
THRESHOLD_MARGIN = 2.0  # ... and aims its threshold at about 2 k candidates, at most 4 k kept


def threshold_topk(q_BTJd, w_BTJ, k_BSd, *, q_pos_BT, kv_pos_BS, q_seg_BT=None, kv_seg_BS=None, topk: int,
                   block_q: int = 128, block_k: int = 512, stride: int = THRESHOLD_STRIDE,
                   margin: float = THRESHOLD_MARGIN):
    """`streaming_topk`'s contract and result (as a set), with the k largest of each score row found from a
    threshold instead of a top_k over the whole row.

    Why: XLA's `top_k` on a GPU costs the same per score whatever k (a sort of the row: about 13 G scores/s
    on an H200, benchmarks/results/gpu/h200/README.md, run 4), so selecting 2048 of 65536 keys sorts all
    65536. Here the scores of a query block fill one [B, block_q, S] row buffer (as `host_topk`'s), and each
    row's k largest are found in three cheap passes: the top r of every 16th score gives a threshold tau
    (r = 2 k / 16, so about 2 k scores are >= tau, within 1/sqrt(r) relative), the scores >= tau are
    compacted in column order into 4 k slots (a cumulative sum and a scatter), and `top_k` runs over those
    only. Exact: a block where any row keeps fewer than min(k, its visible keys) or more than 4 k scores (a
    skewed sample, ties) falls back to `top_k` over the whole rows; at k = 2048 (r = 256) either bound is
    8 standard deviations away for scores in random order. Ties break by index, as `lax.top_k` does. Not
    yet timed on a GPU; on a CPU `host_topk` is faster.
    """
    bl = _Blocks(q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, block_q, block_k)
    kk = min(topk, bl.S)
    qb, wb, kb = bl.q_blocks(q_BTJd), bl.q_blocks(w_BTJ), bl.k_blocks(k_BSd)
    lo_N, hi_N = bl.key_range()

    def q_block(i):
        buf = jnp.full((bl.B, bl.bq, bl.nk * bl.bk), -jnp.inf, jnp.float32)
        return row_topk(_score_rows(bl, qb, wb, kb, i, lo_N[i], hi_N[i], buf), kk, stride=stride, margin=margin)

    vals, idx = lax.map(q_block, jnp.arange(bl.nq))
    return bl.selection(vals, idx)


def row_topk(x, k: int, *, stride: int = THRESHOLD_STRIDE, margin: float = THRESHOLD_MARGIN):
    """(vals, idx) of the k largest of each row of x [..., S] (-inf: no key), as `lax.top_k(x, k)` gives them
    up to order, via a sampled threshold (`threshold_topk`); plain `top_k` where the rows are too short or
    the threshold misses."""
    plan = threshold_plan(x, k, stride=stride, margin=margin)
    if plan is None:
        return lax.top_k(x, k)
    keep, n_keep, ok, cap = plan
    return lax.cond(ok, lambda x: compact_topk(x, keep, n_keep, k, cap), lambda x: tuple(lax.top_k(x, k)), x)


def threshold_plan(x, k: int, *, stride: int = THRESHOLD_STRIDE, margin: float = THRESHOLD_MARGIN):
    """(keep [..., S], n_keep [...], ok, cap): the scores >= tau, tau the r-th largest of every `stride`-th score
    (r = margin * k / stride), and whether every row keeps at least min(k, its finite scores) and at most
    2 r stride (about 2 margin k); None where rows are too short for the sample to save anything."""
    S = x.shape[-1]
    r = -(-int(margin * k) // stride)
    if S <= 4 * r * stride or r > S // stride:
        return None
    finite = x > -jnp.inf
    tau = lax.top_k(x[..., ::stride], r)[0][..., -1:]  # -inf where fewer than r sampled scores are finite
    keep = finite & (x >= tau)
    n_keep = keep.sum(-1, dtype=jnp.int32)
    ok = jnp.all((n_keep >= jnp.minimum(k, finite.sum(-1, dtype=jnp.int32))) & (n_keep <= 2 * r * stride))
    return keep, n_keep, ok, 2 * r * stride


def compact_topk(x, keep, n_keep, k: int, cap: int):
    """`top_k` over the kept scores only: compacted in column order into `cap` slots (so ties still break by
    index), then the k largest of those. Exact when every row keeps <= cap scores, all >= its k-th largest."""
    S = x.shape[-1]
    rows = n_keep.size
    keep = keep.reshape(rows, S)
    slot = jnp.arange(rows, dtype=jnp.int32)[:, None] * cap + jnp.cumsum(keep, -1, dtype=jnp.int32) - 1
    # Scores not kept go out of bounds, where the scatter drops them (no write, so no contention).
    flat = jnp.where(keep, slot, rows * cap).reshape(-1)
    cols = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (rows, S)).reshape(-1)
    cand = jnp.zeros((rows * cap,), jnp.int32).at[flat].set(cols, mode="drop").reshape(*x.shape[:-1], cap)
    used = jnp.arange(cap, dtype=jnp.int32) < n_keep[..., None]
    vals, pick = lax.top_k(jnp.where(used, jnp.take_along_axis(x, cand, -1), -jnp.inf), k)
    return vals, jnp.take_along_axis(cand, pick, -1)


SELECT_IMPLS = ("auto", "xla", "host", "threshold")


def select_topk(q_BTJd, w_BTJ, k_BSd, *, impl: str = "auto", **kwargs):
    """The DSA selection: `host_topk` (impl host, or auto on a single CPU device), `threshold_topk` (impl
    threshold), else `streaming_topk`.

    Several devices keep `streaming_topk` under auto: a host callback cannot be
    partitioned, so SPMD would gather the sharded scores onto one device.
    """
    if impl not in SELECT_IMPLS:
        raise ValueError(f"model.attention.dsa.select={impl!r}: must be one of {SELECT_IMPLS}")
    if impl == "threshold":
        return threshold_topk(q_BTJd, w_BTJ, k_BSd, **kwargs)
    host = impl == "host" or (impl == "auto" and ops.platform() == "cpu" and jax.device_count() == 1)
    return (host_topk if host else streaming_topk)(q_BTJd, w_BTJ, k_BSd, **kwargs)


# ----------------------------------------------------------------------------- the KL losses


def dense_kl(q_BTHD, k_BSKD, lse_BTH, iq_BTJd, w_BTJ, ik_BSd, *, q_pos_BT, kv_pos_BS, q_seg_BT=None,
             kv_seg_BS=None, bias: Bias | None = None, bias_params_HP=None, scale=None, block_q=128, block_k=512):
    """KL(p_t || softmax_s I[t, s]) per query [B, T], over all visible keys, one block pair at a time.

    KL = sum_s p log p - sum_s p I + logsumexp_s I (sum_s p = 1). The main
    attention enters only through p (stop-gradient); gradients reach the
    indexer's q_I, w and k_I. Each key-block step is rematerialised in the
    backward pass, so memory stays O(T * block_k).
    """
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    bl = _Blocks(q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, block_q, block_k)
    scale = D**-0.5 if scale is None else scale
    params = head_params(bias_params_HP, K, _place)
    qb, lseb, kb, qpb, kpb = bl.q_blocks(sg(q_BTHD)), bl.q_blocks(sg(lse_BTH)), bl.k_blocks(sg(k_BSKD)), bl.qpb, bl.kpb
    iqb, wb, ikb = bl.q_blocks(iq_BTJd), bl.q_blocks(w_BTJ), bl.k_blocks(ik_BSd)

    def q_block(i):
        @jax.checkpoint
        def step(carry, j):
            def compute(carry):
                plogp, pI, m, l = carry
                mask = bl.mask(i, j)
                p = sg(_head_mean_probs(qb[i], kb[j], lseb[i], qpb[i], kpb[j], bias, params, scale, mask))
                score = index_scores(iqb[i], wb[i], ikb[j])
                s_m = jnp.where(mask, score, -jnp.inf)
                m_new = jnp.maximum(m, s_m.max(-1))
                m_use = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                l = l * jnp.exp(m - m_use) + jnp.exp(s_m - m_use[..., None]).sum(-1)
                return (plogp + _plogp(p).sum(-1), pI + (p * jnp.where(mask, score, 0.0)).sum(-1), m_new, l)

            return lax.cond(bl.vis_NM[i, j], compute, lambda c: c, carry), None

        zeros = jnp.zeros((B, bl.bq), jnp.float32)
        init = (zeros, zeros, jnp.full((B, bl.bq), -jnp.inf), zeros)
        (plogp, pI, m, l), _ = lax.scan(step, init, jnp.arange(bl.nk))
        lse_I = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)
        return jnp.where(l > 0, plogp - pI + lse_I, 0.0)

    return bl.unblock(lax.map(q_block, jnp.arange(bl.nq)))


def sparse_kl(q_BTHD, k_BSKD, lse_BTH, iq_BTJd, w_BTJ, ik_BSd, idx_BTk, valid_BTk, *, q_pos_BT, kv_pos_BS,
              bias: Bias | None = None, bias_params_HP=None, scale=None, block_q=None, probs_BTk=None):
    """KL(p_t || softmax I[t, selected]) per query [B, T], over the selected set only (sparse stage).

    p_t is the sparse main attention (its own lse), summed over heads and
    L1-normalised; only the indexer receives gradients. `probs_BTk`, when the
    sparse attention returned it, is p_t itself: then the main keys are not
    gathered and scored a second time (q, k and lse are unused).
    """
    T, kk = idx_BTk.shape[1:]
    row = ik_BSd.shape[-1]  # floats gathered per selected key
    params = ()
    if probs_BTk is None:
        _, _, H, D = q_BTHD.shape
        K = k_BSKD.shape[2]
        scale = D**-0.5 if scale is None else scale
        params = head_params(bias_params_HP, K, _place)
        row += K * D
    blocks, unblock = query_blocks(T, block_q or default_block_q(kk, 1, row, 0, 4))

    @jax.checkpoint
    def block(q_b, lse_b, qp_b, iq_b, w_b, idx_b, valid_b, p_b):
        if p_b is None:
            kp_sel = gather_rows(kv_pos_BS, idx_b)
            p_b = _sel_probs(q_b, gather_rows(sg(k_BSKD), idx_b), lse_b, qp_b, kp_sel, bias, params, scale)
        p = sg(jnp.where(valid_b, p_b, 0.0))  # [B, bq, k]
        ik_sel = gather_rows(ik_BSd, idx_b)  # [B, bq, k, d_I]
        score = jnp.einsum("bqj,bqjk->bqk", w_b, jax.nn.relu(jnp.einsum("bqjd,bqkd->bqjk", iq_b, ik_sel)))
        logq = jax.nn.log_softmax(jnp.where(valid_b, score, -jnp.inf), -1)
        kl = (_plogp(p) - p * jnp.where(valid_b, logq, 0.0)).sum(-1)
        return jnp.where(valid_b.any(-1), kl, 0.0)

    main = (None, None) if probs_BTk is not None else (blocks(sg(q_BTHD)), blocks(sg(lse_BTH)))
    p_blocks = None if probs_BTk is None else blocks(sg(probs_BTk))
    kl = lax.map(lambda a: block(*a), (*main, blocks(q_pos_BT), blocks(iq_BTJd), blocks(w_BTJ), blocks(idx_BTk),
                                       blocks(valid_BTk), p_blocks))
    return unblock(kl)


# ----------------------------------------------------------------------------- diagnostics


def mass_diagnostics(q_BTHD, k_BSKD, lse_BTH, idx_BTk, valid_BTk, *, q_pos_BT, kv_pos_BS, q_seg_BT=None,
                     kv_seg_BS=None, bias: Bias | None = None, bias_params_HP=None, scale=None, topk: int,
                     window: int, block_q=128, block_k=512):
    """Per-query attention-mass recall of the selection and of three baselines, all [B, T] f32.

    Returns a dict: `recall` (dense mass inside the selected set), `recall_oracle`
    (the k largest dense probabilities), `recall_window` (the last k positions),
    `recall_random` (expected mass of k random visible keys: k / visible),
    `older_than_window` (share of selected keys at distance >= `window`) and
    `long` (1 where more than k keys are visible: elsewhere every method scores 1).
    `lse_BTH` is the *dense* attention's log-sum-exp. No gradients.
    """
    q, k, lse = sg(q_BTHD), sg(k_BSKD), sg(lse_BTH)
    B, T, H, D = q.shape
    K = k.shape[2]
    bl = _Blocks(q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, block_q, block_k)
    kk = min(topk, bl.S)
    scale = D**-0.5 if scale is None else scale
    params = head_params(bias_params_HP, K, _place)
    qb, lseb, kb, qpb, kpb = bl.q_blocks(q), bl.q_blocks(lse), bl.k_blocks(k), bl.qpb, bl.kpb

    def q_block(i):
        def step(carry, j):
            top, win, n = carry
            mask = bl.mask(i, j)
            p = _head_mean_probs(qb[i], kb[j], lseb[i], qpb[i], kpb[j], bias, params, scale, mask)
            near = (qpb[i][:, :, None] - kpb[j][:, None, :]) < topk
            top = lax.top_k(jnp.concatenate([top, jnp.where(mask, p, -1.0)], -1), kk)[0]
            return (top, win + jnp.where(near, p, 0.0).sum(-1), n + mask.sum(-1)), None

        zeros = jnp.zeros((B, bl.bq), jnp.float32)
        init = (jnp.full((B, bl.bq, kk), -1.0), zeros, zeros)
        (top, win, n), _ = lax.scan(step, init, jnp.arange(bl.nk))
        return jnp.maximum(top, 0.0).sum(-1), win, n

    oracle, win, n = (bl.unblock(x) for x in lax.map(q_block, jnp.arange(bl.nq)))
    # The selection's mass: the dense probabilities at the selected keys, [bq, k] gathered rows at a time.
    blocks, unblock = query_blocks(T, default_block_q(idx_BTk.shape[-1], K, D, 0, 4))

    def sel_block(q_b, lse_b, qp_b, idx_b, valid_b):
        p = _sel_probs(q_b, gather_rows(k, idx_b), lse_b, qp_b, gather_rows(kv_pos_BS, idx_b), bias, params, scale)
        return jnp.where(valid_b, p, 0.0).sum(-1)

    sel = unblock(lax.map(lambda a: sel_block(*a), tuple(blocks(x) for x in (q, lse, q_pos_BT, idx_BTk, valid_BTk))))
    dist = q_pos_BT[:, :, None] - gather_rows(kv_pos_BS, idx_BTk)
    older = jnp.where(valid_BTk & (dist >= window), 1.0, 0.0).sum(-1) / jnp.maximum(valid_BTk.sum(-1), 1)
    return {"recall": sel, "recall_oracle": oracle, "recall_window": win,
            "recall_random": jnp.where(n > 0, jnp.minimum(1.0, kk / jnp.maximum(n, 1.0)), 1.0),
            "older_than_window": older, "long": (n > kk).astype(jnp.float32)}


def _sel_probs(q_bQHD, k_sel, lse_bQH, qp, kp_sel, bias, params, scale):
    B, bq, H, D = q_bQHD.shape
    K = k_sel.shape[3]
    s = jnp.einsum("bqkgd,bqjkd->bqkgj", q_bQHD.reshape(B, bq, K, H // K, D), k_sel,
                   preferred_element_type=jnp.float32) * scale
    s, _, _ = scores(s, qp[:, :, None, None, None], kp_sel[:, :, None, None, :], None, None, params, mask=None,
                     bias=bias, soft_cap=None)
    lse = jnp.where(jnp.isfinite(lse_bQH), lse_bQH, 0.0).reshape(B, bq, K, H // K)
    return jnp.exp(s - lse[..., None]).mean((2, 3))


# ----------------------------------------------------------------------------- the variant


# The sparse stage's 4-byte [tokens, k] tensors per layer (selection, index scores, sparse-KL terms) alive at
# a training step's peak. Fitted to configs/tpu/dsa1b_32k.py alone (41 of its 47 GiB of temporaries in a
# deviceless compile), so its row in benchmarks/tpu_aot.py is not a check of this term.
SELECTION_COPIES = 10


class DSA(AttentionVariant):
    """Dense attention plus an indexer KL during warm-up; top-k sparse attention after it."""

    FIELDS = dict(AttentionVariant.FIELDS, dsa=dict(
        topk=2048,  # keys per query in the sparse stage (all visible keys when fewer)
        index_heads=4,  # H_I indexer heads
        index_dim=32,  # d_I per indexer head
        index_rope_dim=16,  # leading indexer dims that get RoPE (0: none)
        index_norm="layernorm",  # the indexer key's norm: layernorm (DeepSeek-V3.2) | rmsnorm
        warmup_steps=1000,  # dense warm-up steps (indexer trained by KL); sparse from then on
        warmup_mode="joint",  # joint: LM trains too (from scratch) | frozen: only the indexer trains
        kl_weight=1.0,
        index_block_q=128,  # query block of the blockwise index scores / top-k selection
        # Key block of the index scores. In the streaming top-k (select=xla) each merge runs top_k over
        # k + block_k scores, so long blocks amortise it (32K, k=512, CPU: 1.7x faster than 512).
        index_block_k=4096,
        # Who picks the top-k: auto (host on a single CPU device, else xla) | xla (streaming lax.top_k) |
        # host (numpy introselect in a callback: XLA:CPU's top_k is a serial partial sort; 3x faster) |
        # threshold (a sampled threshold, then top_k over 2k candidates; for GPUs, not yet timed there).
        select="auto",
        lr=0.0,  # indexer learning rate (0: train.lr)
        weight_decay=0.0,
    ))
    RING = False  # the indexer's top-k over a sharded sequence is not built yet
    CACHE = False  # the indexer scores keys from their hidden states, which a KV cache does not keep
    STAGES = ("dense", "sparse")

    @classmethod
    def stage_at(cls, cfg, step: int) -> str:
        return "sparse" if step >= cfg.dsa.warmup_steps else "dense"

    @classmethod
    def aux_losses(cls, cfg) -> dict[str, float]:
        return {"dsa_kl": float(cfg.dsa.kl_weight)}

    @classmethod
    def optimizer_groups(cls, cfg) -> dict[str, tuple[float, float]]:
        return {"indexer": (float(cfg.dsa.lr), float(cfg.dsa.weight_decay))}

    @classmethod
    def cost(cls, cfg, *, d_model: int, num_heads: int) -> Cost:
        """The sparse stage's cost: top-k mixing, and an indexer that scores every visible pair with H_I dot
        products of d_I plus their weighted sum, 2 x H_I x (d_I + 1) FLOPs, and caches k_I (d_I per token)."""
        ds = cfg.dsa
        J, d = ds.index_heads, ds.index_dim
        norm = d * (2 if ds.index_norm == "layernorm" else 1)  # k_scale (+ k_bias): elementwise
        return dataclasses.replace(
            super().cost(cfg, d_model=d_model, num_heads=num_heads),
            label=f"DSA top-{ds.topk}, indexer {J} x {d}", keys_per_query=ds.topk,
            params=(("indexer", d_model * J * d + d_model * d + norm + d_model * J),),  # wq, wk, norm, ww
            elementwise_params=norm, cache_per_token=d, flops_per_pair=2 * J * (d + 1),
            train_bytes_per_token=SELECTION_COPIES * ds.topk * 4)

    @classmethod
    def frozen_until(cls, cfg) -> int:
        return int(cfg.dsa.warmup_steps) if cfg.dsa.warmup_mode == "frozen" else 0

    @classmethod
    def check(cls, cfg, **kw) -> list[str]:
        ds, f = cfg.dsa, "model.attention.dsa."
        p = super().check(cfg, **kw)
        for k in ("topk", "index_heads", "index_dim", "index_block_q", "index_block_k"):
            p += fields.positive(f + k, ds[k])
        p += fields.positive(f + "warmup_steps", ds.warmup_steps, zero_ok=True)
        bad = fields.positive(f + "index_rope_dim", ds.index_rope_dim, zero_ok=True)
        if not bad and (ds.index_rope_dim % 2 or (isinstance(ds.index_dim, int) and ds.index_rope_dim > ds.index_dim)):
            bad = [f"{f}index_rope_dim={ds.index_rope_dim}: must be even and <= {f}index_dim={ds.index_dim}"]
        p += bad
        p += fields.allowed(f + "warmup_mode", ds.warmup_mode, WARMUP_MODES)
        p += fields.allowed(f + "index_norm", ds.get("index_norm", "layernorm"), INDEX_NORMS)
        p += fields.allowed(f + "select", ds.get("select", "auto"), SELECT_IMPLS)
        if cfg.get("sinks", False):
            p.append("model.attention.sinks=True: not built for model.attention.name='dsa' yet (its sparse stage and "
                     "KL would need the sink too); allowed with full, sliding and chunked")
        for k in ("kl_weight", "lr", "weight_decay"):
            p += fields.positive(f + k, ds[k], zero_ok=True, kind=(float, int))
        return p

    def __init__(self, *, d_model: int, param_dtype, rngs: nnx.Rngs, dsa, **kwargs):
        super().__init__(**kwargs)
        self.topk, self.block_q, self.block_k = int(dsa["topk"]), int(dsa["index_block_q"]), int(dsa["index_block_k"])
        self.select = str(dsa.get("select", "auto"))
        self.indexer = Indexer(d_model=d_model, index_heads=dsa["index_heads"], index_dim=dsa["index_dim"],
                               index_rope_dim=dsa["index_rope_dim"], param_dtype=param_dtype, rngs=rngs,
                               index_norm=dsa.get("index_norm", "layernorm"))

    def __call__(self, q_BTHD, k_BSKD, v_BSKD, *, q_pos_BT, kv_pos_BS, q_seg_BT=None, kv_seg_BS=None,
                 bias=None, x_BTE=None, stage: str | None = None, diagnostics: bool = False):
        """(out, aux): aux holds the indexer KL ('dsa_kl', the loss) and, with `diagnostics`, the attention-mass
        recall measurements ('dsa_recall', ...), each an f32 [sum over scored queries, count] pair."""
        if stage not in (None, *self.STAGES):
            raise ValueError(f"DSA stage={stage!r}: allowed values are {list(self.STAGES)}")
        sparse = stage == "sparse"
        if x_BTE is None:
            raise ValueError("DSA scores keys from the hidden state: pass x_BTE")
        if k_BSKD.shape[1] != x_BTE.shape[1]:
            raise ValueError("DSA needs the hidden state of every key (T == S); cached decoding is not supported yet")
        iq, w, ik = self.indexer(sg(x_BTE), q_pos_BT)
        bias_fn, params = bias or (None, None)
        biased = dict(bias=bias_fn, bias_params_HP=params)
        pos = dict(q_pos_BT=q_pos_BT, kv_pos_BS=kv_pos_BS)
        segs = dict(q_seg_BT=q_seg_BT, kv_seg_BS=kv_seg_BS)
        blocks = dict(block_q=self.block_q)
        if sparse:
            idx, valid = select_topk(sg(iq), sg(w), sg(ik), impl=self.select, **pos, **segs, topk=self.topk,
                                     **blocks, block_k=self.block_k)
            out, lse, probs = self._sparse_attention(q_BTHD, k_BSKD, v_BSKD, idx, valid, **pos, **biased)
            kl = sparse_kl(q_BTHD, k_BSKD, lse, iq, w, ik, idx, valid, **pos, **biased, probs_BTk=probs)
        else:
            out, lse = ops.attention(q_BTHD, k_BSKD, v_BSKD, **pos, **segs, mask=self.mask, **biased,
                                     impl=self.impl, block_sizes=self.block_sizes, return_lse=True)
            kl = dense_kl(q_BTHD, k_BSKD, lse, iq, w, ik, **pos, **segs, **biased, **blocks, block_k=self.block_k)
        rows = jnp.ones(kl.shape, jnp.float32) if q_seg_BT is None else (q_seg_BT > 0).astype(jnp.float32)
        aux = {"dsa_kl": jnp.stack([(kl * rows).sum(), rows.sum()])}
        if diagnostics:
            aux |= self._diagnose(q_BTHD, k_BSKD, iq, w, ik, pos, segs, biased, rows, None if sparse else lse)
        return out, aux

    def _sparse_attention(self, q, k, v, idx, valid, **kw):
        """(out, lse, head-mean probs or None) through `ops.SPARSE`: the Pallas kernel on TPU (impl auto |
        pallas) and on GPU (pallas, or auto once the GPU check passed it), else the XLA gather path (which also
        returns the probabilities the KL needs)."""
        return ops.sparse_attention(q, k, v, idx, valid, **kw, impl=self.impl)

    def _diagnose(self, q, k, iq, w, ik, pos, segs, biased, rows, dense_lse):
        if dense_lse is None:  # sparse stage: the dense attention is needed only to measure against it
            _, dense_lse = ops.attention(q, k, k, **pos, **segs, mask=self.mask, **biased, impl=self.impl,
                                         block_sizes=self.block_sizes, return_lse=True)
        idx, valid = select_topk(iq, w, ik, impl=self.select, **pos, **segs, topk=self.topk, block_q=self.block_q,
                                 block_k=self.block_k)
        d = mass_diagnostics(q, k, dense_lse, idx, valid, **pos, **segs, **biased, topk=self.topk,
                             window=self.topk, block_q=self.block_q, block_k=self.block_k)
        long = d.pop("long") * rows
        return {f"dsa_{name}": jnp.stack([(v * long).sum(), long.sum()]) for name, v in d.items()}
