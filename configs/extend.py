"""Context extension by continued training (the PI / YaRN recipe) of a finished run.

    python -m lc_jax.train --config configs/extend.py:init_from=runs/quickstart,scaling=yarn,factor=4 \
        --workdir runs/quickstart_yarn4x

Takes the parameters and step of `init_from` (its own config is read from there),
multiplies the sequence length by `factor`, switches RoPE to `scaling` with that
factor and the source's length as the original length, and trains a few hundred
steps with a fresh optimizer at a lower learning rate. Only the model and the step
carry over.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from configs import base
from lc_jax.config import ConfigError, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, init_from="runs/quickstart", scaling="yarn", factor=2.0, steps=200)
    src = Path(a.init_from) / "config.json"
    if not src.exists():
        raise ConfigError([f"init_from={a.init_from!r}: no config.json there; train that run first "
                           "(e.g. make quickstart) or pass init_from=<run dir>"])
    c = base.get_config()
    c.update_from_flattened_dict(_flatten(json.loads(src.read_text())))
    train_len = c.data.seq_len
    new_len = int(train_len * a.factor)
    c.data.seq_len = new_len
    c.data.batch_size = max(1, c.data.batch_size * train_len // new_len)  # same tokens per step
    c.data.curriculum = ""
    c.model.max_seq_len = max(c.model.max_seq_len, new_len)
    c.model.position.scaling.update(name=a.scaling, factor=a.factor, original_max_len=train_len)
    c.train.update(init_from=a.init_from, init_from_step=0, steps=a.steps, lr=c.train.lr / 3, warmup_steps=20,
                   eval_every=a.steps)
    c.checkpoint.update(every=a.steps // 2 or 1)
    return c


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out
