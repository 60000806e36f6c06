"""Ring attention (pallas_kernels/ring_attention.py) against single-device attention, on 8 fake CPU devices.

Every case compares outputs, log-sum-exp and (dq, dk, dv) under a random
(do, dlse) cotangent with `reference.attention` on the same (reordered) arrays,
at f32 tolerances of 1e-5 (values) and 1e-4 (gradients): the ring changes only
the order of floating-point sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import PartitionSpec as P
from kernel_checks import alibi, value_and_vjp

from lc_jax import ops
from pallas_kernels import ring_attention as ring_mod
from pallas_kernels.flash_attention import reference
from pallas_kernels.flash_attention import xla as flash_xla
from pallas_kernels.flash_attention.masks import Mask
from pallas_kernels.ring_attention import layout_order, ring_attention, ring_schedule


def _mesh(n):
    return jax.make_mesh((n,), ("context",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def _inputs(B, T, H, K, D, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, H, D)), jax.random.normal(ks[1], (B, T, K, D)),
            jax.random.normal(ks[2], (B, T, K, D)))


def _packed_segments(B, T):
    """Documents of uneven lengths, positions restarting per document (as data.packing lays them out)."""
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = sorted({0, T, *np.random.default_rng(b).integers(1, T, size=3).tolist()})
        for i, (a, z) in enumerate(zip(cuts, cuts[1:])):
            seg[b, a:z], pos[b, a:z] = i, np.arange(z - a)
    return jnp.asarray(pos), jnp.asarray(seg)


def _ring_fn(mesh, *, segments, slopes, **kw):
    spec = P(None, "context")

    def local(q, k, v, pos, seg):
        return ring_attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg,
                              **({} if slopes is None else alibi(slopes)), block_sizes=flash_xla.BlockSizes(8, 8), **kw)

    if not segments:
        local_noseg = lambda q, k, v, pos: local(q, k, v, pos, None)  # noqa: E731
        return jax.jit(jax.shard_map(local_noseg, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec, spec)))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5, out_specs=(spec, spec)))


_alibi = alibi  # _compare's `alibi` flag shadows the helper


def _compare(n, layout, *, window=None, chunk=None, sinks=None, H=4, K=2, packed=False, alibi=False, B=2, T=64, D=16):
    q, k, v = _inputs(B, T, H, K, D)
    if packed:
        pos, seg = _packed_segments(B, T)
    else:
        pos, seg = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), None
    order = layout_order(T, n, layout)
    q, k, v, pos = q[:, order], k[:, order], v[:, order], pos[:, order]
    seg = None if seg is None else seg[:, order]
    slopes = jnp.asarray(2.0 ** -np.arange(1, H + 1), jnp.float32) if alibi else None
    mask = Mask(window=window, chunk=chunk, sink_tokens=sinks)
    ring = _ring_fn(_mesh(n), segments=packed, slopes=slopes, mask=mask)
    args = (q, k, v, pos) + ((seg,) if packed else ())

    def ref(q, k, v, pos, seg=None):
        return reference.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg, mask=mask,
                                   **({} if slopes is None else _alibi(slopes)))

    rng = np.random.default_rng(7)
    do, dlse = (jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in (q.shape, q.shape[:3]))
    out, lse, grads = value_and_vjp(ring, q, k, v, do, dlse, *args[3:])
    out_r, lse_r, grads_r = value_and_vjp(ref, q, k, v, do, dlse, *args[3:])
    np.testing.assert_allclose(out, out_r, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, lse_r, atol=1e-5, rtol=1e-5)
    for name, g, g_r in zip(("dq", "dk", "dv"), grads, grads_r):
        np.testing.assert_allclose(g, g_r, atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_causal_matches_single_device(n, layout):
    _compare(n, layout)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_sliding_window(layout):
    _compare(4, layout, window=12)


@pytest.mark.parametrize("H,K", [(8, 2), (4, 1)])
def test_ring_gqa_and_mqa(H, K):
    _compare(4, "zigzag", H=H, K=K)


def test_ring_packed_segments_with_alibi():
    _compare(4, "zigzag", packed=True, alibi=True)
    _compare(2, "contiguous", packed=True, window=9)


def test_ring_chunked_matches_single_device():
    # Chunks of 12 within each document (packed, zig-zag, ALiBi), and chunks of 20 with a window of 9.
    _compare(4, "zigzag", packed=True, alibi=True, chunk=12)
    _compare(4, "contiguous", window=9, chunk=20)
    # Sink tokens: each packed document's first 2 keys stay visible beside a window of 7, across the ring.
    _compare(4, "zigzag", packed=True, window=7, sinks=2)


@pytest.fixture
def no_persistent_cache():
    """Compile without the persistent compilation cache (tests/conftest.py) for the test's duration.

    The TPU interpreter steps the two devices' kernels in lockstep from host callbacks, which dispatch small
    jax ops of their own. With a cache from an earlier run, and the reference's ops dispatched beside the
    interpreter, this test deadlocked every time on 2 cores (jax 0.10.2, all threads idle). Without the
    cache, or with nothing running beside the interpreter, it passes in about 12 s; the test does both.
    """
    compilation_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()


def test_ring_pallas_tpu_kernel_interpret(no_persistent_cache):
    """The ring with the Pallas TPU kernel per step (interpret mode): 2 zig-zag shards of 2 x 128 tokens.

    Zig-zag, so that every device runs the kernel at every step: TPU interpret
    mode steps all devices' kernels in lockstep and waits for the ones a
    skipped step never launches (real TPUs have no such coupling).
    """
    n, B, T, H, K, D = 2, 1, 512, 2, 1, 128
    q, k, v = _inputs(B, T, H, K, D)
    order = layout_order(T, n, "zigzag")
    q, k, v = q[:, order], k[:, order], v[:, order]
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))[:, order]
    spec = P(None, "context")

    def local(q, k, v, pos):
        return ring_attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, kernel="pallas", interpret=True)

    ring = jax.jit(jax.shard_map(local, mesh=_mesh(n), in_specs=(spec,) * 4, out_specs=(spec, spec)))
    # The reference first, and nothing else running while the interpreter steps the two devices' kernels:
    # its host callbacks dispatch jax ops of their own.
    (out_r, lse_r), vjp_r = jax.vjp(lambda q, k, v: reference.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos),
                                     q, k, v)
    ct = (jnp.cos(out_r), jnp.sin(lse_r))
    grads_r = jax.block_until_ready(vjp_r(ct))
    (out, lse), vjp = jax.block_until_ready(jax.vjp(ring, q, k, v, pos))
    np.testing.assert_allclose(out, out_r, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, lse_r, atol=1e-5, rtol=1e-5)
    for g, g_r in zip(jax.block_until_ready(vjp(ct))[:3], grads_r):
        np.testing.assert_allclose(g, g_r, atol=1e-4, rtol=1e-4)


def _schedule(n, layout, T, window, chunk=None):
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (1, T))[:, layout_order(T, n, layout)]
    spec = P(None, "context")

    def local(pos):
        needed, steps = ring_schedule(pos, pos, mask=Mask(window=window, chunk=chunk))
        return needed[None], steps[None]

    needed, steps = jax.jit(jax.shard_map(local, mesh=_mesh(n), in_specs=spec, out_specs=(P("context"),) * 2))(pos)
    return np.asarray(needed), int(steps[0])


def test_ring_skips_steps_outside_the_window_and_the_future():
    # Contiguous shards of 32 tokens, window 20: each device needs itself and its left neighbour; the ring
    # stops after 2 of 8 steps (no compute and no communication beyond that).
    needed, steps = _schedule(8, "contiguous", 256, 20)
    assert steps == 2
    assert needed[0].tolist() == [True] + [False] * 7  # device 0 has no past
    assert all(row[:2].tolist() == [True, True] and not row[2:].any() for row in needed[1:])
    # Causal, contiguous: device d computes steps 0..d only (the imbalance zig-zag removes).
    needed, steps = _schedule(4, "contiguous", 64, None)
    assert steps == 4 and needed.sum(1).tolist() == [1, 2, 3, 4]
    # Causal, zig-zag: every device computes every step.
    needed, steps = _schedule(4, "zigzag", 64, None)
    assert steps == 4 and needed.all()
    # Chunks of 64 over contiguous shards of 32: a device shares its chunk with one neighbour only, the left one
    # for odd devices; 2 of 8 steps run (causal alone: 8).
    needed, steps = _schedule(8, "contiguous", 256, None, chunk=64)
    assert steps == 2
    assert needed.sum(1).tolist() == [1, 2] * 4 and not needed[:, 2:].any()


class _DenseStep:
    """A per-step ring kernel without block skipping: `reference.attention` forward, and the backward written
    out over the whole shard from the merged (out, lse), as the blockwise kernels' `attention_bwd` gives it.
    Masked scores are zeroed, not skipped, so a NaN anywhere in a shard it computes reaches dq (0 * NaN) and,
    through p @ v, the output: only the ring's step skipping can keep it out."""

    @staticmethod
    def attention(q, k, v, *, block_sizes=None, interpret=False, **kw):
        return reference.attention(q, k, v, **kw)

    @staticmethod
    def attention_bwd(q, k, v, out, lse, do, dlse, *, q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, mask, scale,
                      bias=None, bias_params_HP=None, logits_soft_cap=None, block_sizes=None, interpret=False):
        assert bias is None and logits_soft_cap is None  # not needed here
        (B, T, H, D), K = q.shape, k.shape[2]
        scale = D**-0.5 if scale is None else scale
        qg, dog = q.reshape(B, T, K, H // K, D), do.reshape(B, T, K, H // K, -1)
        row = lambda x: x.reshape(B, T, K, H // K).transpose(0, 2, 3, 1)[..., None]  # noqa: E731  [B, K, G, T, 1]
        segs = () if q_seg_BT is None else (q_seg_BT[:, None, None, :, None], kv_seg_BS[:, None, None, None, :])
        vis = mask.visible(q_pos_BT[:, None, None, :, None], kv_pos_BS[:, None, None, None, :], *segs)
        s = jnp.einsum("btkgd,bskd->bkgts", qg, k) * scale
        p = jnp.where(vis, jnp.exp(s - row(jnp.where(jnp.isfinite(lse), lse, 0.0))), 0.0)
        delta = row(jnp.sum(out * do, -1))
        ds = p * (jnp.einsum("btkgd,bskd->bkgts", dog, v) - delta + row(dlse)) * scale
        dq = jnp.einsum("bkgts,bskd->btkgd", ds, k).reshape(q.shape)
        return dq, jnp.einsum("bkgts,btkgd->bskd", ds, qg), jnp.einsum("bkgts,btkgd->bskd", p, dog)


@pytest.mark.parametrize("kernel", ["xla", "dense"])
def test_nan_in_skipped_shards_never_reaches_the_output(kernel, monkeypatch):
    """Keys/values of shards outside the window are not computed: NaNs there leave outputs and grads finite.

    "dense" (`_DenseStep`, no block skipping inside a step) shows that the ring's own step skipping does it;
    "xla" is the default per-step kernel. The queries and keys of shards 2..3 match one device on clean inputs.
    """
    monkeypatch.setitem(ring_mod.KERNELS, "dense", _DenseStep)
    n, B, T, H, K, D, W = 4, 1, 64, 2, 1, 8, 6
    q, k, v = _inputs(B, T, H, K, D)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    # Poison shard 0's keys and values at positions that no query in shards 2..3 can see, then only look at
    # those queries (the cotangent is zero elsewhere) and at the gradients of shards 2..3.
    nan_k, nan_v = k.at[:, :8].set(jnp.nan), v.at[:, :8].set(jnp.nan)
    rows = (jnp.arange(T) >= 32)[None, :, None]
    rng = np.random.default_rng(3)
    do = jnp.where(rows[..., None], jnp.asarray(rng.standard_normal(q.shape, np.float32)), 0.0)
    dlse = jnp.where(rows, jnp.asarray(rng.standard_normal(q.shape[:3], np.float32)), 0.0)
    ring = _ring_fn(_mesh(n), segments=False, slopes=None, mask=Mask(window=W), kernel=kernel)
    out, lse, grads = value_and_vjp(ring, q, nan_k, nan_v, do, dlse, pos)
    ref = lambda q, k, v: reference.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=W))  # noqa: E731
    out_r, lse_r, grads_r = value_and_vjp(ref, q, k, v, do, dlse)
    for name, x, x_r, tol in (("out", out, out_r, 1e-5), ("lse", lse, lse_r, 1e-5),
                              *((f"d{c}", g, g_r, 1e-4) for c, g, g_r in zip("qkv", grads, grads_r))):
        assert np.isfinite(np.asarray(x[:, 32:])).all(), f"{name}: NaN from the skipped shard 0"
        np.testing.assert_allclose(x[:, 32:], x_r[:, 32:], atol=tol, rtol=tol, err_msg=name)


