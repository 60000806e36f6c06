"""One body for every implementation in `ops.FLASH`: values, lse and gradients against the reference.

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
    if sinks:  # the learned logits enter through ops.with_sinks, whatever the implementation
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
