"""The base config every run starts from.

Usage: `--config configs/base.py:position=alibi,attention=sliding`, then
`--config.model.d_model=1024` style overrides for values. `arg` picks structure
(big_vision convention); plain fields pick values.

`pattern=` picks per-layer types (lc_jax/layers.py): a released architecture's (`gemma3`, `llama4`,
`gpt_oss`) or a pattern of attention variants, its items joined by '+' (`pattern=5*sliding+full`).

Every field, its default and what it means: `lc_jax.config.defaults()`. The position
schemes and attention variants declare their own fields beside their code (`FIELDS` in
lc_jax/positions/*.py and lc_jax/attention/*.py).
"""

from __future__ import annotations

import ml_collections

from lc_jax import layers
from lc_jax.config import defaults, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, position="rope", attention="full", pattern="")
    c = defaults()
    c.model.position.name = a.position
    c.model.attention.name = a.attention
    if a.pattern in layers.PRESETS:
        c.model.layers = layers.preset(a.pattern)
    else:
        c.model.layers.pattern = a.pattern
    return c
