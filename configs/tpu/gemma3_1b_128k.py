"""A Gemma-3-shaped 1B model at 128K tokens: five sliding-window layers to one global, ring over 8 v5p chips.

    python -m lc_jax.aot --config configs/tpu/gemma3_1b_128k.py      # compile for v5p:2x2x4, no TPU needed

Gemma 3 1B's shape (26 layers, d_model 1152, 4 query heads and 1 KV head of 256, MLP 6912) with its layer
pattern (`pattern=gemma3`, lc_jax/layers.py): local layers see a window of 1024 with RoPE base 10k, every
sixth layer is global with RoPE base 1M and linear scaling 8 (4 global layers of 26). The vocabulary is
lc_jax's byte-level 384, not Gemma's 262K. The 16 chips split as fsdp 2 x context 8 (zig-zag: the global
layers' causal work is balanced; a window layer's ring stops after the step that reaches 1024 back).
`:local` is the same structure at toy size (6 layers, windows of 256).
"""

from __future__ import annotations

import ml_collections

from configs.tpu.common import shrink, tpu_config
from lc_jax import layers
from lc_jax.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, local=False)
    c = tpu_config(topology="v5p:2x2x4", local=a.local)
    c.model.layers = layers.preset("gemma3")
    c.model.update(vocab_size=384, d_model=1152, num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256,
                   mlp_dim=6912, max_seq_len=131072)
    c.data.update(seq_len=131072, batch_size=2)
    c.mesh.update(context=8, context_layout="zigzag")
    if not a.local:
        return c
    c = shrink(c)
    c.model.num_layers = 6  # one whole pattern: five local layers and a global one
    c.model.layers.types.local.attention.window = 256
    return c
