"""Each layer's attention probabilities, for looking at what a model attends to (notebooks, debugging).

Why this module: the model never forms them. Every attention implementation streams over key blocks and
returns only the output and the log-sum-exp (`ops.attention`). So `attention_probs` runs the model's blocks one
by one and, at each layer, takes q and k from the layer itself (`Attention.qkv`); the probabilities come from
the one score function (`masks.scores`: the layer's own mask and bias) and the log-sum-exp of the layer's own
attention call through the reference implementation (learned sinks included: a row then sums to 1 minus the
sink's share).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lc_jax import ops
from pallas_kernels.flash_attention.masks import head_params, scores


class LayerAttention(NamedTuple):
    """One layer's attention inputs and probabilities for a batch of sequences."""

    x_BTE: jax.Array  # the normalised hidden state the attention reads (DSA's indexer reads it too)
    q_BTHD: jax.Array  # queries and keys after the position scheme's rotation
    k_BTKD: jax.Array
    lse_BTH: jax.Array  # the layer's log-sum-exp over its visible keys (and its sink)
    probs_BHTS: jax.Array  # f32: row t is query t's weights over the keys; 0 where the mask hides a key


@functools.partial(nnx.jit, static_argnames="stage")  # eagerly, every small op would compile on its own
def attention_probs(model, tokens_BT, positions_BT=None, segment_ids_BT=None, *, stage=None) -> list[LayerAttention]:
    """`LayerAttention` of every layer of a `model.Transformer` on tokens_BT (positions 0..T-1 by default).

    The probabilities are the dense attention under each layer's mask: for DSA, the distribution its indexer
    learns to imitate (its sparse stage renormalises over the selected keys). `stage` is passed to the blocks,
    so that the hidden states reaching later layers are those of that training stage.
    """
    B, T = tokens_BT.shape
    seg = segment_ids_BT
    x, pos = model.inputs(tokens_BT, positions_BT)
    out = []
    for i, block in enumerate(model.blocks):
        attn, position = block.attn, model.layer_position(i)
        h = block.attn_norm(x)
        q, k, _ = attn.qkv(h, pos, position)
        bias, params = position.bias() or (None, None)
        mask = attn.variant.mask
        _, lse = ops.attention(q, k, k, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg, mask=mask,
                               bias=bias, bias_params_HP=params, sinks_H=attn.variant.sink_logits(),
                               impl="reference", return_lse=True)
        H, K, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
        s = jnp.einsum("btkgd,bskd->bkgts", q.reshape(B, T, K, H // K, D), k,
                       preferred_element_type=jnp.float32) * D**-0.5
        segs = (None, None) if seg is None else (seg[:, None, None, :, None], seg[:, None, None, None, :])
        s, vis, _ = scores(s, pos[:, None, None, :, None], pos[:, None, None, None, :], *segs,
                           head_params(params, K, lambda p: p[None, :, :, None, None]), mask=mask, bias=bias,
                           soft_cap=None)
        lse_BKGT = lse.reshape(B, T, K, H // K).transpose(0, 2, 3, 1)
        p = jnp.where(vis, jnp.exp(s - lse_BKGT[..., None]), 0.0)
        out.append(LayerAttention(h, q, k, lse, p.reshape(B, H, T, T)))
        x = block(x, pos, seg, position, stage=stage)[0]
    return out
