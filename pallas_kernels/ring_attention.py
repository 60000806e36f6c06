"""Ring attention: the sequence is sharded over a mesh axis and K/V travel around the ring.

Each device of the `context` axis holds one shard of the queries and one of the
keys/values. At ring step s, device d attends its queries to the K/V shard
that started on device (d - s) mod n, with any flash kernel of this package
(blockwise XLA on CPU, Pallas on TPU/GPU), and merges the partial result by
log-sum-exp:

    lse = logaddexp(lse_acc, lse_s)
    out = exp(lse_acc - lse) * out_acc + exp(lse_s - lse) * out_s

then passes its K/V shard on with `ppermute`. The send of step s+1's shard
does not depend on step s's compute, so XLA can overlap the two.

Masks come from global positions and segment ids (DESIGN.md), so the ring is
layout-agnostic: contiguous shards, the zig-zag load-balanced layout
(`layout_order`), packed documents, GQA and any `masks.Bias` need nothing special.

Skipping. Before the loop every device all-gathers a tiny summary of every
K/V shard (min/max of positions and segment ids per half shard) and works out
which ring steps can see anything at all (`Mask.block_visible`). A step that
cannot (the future under a causal mask, shards beyond a sliding window or in
other chunks of a chunked mask) is not computed, and the ring
stops after the last step that any device needs (a `pmax`), so a sliding
window of W tokens over shards of L tokens costs about W / L + 1 steps of
compute *and* communication instead of n.

Backward (`custom_vjp`). The gradient rings too: dq accumulates locally while
K/V travel the same way as in the forward, each carrying its dK/dV
accumulator; after the last step the accumulators are sent home in one
`ppermute`. Each step calls the kernel's `attention_bwd` with the *merged*
out and lse, for which p = exp(s - lse) is the shard's share of the global
softmax, so nothing is recomputed beyond one pass over the visible blocks.

Zig-zag layout (Brandon et al. 2023, "Striped attention"; Liu et al. 2023):
the sequence is cut into 2n chunks and device i holds chunks i and 2n-1-i, so
under a causal mask every device has the same amount of visible work.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.flash_attention import gpu as _gpu
from pallas_kernels.flash_attention import masks
from pallas_kernels.flash_attention import tpu as _tpu
from pallas_kernels.flash_attention import xla as _xla
from pallas_kernels.flash_attention.masks import CAUSAL, Bias, Mask

LAYOUTS = ("zigzag", "contiguous")
# Per-step kernels: each module has attention(...) -> (out, lse) and attention_bwd(...) -> (dq, dk, dv).
KERNELS = {"xla": _xla, "pallas": _tpu, "pallas_gpu": _gpu}

# ----------------------------------------------------------------------------- layouts


def check_layout(seq_len: int, num_shards: int, layout: str) -> None:
    """Raise a ValueError naming the problem if `seq_len` does not split into the layout's chunks."""
    if layout not in LAYOUTS:
        raise ValueError(f"context layout {layout!r} is not one of {LAYOUTS}")
    chunks = num_shards * (2 if layout == "zigzag" and num_shards > 1 else 1)
    if seq_len % chunks:
        raise ValueError(f"sequence length {seq_len} does not split into {chunks} equal chunks "
                         f"({layout} layout over {num_shards} context shards)")


def layout_order(seq_len: int, num_shards: int, layout: str) -> np.ndarray:
    """Token order for the ring: `x[:, order]` puts shard i's tokens at [i * L, (i + 1) * L).

    Apply it to tokens, targets, positions, segment ids and loss masks alike
    (host-side, before sharding); the loss is a mean over tokens, so it does not change.
    """
    check_layout(seq_len, num_shards, layout)
    if layout == "contiguous" or num_shards == 1:
        return np.arange(seq_len)
    chunks = np.arange(seq_len).reshape(2 * num_shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * num_shards - 1 - i]]) for i in range(num_shards)])


# ----------------------------------------------------------------------------- per-shard kernels


@dataclasses.dataclass(frozen=True)
class _Static:
    axis_name: str
    axis_size: int
    kernel: str
    block_sizes: object
    interpret: bool
    mask: Mask
    bias: Bias | None
    scale: float | None
    soft_cap: float | None


