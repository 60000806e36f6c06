"""impl='cudnn' in lc_jax.ops: jax.nn.dot_product_attention for the plain causal/sliding layout.

On CPU the shared helper `ops._jax_nn` runs with implementation='xla' (same
arguments, same window convention) against reference.py; the cuDNN path itself
runs only when a GPU is the default backend.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lc_jax import ops
from pallas_kernels.flash_attention import reference
from pallas_kernels.flash_attention.masks import ALIBI, Mask


def _inputs(B=2, T=48, H=4, K=2, D=16, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, K, D), jnp.float32).astype(dtype)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return q, k, v, pos


def test_cudnn_in_impls(monkeypatch):
    assert "cudnn" in ops.IMPLS
    monkeypatch.setattr(ops, "platform", lambda: "gpu")
    q, k, _, pos = _inputs(dtype=jnp.bfloat16)
    assert ops.choose("cudnn", ops.describe(q, k, pos, pos)).name == "cudnn"


@pytest.mark.parametrize("causal,window", [(True, None), (True, 7), (False, None), (False, 7)])
def test_jax_nn_helper_matches_reference(causal, window):
    q, k, v, pos = _inputs()
    mask = Mask(causal=causal, window=window)
    out = ops._jax_nn(q, k, v, mask=mask, scale=None, implementation="xla")
    ref, _ = reference.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=mask)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_jax_nn_helper_grads_match_reference():
    q, k, v, pos = _inputs()
    do = jax.random.normal(jax.random.key(1), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * do)

    helper = loss(lambda q, k, v: ops._jax_nn(q, k, v, mask=Mask(window=7), scale=0.3, implementation="xla"))
    ref = loss(lambda q, k, v: reference.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=7),
                                                   scale=0.3)[0])
    for a, b in zip(jax.grad(helper, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"q_seg_BT": "seg", "kv_seg_BS": "seg"}, "segment ids"),
        ({"bias": ALIBI, "bias_params_HP": jnp.ones((4, 1))}, "bias"),
        ({"mask": Mask(chunk=16)}, "chunk"),
        ({"logits_soft_cap": 30.0}, "logits_soft_cap"),
        ({"return_lse": True}, "return_lse"),
    ],
)
def test_unsupported_arguments_raise(kw, match):
    q, k, v, pos = _inputs()
    kw = {name: (jnp.zeros_like(pos) if isinstance(val, str) else val) for name, val in kw.items()}
    with pytest.raises(ValueError, match=match) as e:
        ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, impl="cudnn", **kw)
    assert "impl='pallas'" in str(e.value)


def test_t_ne_s_raises():
    q, k, v, pos = _inputs()
    with pytest.raises(ValueError, match="T != S"):
        ops.attention(q[:, :16], k, v, q_pos_BT=pos[:, :16], kv_pos_BS=pos, impl="cudnn")


def test_non_causal_window_raises_for_cudnn():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="causal=True"):
        ops._jax_nn(q, k, v, mask=Mask(causal=False, window=7), scale=None, implementation="cudnn")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the non-GPU error")
def test_cudnn_needs_gpu():
    q, k, v, pos = _inputs()
    with pytest.raises(ValueError, match="needs a GPU"):
        ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, impl="cudnn")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN runs only on GPU")
@pytest.mark.parametrize("window", [None, 7])
def test_cudnn_on_gpu_bf16(window):
    q, k, v, pos = _inputs(T=256, H=8, K=2, D=64, dtype=jnp.bfloat16)
    do = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)

    def cudnn(q, k, v):
        return ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=window), impl="cudnn")

    def ref(q, k, v):
        return reference.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(window=window))[0]

    out = jax.jit(cudnn)(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    np.testing.assert_allclose(out.astype(jnp.float32), ref(*f32), atol=2e-2, rtol=2e-2)
    g = jax.jit(jax.grad(lambda *a: jnp.sum(cudnn(*a).astype(jnp.float32) * do), (0, 1, 2)))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * do), (0, 1, 2))(*f32)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=5e-2, rtol=5e-2)


def test_auto_on_a_gpu_takes_only_what_has_passed_there(monkeypatch):
    # 'auto' on a GPU: cuDNN where it computes exactly the call, a Pallas kernel only once the GPU check
    # has passed it (ops.GPU_VERIFIED), else the blockwise XLA path. Platform faked: only the choice is checked.
    monkeypatch.setattr(ops, "platform", lambda: "gpu")
    monkeypatch.setattr(ops, "GPU_VERIFIED", {})
    q, k, v, pos = _inputs(T=64, dtype=jnp.bfloat16)

    def choose(q=q, p=pos, table="flash", **kw):
        return ops.choose("auto", ops.describe(q, k, p, p, **kw), table).name

    assert choose() == "cudnn" and choose(mask=Mask(window=16)) == "cudnn"
    # What cuDNN cannot do: packed documents, positions not 0..T-1 (or not known while tracing), ALiBi, lse.
    assert choose(q_seg_BT=pos // 32) == "xla" and choose(bias=ALIBI) == "xla" and choose(mask=Mask(chunk=16)) == "xla"
    assert choose(lse=True) == "xla" and choose(mask=Mask(causal=False, window=16)) == "xla"
    assert choose(p=pos + 1) == "xla"
    traced = []
    jax.jit(lambda p: traced.append(choose(p=p)) or p)(pos)
    assert traced == ["xla"]  # traced positions cannot be proven 0..T-1
    assert choose(q=q.astype(jnp.float32)) == "xla"
    # Once the GPU check has passed the kernel 'pallas' would run, 'auto' takes it for what cuDNN cannot do.
    monkeypatch.setattr(ops, "GPU_VERIFIED", {"pallas-triton": passed_as_it_is_now("pallas-triton")})
    assert choose(q_seg_BT=pos // 32) == "pallas-triton" and choose() == "cudnn"
    assert choose(table="sparse") == "xla"
    # ... but not once its code has changed since that check.
    monkeypatch.setattr(ops, "GPU_VERIFIED", {"pallas-triton": dataclasses.replace(
        passed_as_it_is_now("pallas-triton"), digest="0" * 16)})
    assert choose(q_seg_BT=pos // 32) == "xla"


def passed_as_it_is_now(key: str, compute_capability: str = "9.0") -> ops.GpuPass:
    """A GPU_VERIFIED entry for kernel `key` as its code is now (what a GPU check that passed it records)."""
    return ops.GpuPass(device="NVIDIA H200", compute_capability=compute_capability, date="2026-12-08", jax="0.11.2",
                       run="h200/test", digest=ops.kernel_digest(key))


def test_a_gpu_check_counts_for_the_code_and_the_gpu_generation_it_passed(monkeypatch):
    monkeypatch.setattr(ops, "GPU_VERIFIED", {"pallas-triton": passed_as_it_is_now("pallas-triton")})
    assert ops.gpu_verified("pallas-triton") is None
    assert "has not passed the GPU check" in ops.gpu_verified("pallas-mosaic-gpu")
    monkeypatch.setattr(ops, "_gpu_compute_capability", lambda: "9.0")
    assert ops.gpu_verified("pallas-triton") is None
    monkeypatch.setattr(ops, "_gpu_compute_capability", lambda: "8.0")  # an A100: other shared memory, no wgmma
    assert "compute capability 9.0 (NVIDIA H200), not 8.0" in ops.gpu_verified("pallas-triton")
    monkeypatch.setattr(ops, "GPU_VERIFIED", {"pallas-triton": dataclasses.replace(
        passed_as_it_is_now("pallas-triton"), digest="0" * 16)})
    assert "has changed since it passed the GPU check" in ops.gpu_verified("pallas-triton")


def test_the_source_digest_follows_code_not_prose():
    code = 'def f(x):\n    """Doubles."""\n    return 2 * x  # why\n'
    same = 'def f(x):\n    """Twice x: another docstring."""\n\n    # another comment\n    return 2*x\n'
    assert ops.source_digest(code) == ops.source_digest(same)
    assert ops.source_digest(code) != ops.source_digest(code.replace("2 * x", "3 * x"))
    assert ops.source_digest(code) != ops.source_digest(code.replace("    return", "    x = -x\n    return"))


def test_one_error_lists_why_each_candidate_declined(monkeypatch):
    q, k, v, pos = _inputs()
    with pytest.raises(ValueError, match="no implementation can compute this call") as e:
        ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, impl="cudnn,pallas-triton", return_lse=True)
    assert "impl='cudnn' does not support return_lse" in str(e.value)
    assert "impl='pallas-triton' needs a GPU" in str(e.value)
    # A preference list runs the first that can: here the blockwise XLA path, after both GPU-only ones declined.
    out = ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, impl="cudnn,pallas-triton,xla")
    np.testing.assert_allclose(out, reference.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos)[0], atol=1e-5)
    with pytest.raises(ValueError, match=r"impl='flash2': allowed values are"):
        ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, impl="flash2")
