"""Config fields: what every owner of fields shares (the registries of position schemes and attention
variants, and the validators).

A validator returns the problems it found, one line each, naming the field, the value it got and what is
allowed, so that `lc_jax.config.validate` can gather every problem of a config and report them at once.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable


def union(registry: dict, where: str) -> dict:
    """Every registered class's `FIELDS` with their defaults, merged (the config holds them all, so that a
    sweep can switch `name` and keep the rest); a field two classes share must have one default."""
    out: dict = {}
    for name, cls in registry.items():
        for key, value in cls.FIELDS.items():
            if key in out and out[key] != value:
                raise TypeError(f"{where}: {name} and another disagree on the default of {key!r}")
            out[key] = copy.deepcopy(value)
    return out


def build(registry: dict, cfg, where: str, **dims):
    """Instantiate `registry[cfg.name]` with its own fields from `cfg` plus the dimensions its constructor names."""
    name = cfg["name"]
    if name not in registry:
        raise ValueError(f"{where}.name={name!r} is not one of {sorted(registry)}")
    cls = registry[name]
    takes = {p for c in cls.__mro__ if "__init__" in vars(c) for p in inspect.signature(c.__init__).parameters}
    return cls(**{k: cfg[k] for k in cls.FIELDS}, **{k: v for k, v in dims.items() if k in takes})


def allowed(field: str, value, values: Iterable) -> list[str]:
    values = list(values)
    return [] if value in values else [f"{field}={value!r}: allowed values are {values}"]


def positive(field: str, value, *, zero_ok: bool = False, kind: tuple[type, ...] = (int,)) -> list[str]:
    """`value` is a positive (or with `zero_ok`, non-negative) instance of `kind`; bools never count."""
    if isinstance(value, kind) and not isinstance(value, bool) and (value >= 0 if zero_ok else value > 0):
        return []
    what = "a non-negative" if zero_ok else "a positive"
    return [f"{field}={value!r}: must be {what} {'/'.join(k.__name__ for k in kind)}"]
