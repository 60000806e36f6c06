"""Full causal attention: every earlier key of the same document is visible."""

from __future__ import annotations

from lc_jax.attention.base import AttentionVariant


class Full(AttentionVariant):
    """The base variant as it is: causal attention within each document (`masks.CAUSAL`)."""
