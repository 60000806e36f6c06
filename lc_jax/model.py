"""A decoder-only transformer in Flax NNX.

Embed -> N x Block(RMSNorm, Attention, RMSNorm, SwiGLU) -> RMSNorm -> head.
Parameters are f32 (`param_dtype`) and carry logical axis names
(`out_sharding`) that `lc_jax.sharding` maps onto mesh axes; compute runs in
`dtype` (bf16 on accelerators), with norms, softmax statistics and logits in f32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lc_jax import attention as attention_variants
from lc_jax import positions

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs: nnx.Rngs, shape, axes, dtype, stddev: float) -> nnx.Param:
    init = jax.nn.initializers.normal(stddev=stddev)
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head attention with grouped K/V heads; the variant decides what is visible."""

    def __init__(self, *, d_model, num_heads, num_kv_heads, head_dim, num_layers, attention_cfg,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dtype = dtype
        s_in, s_out = d_model**-0.5, (num_heads * head_dim) ** -0.5 / math.sqrt(2 * num_layers)
        self.wq = _param(rngs, (d_model, num_heads, head_dim), ("embed", "heads", "head_dim"), param_dtype, s_in)
        self.wk = _param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype, s_in)
        self.wv = _param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype, s_in)
        self.wo = _param(rngs, (num_heads, head_dim, d_model), ("heads", "head_dim", "embed"), param_dtype, s_out)
        self.variant = attention_variants.build(
            attention_cfg, d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, param_dtype=param_dtype, rngs=rngs,
        )

    def __call__(self, x_BTE, pos_BT, seg_BT, position: positions.PositionScheme):
        dt = self.dtype
        q_BTHD = jnp.einsum("bte,ehd->bthd", x_BTE, self.wq[...].astype(dt))
        k_BTKD = jnp.einsum("bte,ekd->btkd", x_BTE, self.wk[...].astype(dt))
        v_BTKD = jnp.einsum("bte,ekd->btkd", x_BTE, self.wv[...].astype(dt))
        q_BTHD, k_BTKD = position.rotate(q_BTHD, k_BTKD, pos_BT, pos_BT)
        out_BTHD = self.variant(
            q_BTHD, k_BTKD, v_BTKD, q_pos_BT=pos_BT, kv_pos_BS=pos_BT, q_seg_BT=seg_BT, kv_seg_BS=seg_BT,
            alibi_slopes_H=position.alibi_slopes(), x_BTE=x_BTE,
        )
        return jnp.einsum("bthd,hde->bte", out_BTHD.astype(dt), self.wo[...].astype(dt))


class SwiGLU(nnx.Module):
    def __init__(self, *, d_model, mlp_dim, num_layers, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        s_in, s_out = d_model**-0.5, mlp_dim**-0.5 / math.sqrt(2 * num_layers)
        self.w_gate = _param(rngs, (d_model, mlp_dim), ("embed", "mlp"), param_dtype, s_in)
        self.w_up = _param(rngs, (d_model, mlp_dim), ("embed", "mlp"), param_dtype, s_in)
        self.w_down = _param(rngs, (mlp_dim, d_model), ("mlp", "embed"), param_dtype, s_out)

    def __call__(self, x_BTE):
        dt = self.dtype
        h_BTF = jax.nn.silu(x_BTE @ self.w_gate[...].astype(dt)) * (x_BTE @ self.w_up[...].astype(dt))
        return h_BTF @ self.w_down[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, *, d_model, num_heads, num_kv_heads, head_dim, mlp_dim, num_layers, attention_cfg,
                 norm_eps, dtype, param_dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
        self.attn = Attention(
            d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            num_layers=num_layers, attention_cfg=attention_cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.mlp_norm = RMSNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
        self.mlp = SwiGLU(d_model=d_model, mlp_dim=mlp_dim, num_layers=num_layers, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BTE, pos_BT, seg_BT, position):
        x_BTE = x_BTE + self.attn(self.attn_norm(x_BTE), pos_BT, seg_BT, position)
        return x_BTE + self.mlp(self.mlp_norm(x_BTE))


class Transformer(nnx.Module):
    def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, mlp_dim: int, max_seq_len: int, position, attention, tie_embeddings: bool = False,
                 dtype: str = "float32", param_dtype: str = "float32", remat: str = "none",
                 norm_eps: float = 1e-6, rngs: nnx.Rngs):
        dt, pdt = DTYPES[dtype], DTYPES[param_dtype]
        self.dtype, self.remat, self.tie_embeddings = dt, remat, tie_embeddings
        self.embed = _param(rngs, (vocab_size, d_model), ("vocab", "embed"), pdt, 1.0)
        self.position = positions.build(
            position, num_heads=num_heads, head_dim=head_dim, d_model=d_model, max_seq_len=max_seq_len,
            param_dtype=pdt, rngs=rngs,
        )
        self.blocks = nnx.List([
            Block(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                  mlp_dim=mlp_dim, num_layers=num_layers, attention_cfg=attention, norm_eps=norm_eps,
                  dtype=dt, param_dtype=pdt, rngs=rngs)
            for _ in range(num_layers)
        ])
        self.final_norm = RMSNorm(d_model, eps=norm_eps, param_dtype=pdt)
        if not tie_embeddings:
            self.head = _param(rngs, (d_model, vocab_size), ("embed", "vocab"), pdt, d_model**-0.5)

    @classmethod
    def from_config(cls, m, *, rngs: nnx.Rngs) -> Transformer:
        """Build from a `config.model` ConfigDict (already validated)."""
        return cls(
            vocab_size=m.vocab_size, d_model=m.d_model, num_layers=m.num_layers, num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads, head_dim=m.head_dim or m.d_model // m.num_heads, mlp_dim=m.mlp_dim,
            max_seq_len=m.max_seq_len, position=m.position, attention=m.attention,
            tie_embeddings=m.tie_embeddings, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
            norm_eps=m.norm_eps, rngs=rngs,
        )

    def __call__(self, tokens_BT=None, positions_BT=None, segment_ids_BT=None, *, embeds_BTE=None):
        """Logits [B, T, V] in f32. `embeds_BTE` replaces the token lookup (causality tests, soft prompts)."""
        if embeds_BTE is None:
            embeds_BTE = jnp.take(self.embed[...], tokens_BT, axis=0)
        x_BTE = embeds_BTE.astype(self.dtype)
        B, T = x_BTE.shape[:2]
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTE = self.position.embed(x_BTE, positions_BT)

        def run_block(block, x, pos, seg, position):
            return block(x, pos, seg, position)

        if self.remat != "none":
            run_block = nnx.remat(run_block, policy=REMAT_POLICIES[self.remat])
        for block in self.blocks:
            x_BTE = run_block(block, x_BTE, positions_BT, segment_ids_BT, self.position)
        h_BTE = self.final_norm(x_BTE)
        if self.tie_embeddings:  # unit-variance embeddings: rescale so initial logits are O(1)
            w_EV = self.embed[...].T * self.embed[...].shape[1] ** -0.5
        else:
            w_EV = self.head[...]
        return jnp.einsum("bte,ev->btv", h_BTE, w_EV.astype(self.dtype), preferred_element_type=jnp.float32)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
