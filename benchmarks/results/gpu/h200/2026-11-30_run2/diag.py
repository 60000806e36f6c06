"""One-off H200 diagnostics of the Mosaic GPU f32 path; run 2 ran it before the check (diag.txt)."""
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention import mosaic_gpu as m
from pallas_kernels.flash_attention import reference
from pallas_kernels.flash_attention.masks import Mask

x = jax.random.normal(jax.random.key(1), (4096,), jnp.float32)
rt = jax.jit(lambda x: x - x.astype(jnp.bfloat16).astype(jnp.float32))(x)
print("diag: XLA round-trip residual max", float(jnp.abs(rt).max()), flush=True)
st = m._static(jnp.float32, 64, Mask(), None, None, None, m.BlockSizes())
parts = jax.jit(lambda x: m._split(x, st))(x)
print("diag: split parts", parts.shape, "max |x - sum|", float(jnp.abs(x - parts.astype(jnp.float32).sum(0)).max()),
      "mid-term max", float(jnp.abs(parts[1].astype(jnp.float32)).max()), flush=True)
B, T, H, D = 1, 256, 4, 64
ks = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(kk, (B, T, H, D), jnp.float32) for kk in ks)
pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
P = dict(q_pos_BT=pos, kv_pos_BS=pos, mask=Mask())
exact = tuple(t.astype(jnp.bfloat16).astype(jnp.float32) for t in (q, k, v))
exact = tuple(t.astype(jnp.bfloat16).astype(jnp.float32) for t in (q, k, v))
for name, (a, b, c) in [("f32", (q, k, v)), ("f32 bf16-exact", exact)]:
    out, lse = jax.jit(lambda a, b, c: m.attention(a, b, c, **P))(a, b, c)
    with jax.default_matmul_precision("highest"):
        ro, rl = jax.jit(lambda a, b, c: reference.attention(a, b, c, **P))(a, b, c)
    o = np.asarray(out)
    exact = float(np.mean(o == np.asarray(out.astype(jnp.bfloat16).astype(jnp.float32))))
    print(f"diag: {name}: out dtype {out.dtype} max|out-ref| {float(jnp.abs(out-ro).max()):.3g} "
          f"max|lse-ref| {float(jnp.abs(lse-rl).max()):.3g} frac out bf16-exact {exact:.3f}", flush=True)
