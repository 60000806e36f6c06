"""Blockwise (flash-style) attention in plain XLA: the CPU path and the fallback everywhere.

Queries are processed one block at a time; for each query block a loop walks
only the key blocks that can be visible (from per-block min/max summaries of
positions and segment ids), keeping an online softmax. Nothing of size T x S
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


def _block_range(vis_NM):
    """First and one-past-last visible key block per query block (empty rows give lo == hi)."""
    nk = vis_NM.shape[1]
    any_N = vis_NM.any(1)
    lo = jnp.where(any_N, jnp.argmax(vis_NM, 1), 0)
    hi = jnp.where(any_N, nk - jnp.argmax(vis_NM[:, ::-1], 1), 0)
    return lo, hi


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
    lo, hi = _block_range(vis)
    params = head_params(bias_params_HP, K, lambda x_KG: x_KG[None, :, :, None, None])

    def q_block(i):
        q_i, qp_i, qs_i = qb[:, i], qpb[:, i], _take(qsb, i)

        def step(j, carry):
            def compute(carry):
                m, l, acc = carry
                s, mask, _ = _logits(q_i, kb[:, j], qp_i, kpb[:, j], qs_i, _take(ksb, j), params, st)
                s = jnp.where(mask, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = jnp.exp(s - m_use[..., None])
                alpha = jnp.exp(m - m_use)
                l = alpha * l + p.sum(-1)
                pv = jnp.einsum(
                    "bkgqs,bskd->bkgqd", p.astype(v.dtype), vb[:, j], preferred_element_type=jnp.float32
                )
                return m_new, l, alpha[..., None] * acc + pv

            return lax.cond(vis[i, j], compute, lambda c: c, carry)

        init = like_vma((
            jnp.full((B, K, G, st.block_q), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, G, st.block_q), jnp.float32),
            jnp.zeros((B, K, G, st.block_q, Dv), jnp.float32),
        ), q, k, v)
        m, l, acc = lax.fori_loop(lo[i], hi[i], step, init)
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
    lo, hi = _block_range(vis)
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

        def step(j, c):
            def compute(c):
                dq_i, dk_acc, dv_acc = c
                k_j, v_j = kb[:, j], vb[:, j]
                s, mask, t = _logits(q_i, k_j, qp_i, kpb[:, j], qs_i, _take(ksb, j), params, st)
                p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
                dp = jnp.einsum("bqkgd,bskd->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_i[..., None] + dlse_i[..., None])
                if t is not None:
                    ds = ds * (1.0 - t * t)
                ds = (ds * st.scale).astype(q.dtype)
                dq_i = dq_i + jnp.einsum("bkgqs,bskd->bqkgd", ds, k_j, preferred_element_type=jnp.float32)
                dk_j = jnp.einsum("bkgqs,bqkgd->bskd", ds, q_i, preferred_element_type=jnp.float32)
                dv_j = jnp.einsum(
                    "bkgqs,bqkgd->bskd", p.astype(do.dtype), do_i, preferred_element_type=jnp.float32
                )
                dk_acc = lax.dynamic_update_index_in_dim(dk_acc, dk_acc[:, j] + dk_j, j, 1)
                dv_acc = lax.dynamic_update_index_in_dim(dv_acc, dv_acc[:, j] + dv_j, j, 1)
                return dq_i, dk_acc, dv_acc

            return lax.cond(vis[i, j], compute, lambda c: c, c)

        dq0 = like_vma(jnp.zeros((B, st.block_q, K, G, D), jnp.float32), q, k, v)
        dq_i, dk_acc, dv_acc = lax.fori_loop(lo[i], hi[i], step, (dq0, *carry))
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
