"""The memory / cost calculator: hand-computed bytes and FLOPs, parameter counts against built models, the CLI."""

from __future__ import annotations

import itertools
import json

import ml_collections
import numpy as np
import pytest

from lc_jax import attention, memory
from lc_jax.attention import Cost
from lc_jax.memory import CalculatorError, ModelShape
from lc_jax.model import count_params
from lc_jax.state import build_model
from pallas_kernels.flash_attention.masks import Mask

L8B = memory.PRESETS["llama3.1-8b"]


def tiny(layers=1, heads=2, kv=1, dim=4, **kw) -> ModelShape:
    return ModelShape(name="tiny", num_layers=layers, d_model=8, num_heads=heads, num_kv_heads=kv, head_dim=dim,
                      mlp_dim=16, vocab_size=32, **kw)


def sliding(window):
    return Cost(label=f"sliding window {window}", mask=Mask(window=window))


def dsa_cost(topk, index_heads, index_dim, d_model=8, num_heads=2):
    """The DSA variant's own cost, from its declared fields."""
    cfg = ml_collections.ConfigDict(attention.fields() | {"name": "dsa"})
    cfg.dsa.update(topk=topk, index_heads=index_heads, index_dim=index_dim)
    return attention.cost(cfg, d_model=d_model, num_heads=num_heads)


# ----------------------------------------------------------------------------- bytes


def test_llama_8b_128k_bf16_counts_k_and_v():
    # 2 (K and V) x 32 layers x 8 KV heads x 128 dims x 131072 tokens x 2 bytes = 16 GiB = 17.18 GB
    b = memory.kv_cache_bytes(L8B, 131072, dtype="bf16")
    assert b == 2 * 32 * 8 * 128 * 131072 * 2 == 17_179_869_184 == 16 * memory.GiB
    assert round(b / memory.GB, 2) == 17.18
    assert memory.kv_cache_bytes(L8B, 131072, batch=4, dtype="f32") == 4 * 2 * b


def test_llama_70b_and_param_counts():
    m70 = memory.PRESETS["llama3.1-70b"]
    assert memory.kv_cache_bytes(m70, 131072) == 2 * 80 * 8 * 128 * 131072 * 2 == 40 * memory.GiB
    # Published totals: 8.03B, 70.6B, 405.9B (untied embeddings).
    assert memory.num_params(L8B) == 8_030_261_248
    assert memory.num_params(m70) == 70_553_706_496
    assert memory.num_params(memory.PRESETS["llama3.1-405b"]) == 405_853_388_800
    assert memory.weight_bytes(L8B, "bf16") == 2 * 8_030_261_248
    assert memory.weight_bytes(L8B, "fp8") == memory.weight_bytes(L8B, "int8") == 8_030_261_248


def test_int8_kv_adds_one_f32_scale_per_token_and_kv_head_for_k_and_v():
    elements = 2 * 32 * 8 * 128 * 131072  # 1 byte each
    scales = 2 * 32 * 8 * 131072 * 4  # K and V, per layer, per (token, kv head), f32
    assert memory.kv_cache_bytes(L8B, 131072, kv_quant="int8") == elements + scales == 8_858_370_048
    assert memory.kv_cache_bytes(L8B, 131072, dtype="f32", kv_quant="int8") == elements + scales  # dtype ignored


def test_chunked_cache_is_bounded_by_the_chunk():
    chunked = Cost(mask=Mask(chunk=16))
    assert memory.cached_tokens(chunked, 1000) == 16 and memory.cached_tokens(chunked, 10) == 10


def test_sliding_window_cache_is_bounded_by_the_window():
    m = tiny(layers=2, kv=2, attention=(sliding(16),))
    per_token = 2 * 2 * 2 * 4 * 2  # K and V x layers x kv heads x dims x bf16
    assert memory.kv_cache_bytes(m, 10) == 10 * per_token
    assert memory.kv_cache_bytes(m, 16) == memory.kv_cache_bytes(m, 1 << 20) == 16 * per_token
    assert memory.cached_tokens(m.attention[0], 1000) == 16


