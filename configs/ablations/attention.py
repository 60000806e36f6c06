"""Attention ablation: full vs sliding window (W = k) vs DSA top-k (same k), from scratch at equal steps.

    python -m experiments.sweep --config configs/ablations/attention.py --workdir runs/ablate_attention
    python -m experiments.report --workdir runs/ablate_attention --out experiments/results/attention

The stdlib corpus is mixed with the passkey task (three examples in four), the
key planted at least `min_distance` = num_layers x k tokens before the question:
beyond the sliding window, and beyond what a stack of windowed layers can relay
(each layer reaches W further back), so a sliding-window model cannot see it at
all; DSA can if its indexer learns to select it; full attention always can.
Reported per run (experiments/report.py): validation loss on text, passkey
accuracy (teacher-forced, all digits right), DSA's attention-mass recall
against the oracle top-k, the last-k window and random k, the share of selected
keys older than the window, and the median step time.

`get_config(arg)`: attention=full|sliding|dsa, topk (k = W), steps, warmup (DSA dense steps), ratio,
seq_len. CPU-sized: a 1.1M-parameter byte-level model at 256 tokens with k = W = 32 (the key at least
128 tokens back).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from configs import base
from lc_jax import sharding, state, steps, train
from lc_jax.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, attention="full", topk=32, steps=1500, warmup=300, ratio=0.75, seq_len=256)
    c = base.get_config(f"attention={a.attention}")
    c.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=512, max_seq_len=a.seq_len,
                   vocab_size=259, dtype="float32")
    c.model.attention.update(window=a.topk, block_q=128, block_k=128)
    c.model.attention.dsa.update(topk=a.topk, index_heads=4, index_dim=32, index_rope_dim=16,
                                 warmup_steps=a.warmup, warmup_mode="joint", index_block_q=128, index_block_k=128)
    c.data.update(seq_len=a.seq_len, batch_size=16)
    c.data.synthetic.update(task="passkey", ratio=a.ratio, min_distance=c.model.num_layers * a.topk, digits=5)
    c.train.update(steps=a.steps, lr=3e-3, warmup_steps=50, log_every=50, eval_every=a.steps // 3,
                   eval_batches=16)
    c.checkpoint.update(every=a.steps // 3, keep=1)
    c.eval.position_buckets = 8
    return c


def get_sweep() -> list[tuple[str, str]]:
    """(name, arg) for each member of the sweep: equal k, steps and data."""
    return [
        ("full", "attention=full"),
        ("sliding_32", "attention=sliding"),
        ("dsa_32", "attention=dsa"),
    ]


def evaluate(workdir) -> dict:
    """The ablation's numbers for one finished run: validation metrics of its last checkpoint, and step times.

    The metrics are recomputed from the checkpoint (so a report always uses the
    current evaluation code); step time is the median over the logged windows
    after the DSA warm-up (the same steps for every member), from
    `tokens_per_s` in metrics.jsonl.
    """
    workdir = Path(workdir)
    config = state.load_config(workdir)
    step, params = state.load_params(workdir, config)
    with nnx.use_eager_sharding(False):
        graphdef = nnx.split(nnx.eval_shape(lambda: state.build_model(config)), nnx.Param)[0]
    eval_step, width = steps.make_eval_step(graphdef, config.eval.position_buckets, config.data.seq_len,
                                            stage=state.stage_at(config, step))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "context": 1}, jax.devices()[:1])
    with jax.set_mesh(mesh):
        val, _ = train.run_eval(jax.jit(eval_step), jax.device_put(params, sharding.replicated(mesh)), config, mesh,
                                width)

    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    tokens = config.data.seq_len * config.data.batch_size
    after = config.model.attention.dsa.warmup_steps + config.train.log_every
    timed = [r for r in rows if r["split"] == "train" and r["step"] > after]
    timed = timed or [r for r in rows if r["split"] == "train"][1:] or [r for r in rows if "tokens_per_s" in r]
    step_s = statistics.median(tokens / r["tokens_per_s"] for r in timed)
    return {"step": step, "validation": val, "median_step_s": step_s}
