"""Layer-pattern ablation: which local:global mix, with or without sinks, at equal steps and data.

    python -m experiments.sweep --config configs/ablations/layer_patterns.py --workdir runs/ablate_layers
    python -m experiments.report --workdir runs/ablate_layers --out experiments/results/layer_patterns

Six 6-layer byte-level models that differ only in their per-layer attention and positions
(`model.layers`, lc_jax/layers.py), trained from scratch on stdlib text mixed with passkey examples
(three in four), the key at a uniform depth. At 256 tokens every key lies beyond one window of W = 16 (the
fact and question alone span about 100 tokens): from the key's digits to the answer there are 233, 192, 150,
114 and 80 tokens at the evaluated depths 0%, 25%, 50%, 75% and 100%. The first four are also beyond
num_layers x W = 96, the most a stack of local layers could relay.

- `all_global`: full attention with RoPE in every layer.
- `ratio_3to1`: three sliding-window layers (W) to one global (RoPE everywhere), cut at 6 layers: the fourth
  layer is global.
- `ratio_5to1`: five to one, Gemma 3's ratio: the sixth (last) layer is global.
- `irope`: Llama 4's iRoPE: three chunked layers (chunks of W, RoPE) to one global NoPE layer with
  attention temperature tuning (its floor at the training length, so that it acts beyond it).
- `all_sliding`, `all_sliding_sinks`: every layer a window of W; the second keeps the first 4 tokens of
  each document visible as well (StreamingLLM sink tokens).

Reported (experiments/report.py): text loss by evaluation length (1x, 2x, 4x the training length),
passkey accuracy by depth at those lengths, and the KV cache per token at 128K from the calculator
(`lc_jax.memory`), for the shapes trained here.

`get_config(arg)`: pattern=all_global|ratio_3to1|ratio_5to1|irope|all_sliding|all_sliding_sinks, window,
steps, seq_len. CPU-sized: 1.6M parameters (d=128, 6 layers, 4 heads of 32; the width of configs/passkey.py,
whose 4-layer RoPE model learned the task by step 1000) at 256 tokens, W = 16, 1200 steps.

Why the key is not kept beyond the window in training: with every training key at least 128 tokens from the
question (`data.synthetic.min_distance`), an 8-layer d=96 `all_global` learned to read far keys only; after
1500 steps it found the key at depth 0 (1.00) and 33% (0.25), and never nearer, where it had seen none. With
keys at any depth the same model (GQA, heads of 24) had found none by step 1200.
"""

from __future__ import annotations

import ml_collections

from configs import base
from lc_jax import evaluate as ev
from lc_jax import memory, state
from lc_jax.config import parse_arg

MEMBERS = ("all_global", "ratio_3to1", "ratio_5to1", "irope", "all_sliding", "all_sliding_sinks")


def _layers(name: str, window: int, seq_len: int) -> tuple[str, str, dict]:
    """(model-wide attention name, pattern, types) of one member."""
    local = {"attention": {"name": "sliding", "window": window}}
    glob = {"attention": {"name": "full"}}
    return {
        "all_global": ("full", "", {}),
        "ratio_3to1": ("full", "3*local,global", {"local": local, "global": glob}),
        "ratio_5to1": ("full", "5*local,global", {"local": local, "global": glob}),
        "irope": ("full", "3*local,global", {
            "local": {"attention": {"name": "chunked", "chunk": window}, "position": {"name": "rope"}},
            "global": {"attention": {"name": "full"}, "position": {
                "name": "nope", "temperature_tuning": True, "temperature_floor_scale": seq_len}}}),
        "all_sliding": ("sliding", "", {}),
        "all_sliding_sinks": ("sliding", "", {}),
    }[name]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, pattern="all_global", window=16, steps=1200, seq_len=256)
    if a.pattern not in MEMBERS:
        raise ValueError(f"pattern={a.pattern!r}: allowed values are {list(MEMBERS)}")
    attention, pattern, types = _layers(a.pattern, a.window, a.seq_len)
    c = base.get_config(f"attention={attention}")
    c.model.update(d_model=128, num_layers=6, num_heads=4, num_kv_heads=4, mlp_dim=512, max_seq_len=4 * a.seq_len,
                   vocab_size=259, dtype="float32")
    c.model.attention.update(window=a.window, block_q=128, block_k=128,
                             sink_tokens=4 if a.pattern == "all_sliding_sinks" else 0)
    c.model.layers.pattern = pattern
    c.model.layers.types = types
    c.data.update(seq_len=a.seq_len, batch_size=16)
    c.data.synthetic.update(task="passkey", ratio=0.75, min_distance=0, digits=5)
    c.train.update(steps=a.steps, lr=3e-3, warmup_steps=50, log_every=50, eval_every=max(a.steps // 2, 1),
                   eval_batches=16)
    c.checkpoint.update(every=max(a.steps // 2, 1), keep=1)
    c.eval.update(position_buckets=8, length_multipliers=(1, 2, 4), max_tokens=16384, scalings=("none",),
                  retrieval=dict(tasks=("passkey",), depths=5, samples=8, mqar_pairs=(4, 8, 16)))
    return c


def get_sweep() -> list[tuple[str, str]]:
    """(name, arg) for each member: equal steps, data and model size; only model.layers differs."""
    return [(name, f"pattern={name}") for name in MEMBERS]


def evaluate(workdir) -> dict:
    """The evaluation suite (text loss by length, passkey by depth x length) and the calculator's KV cache."""
    results = ev.run_suite(workdir)
    config = state.load_config(workdir)
    shape = memory.from_config(config, name=str(workdir))
    context = 131072
    results["kv_cache"] = {"context": context, "bytes_per_token": memory.kv_cache_bytes(shape, context) / context,
                           "describe": shape.describe()}
    return results
