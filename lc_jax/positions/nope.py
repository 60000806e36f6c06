"""NoPE: no explicit positions; causal masking alone carries order (Kazemnejad et al., 2023)."""

from __future__ import annotations

from lc_jax.positions.base import PositionScheme


class NoPE(PositionScheme):
    def __init__(self):
        pass