def test_a_pattern_of_layer_types_sums_each_type():
    # 5 layers of (sliding 16, full) repeated: sliding, full, sliding, full, sliding.
    m = tiny(layers=5, kv=2, attention=(sliding(16), Cost()))
    assert [(c.label, n) for c, n in m.layer_types()] == [("sliding window 16", 3), ("full attention", 2)]
    per_token_layer = 2 * 2 * 4 * 2  # K and V x kv heads x dims x bf16
    assert memory.kv_cache_bytes(m, 1000) == (3 * 16 + 2 * 1000) * per_token_layer
    assert memory.attention_flops(m, 40) == (3 * memory.attention_flops(tiny(attention=(sliding(16),)), 40)
                                             + 2 * memory.attention_flops(tiny(), 40))
    assert "3 x sliding window 16, 2 x full attention" in m.describe()


# ----------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("causal,window,chunk,sinks", list(itertools.product(
    [True, False], [None, 1, 3, 20], [None, 4, 16], [None, 2])))
def test_counted_pairs_are_what_the_mask_lets_through(causal, window, chunk, sinks):
    # Mask.pairs (the calculator's count) against Mask.visible (what every kernel uses), whole chunks and a
    # partial one, with sink tokens, and with a top-k cap of k keys per query.
    mask = Mask(causal=causal, window=window, chunk=chunk, sink_tokens=sinks)
    for T in (1, 2, 5, 9, 40):
        t = np.arange(T)
        per_query = np.asarray(mask.visible(t[:, None], t[None, :])).sum(1)
        assert mask.pairs(T) == per_query.sum()
        assert mask.pairs(T, keys_per_query=3) == np.minimum(per_query, 3).sum()


def test_attention_flops_by_hand():
    # 1 layer, 2 heads of 4 dims, T = 4 causal: 1+2+3+4 = 10 visible pairs; QK^T and PV are each 4 multiply-adds
    # per pair per head = 8 flops, so 16 per pair per head, 32 per pair: 320.
    assert memory.attention_flops(tiny(), 4) == 320
    assert memory.attention_flops(tiny(), 4, causal=False) == 16 * 32
    # Sliding W = 2: 1+2+2+2 = 7 pairs.
    assert memory.attention_flops(tiny(attention=(sliding(2),)), 4) == 7 * 32
    # DSA k = 2, indexer 1 head x 3 dims: main 7 pairs x 32 = 224; indexer 10 causal pairs x 2 x 1 x (3 + 1) = 80.
    dsa = tiny(attention=(dsa_cost(topk=2, index_heads=1, index_dim=3),))
    assert memory.attention_flops(dsa, 4) == 224 + 80
    assert memory.attention_flops(dsa, 4, sparse=False) == 320 + 80
    # Its cache keeps the indexer keys too: d_I = 3 per token and layer, beside K and V.
    assert memory.extra_cache_bytes(dsa, 4, dtype="f32") == 3 * 4 * 4
    # Two layers double it; training is 6 x matmul params x tokens + 3 x attention.
    assert memory.attention_flops(tiny(layers=2), 4) == 640
    m = tiny()
    assert memory.matmul_params(m) == memory.num_params(m) - 32 * 8 - 3 * 8  # no input embedding, no norms
    assert memory.total_train_flops(m, 4, sequences=3) == 3 * (6 * memory.matmul_params(m) * 4 + 3 * 320)


def test_llama_8b_attention_flops_at_128k():
    T = 131072
    assert memory.attention_flops(L8B, T) == 32 * 4 * 32 * 128 * T * (T + 1) // 2  # ~4.5 PFLOPs per sequence


# ----------------------------------------------------------------------------- against the real model


