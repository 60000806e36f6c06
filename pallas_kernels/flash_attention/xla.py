"""Blockwise (flash-style) attention in plain XLA: the CPU path and the fallback everywhere.

Queries are processed one block at a time; for each query block a loop walks
only the key blocks that can be visible (from per-block min/max summaries of
positions and segment ids), keeping an online softmax. A key block that only
sink tokens make visible is visited in its sink columns alone (`_visit_modes`). Nothing of size T x S
is ever built. The backward pass is a `custom_vjp` that recomputes each block's
probabilities from the saved log-sum-exp, in one sweep that yields dq, dk, dv.

Laid out like the Pallas kernels: block sizes, block body, wrapper with shape
validation, custom_vjp.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash_attention.masks import (
    CAUSAL,
    Bias,
    Mask,
    block_visible,
    check_bias,
    head_params,
    like_vma,
    pad_axis,
    pad_positions,
    scores,
)

# ----------------------------------------------------------------------------- block sizes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query / key block lengths. 256 x 512 was fastest on a 2-core CPU at head_dim 64 (4K tokens, 8 heads)."""

    block_q: int = 256
    block_k: int = 512

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {v!r}")


@dataclasses.dataclass(frozen=True)
class _Static:
    mask: Mask
    bias: Bias | None
    scale: float
    soft_cap: float | None
    block_q: int
    block_k: int


# ----------------------------------------------------------------------------- block body


