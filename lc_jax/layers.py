"""Per-layer patterns: which attention variant and position scheme each layer uses.

Long-context models now mix layer types: Gemma 3 puts five sliding-window layers (RoPE base 10k) before each
global one (base 1M, linear scaling 8); Llama 4 runs chunked local layers with RoPE and every fourth layer
global without positions; gpt-oss alternates sliding (W=128) and full layers, all with learned sinks.

`model.layers.pattern` lists layer types, each optionally repeated (`"5*local,global"`). The pattern
repeats over the layers and is cut at `model.num_layers` (Gemma 3's 62 layers end on local ones). Empty:
every layer uses `model.attention` and `model.position`, as before patterns existed.

`model.layers.types.<type>` holds what a type changes: `attention` and `position`, each a partial
`model.attention` / `model.position` (e.g. `attention=dict(name="sliding", window=1024)`). Everything a
type does not set comes from the model-wide fields. A type that is not defined there but is named like an
attention variant (`full`, `sliding`, `chunked`, `dsa`) is that variant with the model-wide fields, so
`"5*sliding,full"` works with nothing else set (`configs/base.py:pattern=5*sliding+full` as a config arg,
whose items are split on commas).

A type's position scheme acts inside attention only (RoPE rotates q and k, ALiBi adds a bias, NoPE does
nothing): schemes that add to the input embeddings (learned, sinusoidal) are model-wide, once.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re

import ml_collections

from lc_jax import attention, positions

#: What `model.layers` holds (`lc_jax.config.defaults`).
FIELDS = dict(pattern="", types={})
#: Position schemes a layer type may pick: the ones that act inside attention.
LAYER_POSITIONS = ("nope", "rope", "alibi")

#: The released architectures' patterns (`configs/base.py:pattern=<name>`), with their published windows,
#: chunks and RoPE bases; a config at another scale sets its own (`model.layers.types.local.attention.window`).
PRESETS: dict[str, dict] = {
    # Gemma 3 (tech report, 2025): 5 local : 1 global, W=1024, RoPE base 10k local / 1M global with linear
    # scaling 8 on the global layers for 128K.
    "gemma3": {"pattern": "5*local,global", "types": {
        "local": {"attention": {"name": "sliding", "window": 1024}, "position": {"name": "rope", "theta": 1e4}},
        "global": {"attention": {"name": "full"}, "position": {
            "name": "rope", "theta": 1e6, "scaling": {"name": "linear", "factor": 8.0}}},
    }},
    # Llama 4 Scout / Maverick (iRoPE): chunked local attention (chunks of 8192) with RoPE, every fourth
    # layer global without positions and with attention temperature tuning (floor 8192, scale 0.1).
    "llama4": {"pattern": "3*local,global", "types": {
        "local": {"attention": {"name": "chunked", "chunk": 8192}, "position": {"name": "rope"}},
        "global": {"attention": {"name": "full"}, "position": {"name": "nope", "temperature_tuning": True}},
    }},
    # gpt-oss (model card, 2025): alternating sliding (W=128) and full layers, learned sinks on both.
    "gpt_oss": {"pattern": "local,global", "types": {
        "local": {"attention": {"name": "sliding", "window": 128, "sinks": True}},
        "global": {"attention": {"name": "full", "sinks": True}},
    }},
}


def preset(name: str) -> dict:
    """`model.layers` fields for preset `name` (a copy)."""
    return copy.deepcopy(PRESETS[name])


@dataclasses.dataclass(frozen=True)
class LayerType:
    """One layer type, resolved: its full `model.attention` and `model.position` configs."""

    name: str
    attention: ml_collections.ConfigDict
    position: ml_collections.ConfigDict
    #: The position config differs from `model.position`: the layer gets a scheme of its own.
    own_position: bool


_ITEM = re.compile(r"^(?:(\d+)\s*\*\s*)?([A-Za-z_][A-Za-z0-9_]*)$")


def parse(pattern: str) -> list[str]:
    """'5*local,global' -> ['local'] * 5 + ['global']; ValueError naming the item that does not parse.
    Items are separated by ',' or '+' (the form a `configs/base.py:pattern=5*sliding+full` arg can carry)."""
    names: list[str] = []
    for item in re.split(r"[,+]", pattern):
        m = _ITEM.match(item.strip())
        if not m or (m.group(1) is not None and int(m.group(1)) < 1):
            raise ValueError(f"model.layers.pattern={pattern!r}: item {item.strip()!r} is not 'type' or "
                             "'N*type' (N >= 1), e.g. '5*sliding,full'")
        names += [m.group(2)] * int(m.group(1) or 1)
    return names


def _merge(base: ml_collections.ConfigDict, override) -> ml_collections.ConfigDict:
    out = copy.deepcopy(base)
    for key, value in dict(override).items():
        if isinstance(value, (dict, ml_collections.ConfigDict)) and isinstance(out.get(key), ml_collections.ConfigDict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def types_in(m) -> list[str]:
    """The pattern's type names in order of first use ([] without a pattern)."""
    layers = m.get("layers") or {}
    return list(dict.fromkeys(parse(layers["pattern"]))) if layers.get("pattern") else []


