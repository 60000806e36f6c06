"""The blockwise XLA path against the materialising reference: values, lse and gradients.

Tolerance (f32): 2e-5 absolute on outputs / lse and 1e-4 on gradients, i.e. summation-order noise.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import alibi

from lc_jax import ops
from lc_jax.positions.alibi import alibi_slopes
from pallas_kernels.flash_attention import xla as flash_xla
from pallas_kernels.flash_attention.masks import Mask
from pallas_kernels.flash_attention.xla import BlockSizes, visited_blocks

ATOL_OUT, ATOL_GRAD = 2e-5, 1e-4


def _inputs(B=2, T=48, S=None, H=4, K=2, D=16, seed=0):
    S = S or T
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, S, K, D))
    v = jax.random.normal(ks[2], (B, S, K, D))
    return q, k, v


def _positions(B, T):
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def _packed(B, T, cuts):
    """Segment ids and per-document positions for documents cut at `cuts`."""
    seg = np.zeros(T, np.int32)
    for c in cuts:
        seg[c:] += 1
    pos = np.arange(T) - np.array([max([0] + [c for c in cuts if c <= t]) for t in range(T)])
    return jnp.broadcast_to(jnp.asarray(pos), (B, T)), jnp.broadcast_to(jnp.asarray(seg + 1), (B, T))


SMALL_BLOCKS = BlockSizes(16, 16)


def _compare(q, k, v, block_sizes=SMALL_BLOCKS, **kw):
    def run(impl):
        def f(q, k, v):
            out, lse = ops.attention(q, k, v, impl=impl, return_lse=True, block_sizes=block_sizes, **kw)
            finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
            # A loss touching both outputs: checks the lse cotangent path too.
            return (out * jnp.cos(out)).sum() + jnp.sin(finite_lse).sum(), (out, lse)

        (_, (out, lse)), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, lse, grads

    out_x, lse_x, g_x = run("xla")
    out_r, lse_r, g_r = run("reference")
    np.testing.assert_allclose(out_x, out_r, atol=ATOL_OUT)
    np.testing.assert_allclose(lse_x, lse_r, atol=ATOL_OUT)
    for name, a, b in zip("qkv", g_x, g_r):
        np.testing.assert_allclose(a, b, atol=ATOL_GRAD, err_msg=f"d{name}")


CASES = {
    "causal": dict(),
    "sliding": dict(mask=Mask(window=7)),
    "sliding_wide": dict(mask=Mask(window=40)),
    "noncausal": dict(mask=Mask(causal=False)),
    "softcap": dict(logits_soft_cap=3.0),
    "chunked": dict(mask=Mask(chunk=12)),  # chunk not a multiple of the 16-blocks
    "chunked_window_noncausal": dict(mask=Mask(causal=False, window=9, chunk=20)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_masks(case):
    q, k, v = _inputs()
    pos = _positions(2, 48)
    _compare(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, **CASES[case])


@pytest.mark.parametrize("H,K", [(4, 4), (8, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_gqa_mqa(H, K):
    q, k, v = _inputs(H=H, K=K)
    pos = _positions(2, 48)
    _compare(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=20))


def test_packed_segments():
    q, k, v = _inputs(T=64)
    pos, seg = _packed(2, 64, cuts=[10, 33, 34])
    _compare(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg)


@pytest.mark.parametrize("H", [4, 6])
def test_alibi(H):
    q, k, v = _inputs(H=H, K=2)
    pos = _positions(2, 48)
    _compare(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, **alibi(jnp.asarray(alibi_slopes(H)) * 4))


def test_chunked_with_segments_gqa_alibi():
    """Chunked local attention (chunks of 10 within each document) AND segments, a window, GQA and ALiBi."""
    q, k, v = _inputs(T=64, H=8, K=2)
    pos, seg = _packed(2, 64, cuts=[10, 33, 34])
    _compare(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg, mask=Mask(window=7, chunk=10),
             **alibi(jnp.asarray(alibi_slopes(8))))


def test_lengths_not_multiple_of_block():
    q, k, v = _inputs(T=37)
    pos = _positions(2, 37)
    _compare(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, block_sizes=BlockSizes(16, 8), mask=Mask(window=9))


def test_cross_attention_offset_positions():
    """Queries are the last 24 tokens of a 56-token context (chunked prefill against a cache)."""
    q, k, v = _inputs(T=24, S=56)
    q_pos = _positions(2, 24) + 32
    _compare(q, k, v, q_pos_BT=q_pos, kv_pos_BS=_positions(2, 56), mask=Mask(window=20))


def test_zigzag_positions():
    """A load-balanced ring layout: the local shard holds two non-adjacent chunks of the sequence."""
    q, k, v = _inputs(T=32)
    pos = jnp.broadcast_to(jnp.concatenate([jnp.arange(16), jnp.arange(48, 64)]), (2, 32))
    _compare(q, k, v, q_pos_BT=pos, kv_pos_BS=pos)


def test_rows_without_visible_keys_are_zero():
    q, k, v = _inputs(T=16)
    q_pos, kv_pos = _positions(2, 16), _positions(2, 16) + 100  # every key is in the future
    for impl in ("xla", "reference"):
        out, lse = ops.attention(q, k, v, q_pos_BT=q_pos, kv_pos_BS=kv_pos, impl=impl, return_lse=True)
        assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_bf16_close_to_f32_reference():
    q, k, v = (x.astype(jnp.bfloat16) for x in _inputs())
    pos = _positions(2, 48)
    out = ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, impl="xla", block_sizes=BlockSizes(16, 16))
    ref = ops.attention(*(x.astype(jnp.float32) for x in (q, k, v)), q_pos_BT=pos, kv_pos_BS=pos, impl="reference")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-2)


def test_fully_masked_blocks_are_skipped():
    T, bs = 4096, BlockSizes(256, 256)
    pos = _positions(1, T)
    n = T // 256
    causal, total = visited_blocks(pos, pos, block_sizes=bs)
    assert total == n * n and causal == n * (n + 1) // 2
    sliding, _ = visited_blocks(pos, pos, mask=Mask(window=256), block_sizes=bs)
    assert sliding == 2 * n - 1  # the diagonal block and the one before it
    doc_pos, seg = _packed(1, T, cuts=[1024, 2048, 3072])
    packed, _ = visited_blocks(doc_pos, doc_pos, seg, seg, block_sizes=bs)
    assert packed == 4 * (4 * 5 // 2)  # four independent causal triangles of 4 blocks
    # Chunks of 1024 with 256 x 512 blocks: per chunk 4 q blocks x 2 kv blocks, of which q blocks 0 and 1 see only
    # kv block 0 (causal), so 6 of 128 pairs per chunk: 24 / 128 = 19% (the chunked causal mask keeps 12.5% of pairs).
    chunked, total = visited_blocks(pos, pos, mask=Mask(chunk=1024), block_sizes=BlockSizes(256, 512))
    assert (chunked, total) == (4 * 6, 16 * 8)


def test_bad_shapes_raise_clear_errors():
    q, k, v = _inputs(H=4, K=3)
    pos = _positions(2, 48)
    with pytest.raises(ValueError, match="multiple of num kv heads"):
        ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos)
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="window must be a positive"):
        ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=0))
    with pytest.raises(ValueError, match="impl"):
        ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, impl="flash9000")
    with pytest.raises(ValueError, match="q_pos"):
        ops.attention(q, k, v, q_pos_BT=pos[:, :10], kv_pos_BS=pos)


def test_mask_semantics_against_brute_force():
    """Mask.visible is the definition in words; block_visible never hides a visible pair, block_full never
    claims a hidden one; max_distance bounds it."""
    qp, kp = np.arange(-3, 40)[:, None], np.arange(-3, 40)[None, :]
    d = qp - kp
    for causal, window, chunk, sinks in itertools.product((True, False), (None, 1, 5), (None, 1, 7), (None, 3)):
        mask = Mask(causal=causal, window=window, chunk=chunk, sink_tokens=sinks)
        local = np.ones(d.shape, bool)  # the window and chunk terms, which sink tokens override
        if window is not None:
            local &= (d < window) if causal else (np.abs(d) < window)
        if chunk is not None:
            local &= np.floor_divide(qp, chunk) == np.floor_divide(kp, chunk)
        if sinks is not None:
            local |= kp < sinks
        want = local & (d >= 0) if causal else local
        got = np.asarray(mask.visible(jnp.asarray(qp), jnp.asarray(kp)))
        np.testing.assert_array_equal(got, want, err_msg=str(mask))
        if causal and mask.max_distance is not None and sinks is None:
            assert d[got].max() == mask.max_distance
        for lo_q, lo_k, n in ((0, 0, 5), (3, 9, 4), (12, 2, 6), (20, 27, 3), (10, 8, 2), (15, 14, 1), (22, 22, 1)):
            pair = want[lo_q + 3:lo_q + 3 + n, lo_k + 3:lo_k + 3 + n].any()
            block = bool(mask.block_visible(lo_q, lo_q + n - 1, lo_k, lo_k + n - 1))
            assert block or not pair, (mask, lo_q, lo_k)
            every = want[lo_q + 3:lo_q + 3 + n, lo_k + 3:lo_k + 3 + n].all()
            full = bool(mask.block_full(lo_q, lo_q + n - 1, lo_k, lo_k + n - 1))
            assert every or not full, (mask, lo_q, lo_k)  # never claims a hidden pair visible
            if sinks is None:  # exact on contiguous ranges (with sinks, conservative)
                assert full == every, (mask, lo_q, lo_k)
    assert Mask().max_distance is None and Mask(window=8, chunk=4).max_distance == 3
    for bad in (dict(window=0), dict(chunk=-2), dict(chunk=2.5), dict(window=True), dict(sink_tokens=0)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a positive int or None"):
            Mask(**bad)


# Visit modes of the first 48 tokens (3 x 3 blocks of 16; 0 skip, 1 whole block, 2 sink columns alone) and
# the sink columns' offset in each key block holding sinks. One document: query block 2 sees key block 0
# for its sinks alone (the window hides the rest), in 8 columns from 0. Short documents put four documents'
# sinks in block 0 (columns 0 to 13, more than 8): query block 2, whose chunk hides the rest, visits it in
# full. Two documents, non-causal: blocks above the diagonal are visited, query block 2 (document 2) skips
# block 0 (document 1's sinks: another segment), and document 2's sinks start at column 7 of key block 1.
@pytest.mark.parametrize("cuts, mask, modes, offsets", [
    ((), Mask(window=6, sink_tokens=3), [[1, 0, 0], [1, 1, 0], [2, 1, 1]], {0: 0}),
    ((5, 10, 12), Mask(chunk=20, sink_tokens=2), [[1, 1, 0], [1, 1, 0], [1, 0, 1]], {0: 0}),
    ((23,), Mask(causal=False, window=5, sink_tokens=4), [[1, 1, 0], [1, 1, 1], [0, 1, 1]], {0: 0, 1: 7}),
], ids=["one-doc-window", "short-docs-chunk", "two-docs-noncausal"])
def test_sink_tokens_blockwise_visits(cuts, mask, modes, offsets):
    # The XLA path visits a key block that only sink tokens make visible in its sink columns alone when they
    # lie in one run, else in full (short documents: several documents' sinks in one block). Both, with
    # windows, chunks, non-causal windows and a length that is not a multiple of the blocks, against the
    # reference, values and gradients.
    T = 61
    q, k, v = _inputs(T=T)
    pos, seg = _packed(2, T, cuts)
    _compare(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg, mask=mask)
    pb, sb = pos[:, :48].reshape(2, 3, 16), seg[:, :48].reshape(2, 3, 16)
    st = flash_xla._Static(mask, None, 1.0, None, 16, 16)
    vis = flash_xla.block_visible(pb, pb, sb, sb, mask=st.mask)
    got, offset = flash_xla._visit_modes(vis, pb, sb, pb, sb, st)
    assert np.asarray(got).tolist() == modes
    assert {j: int(offset[j]) for j in offsets} == offsets


def _with_sink_brute_force(q, k, v, pos, sinks_H, mask):
    """softmax over [the visible keys, one sink logit per head whose value is 0], written out in full."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    kk, vv = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, kk) * D**-0.5
    s = jnp.where(mask.visible(pos[:, None, :, None], pos[:, None, None, :]), s, -jnp.inf)
    s = jnp.concatenate([s, jnp.broadcast_to(sinks_H[None, :, None, None], (B, H, T, 1))], -1)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1)[..., :-1], vv)


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("mask", [Mask(), Mask(window=5), Mask(chunk=12)], ids=["causal", "window", "chunk"])
def test_sinks_against_brute_force_with_their_gradient(impl, mask):
    q, k, v = _inputs(T=40, H=4, K=2)
    pos = _positions(2, 40)
    sinks = jnp.asarray([-1.0, 0.0, 0.5, 2.0])
    do = jax.random.normal(jax.random.PRNGKey(7), q.shape)

    def loss(fn):
        return lambda q, k, v, s: (fn(q, k, v, s) * do).sum()

    ours = loss(lambda q, k, v, s: ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=mask, sinks_H=s,
                                                 impl=impl, block_sizes=SMALL_BLOCKS))
    brute = loss(lambda q, k, v, s: _with_sink_brute_force(q, k, v, pos, s, mask))
    np.testing.assert_allclose(jax.jit(ours)(q, k, v, sinks), jax.jit(brute)(q, k, v, sinks), rtol=1e-5)
    grads = [jax.jit(jax.grad(f, (0, 1, 2, 3)))(q, k, v, sinks) for f in (ours, brute)]
    for name, a, b in zip(["q", "k", "v", "sinks"], *grads):
        np.testing.assert_allclose(a, b, atol=ATOL_GRAD, rtol=ATOL_GRAD, err_msg=f"d{name}")
