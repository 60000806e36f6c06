"""Passkey retrieval, trained: a small model on stdlib text mixed with passkey examples at 256 tokens.

    python -m experiments.sweep --config configs/passkey.py --workdir runs/passkey
    python -m lc_jax.evaluate --workdir runs/passkey/rope

Three examples in four are passkey (landmark format, 5 digits, the key at a
uniform depth); the rest are text. At the training length the model learns to
copy the key (an induction head over the repeated filler and the fact); the
retrieval heatmaps then show where that breaks beyond 256 tokens, per position
scheme. The sweep runs RoPE and ALiBi (and NoPE) with everything else equal.

`get_config(arg)`: position=rope|alibi|nope|..., steps, ratio, seq_len.
CPU-sized: a 1.1M-parameter byte-level model, about 0.4 s a step on 2 cores (10 minutes a member).
"""

from __future__ import annotations

import ml_collections

from configs import base
from lc_jax import evaluate as ev
from lc_jax.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, position="rope", steps=1500, ratio=0.75, seq_len=256)
    c = base.get_config(f"position={a.position}")
    c.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=512, max_seq_len=a.seq_len,
                   vocab_size=259, dtype="float32")
    c.model.attention.update(block_q=a.seq_len, block_k=a.seq_len)
    c.data.update(seq_len=a.seq_len, batch_size=16)
    c.data.synthetic.update(task="passkey", ratio=a.ratio, digits=5)
    c.train.update(steps=a.steps, lr=3e-3, warmup_steps=50, log_every=50, eval_every=max(a.steps // 3, 1),
                   eval_batches=16)
    c.checkpoint.update(every=max(a.steps // 3, 1), keep=1)
    c.eval.update(position_buckets=8, length_multipliers=(1, 2, 4, 8), max_tokens=32768,
                  scalings=("none", "linear", "ntk", "yarn"),
                  retrieval=dict(tasks=("passkey",), depths=5, samples=16, mqar_pairs=(4, 8, 16)))
    return c


def get_sweep() -> list[tuple[str, str]]:
    """(name, arg) for each member: only the position scheme differs."""
    return [("rope", "position=rope"), ("alibi", "position=alibi"), ("nope", "position=nope")]


def evaluate(workdir) -> dict:
    """The whole evaluation suite (per-position loss, extrapolation, passkey heatmap) on the last checkpoint."""
    return ev.run_suite(workdir)
