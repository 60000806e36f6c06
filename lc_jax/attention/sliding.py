"""Sliding-window causal attention (Longformer / Mistral): query at p sees keys at p-W+1 .. p.

Key blocks entirely outside the window are skipped by the kernels, so cost is
O(T * W) rather than O(T^2).
"""

from __future__ import annotations

import dataclasses

from lc_jax import fields
from lc_jax.attention.base import AttentionVariant, Cost
from pallas_kernels.flash_attention.masks import Mask


class Sliding(AttentionVariant):
    FIELDS = dict(AttentionVariant.FIELDS, window=1024)  # W: a query at p sees keys at p-W+1 .. p

    @classmethod
    def check(cls, cfg, **kw) -> list[str]:
        return super().check(cfg, **kw) + fields.positive("model.attention.window", cfg.window)

    @classmethod
    def cost(cls, cfg, **dims) -> Cost:
        return dataclasses.replace(super().cost(cfg, **dims), label=f"sliding window {cfg.window}",
                                   mask=Mask(causal=True, window=cfg.window))

    def __init__(self, *, window: int, **kwargs):
        super().__init__(**kwargs)
        self.mask = Mask(causal=True, window=window)