def _kernel_kwargs(st: _Static, q_pos, kv_pos, q_seg, kv_seg, params):
    kw = dict(q_pos_BT=q_pos, kv_pos_BS=kv_pos, q_seg_BT=q_seg, kv_seg_BS=kv_seg, mask=st.mask, bias=st.bias,
              bias_params_HP=params, scale=st.scale, logits_soft_cap=st.soft_cap, block_sizes=st.block_sizes)
    if st.kernel != "xla":
        kw["interpret"] = st.interpret
    return kw


def _shard_fwd(st: _Static, q, k, v, *masks_args):
    return KERNELS[st.kernel].attention(q, k, v, **_kernel_kwargs(st, *masks_args))


def _shard_bwd(st: _Static, q, k, v, out, lse, do, dlse, *masks_args):
    return KERNELS[st.kernel].attention_bwd(q, k, v, out, lse, do, dlse, **_kernel_kwargs(st, *masks_args))


# ----------------------------------------------------------------------------- which steps can see anything


def _summary(x_BT):
    """[B, nb, 2] min/max per half shard: enough for `masks.block_visible`, a few bytes to all-gather."""
    B, L = x_BT.shape
    nb = 2 if L % 2 == 0 else 1
    xb = x_BT.reshape(B, nb, L // nb)
    return jnp.stack([xb.min(-1), xb.max(-1)], -1)


def _needed_steps(st: _Static, q_pos, kv_pos, q_seg, kv_seg):
    """(needed_N, num_steps): may ring step s show this device's queries any key; how many steps to run."""
    n, me = st.axis_size, lax.axis_index(st.axis_name)
    kvp_all = lax.all_gather(_summary(kv_pos), st.axis_name)  # [n, B, nb, 2]
    kvs_all = None if kv_seg is None else lax.all_gather(_summary(kv_seg), st.axis_name)
    qp, qs = _summary(q_pos), None if q_seg is None else _summary(q_seg)

    def sees(src):
        ks = None if kvs_all is None else kvs_all[src]
        return masks.block_visible(qp, kvp_all[src], qs, ks, mask=st.mask).any()

    src_N = (me - jnp.arange(n)) % n
    needed_N = jax.vmap(sees)(src_N)
    last = jnp.max(jnp.where(needed_N, jnp.arange(n), -1))
    num_steps = lax.pmax(last + 1, st.axis_name)
    return needed_N, num_steps


def _shift(xs, axis_name: str, n: int, by: int):
    """Send every device's `xs` to device (d + by) mod n."""
    perm = [(i, (i + by) % n) for i in range(n)]
    return jax.tree.map(lambda x: None if x is None else lax.ppermute(x, axis_name, perm), xs)


# ----------------------------------------------------------------------------- forward / backward rings


def _forward(st: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg, params):
    B, T, H, _ = q.shape
    Dv = v.shape[-1]
    needed_N, num_steps = _needed_steps(st, q_pos, kv_pos, q_seg, kv_seg)

    def body(carry):
        s, kv, out_acc, lse_acc = carry
        nxt = _shift(kv, st.axis_name, st.axis_size, 1)  # independent of this step's compute: overlaps it
        k_s, v_s, kp_s, ks_s = kv

        def compute(acc):
            out_acc, lse_acc = acc
            out_s, lse_s = _shard_fwd(st, q, k_s, v_s, q_pos, kp_s, q_seg, ks_s, params)
            lse = jnp.logaddexp(lse_acc, lse_s)
            safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
            w_old = jnp.where(jnp.isfinite(lse_acc), jnp.exp(lse_acc - safe), 0.0)[..., None]
            w_new = jnp.where(jnp.isfinite(lse_s), jnp.exp(lse_s - safe), 0.0)[..., None]
            return w_old * out_acc + w_new * out_s.astype(jnp.float32), lse

        out_acc, lse_acc = lax.cond(needed_N[s], compute, lambda acc: acc, (out_acc, lse_acc))
        return s + 1, nxt, out_acc, lse_acc

    init = (jnp.zeros((), jnp.int32), (k, v, kv_pos, kv_seg),
            *masks.like_vma((jnp.zeros((B, T, H, Dv), jnp.float32), jnp.full((B, T, H), -jnp.inf, jnp.float32)),
                            q, k, v))
    _, _, out, lse = lax.while_loop(lambda c: c[0] < num_steps, body, init)
    return out.astype(q.dtype), lse


def _backward(st: _Static, res, g):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, params, out, lse = res
    do, dlse = g
    n = st.axis_size
    needed_N, num_steps = _needed_steps(st, q_pos, kv_pos, q_seg, kv_seg)

    def body(carry):
        s, kv, dkv, dq_acc = carry
        k_s, v_s, kp_s, ks_s = kv

        def compute(acc):
            dq_acc, (dk_acc, dv_acc) = acc
            dq, dk, dv = _shard_bwd(st, q, k_s, v_s, out, lse, do, dlse, q_pos, kp_s, q_seg, ks_s, params)
            return dq_acc + dq.astype(jnp.float32), (dk_acc + dk.astype(jnp.float32), dv_acc + dv.astype(jnp.float32))

        dq_acc, dkv = lax.cond(needed_N[s], compute, lambda acc: acc, (dq_acc, dkv))
        kv, dkv = _shift((kv, dkv), st.axis_name, n, 1)  # dK/dV travel with their K/V
        return s + 1, kv, dkv, dq_acc

    f32 = lambda x: masks.like_vma(jnp.zeros(x.shape, jnp.float32), q, k, v)  # noqa: E731
    init = (jnp.zeros((), jnp.int32), (k, v, kv_pos, kv_seg), (f32(k), f32(v)), f32(q))
    _, _, dkv, dq = lax.while_loop(lambda c: c[0] < num_steps, body, init)
    # After num_steps shifts, device d holds the accumulators of shard (d - num_steps): send them home.
    dk, dv = lax.switch(num_steps % n, [functools.partial(_shift, axis_name=st.axis_name, n=n, by=-j)
                                        for j in range(n)], dkv)
    dparams = None if params is None else jnp.zeros_like(params)  # bias parameters are fixed, never trained
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, dparams


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, params):
    return _forward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, params)


