"""One-off GPU diagnosis (run 4): where DSA's time goes at T=65536, k=2048, and how far jax's own Mosaic GPU
flash kernel gets against cuDNN, to aim the next kernel work. Each part prints as soon as it is measured.

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/results/gpu/h200/2026-11-30_run4/diag.py PART OUT.json
PART: select | flash | parts | flash16 | mqa (the last two: a second call, after the first's findings)
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lc_jax import ops
from lc_jax.attention import dsa
from pallas_kernels import sparse_attention_gpu
from pallas_kernels.flash_attention.masks import Mask

T, K_TOP = int(os.environ.get("DIAG_T", 65536)), int(os.environ.get("DIAG_K", 2048))  # small: a CPU smoke run
rng = np.random.default_rng(0)
rand = lambda *s, dt=jnp.bfloat16: jnp.asarray(rng.standard_normal(s, np.float32), dt)  # noqa: E731
pos = jnp.arange(T, dtype=jnp.int32)[None]
P = dict(q_pos_BT=pos, kv_pos_BS=pos)
out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}


def timed(name, fn, *args, reps=3, **info):
    try:
        t0 = time.perf_counter()
        c = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(c(*args))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            ts.append(time.perf_counter() - t0)
        row = dict(name=name, median_s=float(np.median(ts)), runs_s=ts, compile_s=compile_s, **info)
    except Exception as e:  # noqa: BLE001
        row = dict(name=name, error=f"{type(e).__name__}: {str(e).strip()[:400]}", **info)
    out["rows"].append(row)
    print(json.dumps(row), flush=True)
    json.dump(out, open(sys.argv[2], "w"), indent=1)
    return row


part = sys.argv[1]
# The wide layer's indexer (benchmarks/dsa.py LAYERS['wide']): 4 heads x 32, scores in f32.
iq, w, ik = rand(1, T, 4, 32, dt=jnp.float32), rand(1, T, 4, dt=jnp.float32), rand(1, T, 32, dt=jnp.float32)

if part == "select":
    for impl, bq, bk in [("radix", 1024, 4096), ("radix", 256, 4096), ("xla", 512, 4096)]:
        timed(f"select {impl} block_q={bq}", lambda a, b, c, impl=impl, bq=bq, bk=bk: dsa.select_topk(
            a, b, c, impl=impl, **P, topk=K_TOP, block_q=bq, block_k=bk), iq, w, ik)
    # The same rows through lax.top_k directly (dense rows, no streaming), for scale.
    R = 1024
    x = rand(R, T, dt=jnp.float32)
    timed(f"lax.top_k rows={R} S={T} k={K_TOP}", lambda x: jax.lax.top_k(x, K_TOP), x)
    timed(f"radix rows={R} S={T} k={K_TOP}", lambda x: dsa._radix_rows(x, K_TOP), x)

if part == "flash":
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am

    Tf, H, D = 8192, 16, 128
    q, k, v = rand(1, Tf, H, D), rand(1, Tf, H, D), rand(1, Tf, H, D)
    pf = jnp.arange(Tf, dtype=jnp.int32)[None]
    flops = 4 * Tf * Tf * H * D / 2

    def fb(f):
        return lambda q, k, v: jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))(
            q, k, v)

    impls = {
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
        "lc_jax pallas": lambda q, k, v: ops.attention(q, k, v, q_pos_BT=pf, kv_pos_BS=pf, mask=Mask(),
                                                       impl="pallas"),
    }
    for bkv in (128, 64):
        cfg = am.TuningConfig(block_q=64, block_kv=bkv, max_concurrent_steps=2, causal=True, block_q_dkv=64,
                              block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
        impls[f"jax attention_mgpu kv{bkv}"] = lambda q, k, v, cfg=cfg: am.attention(q, k, v, cfg)
    for n, f in impls.items():
        r = timed(f"flash fwd {n}", f, q, k, v, reps=5)
        if "median_s" in r:
            r["tflops"] = flops / r["median_s"] / 1e12
        r = timed(f"flash fwd+bwd {n}", fb(f), q, k, v, reps=5)
        if "median_s" in r:
            r["tflops"] = 3.5 * flops / r["median_s"] / 1e12
    print(json.dumps({r["name"]: round(r.get("tflops", 0), 1) for r in out["rows"]}), flush=True)

if part == "parts":
    H, KV, D = 16, 4, 128
    q, k, v = rand(1, T, H, D), rand(1, T, KV, D), rand(1, T, KV, D)
    idx, valid = jax.jit(lambda a, b, c: dsa.select_topk(a, b, c, impl="radix", **P, topk=K_TOP, block_q=1024,
                                                         block_k=4096))(iq, w, ik)

    def sparse_fb(q, k, v):
        def loss(q, k, v):
            o, _ = sparse_attention_gpu.sparse_attention(q, k, v, idx, valid, **P)
            return o.astype(jnp.float32).sum()
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    def full_fb(q, k, v):
        return jax.value_and_grad(lambda q, k, v: ops.attention(q, k, v, **P, mask=Mask(), impl="pallas").astype(
            jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    timed("full fwd+bwd pallas", full_fb, q, k, v)
    timed("sparse attention fwd+bwd triton", sparse_fb, q, k, v)
    timed("sparse attention fwd triton", lambda q, k, v: sparse_attention_gpu.sparse_attention(
        q, k, v, idx, valid, **P)[0], q, k, v)
    timed("index scores only (einsum, 64 query blocks of 1024)", lambda a, b, c: jax.lax.map(
        lambda i: dsa.index_scores(jax.lax.dynamic_slice_in_dim(a, i * 1024, 1024, 1),
                                   jax.lax.dynamic_slice_in_dim(b, i * 1024, 1024, 1), c).max(-1),
        jnp.arange(T // 1024)), iq, w, ik)

if part == "flash16":  # jax's attention_mgpu takes f16 only (bf16 failed in the first call): all three in f16
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am

    Tf, H, D = 8192, 16, 128
    q, k, v = (rand(1, Tf, H, D, dt=jnp.float16) for _ in range(3))
    pf = jnp.arange(Tf, dtype=jnp.int32)[None]
    flops = 4 * Tf * Tf * H * D / 2

    def fb(f):
        return lambda q, k, v: jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))(
            q, k, v)

    impls = {
        "cudnn f16": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
        "lc_jax pallas f16": lambda q, k, v: ops.attention(q, k, v, q_pos_BT=pf, kv_pos_BS=pf, mask=Mask(),
                                                           impl="pallas"),
    }
    for bkv in (128, 64):
        cfg = am.TuningConfig(block_q=64, block_kv=bkv, max_concurrent_steps=2, causal=True, block_q_dkv=64,
                              block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
        impls[f"jax attention_mgpu f16 kv{bkv}"] = lambda q, k, v, cfg=cfg: am.attention(q, k, v, cfg)
    for n, f in impls.items():
        for what, fn, mult in (("fwd", f, 1.0), ("fwd+bwd", fb(f), 3.5)):
            r = timed(f"flash {what} {n}", fn, q, k, v, reps=5)
            if "median_s" in r:
                r["tflops"] = mult * flops / r["median_s"] / 1e12
    print(json.dumps({r["name"]: round(r.get("tflops", 0), 1) for r in out["rows"]}), flush=True)

if part == "mqa":  # the sparse kernel's cost by kv heads: DeepSeek's sparse MLA shares one kv head by all heads
    idx, valid = jax.jit(lambda a, b, c: dsa.select_topk(a, b, c, impl="radix", **P, topk=K_TOP, block_q=1024,
                                                         block_k=4096))(iq, w, ik)
    for KV in (1, 4):
        q, k, v = rand(1, T, 16, 128), rand(1, T, KV, 128), rand(1, T, KV, 128)

        def sparse_fb(q, k, v):
            def loss(q, k, v):
                o, _ = sparse_attention_gpu.sparse_attention(q, k, v, idx, valid, **P)
                return o.astype(jnp.float32).sum()
            return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

        timed(f"sparse fwd+bwd triton, 16 heads over {KV} kv", sparse_fb, q, k, v, reps=2)
        timed(f"full fwd+bwd pallas, 16 heads over {KV} kv", lambda q, k, v: jax.value_and_grad(
            lambda q, k, v: ops.attention(q, k, v, **P, mask=Mask(), impl="pallas").astype(jnp.float32).sum(),
            argnums=(0, 1, 2))(q, k, v), q, k, v, reps=2)
    x = rand(1024, T, dt=jnp.float32)
    for kk in (2048, 256):
        timed(f"lax.top_k rows=1024 S={T} k={kk}", lambda x, kk=kk: jax.lax.top_k(x, kk), x)
