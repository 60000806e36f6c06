"""Masks and biases shared by every attention implementation.

Visibility is a function of *positions and segment ids*, never of array
indices, so that packed documents, ring shards, zig-zag layouts and chunked
prefill against a KV cache all reuse one definition.
"""

from __future__ import annotations

import jax
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
    q_pos_BNb, kv_pos_BMb = jnp.asarray(q_pos_BNb), jnp.asarray(kv_pos_BMb)  # traced indexing needs jax arrays
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


def pad_axis(x, axis: int, n: int, value):
    """Pad `x` with `n` entries of `value` at the end of `axis` (no-op for n == 0 or x None)."""
    if x is None or n == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n)
    return jnp.pad(x, widths, constant_values=value)


def pad_positions(q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, block_q: int, block_k: int, *,
                  always_segments: bool = False, shape_BTS: tuple[int, int, int] | None = None):
    """int32 positions and segment ids padded to whole blocks; returns (q_pos, kv_pos, q_seg, kv_seg, pad_t, pad_s).

    Padded keys get segment -1 and padded queries -2, so neither is ever visible.
    Segment ids are created (zeros) when absent and padding needs them, or always
    with `always_segments` (the Pallas kernels take them as inputs).
    """
    (B, T), S = (shape_BTS[:2], shape_BTS[2]) if shape_BTS else (q_pos_BT.shape, kv_pos_BS.shape[1])
    if q_pos_BT.shape != (B, T) or kv_pos_BS.shape != (B, S):
        raise ValueError(f"q_pos {q_pos_BT.shape} / kv_pos {kv_pos_BS.shape} must be ({B}, {T}) / ({B}, {S})")
    if (q_seg_BT is None) != (kv_seg_BS is None):
        raise ValueError("q_seg_BT and kv_seg_BS must be given together")
    if q_seg_BT is not None and (q_seg_BT.shape != (B, T) or kv_seg_BS.shape != (B, S)):
        raise ValueError(f"q_seg {q_seg_BT.shape} / kv_seg {kv_seg_BS.shape} must be ({B}, {T}) / ({B}, {S})")
    pad_t, pad_s = -T % block_q, -S % block_k
    if (pad_t or pad_s or always_segments) and q_seg_BT is None:
        q_seg_BT, kv_seg_BS = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
    as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731  (numpy in: jax out)
    return (pad_axis(as_int(q_pos_BT), 1, pad_t, 0), pad_axis(as_int(kv_pos_BS), 1, pad_s, 0),
            pad_axis(as_int(q_seg_BT), 1, pad_t, -2), pad_axis(as_int(kv_seg_BS), 1, pad_s, -1), pad_t, pad_s)


def check_qkv(q_BTHD, k_BSKD, v_BSKD, alibi_slopes_H=None) -> tuple[int, int, int, int, int, int]:
    """Validate a kernel's q/k/v (and ALiBi slopes) shapes; returns (B, T, S, H, K, D)."""
    if q_BTHD.ndim != 4 or k_BSKD.ndim != 4 or v_BSKD.ndim != 4:
        raise ValueError(f"q {q_BTHD.shape}, k {k_BSKD.shape}, v {v_BSKD.shape} must be rank 4 [B, len, heads, D]")
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    if k_BSKD.shape[0] != B or v_BSKD.shape[:3] != k_BSKD.shape[:3] or k_BSKD.shape[3] != D:
        raise ValueError(f"k {k_BSKD.shape} / v {v_BSKD.shape} do not match q {q_BTHD.shape}")
    if K == 0 or H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
    if alibi_slopes_H is not None and alibi_slopes_H.shape != (H,):
        raise ValueError(f"alibi_slopes_H must have shape ({H},), got {alibi_slopes_H.shape}")
    return B, T, S, H, K, D


def _varying(x) -> frozenset:
    """The manual mesh axes `x` varies over (`aval.mat.varying` in jax 0.10, `aval.vma` before)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def like_vma(x, *refs):
    """Give fresh loop carries (zeros, -inf) the varying mesh axes of `refs`.

    Inside `shard_map` (ring attention) the inputs vary over the manual axes
    while constants do not, and `cond` / `scan` / `while_loop` reject carries
    whose types differ; outside `shard_map` this is a no-op.
    """
    want = frozenset().union(*(_varying(r) for r in refs if r is not None))
    if not want:
        return x

    def cast(a):
        missing = tuple(sorted(want - _varying(a)))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, x)


def out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
    """A `pallas_call` output type that varies over the same manual mesh axes as `like` (inside shard_map)."""
    aval = jax.typeof(like)
    if not _varying(like):
        return jax.ShapeDtypeStruct(shape, dtype)
    if getattr(aval, "mat", None) is not None:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=aval.mat)
    return jax.ShapeDtypeStruct(shape, dtype, vma=aval.vma)
