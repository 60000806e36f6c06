"""Causality for every position scheme x attention variant x implementation.

The gradient of the logits at position t with respect to the input embeddings
at positions > t must be exactly zero, and must not vanish for positions <= t
(otherwise the test could pass on a model that ignores its context).
"""

import itertools

import jax
import numpy as np
import pytest
from flax import nnx

from lc_jax import attention, positions
from lc_jax.state import build_model

# DSA runs in both of its stages: dense warm-up and top-k sparse.
VARIANTS = [v for v in sorted(attention.REGISTRY) if v != "dsa"] + ["dsa", "dsa-sparse"]


@pytest.mark.parametrize(
    "position,variant,impl",
    list(itertools.product(sorted(positions.REGISTRY), VARIANTS, ["xla", "reference"])),
)
def test_causal(tiny_config, position, variant, impl):
    T = 24
    c = tiny_config(f"position={position},attention={variant.split('-')[0]}")
    c.model.attention.update(impl=impl, window=5, chunk=8, block_q=8, block_k=8)
    c.model.attention.dsa.update(topk=6, index_heads=2, index_dim=8, index_rope_dim=4, index_block_q=8,
                                 index_block_k=8)
    graphdef, state = nnx.split(build_model(c))
    x_BTE = jax.random.normal(jax.random.PRNGKey(1), (1, T, c.model.d_model))

    def logits_per_position(x):
        model = nnx.merge(graphdef, state)
        stage = "sparse" if variant == "dsa-sparse" else None
        return model(None, embeds_BTE=x, stage=stage)[0].sum(-1)  # [T]

    jac_TTE = jax.jacobian(logits_per_position)(x_BTE)[:, 0]  # d logit_t / d x_s
    influence_TT = np.abs(np.asarray(jac_TTE)).sum(-1)
    future = np.triu(np.ones((T, T), bool), k=1)
    assert influence_TT[future].max() == 0.0, "a position sees the future"
    # Self and (within the window) the past must matter.
    assert (influence_TT[np.eye(T, dtype=bool)] > 0).all()
    if variant == "dsa-sparse":  # each query sees its top-6 keys only: some past, not necessarily t-1
        assert all(influence_TT[t, :t].max() > 0 for t in range(1, T))
    elif variant == "chunked":  # chunks of 8 positions: the chunk's past matters, earlier chunks never do
        same_chunk = np.arange(T)[:, None] // 8 == np.arange(T)[None, :] // 8
        assert influence_TT[~same_chunk].max() == 0.0, "a query sees another chunk"
        assert all(influence_TT[t, t - 1] > 0 for t in range(1, T) if t % 8)
    else:
        assert (np.diagonal(influence_TT, offset=-1) > 0).all()
    if variant == "sliding":
        far_past = np.tril(np.ones((T, T), bool), k=-(5 * c.model.num_layers))
        assert influence_TT[far_past].max() == 0.0, "sliding window leaks beyond num_layers * W"
