"""Chunked local attention (Llama 4's local layers, "iRoPE"): a query sees the earlier keys of its own chunk.

A document's positions are cut into chunks of C tokens, so the query at position p sees the keys at
C * floor(p / C) .. p: the first query of a chunk sees itself alone, the last one C keys. Unlike a sliding
window the span restarts at every chunk boundary. The mask is `masks.Mask(chunk=C)`: every implementation
and the ring skip the blocks that lie in other chunks, so the cost is O(T * C), and a KV cache keeps C slots.
"""

from __future__ import annotations

import dataclasses

from lc_jax import fields
from lc_jax.attention.base import AttentionVariant, Cost
from pallas_kernels.flash_attention.masks import Mask


class Chunked(AttentionVariant):
    FIELDS = dict(
        AttentionVariant.FIELDS,
        chunk=8192,  # C: tokens per chunk (Llama 4 Scout / Maverick: 8192)
        sink_tokens=0,  # N: the first N tokens of each document stay visible from every chunk
    )

    @classmethod
    def check(cls, cfg, **kw) -> list[str]:
        return (super().check(cfg, **kw) + fields.positive("model.attention.chunk", cfg.chunk)
                + fields.positive("model.attention.sink_tokens", cfg.sink_tokens, zero_ok=True))

    @classmethod
    def cost(cls, cfg, **dims) -> Cost:
        sinks = f" + {cfg.sink_tokens} sink tokens" if cfg.sink_tokens else ""
        return dataclasses.replace(super().cost(cfg, **dims),
                                   label=f"chunked local attention, chunks of {cfg.chunk}{sinks}",
                                   mask=Mask(causal=True, chunk=cfg.chunk, sink_tokens=cfg.sink_tokens or None))

    def __init__(self, *, chunk: int, sink_tokens: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.mask = Mask(causal=True, chunk=chunk, sink_tokens=sink_tokens or None)