def _logits(q_i, k_j, qp_i, kp_j, qs_i, ks_j, params, st: _Static):
    """Scores [B, K, G, bq, bk] in f32, their visibility [B, 1, 1, bq, bk], and tanh(s/cap) for the backward."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * st.scale
    rows, cols = (lambda x: x[:, None, None, :, None]), (lambda x: x[:, None, None, None, :])  # noqa: E731
    segs = (None, None) if qs_i is None else (rows(qs_i), cols(ks_j))
    return scores(s, rows(qp_i), cols(kp_j), *segs, params, mask=st.mask, bias=st.bias, soft_cap=st.soft_cap)


def _visit_list(visit_NM):
    """Per query block, the key blocks to visit in increasing order, then the rest: (int32 [N, M] block
    indices, int32 [N] how many to visit). The loops walk only these, so a query block pays for the blocks
    it sees, however far apart (sink tokens and a window), and for no others."""
    order = jnp.argsort(~visit_NM, axis=1, stable=True).astype(jnp.int32)
    return order, visit_NM.sum(1).astype(jnp.int32)


def _sink_width(st: _Static) -> int:
    """Columns a sink-only visit computes: the sink tokens, rounded up to 8, at most a block."""
    return min(st.block_k, -(-st.mask.sink_tokens // 8) * 8)


def _visit_modes(vis, kpb, ksb, qpb, qsb, st: _Static):
    """int32 [nq, nk]: 0 skip, 1 the whole key block, 2 only the sink tokens' columns of it; and their offset
    per key block (None without sink tokens). A block is visited narrowly when only sink tokens make it
    visible (its window / chunk terms hide it) and every key of it with kv_pos < N lies in one run of
    `_sink_width` columns (over the batch): sinks then cost N columns per query block, not a key block."""
    if st.mask.sink_tokens is None:
        return vis.astype(jnp.int32), None
    local = block_visible(qpb, kpb, qsb, ksb, mask=dataclasses.replace(st.mask, sink_tokens=None))
    width, bk = _sink_width(st), st.block_k
    sink = kpb < st.mask.sink_tokens  # [B, nk, bk]; padded keys (segment -1) are never sinks
    if ksb is not None:
        sink &= ksb >= 0
    col = jnp.arange(bk)
    first = jnp.where(sink, col, bk).min((0, 2))
    last = jnp.where(sink, col, -1).max((0, 2))
    narrow_ok = last - first < width  # all of a block's sinks in one run of `width` (True if it has none)
    offset = jnp.clip(first, 0, bk - width)
    modes = jnp.where(local, 1, jnp.where(vis, jnp.where(narrow_ok[None, :], 2, 1), 0))
    return modes.astype(jnp.int32), offset


def _sink_columns(x, o, width):
    """Columns [o, o + width) of a key block ([B, bk, ...] or [B, bk])."""
    return None if x is None else lax.dynamic_slice_in_dim(x, o, width, axis=1)


def _blocked(q, k, v, q_pos, kv_pos, q_seg, kv_seg, st: _Static):
    B, T, H, D = q.shape
    _, S, K, _ = k.shape
    G = H // K
    nq, nk = T // st.block_q, S // st.block_k
    qb = q.reshape(B, nq, st.block_q, K, G, D)
    kb = k.reshape(B, nk, st.block_k, K, D)
    vb = v.reshape(B, nk, st.block_k, K, v.shape[-1])
    qpb = q_pos.reshape(B, nq, st.block_q)
    kpb = kv_pos.reshape(B, nk, st.block_k)
    qsb = None if q_seg is None else q_seg.reshape(B, nq, st.block_q)
    ksb = None if kv_seg is None else kv_seg.reshape(B, nk, st.block_k)
    vis = block_visible(qpb, kpb, qsb, ksb, mask=st.mask)
    return qb, kb, vb, qpb, kpb, qsb, ksb, vis


def _take(x, i):
    return None if x is None else x[:, i]


def _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bias_params_HP, st: _Static):
    B, T, H, D = q.shape
    K, Dv = k.shape[2], v.shape[3]
    G = H // K
    qb, kb, vb, qpb, kpb, qsb, ksb, vis = _blocked(q, k, v, q_pos, kv_pos, q_seg, kv_seg, st)
    modes, offset = _visit_modes(vis, kpb, ksb, qpb, qsb, st)
    order, count = _visit_list(modes == 1)
    sink_order, sink_count = _visit_list(modes == 2)
    params = head_params(bias_params_HP, K, lambda x_KG: x_KG[None, :, :, None, None])

    def q_block(i):
        q_i, qp_i, qs_i = qb[:, i], qpb[:, i], _take(qsb, i)

        def compute(carry, k_j, v_j, kp_j, ks_j):
            m, l, acc = carry
            s, mask, _ = _logits(q_i, k_j, qp_i, kp_j, qs_i, ks_j, params, st)
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_use[..., None])
            alpha = jnp.exp(m - m_use)
            l = alpha * l + p.sum(-1)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
            return m_new, l, alpha[..., None] * acc + pv

        def step(t, carry):  # a whole key block
            j = order[i, t]
            return compute(carry, kb[:, j], vb[:, j], kpb[:, j], _take(ksb, j))

        def sink_step(t, carry):  # the sink columns of a key block that only they make visible
            j = sink_order[i, t]
            return compute(carry, *(_sink_columns(x, offset[j], _sink_width(st))
                                    for x in (kb[:, j], vb[:, j], kpb[:, j], _take(ksb, j))))

        init = like_vma((
            jnp.full((B, K, G, st.block_q), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, G, st.block_q), jnp.float32),
            jnp.zeros((B, K, G, st.block_q, Dv), jnp.float32),
        ), q, k, v)
        carry = lax.fori_loop(0, count[i], step, init)
        if offset is not None:
            carry = lax.fori_loop(0, sink_count[i], sink_step, carry)
        m, l, acc = carry
        safe_l = jnp.where(l == 0, 1.0, l)
        out = (acc / safe_l[..., None]).transpose(0, 3, 1, 2, 4).reshape(B, st.block_q, H, Dv)
        lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(safe_l)).transpose(0, 3, 1, 2).reshape(B, st.block_q, H)
        return out.astype(q.dtype), lse

    out_NBbHD, lse_NBbH = lax.map(q_block, jnp.arange(qb.shape[1]))
    out = out_NBbHD.transpose(1, 0, 2, 3, 4).reshape(B, T, H, Dv)
    lse = lse_NBbH.transpose(1, 0, 2, 3).reshape(B, T, H)
    return out, lse


def _backward(q, k, v, out, lse, do, dlse, q_pos, kv_pos, q_seg, kv_seg, bias_params_HP, st: _Static):
    B, T, H, D = q.shape
    K, Dv = k.shape[2], v.shape[3]
    G = H // K
    qb, kb, vb, qpb, kpb, qsb, ksb, vis = _blocked(q, k, v, q_pos, kv_pos, q_seg, kv_seg, st)
    modes, offset = _visit_modes(vis, kpb, ksb, qpb, qsb, st)
    order, count = _visit_list(modes == 1)
    sink_order, sink_count = _visit_list(modes == 2)
    nq, nk = qb.shape[1], kb.shape[1]
    params = head_params(bias_params_HP, K, lambda x_KG: x_KG[None, :, :, None, None])

    def per_row(x_BTH):  # [B, T, H] -> [B, nq, K, G, bq]
        return x_BTH.reshape(B, nq, st.block_q, K, G).transpose(0, 1, 3, 4, 2)

    delta = per_row(jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), -1))
    lse_safe = per_row(jnp.where(jnp.isfinite(lse), lse, 0.0))
    dlse = per_row(dlse.astype(jnp.float32))
    dob = do.reshape(B, nq, st.block_q, K, G, Dv)

    def q_block(carry, i):
        q_i, do_i, qp_i, qs_i = qb[:, i], dob[:, i], qpb[:, i], _take(qsb, i)
        lse_i, delta_i, dlse_i = lse_safe[:, i], delta[:, i], dlse[:, i]

        def compute(c, j, o, width):
            """Block j's part of the gradients: all its columns (width None) or columns [o, o + width)."""
            dq_i, dk_acc, dv_acc = c
            cols = (lambda x: x) if width is None else (lambda x: _sink_columns(x, o, width))  # noqa: E731
            k_j, v_j, kp_j, ks_j = (cols(x) for x in (kb[:, j], vb[:, j], kpb[:, j], _take(ksb, j)))
            s, mask, t = _logits(q_i, k_j, qp_i, kp_j, qs_i, ks_j, params, st)
            p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None] + dlse_i[..., None])
            if t is not None:
                ds = ds * (1.0 - t * t)
            ds = (ds * st.scale).astype(q.dtype)
            dq_i = dq_i + jnp.einsum("bkgqs,bskd->bqkgd", ds, k_j, preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bkgqs,bqkgd->bskd", ds, q_i, preferred_element_type=jnp.float32)
            dv_j = jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do.dtype), do_i, preferred_element_type=jnp.float32)

            def add(acc, d):
                blk = acc[:, j]
                if width is None:
                    blk = blk + d
                else:
                    blk = lax.dynamic_update_slice_in_dim(blk, lax.dynamic_slice_in_dim(blk, o, width, 1) + d, o, 1)
                return lax.dynamic_update_index_in_dim(acc, blk, j, 1)

            return dq_i, add(dk_acc, dk_j), add(dv_acc, dv_j)

        def step(t, c):
            return compute(c, order[i, t], 0, None)

        def sink_step(t, c):
            j = sink_order[i, t]
            return compute(c, j, offset[j], _sink_width(st))

        dq0 = like_vma(jnp.zeros((B, st.block_q, K, G, D), jnp.float32), q, k, v)
        c = lax.fori_loop(0, count[i], step, (dq0, *carry))
        if offset is not None:
            c = lax.fori_loop(0, sink_count[i], sink_step, c)
        dq_i, dk_acc, dv_acc = c
        return (dk_acc, dv_acc), dq_i

    init = like_vma((
        jnp.zeros((B, nk, st.block_k, K, D), jnp.float32),
        jnp.zeros((B, nk, st.block_k, K, Dv), jnp.float32),
    ), q, k, v)
    (dk, dv), dq = lax.scan(q_block, init, jnp.arange(nq))
    dq = dq.transpose(1, 0, 2, 3, 4, 5).reshape(B, T, H, D).astype(q.dtype)
    dk = dk.reshape(B, -1, K, D).astype(k.dtype)
    dv = dv.reshape(B, -1, K, Dv).astype(v.dtype)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bias_params_HP, st):
    return _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bias_params_HP, st)


