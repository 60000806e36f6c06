"""A seconds-long CPU run (2 layers of width 32 at 64 tokens): smoke tests and the fault-injection suite."""

from __future__ import annotations

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config(arg)
    c.model.update(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                   max_seq_len=64, dtype="float32")
    c.model.attention.update(window=16, block_q=16, block_k=16)
    c.data.update(seq_len=64, batch_size=8, max_docs=12)
    c.train.update(steps=6, lr=1e-3, warmup_steps=2, log_every=2, eval_every=3, eval_batches=1, progress=False)
    c.checkpoint.update(every=3, keep=5)
    c.eval.position_buckets = 4
    return c
