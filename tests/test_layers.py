"""Per-layer patterns (lc_jax/layers.py): parsing, validation that names the layer type and the field,
models whose layers differ (causal in every type, parameters and caches per type), and training with one."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from lc_jax import config as config_lib
from lc_jax import layers, memory, train
from lc_jax.model import count_params
from lc_jax.positions import NoPE, RoPE
from lc_jax.state import build_model


def test_parse_repeats_and_the_pattern_is_cut_at_num_layers(tiny_config):
    assert layers.parse("5*local, global") == ["local"] * 5 + ["global"]
    assert layers.parse("sliding+full") == ["sliding", "full"]
    for bad in ("", "0*full", "2*", "full,,sliding", "x-y"):
        with pytest.raises(ValueError, match="is not 'type' or 'N\\*type'"):
            layers.parse(bad)
    c = tiny_config("pattern=gemma3", **{"model.num_layers": 8})
    assert [t.name for t in layers.per_layer(c.model)] == ["local"] * 5 + ["global"] + ["local"] * 2
    assert [t.name for t in layers.per_layer(tiny_config().model)] == ["model", "model"]


def test_types_inherit_the_model_wide_fields(tiny_config):
    c = tiny_config("pattern=2*sliding+chunked", **{"model.attention.window": 7, "model.num_layers": 3})
    types = layers.resolve(c.model)
    assert (types["sliding"].attention.name, types["sliding"].attention.window) == ("sliding", 7)
    assert types["chunked"].attention.name == "chunked" and not types["chunked"].own_position
    g = layers.resolve(tiny_config("pattern=gemma3", **{"model.num_layers": 6}).model)
    assert g["global"].position.theta == 1e6 and g["global"].position.scaling.name == "linear"
    assert g["global"].position.layout == "half"  # what the type leaves alone comes from model.position


BAD = [
    ("pattern=5*slidng+full", {}, "layer type 'slidng' is neither in model.layers.types ([]) nor an attention "
                                  "variant (['full', 'sliding', 'chunked', 'dsa']); did you mean 'sliding'?"),
    ("pattern=gemma3", {"model.num_layers": 6, "model.layers.types.local.attention.window": 0},
     "layer type 'local' (layers 0-4): model.layers.types.local.attention.window=0"),
    ("pattern=sliding+full", {"model.attention.window": -1}, "layer type 'sliding' (layers 0): "
                                                             "model.attention.window=-1"),
    ("pattern=llama4", {"model.num_layers": 4, "model.layers.types.global.position.name": "learned"},
     "layer type 'global' (layers 3): model.layers.types.global.position.name='learned': a layer type may use "
     "['nope', 'rope', 'alibi']"),
    ("pattern=gemma3", {"model.num_layers": 4}, "model.layers.pattern='5*local,global' has 6 layers, more than "
                                                "model.num_layers=4"),
]


@pytest.mark.parametrize("arg,overrides,needle", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_patterns_name_the_layer_type_and_the_field(tiny_config, arg, overrides, needle):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(tiny_config(arg, **overrides))
    assert needle in str(e.value)


def test_unknown_keys_inside_a_type_are_named(tiny_config):
    c = tiny_config("pattern=gpt_oss")
    c.model.layers.types.local.attention.windw = 5
    with pytest.raises(config_lib.ConfigError, match=r"model.layers.types.local.attention.windw: unknown key; "
                                                     r"did you mean model.layers.types.local.attention.window\?"):
        config_lib.validate(c)


PATTERNS = {  # at the tiny scale: windows and chunks of 5 and 8 in 24 tokens, every type of each preset
    "gemma3": ("pattern=gemma3", {"model.num_layers": 6, "model.layers.types.local.attention.window": 5}),
    "llama4": ("pattern=llama4", {"model.num_layers": 4, "model.layers.types.local.attention.chunk": 8}),
    "gpt_oss": ("pattern=gpt_oss", {"model.layers.types.local.attention.window": 5}),
    "sliding+chunked+dsa+full": ("pattern=sliding+chunked+dsa+full", {"model.num_layers": 4}),
}


def _model(tiny_config, name):
    arg, overrides = PATTERNS[name]
    c = tiny_config(arg, **overrides)
    c.model.attention.update(window=5, chunk=8, block_q=8, block_k=8)
    c.model.attention.dsa.update(topk=6, index_heads=2, index_dim=8, index_rope_dim=4, index_block_q=8,
                                 index_block_k=8)
    config_lib.validate(c)
    return c, build_model(c)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_mixed_patterns_are_causal_and_see_their_past(tiny_config, name):
    T = 24
    c, model = _model(tiny_config, name)
    graphdef, state = nnx.split(model)
    x_BTE = jax.random.normal(jax.random.PRNGKey(1), (1, T, c.model.d_model))
    jac_TTE = jax.jit(jax.jacobian(lambda x: nnx.merge(graphdef, state)(None, embeds_BTE=x)[0].sum(-1)))(x_BTE)[:, 0]
    influence_TT = np.abs(np.asarray(jac_TTE)).sum(-1)
    assert influence_TT[np.triu(np.ones((T, T), bool), k=1)].max() == 0.0, "a position sees the future"
    assert (influence_TT[np.tril(np.ones((T, T), bool))] > 0).all()  # a global layer: all of the past counts


def test_each_layer_type_gets_its_own_variant_scheme_and_parameters(tiny_config):
    c, model = _model(tiny_config, "llama4")
    assert [type(b.attn.variant).__name__ for b in model.blocks] == ["Chunked"] * 3 + ["Full"]
    assert [type(model.layer_position(i)).__name__ for i in range(4)] == ["RoPE"] * 3 + ["NoPE"]
    assert isinstance(model.position, RoPE) and isinstance(model.layer_position(3), NoPE)
    c, model = _model(tiny_config, "gpt_oss")
    assert all(b.attn.variant.sinks is not None for b in model.blocks)  # sinks on both types
    # The calculator counts what the model builds, pattern and sinks included.
    assert memory.num_params(memory.from_config(c)) == count_params(model)
    c, model = _model(tiny_config, "gemma3")
    assert memory.num_params(memory.from_config(c)) == count_params(model)
    assert model.layer_position(5).theta == 1e6 and model.layer_position(0) is model.layer_position(4)


def test_no_pattern_builds_the_same_model_as_before(tiny_config):
    # One layer type from model.attention / model.position: no per-layer schemes, no new state.
    model = build_model(tiny_config())
    assert model.layer_positions is None and model.position_of_layer == (None, None)


def test_a_patterned_run_trains_with_remat_checkpoints_and_resumes(tiny_config, tmp_path):
    c = tiny_config("pattern=gpt_oss", **{"model.layers.types.local.attention.window": 16,
                                          "model.remat": "full", "train.log_every": 1})
    train.train(c, tmp_path)
    c.train.steps = 8
    train.train(c, tmp_path)
    rows = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 9)) and all(np.isfinite(r["loss"]) for r in rows)


def test_a_dsa_layer_before_other_types_keeps_its_indexer_loss(tiny_config):
    # The aux of a layer type that only some layers return (DSA's indexer KL) is summed over those layers,
    # whatever follows them: it trains every DSA layer's indexer.
    c = tiny_config("pattern=dsa+full+dsa+full", **{"model.num_layers": 4, "model.attention.dsa.topk": 8})
    model = build_model(c)
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 256)
    _, aux = model(tokens, return_aux=True)
    assert set(aux) == {"dsa_kl"}
    assert float(aux["dsa_kl"][1]) == 2 * tokens.size  # the rows of both DSA layers (B x T each)
