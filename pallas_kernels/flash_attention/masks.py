"""Masks and biases shared by every attention implementation: the one place that computes them.

Visibility is a function of *positions and segment ids*, never of array
indices, so that packed documents, ring shards, zig-zag layouts and chunked
prefill against a KV cache all reuse one definition.

* `Mask` (static, hashable): which keys a query sees (causal, sliding window,
  chunked local attention, sink tokens) as `visible` on broadcastable arrays (kernels call it
  on [bq, 1] / [1, bk] block views), as a conservative `block_visible` on
  position ranges, which every block-skipping table uses, as `block_full` (every pair
  visible: a kernel may skip the element-wise mask there), and `pairs`, the count of
  what it lets through (the memory calculator's attention FLOPs).
* `Bias` (static, hashable): an additive logit bias fn(q_pos, kv_pos, *params)
  with `num_params` fixed f32 scalars per head (`ALIBI`). The kernels take the
  parameters as one f32 array bias_params_HP [H, num_params], load head h's row
  and call `fn`; their cotangent is zero: trainable bias parameters are not
  supported by the kernels.
* `scores`: soft-cap, bias, visibility of raw scaled logits, in that order; every
  implementation calls it, so a new mask shape or bias scheme needs no kernel change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _and(a, b):
    return b if a is None else a & b


@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys a query sees, from positions (and segment ids: equal ids only), all terms combined by AND.

    causal: kv_pos <= q_pos. window W: 0 <= q_pos - kv_pos < W when causal, |q_pos - kv_pos| < W when not.
    chunk C (chunked local attention, Llama 4 iRoPE style): q_pos // C == kv_pos // C, positions being
    global token positions within a document.
    sink_tokens N (StreamingLLM, Xiao et al. 2024): keys at kv_pos < N, the first N tokens of each document,
    stay visible whatever the window or chunk; causality and segments still apply. It widens only the local
    terms: (window AND chunk) OR kv_pos < N, then AND causal AND same segment.
    """

    causal: bool = True
    window: int | None = None
    chunk: int | None = None
    sink_tokens: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "causal", bool(self.causal))
        for name in ("window", "chunk", "sink_tokens"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v <= 0:
                raise ValueError(f"Mask.{name}={v!r}: {name} must be a positive int or None")
            object.__setattr__(self, name, int(v))

    def visible(self, q_pos, kv_pos, q_seg=None, kv_seg=None):
        """Bool, elementwise on broadcastable arrays: may a query at q_pos see the key at kv_pos."""
        d = q_pos - kv_pos
        local = None
        if self.window is not None:
            local = (d < self.window) if self.causal else (jnp.abs(d) < self.window)
        if self.chunk is not None:
            local = _and(local, q_pos // self.chunk == kv_pos // self.chunk)
        if local is not None and self.sink_tokens is not None:
            local = local | (kv_pos < self.sink_tokens)
        ok = (d >= 0) if self.causal else None
        ok = local if ok is None else _and(local, ok)
        if q_seg is not None:
            ok = _and(ok, q_seg == kv_seg)
        return jnp.ones(jnp.shape(d), bool) if ok is None else ok

    def block_visible(self, q_lo, q_hi, k_lo, k_hi):
        """Conservative bool for position ranges: False only if no (query, key) pair in them can be visible."""
        q_lo, q_hi, k_lo, k_hi = (jnp.asarray(x) for x in (q_lo, q_hi, k_lo, k_hi))
        local = None
        if self.window is not None:
            local = q_lo - k_hi < self.window
            if not self.causal:
                local = local & (k_lo - q_hi < self.window)
        if self.chunk is not None:
            c = self.chunk
            local = _and(local, (k_hi // c >= q_lo // c) & (k_lo // c <= q_hi // c))
        if local is not None and self.sink_tokens is not None:
            local = local | (k_lo < self.sink_tokens)
        ok = (k_lo <= q_hi) if self.causal else None
        ok = local if ok is None else _and(local, ok)
        shape = jnp.broadcast_shapes(q_lo.shape, q_hi.shape, k_lo.shape, k_hi.shape)
        return jnp.ones(shape, bool) if ok is None else jnp.broadcast_to(ok, shape)

    def block_full(self, q_lo, q_hi, k_lo, k_hi):
        """Conservative bool for position ranges: True only if every (query, key) pair in them is visible.

        A kernel skips the element-wise mask on such blocks (segments are checked by `block_full` below).
        """
        q_lo, q_hi, k_lo, k_hi = (jnp.asarray(x) for x in (q_lo, q_hi, k_lo, k_hi))
        local = None
        if self.window is not None:
            local = q_hi - k_lo < self.window
            if not self.causal:
                local = local & (k_hi - q_lo < self.window)
        if self.chunk is not None:
            c = self.chunk
            local = _and(local, (q_lo // c == q_hi // c) & (k_lo // c == k_hi // c) & (q_lo // c == k_lo // c))
        if local is not None and self.sink_tokens is not None:
            local = local | (k_hi < self.sink_tokens)
        ok = (k_hi <= q_lo) if self.causal else None
        ok = local if ok is None else _and(local, ok)
        shape = jnp.broadcast_shapes(q_lo.shape, q_hi.shape, k_lo.shape, k_hi.shape)
        return jnp.ones(shape, bool) if ok is None else jnp.broadcast_to(ok, shape)

    def pairs(self, length: int, keys_per_query: int | None = None) -> int:
        """Visible (query, key) pairs in one document of `length` tokens: the work an attention that skips
        what it cannot see does. With `keys_per_query` k, each query counts min(its visible keys, k), as a
        top-k selection mixes. Exact, from each query's contiguous range of visible keys (as `visible`)."""
        t = np.arange(length, dtype=np.int64)
        lo, hi = np.zeros_like(t), (t if self.causal else np.full_like(t, length - 1))
        if self.window is not None:
            lo = np.maximum(lo, t - self.window + 1)
            hi = hi if self.causal else np.minimum(hi, t + self.window - 1)
        if self.chunk is not None:
            start = t // self.chunk * self.chunk
            lo, hi = np.maximum(lo, start), np.minimum(hi, start + self.chunk - 1)
        n = hi - lo + 1
        if self.sink_tokens is not None and (self.window is not None or self.chunk is not None):
            sink_hi = np.minimum(self.sink_tokens, length) - 1  # sinks: keys 0 .. sink_hi, causal as well
            if self.causal:
                sink_hi = np.minimum(sink_hi, t)
            n = n + (sink_hi + 1) - np.clip(np.minimum(sink_hi, hi) - lo + 1, 0, None)  # minus the overlap
        return int((n if keys_per_query is None else np.minimum(n, keys_per_query)).sum())

    @property
    def max_distance(self) -> int | None:
        """The largest q_pos - kv_pos a local term lets through, or None (unbounded): with `sink_tokens`, a
        KV cache keeps those first tokens beside the last max_distance + 1 (`cache_slots`)."""
        bounds = [x - 1 for x in (self.window, self.chunk) if x is not None]
        return min(bounds) if bounds else None

    def cache_slots(self, max_len: int) -> int:
        """KV-cache slots for `max_len` tokens: the sink tokens plus a ring of max_distance + 1, or all."""
        reach = self.max_distance
        if reach is None:
            return max_len
        return min(max_len, (self.sink_tokens or 0) + reach + 1)


#: The default: causal, no window, no chunks.
CAUSAL = Mask()


@dataclasses.dataclass(frozen=True)
class Bias:
    """An additive logit bias b = fn(q_pos, kv_pos, *params): `num_params` fixed f32 values per head.

    `fn` is elementwise jnp that lowers inside Pallas TPU / Triton / Mosaic GPU kernels (arithmetic, abs,
    where, log, ...); positions arrive as int32 arrays, params as f32 scalars or broadcastable arrays.
    """

    name: str
    fn: Callable
    num_params: int

    def __call__(self, q_pos, kv_pos, *params):
        return self.fn(q_pos, kv_pos, *params)


def _alibi(q_pos, kv_pos, slope):
    return -slope * jnp.abs(q_pos - kv_pos).astype(jnp.float32)


#: ALiBi (Press et al., 2022): -slope_h * |q_pos - kv_pos|; bias_params_HP = slopes[:, None].
ALIBI = Bias("alibi", _alibi, 1)


def scores(s, q_pos, kv_pos, q_seg, kv_seg, params, *, mask: Mask | None, bias: Bias | None,
           soft_cap: float | None):
    """(s, visible, t) from raw scaled f32 logits s: soft-capped, then biased; visible is `mask.visible`.

    t = tanh(s / cap) for the soft-cap backward (None without a cap). `mask` None (the sparse kernels,
    whose selection decides visibility) gives visible None. `params` is the head's bias parameters.
    """
    t = None
    if soft_cap is not None:
        t = jnp.tanh(s / soft_cap)
        s = soft_cap * t
    if bias is not None:
        s = s + bias(q_pos, kv_pos, *params)
    vis = None if mask is None else mask.visible(q_pos, kv_pos, q_seg, kv_seg)
    return s, vis, t


def head_row(params_ref, h, bias: Bias | None) -> tuple:
    """Inside a flash kernel: query head h's bias parameters, scalars of the flattened [H * P] table (a kernel
    handed one kv head's block indexes it by group member); () without a bias."""
    if bias is None:
        return ()
    P = bias.num_params
    return tuple(params_ref[h * P + p] for p in range(P))


def head_params(bias_params_HP, kv_heads: int, place: Callable) -> tuple:
    """The bias parameters as P f32 arrays [K, G] (kv head, group member), each put in place by `place`."""
    if bias_params_HP is None:
        return ()
    H, P = bias_params_HP.shape
    x_KGP = jnp.asarray(bias_params_HP, jnp.float32).reshape(kv_heads, H // kv_heads, P)
    return tuple(place(x_KGP[..., p]) for p in range(P))


def block_visible(q_pos_BNb, kv_pos_BMb, q_seg_BNb=None, kv_seg_BMb=None, *, mask: Mask):
    """Conservative [N, M] table: False only if block pair (n, m) is fully masked for every batch row.

    Works on per-block min/max summaries, so it is exact for the usual monotone
    layouts (contiguous, zig-zag halves, packed documents with increasing
    segment ids) and merely conservative otherwise.
    """
    (q_lo, q_hi, k_lo, k_hi), segs = _block_summaries(q_pos_BNb, kv_pos_BMb, q_seg_BNb, kv_seg_BMb)
    vis_BNM = mask.block_visible(q_lo, q_hi, k_lo, k_hi)
    if segs is not None:
        qs_lo, qs_hi, ks_lo, ks_hi = segs
        vis_BNM &= (qs_lo <= ks_hi) & (ks_lo <= qs_hi)
    return vis_BNM.any(0)


def _block_summaries(q_pos_BNb, kv_pos_BMb, q_seg_BNb, kv_seg_BMb):
    """Per-block min / max of positions (and segment ids, or None), broadcast to [B, N, M]."""
    def lo_hi(x, q: bool):
        x = jnp.asarray(x)  # traced indexing needs jax arrays
        axis = 2 if q else 1
        return jnp.expand_dims(x.min(-1), axis), jnp.expand_dims(x.max(-1), axis)

    pos = (*lo_hi(q_pos_BNb, True), *lo_hi(kv_pos_BMb, False))
    segs = None if q_seg_BNb is None else (*lo_hi(q_seg_BNb, True), *lo_hi(kv_seg_BMb, False))
    return pos, segs


def block_full(q_pos_BNb, kv_pos_BMb, q_seg_BNb=None, kv_seg_BMb=None, *, mask: Mask):
    """Conservative [N, M] table: True only if every pair of block pair (n, m) is visible in every batch row.

    The counterpart of `block_visible`, from the same per-block min/max summaries: one segment id across
    both blocks, and `Mask.block_full` on the positions. Padding (segments -2 / -1) is never full.
    """
    (q_lo, q_hi, k_lo, k_hi), segs = _block_summaries(q_pos_BNb, kv_pos_BMb, q_seg_BNb, kv_seg_BMb)
    full_BNM = mask.block_full(q_lo, q_hi, k_lo, k_hi)
    if segs is not None:
        qs_lo, qs_hi, ks_lo, ks_hi = segs
        full_BNM &= (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo)
    return full_BNM.all(0)


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


def check_qkv(q_BTHD, k_BSKD, v_BSKD, bias=None, bias_params_HP=None) -> tuple[int, int, int, int, int, int]:
    """Validate a kernel's q/k/v (and bias parameter) shapes; returns (B, T, S, H, K, D)."""
    if q_BTHD.ndim != 4 or k_BSKD.ndim != 4 or v_BSKD.ndim != 4:
        raise ValueError(f"q {q_BTHD.shape}, k {k_BSKD.shape}, v {v_BSKD.shape} must be rank 4 [B, len, heads, D]")
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    if k_BSKD.shape[0] != B or v_BSKD.shape[:3] != k_BSKD.shape[:3] or k_BSKD.shape[3] != D:
        raise ValueError(f"k {k_BSKD.shape} / v {v_BSKD.shape} do not match q {q_BTHD.shape}")
    if K == 0 or H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
    check_bias(bias, bias_params_HP, H)
    return B, T, S, H, K, D


def check_bias(bias, bias_params_HP, H: int) -> None:
    """A bias comes with its [H, num_params] parameters, and parameters only with a bias."""
    if bias is not None and not isinstance(bias, Bias):
        raise ValueError(f"bias must be a masks.Bias or None, got {type(bias).__name__}")
    if (bias is None) != (bias_params_HP is None):
        raise ValueError("bias and bias_params_HP must be given together")
    if bias is not None and jnp.shape(bias_params_HP) != (H, bias.num_params):
        raise ValueError(f"bias_params_HP must have shape ({H}, {bias.num_params}) for bias {bias.name!r}, "
                         f"got {jnp.shape(bias_params_HP)}")


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
