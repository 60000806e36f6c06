"""A Llama-3.1-8B-shaped model at 128K tokens with ring attention over 16 chips of a v5p-128 slice.

    python -m lc_jax.aot --config configs/tpu/llama8b_128k.py            # compile for v5p:4x4x4, no TPU needed

Llama-3.1-8B's shape (32 layers, d_model 4096, 32 query / 8 kv heads of 128, SwiGLU 14336,
vocab 128256, RoPE base 500000 with the llama3 scaling, factor 8 over 8192), trained here on
byte-level data, so only the first 259 embedding rows see tokens: the point is the memory plan.
The 64 chips split as fsdp 4 x context 16: each ring of 16 chips holds one 128K sequence,
8K tokens per chip. `:local` is the same structure at toy size.
"""

from __future__ import annotations

import ml_collections

from configs.tpu.common import shrink, tpu_config
from lc_jax import positions
from lc_jax.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, local=False)
    c = tpu_config(topology="v5p:4x4x4", local=a.local)
    rope = positions.preset("llama3.1")  # Llama-3.1's RoPE exactly, as transformers computes it
    c.model.update(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                   head_dim=rope.head_dim, mlp_dim=14336, max_seq_len=rope.max_position_embeddings)
    c.model.position.update(rope.position)
    c.data.update(seq_len=131072, batch_size=4)
    c.mesh.update(context=16)
    return shrink(c) if a.local else c
