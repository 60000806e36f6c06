"""Hugging Face `rope_scaling` dictionaries <-> lc_jax RoPE configs, and presets of released models.

A released model's `config.json` says how its RoPE is scaled with `rope_theta`,
`max_position_embeddings`, `head_dim` (times `partial_rotary_factor`) and a
`rope_scaling` dictionary whose `rope_type` (older files: `type`) is one of
`linear`, `dynamic`, `yarn` or `llama3`, with that method's field names.
`from_hf` turns those into `model.position` for lc_jax and `to_hf` turns one back,
so that a config can say "Llama-3.1's RoPE" and get exactly the frequencies that
`transformers` (src/transformers/modeling_rope_utils.py) computes for it.

    from lc_jax.positions import hf
    p = hf.preset("llama3.1")           # position config, head_dim 128, 131072 positions
    c.model.position.update(p.position); c.model.head_dim = p.head_dim
"""

from __future__ import annotations

from typing import Any, NamedTuple

from lc_jax.positions import rope_scaling as scalings  # `rope_scaling` is Hugging Face's argument name here

#: Hugging Face rope_type -> lc_jax scaling name.
HF_TO_LC = {"default": "none", "linear": "linear", "dynamic": "dynamic_ntk", "yarn": "yarn", "llama3": "llama3"}
LC_TO_HF = {v: k for k, v in HF_TO_LC.items()}
#: The rope_scaling keys each rope_type reads (transformers' `_validate_*_rope_parameters`).
HF_FIELDS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}


class Preset(NamedTuple):
    position: dict  # for `config.model.position`
    head_dim: int  # the rotated head width the frequencies are defined for
    max_position_embeddings: int