def test_layout_order_and_errors():
    order = layout_order(16, 2, "zigzag")
    assert order.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    assert sorted(order.tolist()) == list(range(16))
    assert layout_order(16, 4, "contiguous").tolist() == list(range(16))
    with pytest.raises(ValueError, match="does not split into 8 equal chunks"):
        layout_order(20, 4, "zigzag")
    with pytest.raises(ValueError, match="not one of"):
        layout_order(16, 2, "striped")


def test_ring_pallas_gpu_kernel_interpret():
    """The ring with the Triton GPU kernel per step, in the generic Pallas interpreter: 2 shards, GQA, window."""
    from pallas_kernels.flash_attention import gpu as flash_gpu

    n, B, T, H, K, D, W = 2, 1, 64, 4, 2, 16, 20
    q, k, v = _inputs(B, T, H, K, D)
    order = layout_order(T, n, "zigzag")
    q, k, v = q[:, order], k[:, order], v[:, order]
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))[:, order]
    spec = P(None, "context")

    def local(q, k, v, pos):
        return ring_attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=W), kernel="pallas_gpu",
                              interpret=True,
                              block_sizes=flash_gpu.BlockSizes(block_q=16, block_k=16))

    # check_vma=False: jax 0.10's generic Pallas interpreter slices with unvarying indices inside shard_map
    # ("dynamic_slice requires varying manual axes to match"); the compiled GPU path does not interpret.
    ring = jax.jit(jax.shard_map(local, mesh=_mesh(n), in_specs=(spec,) * 4, out_specs=(spec, spec),
                                 check_vma=False))
    (out, lse), vjp = jax.vjp(ring, q, k, v, pos)
    ref = lambda q, k, v: reference.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=W))  # noqa: E731
    (out_r, lse_r), vjp_r = jax.vjp(ref, q, k, v)
    np.testing.assert_allclose(out, out_r, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, lse_r, atol=1e-5, rtol=1e-5)
    ct = (jnp.cos(out), jnp.sin(lse))
    for g, g_r in zip(vjp(ct)[:3], vjp_r(ct)):
        np.testing.assert_allclose(g, g_r, atol=1e-4, rtol=1e-4)


def test_ring_with_sinks_through_ops_matches_one_device():
    """`ops.attention` on a context mesh (the ring) with learned sinks, chunks and sink tokens (the first 3
    positions, held by the first shard, visible from every chunk): the values and gradients (the sink logits'
    included) of the same call on one device."""
    B, T, H, K, D = 2, 64, 4, 2, 16
    q, k, v = _inputs(B, T, H, K, D)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    sinks = jnp.asarray([-1.0, 0.0, 0.5, 2.0])

    def loss(q, k, v, s):
        out = ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(chunk=20, sink_tokens=3), sinks_H=s,
                            impl="xla", block_sizes=flash_xla.BlockSizes(8, 8))
        return (out * jnp.cos(out)).sum()

    one = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3)))(q, k, v, sinks)
    with jax.set_mesh(_mesh(4)):
        ring = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3)))(q, k, v, sinks)
    np.testing.assert_allclose(ring[0], one[0], rtol=1e-5)
    for name, a, b in zip(["q", "k", "v", "sinks"], ring[1], one[1]):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")
