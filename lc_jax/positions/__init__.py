"""Position schemes, looked up by the name in `config.model.position.name`."""

from __future__ import annotations

from lc_jax.positions.alibi import ALiBi
from lc_jax.positions.base import PositionScheme
from lc_jax.positions.hf import from_hf, preset, to_hf
from lc_jax.positions.learned import Learned
from lc_jax.positions.nope import NoPE
from lc_jax.positions.rope import RoPE
from lc_jax.positions.sinusoidal import Sinusoidal

__all__ = ["REGISTRY", "PositionScheme", "build", "from_hf", "preset", "to_hf"]

REGISTRY: dict[str, type[PositionScheme]] = {
    "nope": NoPE,
    "learned": Learned,
    "sinusoidal": Sinusoidal,
    "rope": RoPE,
    "alibi": ALiBi,
}


def build(cfg, *, num_heads: int, head_dim: int, d_model: int, max_seq_len: int, param_dtype, rngs):
    """Instantiate the scheme `cfg.name` with its own fields from `cfg` plus model dimensions."""
    name = cfg["name"]
    if name not in REGISTRY:
        raise ValueError(f"model.position.name={name!r} is not one of {sorted(REGISTRY)}")
    own = {k: v for k, v in dict(cfg).items() if k != "name"}
    return REGISTRY[name](
        num_heads=num_heads, head_dim=head_dim, d_model=d_model, max_seq_len=max_seq_len,
        param_dtype=param_dtype, rngs=rngs, **own,
    )
