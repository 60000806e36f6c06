"""Masks and biases shared by every attention implementation.

Visibility is a function of *positions and segment ids*, never of array
indices, so that packed documents, ring shards, zig-zag layouts and chunked
prefill against a KV cache all reuse one definition.
"""

from __future__ import annotations

import jax.numpy as jnp


def visible(q_pos_BT, kv_pos_BS, q_seg_BT=None, kv_seg_BS=None, *, causal=True, window=None):
    """Boolean [B, T, S]: may query t attend to key s."""
    d_BTS = q_pos_BT[:, :, None] - kv_pos_BS[:, None, :]
    ok_BTS = jnp.ones(d_BTS.shape, dtype=bool)
    if causal:
        ok_BTS &= d_BTS >= 0
    if window is not None:
        ok_BTS &= (d_BTS < window) if causal else (jnp.abs(d_BTS) < window)
    if q_seg_BT is not None:
        ok_BTS &= q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]
    return ok_BTS


def alibi_bias(q_pos_BT, kv_pos_BS, slopes_H):
    """ALiBi bias [B, H, T, S] = -slope_h * |q_pos - kv_pos| (Press et al., 2022)."""
    dist_BTS = jnp.abs(q_pos_BT[:, :, None] - kv_pos_BS[:, None, :]).astype(jnp.float32)
    return -slopes_H.astype(jnp.float32)[None, :, None, None] * dist_BTS[:, None]


def block_visible(q_pos_BNb, kv_pos_BMb, q_seg_BNb=None, kv_seg_BMb=None, *, causal=True, window=None):
    """Conservative [N, M] table: False only if block pair (n, m) is fully masked for every batch row.

    Works on per-block min/max summaries, so it is exact for the usual monotone
    layouts (contiguous, zig-zag halves, packed documents with increasing
    segment ids) and merely conservative otherwise.
    """
    q_lo, q_hi = q_pos_BNb.min(-1)[:, :, None], q_pos_BNb.max(-1)[:, :, None]
    k_lo, k_hi = kv_pos_BMb.min(-1)[:, None, :], kv_pos_BMb.max(-1)[:, None, :]
    vis_BNM = jnp.ones(jnp.broadcast_shapes(q_lo.shape, k_lo.shape), dtype=bool)
    if causal:
        vis_BNM &= k_lo <= q_hi
    if window is not None:
        vis_BNM &= q_lo - k_hi < window
        if not causal:
            vis_BNM &= k_lo - q_hi < window
    if q_seg_BNb is not None:
        qs_lo, qs_hi = q_seg_BNb.min(-1)[:, :, None], q_seg_BNb.max(-1)[:, :, None]
        ks_lo, ks_hi = kv_seg_BMb.min(-1)[:, None, :], kv_seg_BMb.max(-1)[:, None, :]
        vis_BNM &= (qs_lo <= ks_hi) & (ks_lo <= qs_hi)
    return vis_BNM.any(0)