def _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bias_params_HP, st):
    out, lse = _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bias_params_HP, st)
    return (out, lse), (q, k, v, out, lse, q_pos, kv_pos, q_seg, kv_seg, bias_params_HP)


def _flash_bwd(st, res, g):
    q, k, v, out, lse, q_pos, kv_pos, q_seg, kv_seg, bias_params_HP = res
    do, dlse = g
    dq, dk, dv = _backward(q, k, v, out, lse, do, dlse, q_pos, kv_pos, q_seg, kv_seg, bias_params_HP, st)
    # Bias parameters (ALiBi slopes) are fixed by the scheme, never trained: zero cotangent.
    dparams = None if bias_params_HP is None else jnp.zeros_like(bias_params_HP)
    return dq, dk, dv, None, None, None, None, dparams


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- wrapper


def _prepare(q_BTHD, k_BSKD, v_BSKD, q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, mask, bias, bias_params_HP,
             scale, logits_soft_cap, block_sizes):
    """Pad to whole blocks and fix the static settings (shared by the forward and `attention_bwd`)."""
    bs = block_sizes or BlockSizes()
    T, D = q_BTHD.shape[1], q_BTHD.shape[3]
    S = k_BSKD.shape[1]
    bq, bk = min(bs.block_q, T), min(bs.block_k, S)
    q_pos, kv_pos, q_seg, kv_seg, pad_t, pad_s = pad_positions(q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, bq, bk)
    check_bias(bias, bias_params_HP, q_BTHD.shape[2])
    st = _Static(
        mask=mask,
        bias=bias,
        scale=float(D**-0.5 if scale is None else scale),
        soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        block_q=bq,
        block_k=bk,
    )
    return q_pos, kv_pos, q_seg, kv_seg, pad_t, pad_s, st


