"""KV-cache generation: cached logits equal a full forward pass, chunking is invisible, the CLI runs.

Every model is tiny (d_model 32, 4 query heads / 2 kv heads: GQA) with random
weights; sequences are longer than the sliding window so the ring buffer wraps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lc_jax import cli, generate, train
from lc_jax.state import build_model

B, T, P, W = 2, 40, 24, 8  # batch, sequence, prompt (prefilled), sliding window (< T: the ring wraps)
DYN_NTK = {"model.position.scaling.name": "dynamic_ntk", "model.position.scaling.factor": 2.0,
           "model.position.scaling.original_max_len": 16}


def _model(tiny_config, arg, **overrides):
    c = tiny_config(arg, **overrides)
    c.model.attention.update(window=W, block_q=16, block_k=16)
    return build_model(c)


def _tokens(seed=0, length=T):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (B, length)), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _full_forward(graph, state, tokens_BT, positions_BT, segments_BT):
    return nnx.merge(graph.graphdef, state)(tokens_BT, positions_BT, segments_BT)


def _reference(model, tokens_BT, prefix_rope: bool):
    """Full-forward logits [B, T, V]; with `prefix_rope` each decode position t comes from a forward over
    tokens[:t+1] (what dynamic NTK sees at that step), padded to one shape with an unseen segment."""
    graph, state = generate._split(model)
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seg_BT = jnp.zeros((B, T), jnp.int32)
    if not prefix_rope:
        return _full_forward(graph, state, tokens_BT, pos_BT, seg_BT)

    def prefix(n):  # tokens past n: position 0, segment 1 (never visible, max position stays n - 1)
        live = jnp.arange(T) < n
        pos = jnp.broadcast_to(jnp.where(live, jnp.arange(T), 0).astype(jnp.int32), (B, T))
        seg = jnp.broadcast_to(jnp.where(live, 0, 1).astype(jnp.int32), (B, T))
        return _full_forward(graph, state, tokens_BT, pos, seg)

    out = [prefix(P)[:, :P]] + [prefix(t + 1)[:, t:t + 1] for t in range(P, T)]
    return jnp.concatenate(out, axis=1)


CASES = {
    "nope": ("position=nope", {}),
    "learned": ("position=learned", {}),
    "sinusoidal": ("position=sinusoidal", {}),
    "rope": ("position=rope", {}),
    "alibi": ("position=alibi", {}),
    "rope-sliding-ring-mqa": ("position=rope,attention=sliding", {"model.num_kv_heads": 1}),
    "alibi-sliding-ring": ("position=alibi,attention=sliding", {}),
    "alibi-sliding-ring-reference-impl": ("position=alibi,attention=sliding", {"model.attention.impl": "reference"}),
    "rope-chunked-ring": ("position=rope,attention=chunked", {"model.attention.chunk": W}),
    "alibi-sinks": ("position=alibi", {"model.attention.sinks": True}),
    # StreamingLLM sink tokens: W ring slots plus slots that keep the first positions.
    "rope-sliding-sink-tokens": ("position=rope,attention=sliding", {"model.attention.sink_tokens": 3}),
    "alibi-chunked-sink-tokens": ("position=alibi,attention=chunked", {"model.attention.chunk": W,
                                                                       "model.attention.sink_tokens": 2}),
    # The released patterns (lc_jax/layers.py) with their local layers cut to W: each layer keeps its own ring.
    "gemma3-pattern": ("pattern=gemma3", {"model.num_layers": 6, "model.layers.types.local.attention.window": W}),
    # Llama 4's temperature tuning on the global layers, its floor cut from 8192 to 8 so that it acts here.
    "llama4-pattern": ("pattern=llama4", {"model.num_layers": 4, "model.layers.types.local.attention.chunk": W,
                                          "model.layers.types.global.position.temperature_floor_scale": 8}),
    "gpt-oss-pattern": ("pattern=gpt_oss", {"model.layers.types.local.attention.window": W}),
    # One layer: every key then comes from the embeddings, so the cache is exact for dynamic NTK too
    # (deeper layers' keys depend on the base used when their token was processed; see generate.py).
    "rope-dynamic-ntk": ("position=rope", {**DYN_NTK, "model.num_layers": 1}),
}


def _cached_logits(model, tokens_BT, *, int8=False):
    """Prefill P tokens in chunks of 12 (> W: a chunk wraps the ring), then decode the rest one by one."""
    cache = model.init_cache(B, T, int8=int8)
    pre_BPV, cache = generate.prefill(model, tokens_BT[:, :P], cache, chunk=12)
    dec_BNV, cache = generate.decode(model, tokens_BT[:, P:], cache, start=P)
    return jnp.concatenate([pre_BPV, dec_BNV], axis=1), cache


@pytest.mark.parametrize("case", list(CASES))
def test_cached_decoding_matches_full_forward(tiny_config, case):
    arg, overrides = CASES[case]
    model = _model(tiny_config, arg, **overrides)
    tokens_BT = _tokens()
    cached_BTV, cache = _cached_logits(model, tokens_BT)
    if "sliding" in arg or "chunked" in arg:
        sinks = overrides.get("model.attention.sink_tokens", 0)
        assert {layer.slots for layer in cache.layers} == {W + sinks}
        if sinks:  # the sink tokens in their own slots, the ring holding the last W positions
            pos_S = np.asarray(cache.layers[0].pos_BS[0])
            assert pos_S[:sinks].tolist() == list(range(sinks))
            assert sorted(pos_S[sinks:].tolist()) == list(range(T - W, T))
    if "pattern" in arg:  # local layers keep W slots, global ones every token
        assert [layer.slots for layer in cache.layers] == [W if b.attn.variant.mask.max_distance else T
                                                           for b in model.blocks]
        assert {layer.slots for layer in cache.layers} == {W, T}
    ref_BTV = _reference(model, tokens_BT, prefix_rope="dynamic" in case)
    np.testing.assert_allclose(cached_BTV, ref_BTV, atol=1e-5, rtol=0)
    if case == "rope":  # the int8 cache against the f32 one
        int8_BTV, cache = _cached_logits(model, tokens_BT, int8=True)
        layer = cache.layers[0]
        assert layer.k_BSKD.dtype == layer.v_BSKD.dtype == jnp.int8
        assert layer.k_scale_BSK.shape == layer.k_BSKD.shape[:3] and layer.k_scale_BSK.dtype == jnp.float32
        err = float(jnp.abs(int8_BTV - cached_BTV).max())
        assert 0 < err < generate.INT8_LOGIT_ATOL, err


def test_chunked_prefill_equals_one_shot(tiny_config):
    """Sliding window (ring of W = 8 slots) with dynamic NTK beyond its original length (16), two layers."""
    model = _model(tiny_config, "position=rope,attention=sliding", **DYN_NTK)
    tokens_BT = _tokens(seed=1)
    one_BTV, one_cache = generate.prefill(model, tokens_BT, model.init_cache(B, T), chunk=T)
    for chunk in (16, 24):  # neither divides T = 40; both exceed W
        got_BTV, cache = generate.prefill(model, tokens_BT, model.init_cache(B, T), chunk=chunk)
        np.testing.assert_allclose(got_BTV, one_BTV, atol=1e-5, rtol=0, err_msg=f"chunk={chunk}")
        for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(one_cache), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"cache, chunk={chunk}")
    pos_S = np.asarray(one_cache.layers[0].pos_BS[0])  # the ring holds the last W positions, each at slot pos mod W
    assert sorted(pos_S.tolist()) == list(range(T - W, T)) and (pos_S % W == np.arange(W)).all()
    assert (np.asarray(one_cache.layers[0].seg_BS) == 0).all()


def test_ring_buffer_memory_bounded_by_window(tiny_config):
    sliding = _model(tiny_config, "position=rope,attention=sliding")
    for max_len in (T, 1_000_000):
        for int8 in (False, True):
            cache = sliding.init_cache(B, max_len, int8=int8)
            assert all(x.shape[:2] == (B, W) for x in jax.tree.leaves(cache))
            assert cache.layers[0].k_BSKD.shape == (B, W, 2, 8)  # [B, W, kv heads, head_dim]: never repeated to H
    assert _model(tiny_config, "position=rope").init_cache(B, T).layers[0].k_BSKD.shape == (B, T, 2, 8)


def test_sampling_greedy_deterministic_and_top_p_to_zero_is_greedy(tiny_config):
    model = _model(tiny_config, "position=rope")
    prompt_BT = _tokens(seed=3, length=8)
    kw = dict(max_new_tokens=6, chunk=4)
    greedy = generate.generate(model, prompt_BT, temperature=0.0, **kw)
    assert greedy.shape == (B, 6)
    np.testing.assert_array_equal(greedy, generate.generate(model, prompt_BT, temperature=0.0, seed=7, **kw))
    for seed in (0, 1):
        np.testing.assert_array_equal(greedy, generate.generate(model, prompt_BT, temperature=1.0, top_p=1e-6,
                                                                seed=seed, **kw))
    a, b, c = (generate.generate(model, prompt_BT, temperature=1.5, top_p=1.0, seed=s, **kw) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)  # seeded
    assert not np.array_equal(a, c)


def test_top_p_keeps_the_nucleus():
    logits_BV = jnp.log(jnp.asarray([[0.6, 0.3, 0.1]] * 256))
    key = jax.random.key(0)
    assert set(np.asarray(generate.sample_logits(logits_BV, key, 1.0, 0.5)).tolist()) == {0}
    assert set(np.asarray(generate.sample_logits(logits_BV, key, 1.0, 0.8)).tolist()) == {0, 1}
    assert set(np.asarray(generate.sample_logits(logits_BV, key, 1.0, 1.0)).tolist()) == {0, 1, 2}


def test_dsa_raises_a_clear_error(tiny_config):
    model = _model(tiny_config, "attention=dsa")
    with pytest.raises(NotImplementedError, match=r"model\.attention\.name='dsa'"):
        model.init_cache(B, T)
    with pytest.raises(NotImplementedError, match=r"model\.attention\.name='dsa'"):
        generate.generate(model, _tokens(length=4), max_new_tokens=2)


def test_learned_positions_past_the_table_refused(tiny_config):
    model = _model(tiny_config, "position=learned")  # max_seq_len 64
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate.generate(model, _tokens(length=60), max_new_tokens=10)


def test_cli_end_to_end(tiny_config, tmp_path, capsys):
    c = tiny_config()
    c.train.update(steps=2, eval_every=2, log_every=1)
    c.checkpoint.update(every=2)
    train.train(c, tmp_path)
    capsys.readouterr()
    argv = ["--workdir", str(tmp_path), "--prompt", "def main(", "--max_new_tokens", "8", "--chunk", "5"]
    text = generate.main(argv + ["--temperature", "0.8", "--top_p", "0.9", "--seed", "3", "--kv_int8"])
    assert isinstance(text, str) and capsys.readouterr().out == text + "\n"
    run = lambda args: cli.run(lambda a: generate.main(a) and 0, args)  # noqa: E731  (the module's __main__)
    for bad, msg in ((["--top_p", "0"], "error: --top_p=0.0: must be in"), (["--chunk", "0"], "--chunk=0: must be "
                     "positive"), (["--temperature", "-1"], "--temperature=-1.0: must be >= 0")):
        assert run(argv + bad) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        generate.main(argv + ["--nope"])
    assert "unrecognized" in capsys.readouterr().err
    assert run(["--workdir", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err
