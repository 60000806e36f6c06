"""lc_jax.inspect_attention: the probabilities it reports are the ones each layer attends with."""

import jax
import jax.numpy as jnp
import numpy as np

from lc_jax import ops
from lc_jax.inspect_attention import attention_probs
from lc_jax.state import build_model


def test_probabilities_reproduce_each_layers_attention(tiny_config):
    # gpt-oss pattern: a sliding layer and a full layer, both with learned sinks; packed documents.
    c = tiny_config("pattern=gpt_oss", **{"model.layers.types.local.attention.window": 8})
    model = build_model(c)
    B, T = 2, 48
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 256)
    seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 28], B, axis=0), jnp.int32)
    layers = attention_probs(model, tokens, segment_ids_BT=seg)
    assert len(layers) == c.model.num_layers
    _, pos = model.inputs(tokens)
    for i, (block, la) in enumerate(zip(model.blocks, layers)):
        attn, position = block.attn, model.layer_position(i)
        q, k, v = attn.qkv(la.x_BTE, pos, position)
        bias, params = position.bias() or (None, None)
        out = ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg,
                            mask=attn.variant.mask, bias=bias, bias_params_HP=params,
                            sinks_H=attn.variant.sink_logits(), impl="reference")
        G = attn.num_heads // attn.num_kv_heads  # query heads per kv head
        v_BHSD = jnp.repeat(v.transpose(0, 2, 1, 3), G, axis=1)
        mine = jnp.einsum("bhts,bhsd->bthd", la.probs_BHTS, v_BHSD.astype(jnp.float32))
        np.testing.assert_allclose(mine, out.astype(jnp.float32), atol=2e-5)  # f32 sums of ~50 terms
        p = np.asarray(la.probs_BHTS)
        assert (p >= 0).all() and (p.sum(-1) <= 1 + 1e-5).all()  # the sink takes the rest of each row
        doc1_sees_doc0 = p[:, :, 20:, :20]
        assert not doc1_sees_doc0.any() and not np.triu(p, 1).any()  # per document and causal
        if i % 2 == 0:  # the sliding layer: nothing older than its window
            assert not np.tril(p, -8).any()