def _params(bias_params_HP):
    return None if bias_params_HP is None else jnp.asarray(bias_params_HP, jnp.float32)


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
):
    """Blockwise attention; returns (out_BTHD, lse_BTH). Shapes are validated by `lc_jax.ops`."""
    T = q_BTHD.shape[1]
    q_pos, kv_pos, q_seg, kv_seg, pad_t, pad_s, st = _prepare(
        q_BTHD, k_BSKD, v_BSKD, q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, mask, bias, bias_params_HP,
        scale, logits_soft_cap, block_sizes)
    q = pad_axis(q_BTHD, 1, pad_t, 0)
    k, v = pad_axis(k_BSKD, 1, pad_s, 0), pad_axis(v_BSKD, 1, pad_s, 0)
    out, lse = _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, _params(bias_params_HP), st)
    return out[:, :T], lse[:, :T]


def attention_bwd(q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BTH, do_BTHD, dlse_BTH, *, q_pos_BT, kv_pos_BS,
                  q_seg_BT=None, kv_seg_BS=None, mask: Mask = CAUSAL, bias: Bias | None = None,
                  bias_params_HP=None, scale=None, logits_soft_cap=None, block_sizes: BlockSizes | None = None):
    """(dq, dk, dv) of one key shard, given the rows' *final* out and lse.

    Ring attention merges many key shards; with the merged lse,
    p = exp(s - lse) is this shard's share of the global softmax, so the usual
    flash backward (ds = p * (dp - rowsum(out * do) + dlse)) yields exactly this
    shard's part of the gradient without recomputing the other shards.
    """
    T, S = q_BTHD.shape[1], k_BSKD.shape[1]
    q_pos, kv_pos, q_seg, kv_seg, pad_t, pad_s, st = _prepare(
        q_BTHD, k_BSKD, v_BSKD, q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, mask, bias, bias_params_HP,
        scale, logits_soft_cap, block_sizes)
    padq = lambda x: pad_axis(x, 1, pad_t, 0)  # noqa: E731
    k, v = pad_axis(k_BSKD, 1, pad_s, 0), pad_axis(v_BSKD, 1, pad_s, 0)
    dq, dk, dv = _backward(padq(q_BTHD), k, v, padq(out_BTHD), padq(lse_BTH), padq(do_BTHD), padq(dlse_BTH),
                           q_pos, kv_pos, q_seg, kv_seg, _params(bias_params_HP), st)
    return dq[:, :T], dk[:, :S], dv[:, :S]


def visited_blocks(q_pos_BT, kv_pos_BS, q_seg_BT=None, kv_seg_BS=None, *, mask: Mask = CAUSAL,
                   block_sizes: BlockSizes | None = None):
    """(visited, total) key-block visits: how much work block skipping saves for this layout."""
    bs = block_sizes or BlockSizes()
    B, T = q_pos_BT.shape
    S = kv_pos_BS.shape[1]
    bq, bk = min(bs.block_q, T), min(bs.block_k, S)
    if T % bq or S % bk:
        raise ValueError("visited_blocks expects lengths that are multiples of the block sizes")
    segs = q_seg_BT is not None
    vis = block_visible(
        q_pos_BT.reshape(B, -1, bq), kv_pos_BS.reshape(B, -1, bk),
        q_seg_BT.reshape(B, -1, bq) if segs else None, kv_seg_BS.reshape(B, -1, bk) if segs else None,
        mask=mask,
    )
    return int(vis.sum()), int(vis.size)