def _ring_fwd(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, params):
    out, lse = _forward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, params)
    return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, params, out, lse)


_ring.defvjp(_ring_fwd, _backward)


# ----------------------------------------------------------------------------- public wrapper


def ring_attention(
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
    axis_name: str = "context",
    kernel: str = "xla",
    block_sizes=None,
    interpret: bool = False,
):
    """Ring attention on this device's shards; call inside `shard_map` over `axis_name`. Returns (out, lse).

    All arguments are local shards: q/positions/segments of this device's
    queries, k/v/positions/segments of its keys. Positions must be global.
    `kernel`: 'xla' (blockwise, any backend), 'pallas' (the TPU kernel) or
    'pallas_gpu' (the Triton GPU kernel); `interpret=True` runs a Pallas kernel on CPU.
    """
    if kernel not in KERNELS:
        raise ValueError(f"ring attention kernel={kernel!r} is not one of {sorted(KERNELS)}")
    B, T, S, H, K, D = masks.check_qkv(q_BTHD, k_BSKD, v_BSKD, bias, bias_params_HP)
    if T != S:
        raise ValueError(f"ring attention shards queries and keys alike: local q length {T} != k length {S}")
    if (q_seg_BT is None) != (kv_seg_BS is None):
        raise ValueError("q_seg_BT and kv_seg_BS must be given together")
    st = _Static(axis_name=axis_name, axis_size=lax.axis_size(axis_name), kernel=kernel,
                 block_sizes=block_sizes, interpret=interpret, mask=mask, bias=bias, scale=scale,
                 soft_cap=logits_soft_cap)
    as_int = lambda x: None if x is None else x.astype(jnp.int32)  # noqa: E731
    params = None if bias_params_HP is None else jnp.asarray(bias_params_HP, jnp.float32)
    return _ring(st, q_BTHD, k_BSKD, v_BSKD, as_int(q_pos_BT), as_int(kv_pos_BS), as_int(q_seg_BT),
                 as_int(kv_seg_BS), params)


def ring_schedule(q_pos_BT, kv_pos_BS, q_seg_BT=None, kv_seg_BS=None, *, mask: Mask = CAUSAL,
                  axis_name: str = "context"):
    """(needed_N, num_steps) inside `shard_map`: which ring steps this device computes, and how many run.

    The forward and backward rings use exactly this schedule; tests and
    benchmarks read it to show what the window, the chunks and the causal mask save.
    """
    st = _Static(axis_name=axis_name, axis_size=lax.axis_size(axis_name), kernel="xla", block_sizes=None,
                 interpret=False, mask=mask, bias=None, scale=None, soft_cap=None)
    return _needed_steps(st, q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS)
