"""Attention variants, looked up by the name in `config.model.attention.name`."""

from __future__ import annotations

from lc_jax.attention.base import AttentionVariant
from lc_jax.attention.dsa import DSA
from lc_jax.attention.full import Full
from lc_jax.attention.sliding import Sliding

REGISTRY: dict[str, type[AttentionVariant]] = {
    "full": Full,
    "sliding": Sliding,
    "dsa": DSA,
}


def build(cfg, **dims):
    """Instantiate the variant `cfg.name` with its own fields from `cfg` (plus model dims, for DSA)."""
    name = cfg["name"]
    if name not in REGISTRY:
        raise ValueError(f"model.attention.name={name!r} is not one of {sorted(REGISTRY)}")
    own = {k: v for k, v in dict(cfg).items() if k != "name"}
    return REGISTRY[name](**dims, **own)
