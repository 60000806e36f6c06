"""The ~1B model with DSA (top-2048 keys per query, lightning indexer) at 32K tokens on a v5p slice.

    python -m lc_jax.aot --config configs/tpu/dsa1b_32k.py               # the sparse stage, for v5p:2x2x2
    python -m lc_jax.aot --config configs/tpu/dsa1b_32k.py --stage dense  # the dense warm-up

DSA does not run under context parallelism yet, so each of the 8 chips (fsdp 8) holds one
whole sequence. At 64K it does not fit a v5p chip (98 GiB of 96, compiled): the sparse stage's
KL holds [tokens, k, heads] f32 scores, 128 KiB per token per tensor at k = 2048 and 16 heads.
`:local` is the same structure at toy size.
"""

from __future__ import annotations

import ml_collections

from configs.tpu.common import shrink, tpu_config
from lc_jax.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, local=False)
    c = tpu_config(topology="v5p:2x2x2", attention="dsa", local=a.local)
    c.model.update(vocab_size=384, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8, head_dim=128,
                   mlp_dim=8192, max_seq_len=32768)
    c.model.attention.dsa.update(topk=2048, warmup_steps=1000)
    c.data.update(seq_len=32768, batch_size=8)
    c.mesh.update(context=1)
    return shrink(c) if a.local else c
