"""One body for every implementation in `ops.FLASH`: values, lse and gradients against the reference (the
reference row itself, through `ops.attention` and `ops.with_sinks` too, against a brute force written out here).

Each case runs through `ops.attention(impl=<name>)`, so the implementation table decides what runs. Where
an implementation declines a case (`Implementation.declines`: cuDNN has no segments, the GPU kernels need
a GPU), the test is skipped with the table's own reason; nothing else is turned into a skip, so a kernel
that fails to lower or computes a wrong number fails. On a CPU the reference, the blockwise XLA path and
the Pallas TPU kernel (interpret mode) run; on a GPU machine the Triton, Mosaic GPU and cuDNN rows run too.
The per-kernel files (test_flash_*.py) go deeper into each kernel: block skipping, layouts, lowering.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import assert_grads_close, assert_outputs_close, tolerances

from lc_jax import ops
from lc_jax.positions.alibi import alibi_slopes
from pallas_kernels.flash_attention import gpu, mosaic_gpu, reference, tpu, xla
from pallas_kernels.flash_attention.masks import ALIBI, Mask

# Small blocks so that even these short sequences cross several blocks (the TPU kernel allows them in tests).
BLOCKS = {"xla": xla.BlockSizes(16, 16), "pallas-tpu": tpu.BlockSizes(32, 32, allow_unaligned=True),
          "pallas-triton": gpu.BlockSizes(), "pallas-mosaic-gpu": mosaic_gpu.BlockSizes()}

CASES = {
    "causal": dict(),
    "window-gqa": dict(mask=Mask(window=9)),
    "packed-alibi": dict(segments=True, alibi=True),
    "chunk-window-softcap": dict(mask=Mask(window=20, chunk=24), logits_soft_cap=5.0),
    # Sink tokens (the first N of each document, StreamingLLM) and learned sink logits (gpt-oss), with
    # windows, chunks, packed documents, ALiBi, soft-cap and GQA (4 query heads on 2 kv heads throughout).
    "sink-tokens-window-packed-alibi-learned-sinks": dict(mask=Mask(window=9, sink_tokens=3), segments=True,
                                                          alibi=True, sinks=True),
    "sink-tokens-chunk-softcap": dict(mask=Mask(chunk=24, sink_tokens=4), logits_soft_cap=5.0),
}
SINKS_H = jnp.asarray([-1.0, 0.0, 0.5, 2.0])


def _inputs(case, dtype):
    B, T, H, K, D = 2, 64, 4, 2, 32
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (B, T, n, D), jnp.float32).astype(dtype) for kk, n in zip(ks, (H, K, K)))
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    kw = {"mask": case.get("mask", Mask()), "logits_soft_cap": case.get("logits_soft_cap")}
    if case.get("segments"):  # two documents per row, positions restarting at each
        seg = jnp.broadcast_to((jnp.arange(T) >= 40).astype(jnp.int32), (B, T))
        pos = jnp.where(seg == 1, pos - 40, pos)
        kw |= {"q_seg_BT": seg, "kv_seg_BS": seg}
    if case.get("alibi"):
        kw |= {"bias": ALIBI, "bias_params_HP": jnp.asarray(alibi_slopes(H))[:, None]}
    return q, k, v, pos, kw


def _brute_force(q, k, v, pos, sinks_H, *, mask, logits_soft_cap, q_seg_BT=None, kv_seg_BS=None, bias=None,
                 bias_params_HP=None):
    """(out, lse) as the definitions say, written out in full, independent of `reference.attention` and
    `ops.with_sinks`: soft-capped logits, plus -slope * |q_pos - kv_pos| (ALiBi), -inf where `Mask.visible`
    (itself checked in test_attention.py) hides the key, then a softmax over the keys and one sink logit
    per head (a key without value)."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    s = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, G, axis=2)) * D**-0.5
    if logits_soft_cap is not None:
        s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
    if bias is not None:
        assert bias is ALIBI
        s = s - bias_params_HP[None, :, :, None] * jnp.abs(pos[:, None, :, None] - pos[:, None, None, :])
    segs = () if q_seg_BT is None else (q_seg_BT[:, None, :, None], kv_seg_BS[:, None, None, :])
    s = jnp.where(mask.visible(pos[:, None, :, None], pos[:, None, None, :], *segs), s, -jnp.inf)
    if sinks_H is not None:
        s = jnp.concatenate([s, jnp.broadcast_to(sinks_H[None, :, None, None], (B, H, T, 1))], -1)
    p = jax.nn.softmax(s, -1)[..., :T]
    out = jnp.einsum("bhts,bshd->bthd", p, jnp.repeat(v, G, axis=2))
    return out, jax.nn.logsumexp(s, -1).transpose(0, 2, 1)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl", sorted(ops.FLASH))
def test_implementation_against_reference(impl, case):
    dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32  # cuDNN computes in bf16 / f16 only
    q, k, v, pos, kw = _inputs(CASES[case], dtype)
    sinks = CASES[case].get("sinks", False)
    call = ops.describe(q, k, pos, pos, q_seg_BT=kw.get("q_seg_BT"), mask=kw["mask"], bias=kw.get("bias"),
                        logits_soft_cap=kw["logits_soft_cap"], lse=impl != "cudnn" or sinks)
    if (why := ops.FLASH[impl].declines(call)) is not None:
        pytest.skip(f"impl={impl!r} {why}")
    atol, gtol = tolerances(dtype)
    do = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)

    def run(fn, *args):
        """(fn's outputs, d(sum(out * do)) / d(q, k, v[, sink logits])); fn returns out or (out, lse)."""
        def loss(*args):
            res = fn(*args)
            out = res[0] if isinstance(res, tuple) else res
            return jnp.sum(out.astype(jnp.float32) * do), res

        (_, res), grads = jax.jit(jax.value_and_grad(loss, tuple(range(len(args))), has_aux=True))(*args)
        return res, grads

    ours = lambda q, k, v, *s: ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, impl=impl,  # noqa: E731
                                             return_lse=impl != "cudnn", block_sizes=BLOCKS.get(impl),
                                             sinks_H=s[0] if s else None, **kw)
    if impl == "reference":  # the ground truth of the other rows, checked itself against the brute force
        ref = lambda q, k, v, *s: _brute_force(q, k, v, pos, s[0] if s else None, **kw)  # noqa: E731
    elif sinks:  # the learned logits enter through ops.with_sinks, whatever the implementation
        ref = lambda q, k, v, s: ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, impl="reference",  # noqa: E731
                                               return_lse=True, sinks_H=s, **kw)
    else:
        ref = lambda q, k, v: reference.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, **kw)  # noqa: E731
    extra = (SINKS_H,) if sinks else ()
    out, grads = run(ours, q, k, v, *extra)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (out_r, lse_r), grads_r = run(ref, *f32, *extra)
    if impl == "cudnn":
        np.testing.assert_allclose(out.astype(jnp.float32), out_r, atol=atol, rtol=atol)
    else:
        assert_outputs_close(out[0], out[1], out_r, lse_r, q, v, atol)
    assert_grads_close(grads[:3], grads_r[:3], dtype, gtol)
    if sinks:
        np.testing.assert_allclose(grads[3], grads_r[3], atol=gtol, rtol=gtol, err_msg="dsinks")
