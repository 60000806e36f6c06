"""Sliding-window causal attention (Longformer / Mistral): query at p sees keys at p-W+1 .. p.

Key blocks entirely outside the window are skipped by the kernels, so cost is
O(T * W) rather than O(T^2). `sink_tokens` N keeps the first N tokens of each
document visible beside the window (StreamingLLM, Xiao et al. 2024): O(T * (W + N)).
"""

from __future__ import annotations

import dataclasses

from lc_jax import fields
from lc_jax.attention.base import AttentionVariant, Cost
from pallas_kernels.flash_attention.masks import Mask


class Sliding(AttentionVariant):
    FIELDS = dict(
        AttentionVariant.FIELDS,
        window=1024,  # W: a query at p sees keys at p-W+1 .. p
        sink_tokens=0,  # N: the first N tokens of each document stay visible as well (StreamingLLM)
    )

    @classmethod
    def check(cls, cfg, **kw) -> list[str]:
        return (super().check(cfg, **kw) + fields.positive("model.attention.window", cfg.window)
                + fields.positive("model.attention.sink_tokens", cfg.sink_tokens, zero_ok=True))

    @classmethod
    def cost(cls, cfg, **dims) -> Cost:
        sinks = f" + {cfg.sink_tokens} sink tokens" if cfg.sink_tokens else ""
        return dataclasses.replace(super().cost(cfg, **dims), label=f"sliding window {cfg.window}{sinks}",
                                   mask=Mask(causal=True, window=cfg.window, sink_tokens=cfg.sink_tokens or None))

    def __init__(self, *, window: int, sink_tokens: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.mask = Mask(causal=True, window=window, sink_tokens=sink_tokens or None)
