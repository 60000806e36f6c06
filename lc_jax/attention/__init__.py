"""Attention variants, looked up by the name in `config.model.attention.name`."""

from __future__ import annotations

from lc_jax import fields as fields_lib
from lc_jax.attention.base import AttentionVariant, Cost
from lc_jax.attention.chunked import Chunked
from lc_jax.attention.dsa import DSA
from lc_jax.attention.full import Full
from lc_jax.attention.sliding import Sliding

REGISTRY: dict[str, type[AttentionVariant]] = {
    "full": Full,
    "sliding": Sliding,
    "chunked": Chunked,
    "dsa": DSA,
}


def fields() -> dict:
    """Every variant's fields with their defaults: `model.attention` holds them all."""
    return fields_lib.union(REGISTRY, "model.attention")


def check(cfg, **dims) -> list[str]:
    """Problems with `model.attention`: the name, then the chosen variant's own checks (`AttentionVariant.check`).

    Fields of other variants are ignored, so that a sweep over `name` can share them.
    """
    if cfg.name not in REGISTRY:
        return [f"model.attention.name={cfg.name!r}: allowed values are {list(REGISTRY)}"]
    return REGISTRY[cfg.name].check(cfg, **dims)


def build(cfg, **dims):
    """Instantiate `cfg.name` with its own fields from `cfg` plus the model dimensions its constructor names
    (of d_model, num_heads, num_kv_heads, head_dim, param_dtype, rngs)."""
    return fields_lib.build(REGISTRY, cfg, "model.attention", **dims)


def cost(cfg, *, d_model: int, num_heads: int) -> Cost:
    """One layer of `cfg.name`'s cost in the memory calculator's terms (`AttentionVariant.cost`)."""
    return REGISTRY[cfg.name].cost(cfg, d_model=d_model, num_heads=num_heads)
