"""The interface every attention variant implements.

A variant decides *which* keys each query sees (and may own parameters, as the
DSA indexer will); the arithmetic goes through `lc_jax.ops.attention`.
"""

from __future__ import annotations

from flax import nnx

from lc_jax import ops
from pallas_kernels.flash_attention.masks import Mask
from pallas_kernels.flash_attention.xla import BlockSizes


class AttentionVariant(nnx.Module):
    #: Keys further back than this are never visible (None: unbounded). KV caches read it.
    window: int | None = None

    def __init__(self, *, impl: str = "auto", block_q: int = 256, block_k: int = 512, **_unused):
        self.impl = impl
        self.block_sizes = BlockSizes(block_q, block_k)

    @property
    def mask(self) -> Mask:
        """The visibility every query of this variant starts from (DSA then selects within it)."""
        return Mask(causal=True, window=self.window)

    def __call__(self, q_BTHD, k_BSKD, v_BSKD, *, q_pos_BT, kv_pos_BS, q_seg_BT=None, kv_seg_BS=None,
                 bias=None, x_BTE=None):
        """`bias`: the position scheme's (masks.Bias, params [H, P]) pair, or None."""
        del x_BTE  # Only variants that score keys from the hidden state (DSA) need it.
        bias_fn, params = bias or (None, None)
        return ops.attention(
            q_BTHD, k_BSKD, v_BSKD, q_pos_BT=q_pos_BT, kv_pos_BS=kv_pos_BS, q_seg_BT=q_seg_BT,
            kv_seg_BS=kv_seg_BS, mask=self.mask, bias=bias_fn, bias_params_HP=params,
            impl=self.impl, block_sizes=self.block_sizes,
        )
