"""Position-scheme ablation: six schemes trained from scratch at 512 tokens, evaluated at 512..4096.

    python -m experiments.sweep --config configs/ablations/positions.py --workdir runs/ablate_positions
    python -m experiments.report --workdir runs/ablate_positions --out experiments/results/positions

`get_config(arg)` builds one member (arg: position=..., fraction=...); `get_sweep()`
lists the members. RoPE runs are also evaluated with linear, ntk, dynamic_ntk and
yarn applied at evaluation. CPU-sized: a 3M-parameter byte-level model.
"""

from __future__ import annotations

import ml_collections

from configs import base
from lc_jax.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, position="rope", fraction=1.0, steps=250)
    c = base.get_config(f"position={a.position}")
    c.model.update(d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=768, max_seq_len=512,
                   vocab_size=259, dtype="float32")
    c.model.position.fraction = a.fraction
    c.model.attention.update(block_q=256, block_k=256)
    c.data.update(seq_len=512, batch_size=8)
    c.train.update(steps=a.steps, lr=3e-3, warmup_steps=25, log_every=25, eval_every=a.steps, eval_batches=16)
    c.checkpoint.update(every=a.steps, keep=1)
    c.eval.update(position_buckets=16, length_multipliers=(1, 2, 4, 8), max_tokens=65536,
                  scalings=("none", "linear", "ntk", "dynamic_ntk", "yarn"))
    return c


def get_sweep() -> list[tuple[str, str]]:
    """(name, arg) for each member of the sweep."""
    return [
        ("nope", "position=nope"),
        ("learned", "position=learned"),
        ("sinusoidal", "position=sinusoidal"),
        ("rope", "position=rope"),
        ("alibi", "position=alibi"),
        ("rope_partial_0.25", "position=rope,fraction=0.25"),
    ]