def from_hf(rope_scaling: dict | None, rope_theta: float, head_dim: int, max_position_embeddings: int, *,
            partial_rotary_factor: float = 1.0, layout: str = "half") -> dict:
    """The lc_jax `model.position` dict for a Hugging Face RoPE description.

    Follows transformers' `_compute_*_parameters`: where `original_max_position_embeddings`
    is absent, `max_position_embeddings` is the original length; `beta_fast` / `beta_slow`
    default to 32 / 1; an absent `factor` in yarn is max_position_embeddings / original.
    """
    rs = dict(rope_scaling or {})
    rope_type = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    rs.pop("type", None)
    if rope_type not in HF_TO_LC:
        raise ValueError(f"rope_scaling rope_type={rope_type!r} is not one of {sorted(HF_TO_LC)}")
    unknown = set(rs) - HF_FIELDS[rope_type]
    if unknown:
        raise ValueError(f"rope_scaling {sorted(unknown)} for rope_type={rope_type!r}: "
                         f"allowed keys are {sorted(HF_FIELDS[rope_type])}")
    rot = int(head_dim * partial_rotary_factor)
    if head_dim <= 0 or rot < 2 or rot % 2:
        raise ValueError(f"head_dim={head_dim} x partial_rotary_factor={partial_rotary_factor} = {rot}: "
                         "the rotated width must be a positive even number")
    scaling = dict(scalings.FIELD_DEFAULTS)
    scaling["name"] = HF_TO_LC[rope_type]
    if rope_type != "default":
        original = rs.get("original_max_position_embeddings") or max_position_embeddings
        factor = rs.get("factor")
        if factor is None:
            if rope_type != "yarn":
                raise ValueError(f"rope_scaling for rope_type={rope_type!r} needs 'factor'")
            factor = max_position_embeddings / original
        scaling["factor"] = float(factor)
        if rope_type != "linear":
            scaling["original_max_len"] = int(original)
        for key in ("beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
            if rs.get(key) is not None:
                scaling[key] = float(rs[key])
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            scaling[key] = float(rs.get(key) or 0.0)
        scaling["truncate"] = bool(rs.get("truncate", True))
    return dict(name="rope", theta=float(rope_theta), layout=layout, fraction=float(partial_rotary_factor),
                fraction_mode="rotary_dims", scaling=scaling)


def to_hf(position: Any, max_position_embeddings: int | None = None) -> dict:
    """The inverse of `from_hf`: rope_theta, rope_scaling (None for plain RoPE), max_position_embeddings
    and partial_rotary_factor for an lc_jax `model.position` (dict or ConfigDict).

    `max_position_embeddings` is the model's (extended) length; dynamic NTK stores its
    original length there, as transformers reads it. Scalings without a Hugging Face
    form (ntk, yarn_ratio_ramp, p-RoPE) are an error.
    """
    p = dict(position)
    if p.get("name") != "rope":
        raise ValueError(f"model.position.name={p.get('name')!r}: only 'rope' has a Hugging Face rope_scaling")
    if p.get("fraction_mode", "rotary_dims") != "rotary_dims":
        raise ValueError(f"model.position.fraction_mode={p['fraction_mode']!r}: Hugging Face has only partial "
                         "rotation ('rotary_dims')")
    sc = scalings.resolve(dict(scalings.FIELD_DEFAULTS, **dict(p.get("scaling") or {})))
    name = sc["name"]
    if name not in LC_TO_HF:
        raise ValueError(f"model.position.scaling.name={name!r} has no Hugging Face rope_type; allowed "
                         f"{sorted(LC_TO_HF)}")
    out = {"rope_theta": float(p.get("theta", 10000.0)), "rope_scaling": None,
           "max_position_embeddings": max_position_embeddings,
           "partial_rotary_factor": float(p.get("fraction", 1.0))}
    if name == "none":
        return out
    rs: dict[str, Any] = {"rope_type": LC_TO_HF[name], "factor": float(sc["factor"])}
    if name == "dynamic_ntk":
        out["max_position_embeddings"] = int(sc["original_max_len"])
    elif name in ("yarn", "llama3"):
        rs["original_max_position_embeddings"] = int(sc["original_max_len"])
        if out["max_position_embeddings"] is None:
            out["max_position_embeddings"] = int(sc["original_max_len"] * sc["factor"])
    if name == "llama3":
        rs.update(low_freq_factor=float(sc["low_freq_factor"]), high_freq_factor=float(sc["high_freq_factor"]))
    if name == "yarn":
        rs.update(beta_fast=float(sc["beta_fast"]), beta_slow=float(sc["beta_slow"]))
        rs.update({k: float(sc[k]) for k in ("mscale", "mscale_all_dim", "attention_factor") if sc[k]})
        if not sc["truncate"]:
            rs["truncate"] = False
    out["rope_scaling"] = rs
    return out


#: Released models' RoPE, as their config.json files state it (head_dim: the rotated part).
PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.1-8B config.json
    "llama3.1": dict(rope_theta=500000.0, head_dim=128, max_position_embeddings=131072, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}),
    # Qwen/Qwen2.5-7B-Instruct: config.json plus the rope_scaling its model card adds for 128K
    "qwen2.5-yarn": dict(rope_theta=1000000.0, head_dim=128, max_position_embeddings=32768, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    # Qwen/Qwen3-8B: the model card's YaRN rope_scaling, max_position_embeddings 40960
    "qwen3-yarn": dict(rope_theta=1000000.0, head_dim=128, max_position_embeddings=40960, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    # deepseek-ai/DeepSeek-V3 config.json (qk_rope_head_dim 64: the rotated part of each head);
    # DeepSeek's reference code rotates interleaved pairs
    "deepseek-v3-yarn": dict(rope_theta=10000.0, head_dim=64, max_position_embeddings=163840, layout="interleaved",
                             rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def preset(name: str) -> Preset:
    """A released model's RoPE as an lc_jax position config; frequencies match at `head_dim`."""
    if name not in PRESETS:
        raise ValueError(f"RoPE preset {name!r} is not one of {sorted(PRESETS)}")
    p = dict(PRESETS[name])
    position = from_hf(p["rope_scaling"], p["rope_theta"], p["head_dim"], p["max_position_embeddings"],
                       layout=p.get("layout", "half"))
    return Preset(position, p["head_dim"], p["max_position_embeddings"])
