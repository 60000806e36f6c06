"""The ~1B model with a 4096-token sliding window at 128K tokens, ring attention over 8 chips of a v6e slice.

    python -m lc_jax.aot --config configs/tpu/sliding1b_128k.py          # compile for v6e:4x4, no TPU needed

Each chip holds 16K tokens of a 128K sequence (contiguous layout: under a window every shard
has the same work, and the ring stops after the one step a 4K window can reach back).
The 16 chips split as fsdp 2 x context 8. `:local` is the same structure at toy size.
"""

from __future__ import annotations

import ml_collections

from configs.tpu.common import shrink, tpu_config
from lc_jax.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, local=False)
    c = tpu_config(topology="v6e:4x4", attention="sliding", local=a.local)
    c.model.update(vocab_size=384, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8, head_dim=128,
                   mlp_dim=8192, max_seq_len=131072)
    c.model.attention.window = 4096
    c.data.update(seq_len=131072, batch_size=2)
    c.mesh.update(context=8, context_layout="contiguous")
    return shrink(c) if a.local else c
