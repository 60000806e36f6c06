"""A few-million-parameter byte-level model at 2048 tokens that learns on 2 CPU cores in minutes."""

from __future__ import annotations

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config(arg)
    c.model.update(d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=768, max_seq_len=2048,
                   vocab_size=259, dtype="float32")
    # 256-wide blocks suit head_dim 64 on CPU (see benchmarks/attention.py).
    c.model.attention.update(block_q=256, block_k=256)
    c.data.update(seq_len=2048, batch_size=2)
    c.train.update(steps=300, lr=3e-3, warmup_steps=30, weight_decay=0.1, log_every=10, eval_every=100,
                   eval_batches=24)
    c.checkpoint.update(every=100, keep=2)
    c.eval.position_buckets = 16
    return c
