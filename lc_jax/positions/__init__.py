"""Position schemes, looked up by the name in `config.model.position.name`."""

from __future__ import annotations

from lc_jax import fields as fields_lib
from lc_jax.positions.alibi import ALiBi
from lc_jax.positions.base import PositionScheme
from lc_jax.positions.hf import from_hf, preset, to_hf
from lc_jax.positions.learned import Learned
from lc_jax.positions.nope import NoPE
from lc_jax.positions.rope import RoPE
from lc_jax.positions.sinusoidal import Sinusoidal

__all__ = ["REGISTRY", "PositionScheme", "build", "check", "fields", "from_hf", "preset", "to_hf"]

REGISTRY: dict[str, type[PositionScheme]] = {
    "nope": NoPE,
    "learned": Learned,
    "sinusoidal": Sinusoidal,
    "rope": RoPE,
    "alibi": ALiBi,
}


def fields() -> dict:
    """Every scheme's fields with their defaults: `model.position` holds them all."""
    return fields_lib.union(REGISTRY, "model.position")


def check(cfg, *, head_dim: int | None) -> list[str]:
    """Problems with `model.position`: the name, the chosen scheme's own checks, and a method picked for a
    scheme that is not in use (a field dict with a `name`, e.g. `scaling.name='yarn'` under ALiBi).

    Plain values of other schemes are ignored, so that a sweep over `name` can share them.
    """
    if cfg.name not in REGISTRY:
        return [f"model.position.name={cfg.name!r}: allowed values are {list(REGISTRY)}"]
    cls = REGISTRY[cfg.name]
    p = cls.check(cfg, head_dim=head_dim)
    for key, default in fields().items():
        if key in cls.FIELDS or not isinstance(default, dict) or "name" not in default:
            continue
        if cfg[key]["name"] != default["name"]:
            owners = [n for n, c in REGISTRY.items() if key in c.FIELDS]
            p.append(f"model.position.{key}.name={cfg[key]['name']!r} needs model.position.name in {owners} "
                     f"(got {cfg.name!r}); leave it {default['name']!r}")
    return p


def build(cfg, **dims):
    """Instantiate `cfg.name` with its own fields from `cfg` plus the model dimensions its constructor names
    (of num_heads, head_dim, d_model, max_seq_len, param_dtype, rngs)."""
    return fields_lib.build(REGISTRY, cfg, "model.position", **dims)
