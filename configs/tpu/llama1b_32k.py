"""A ~1B-parameter byte-level model at 32K tokens on a v5p slice, with 4-way context parallelism.

    python -m lc_jax.aot --config configs/tpu/llama1b_32k.py             # compile for v5p:2x2x2, no TPU needed
    python -m lc_jax.train --config configs/tpu/llama1b_32k.py --workdir gs://bucket/runs/1b_32k   # on the slice

16 layers of d_model 2048 (16 query / 8 kv heads of 128, SwiGLU 8192), RoPE. The 8 chips
split as fsdp 2 x context 4: each ring of 4 chips holds one 32K sequence, 8K tokens per chip,
zig-zag balanced. `:local` is the same structure at toy size (compiles in seconds).
"""

from __future__ import annotations

import ml_collections

from configs.tpu.common import shrink, tpu_config
from lc_jax.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, local=False)
    c = tpu_config(topology="v5p:2x2x2", local=a.local)
    c.model.update(vocab_size=384, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8, head_dim=128,
                   mlp_dim=8192, max_seq_len=32768)
    c.data.update(seq_len=32768, batch_size=2)
    c.mesh.update(context=4)
    return shrink(c) if a.local else c