@pytest.mark.parametrize("arg,overrides", [
    ("attention=full", {}),
    ("attention=full", {"model.tie_embeddings": True}),
    ("attention=dsa", {"model.attention.dsa.index_heads": 2, "model.attention.dsa.index_dim": 8,
                       "model.attention.dsa.index_rope_dim": 4, "model.attention.dsa.topk": 8}),
    ("attention=sliding,position=learned", {}),
    ("attention=chunked", {"model.attention.sinks": True}),
])
def test_param_count_matches_the_built_model(tiny_config, arg, overrides):
    config = tiny_config(arg, **overrides)  # d_model 32, 2 layers, 4 heads, 2 kv heads, mlp 64, vocab 259
    shape = memory.from_config(config)
    assert memory.num_params(shape) == count_params(build_model(config))
    name = arg.split(",")[0].split("=")[1]
    assert shape.describe().endswith({"full": "full attention", "sliding": "sliding window 16", "dsa": "DSA top-8, "
                                      "indexer 2 x 8", "chunked": "chunked local attention, chunks of 8192"}[name])


# ----------------------------------------------------------------------------- CLI


def test_cli_table(capsys):
    assert memory.main(["--model", "llama3.1-8b", "--context", "8K,32768,128K"]) == 0
    out = capsys.readouterr().out
    assert "GB = 10^9 bytes, GiB = 2^30 bytes" in out
    assert "KV cache GB" in out and "KV cache GiB" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("8,192", "32,768", "131,072"))]
    assert [r[0] for r in rows] == ["8,192", "32,768", "131,072"]
    assert rows[-1][3:5] == ["17.18", "16.00"]  # KV cache GB, GiB at 128K