def resolve(m) -> dict[str, LayerType]:
    """Every layer type the pattern uses, resolved against the model-wide fields (one type, 'model', without
    a pattern). Raises ValueError for a type that is neither defined nor an attention variant."""
    if not types_in(m):
        return {"model": LayerType("model", m.attention, m.position, False)}
    defined = dict(m.layers.types)
    out = {}
    for name in types_in(m):
        if name in defined:
            spec = dict(defined[name])
        elif name in attention.REGISTRY:
            spec = {"attention": {"name": name}}
        else:
            known = sorted(set(defined) | set(attention.REGISTRY))
            near = difflib.get_close_matches(name, known, n=1)
            raise ValueError(f"model.layers.pattern={m.layers.pattern!r}: layer type {name!r} is neither in "
                             f"model.layers.types ({sorted(defined)}) nor an attention variant "
                             f"({list(attention.REGISTRY)})" + (f"; did you mean {near[0]!r}?" if near else ""))
        att = _merge(m.attention, spec.get("attention", {}))
        pos = _merge(m.position, spec.get("position", {}))
        out[name] = LayerType(name, att, pos, pos.to_dict() != m.position.to_dict())
    return out


def per_layer(m) -> list[LayerType]:
    """The type of each of the `m.num_layers` layers: the pattern repeated and cut."""
    types = resolve(m)
    names = parse(m.layers.pattern) if types_in(m) else ["model"]
    return [types[names[i % len(names)]] for i in range(m.num_layers)]


def staged_attention(m) -> ml_collections.ConfigDict:
    """The attention config whose variant sets the training stages (DSA: dense warm-up, then sparse; one
    compiled step each): the first layer type whose variant has more than one stage, else model.attention."""
    for t in resolve(m).values():
        if len(attention.REGISTRY[t.attention.name].STAGES) > 1:
            return t.attention
    return m.attention


def check(m, **dims) -> list[str]:
    """Problems with `model.layers` and with each layer type's attention and position fields, each naming
    the type, its layers and the field (`model.layers.types.<type>.attention.window=...`)."""
    layers = m.get("layers") or {}
    pattern = layers.get("pattern", "")
    if not isinstance(pattern, str):
        return [f"model.layers.pattern={pattern!r}: must be a string such as '5*sliding,full' ('' for none)"]
    try:
        types = resolve(m)
    except ValueError as e:
        return [str(e)]
    if not types_in(m):
        return []
    names = parse(pattern)
    p = []
    if len(names) > m.num_layers:
        p.append(f"model.layers.pattern={pattern!r} has {len(names)} layers, more than "
                 f"model.num_layers={m.num_layers}: its last types would never be used")
    staged = {n: t.attention.to_dict() for n, t in types.items() if t.attention.name in attention.REGISTRY
              and len(attention.REGISTRY[t.attention.name].STAGES) > 1}
    if len({str(sorted(a.items())) for a in staged.values()}) > 1:
        p.append(f"model.layers: layer types {sorted(staged)} train in stages with different attention fields; "
                 "one schedule of stages per model: give them the same fields")
    for name, t in types.items():
        where = [i for i in range(m.num_layers) if names[i % len(names)] == name]
        label = f"layer type {name!r} (layers {_ranges(where)})"
        prefix = f"model.layers.types.{name}." if name in layers.get("types", {}) else "model."
        for line in attention.check(t.attention, **dims):
            p.append(f"{label}: {line.replace('model.attention.', prefix + 'attention.')}")
        if t.own_position:
            if t.position.name not in LAYER_POSITIONS:
                p.append(f"{label}: {prefix}position.name={t.position.name!r}: a layer type may use "
                         f"{list(LAYER_POSITIONS)}; learned and sinusoidal positions are added once, to the "
                         "input embeddings (set model.position.name)")
            else:
                for line in positions.check(t.position, head_dim=dims.get("head_dim")):
                    p.append(f"{label}: {line.replace('model.position.', prefix + 'position.')}")
    return p


def _ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, x in enumerate(idx):
        if start is None:
            start = x
        if i + 1 == len(idx) or idx[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)