def test_cli_json_and_config_file(capsys):
    assert memory.main(["--model", "llama3.1-70b", "--context", "128K", "--kv-quant", "int8", "--batch", "2",
                        "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rows"][0]["kv_cache_bytes"] == 2 * (2 * 80 * 8 * 131072 * (128 + 4))
    assert rep["kv_quant"] == "int8" and rep["units"]["GiB"] == "2^30 bytes"

    assert memory.main(["--model", "configs/base.py:attention=sliding", "--config.model.attention.window=512",
                        "--context", "1M", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["attention"] == ["sliding window 512"] and rep["rows"][0]["cached_tokens"] == [512]
    assert rep["rows"][0]["kv_cache_bytes"] == 2 * 8 * 2 * 64 * 512 * 2


def test_parse_contexts():
    assert memory.parse_contexts("8192, 32k,128K,1M") == [8192, 32768, 131072, 1 << 20]


@pytest.mark.parametrize("argv,needle", [
    (["--model", "llama9", "--context", "8K"], "llama3.1-8b"),  # unknown preset lists the presets
    (["--model", "llama3.1-8b", "--context", "8Q"], "--context"),
    (["--model", "llama3.1-8b", "--context", "0"], "--context"),
    (["--model", "llama3.1-8b", "--context", "8K", "--dtype", "fp4"], "'bf16', 'f32', 'f16', 'fp8', 'int8'"),
    (["--model", "llama3.1-8b", "--context", "8K", "--kv-quant", "int4"], "--kv-quant"),
    (["--model", "llama3.1-8b", "--context", "8K", "--batch", "-1"], "--batch"),
    (["--model", "llama3.1-8b", "--context", "8K", "--config.model.d_model=8"], "preset"),
    (["--model", "configs/base.py", "--context", "8K", "--config.model.nope=1"], "--config.model.nope"),
    (["--model", "configs/base.py", "--context", "8K", "--config.model.d_model=big"], "int"),
    (["--model", "configs/base.py:bogus=1", "--context", "8K"], "bogus"),
])
def test_cli_errors_name_the_flag(capsys, argv, needle):
    assert memory.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err


def test_function_errors():
    with pytest.raises(CalculatorError, match="kv_quant"):
        memory.kv_cache_bytes(L8B, 8, kv_quant="int4")
    with pytest.raises(CalculatorError, match="allowed values"):
        memory.weight_bytes(L8B, "int3")
    with pytest.raises(CalculatorError, match="num_kv_heads"):
        tiny(heads=3, kv=2)
    with pytest.raises(CalculatorError, match="context"):
        memory.attention_flops(L8B, 0)


def test_train_memory_state_is_exact_and_the_rest_follows_tokens_per_chip():
    # The 8B shape on 64 chips, fsdp 4 x context 16: each chip holds a quarter of the f32 parameters and of
    # both AdamW moments (replicated over the ring), and 4 sequences x 128K tokens / (4 x 16) = 8K tokens.
    run = memory.TrainRun(seq_len=131072, batch=4, mesh=dict(data=1, fsdp=4, tensor=1, context=16))
    mem = memory.train_memory(L8B, run)
    assert run.tokens_per_chip == 8192
    assert mem["parameters"] == 8_030_261_248 * 4 // 4 and mem["optimizer"] == 2 * mem["parameters"]
    assert mem["logits"] == 8192 * 128256 * 4 * memory.LOGIT_COPIES
    assert mem["total"] == mem["arguments"] + mem["temporaries"] + mem["program"]
    # Twice the tokens per chip (half the ring): the state stays, the activation terms double.
    half = memory.train_memory(L8B, memory.TrainRun(seq_len=131072, batch=4, mesh=dict(fsdp=4, context=8)))
    assert half["arguments"] == mem["arguments"]
    assert half["saved_activations"] == 2 * mem["saved_activations"] and half["logits"] == 2 * mem["logits"]
    with pytest.raises(CalculatorError, match="does not split"):
        memory.TrainRun(seq_len=1000, batch=4, mesh=dict(fsdp=4, context=16))
    # A variant's own temporaries (here a top-k selection of 2048 per token) scale with tokens and its layers.
    dsa8b = ModelShape(**{**vars(L8B), "attention": (dsa_cost(2048, 64, 128, d_model=4096, num_heads=32),)})
    extras = memory.train_memory(dsa8b, run)["attention_extras"]
    assert mem["attention_extras"] == 0 and extras == 32 * 8192 * dsa8b.attention[0].train_bytes_per_token > 0


def test_train_cli(capsys):
    assert memory.main(["--model", "configs/tpu/llama1b_32k.py", "--train"]) == 0
    out = capsys.readouterr().out
    assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 1, 'context': 4}" in out and "v5p:2x2x2" in out
    assert memory.main(["--model", "configs/tpu/llama1b_32k.py", "--train", "--topology", "v9:2"]) == 2
    assert "topology='v9:2'" in capsys.readouterr().err
    assert memory.main(["--model", "llama3.1-8b", "--train"]) == 2
    assert "needs a config file" in capsys.readouterr().err


@pytest.mark.parametrize("name, per_layer_token, layers", [
    # (K + V) x kv heads x head dim x 2 bytes per token and layer; (layer count, slots) per layer type.
    ("gemma3-27b", 2 * 16 * 128 * 2, [(52, 1024), (10, None)]),  # 5 sliding (W=1024) : 1 global of 62
    ("llama4-scout", 2 * 8 * 128 * 2, [(36, 8192), (12, None)]),  # 3 chunked (8192) : 1 global NoPE of 48
    ("gpt-oss-120b", 2 * 8 * 64 * 2, [(18, 128), (18, None)]),  # sliding (W=128) and full, alternating
])
def test_hybrid_presets_count_each_layer_types_cache(name, per_layer_token, layers):
    model = memory.PRESETS[name]
    for context in (4096, 32768, 131072):
        want = sum(n * per_layer_token * (context if slots is None else min(context, slots)) for n, slots in layers)
        assert memory.kv_cache_bytes(model, context) == want, (name, context)
    # At 128K the bounded layers hold what they see, the global ones everything: Gemma 3 27B 11.17 GB in bf16.
    assert round(memory.kv_cache_bytes(memory.PRESETS["gemma3-27b"], 131072) / 1e9, 2) == 11.17
