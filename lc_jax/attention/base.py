"""The interface every attention variant implements.

A variant decides *which* keys each query sees (and may own parameters, as the
DSA indexer does); the arithmetic goes through `lc_jax.ops.attention`.

A variant also describes itself to the layers above, so that training, evaluation,
generation and the calculators never name it: its config fields and their checks
(`FIELDS`, `check`), its stage schedule (`STAGES`, `stage_at`: one compiled train step
per stage), the auxiliary values it returns and which of them are losses
(`__call__` returns `(out, aux)`; `aux_losses`), the parameters it trains with their
own optimizer (`optimizer_groups`, `frozen_until`), and whether it can attend from a
KV cache (`CACHE`) or run as a ring over the context axis (`RING`), and what one of its
layers costs (`cost`: the terms the memory calculator sums).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
from flax import nnx

from lc_jax import fields, ops
from pallas_kernels.flash_attention import tpu as flash_tpu
from pallas_kernels.flash_attention.masks import CAUSAL, Mask
from pallas_kernels.flash_attention.xla import BlockSizes


@dataclasses.dataclass(frozen=True)
class Cost:
    """What one attention layer costs beyond its q/k/v/o projections, in the terms `lc_jax.memory` sums.

    A variant fills in its own (`AttentionVariant.cost`), so the calculator needs no knowledge of any variant.
    """

    label: str = "full attention"
    #: Which keys a query sees: `mask.pairs` are the score and mixing FLOPs, `mask.max_distance + 1` the KV
    #: cache's slots when it is bounded.
    mask: Mask = CAUSAL
    #: A top-k selection: each query mixes at most this many of its visible keys (None: all of them).
    keys_per_query: int | None = None
    #: Parameters one layer adds, by group (e.g. {"sinks": H}), and how many of them are not multiplied per
    #: token (scales, biases, sink logits: elementwise, so outside the 6 x params x tokens of training FLOPs).
    params: tuple[tuple[str, int], ...] = ()
    elementwise_params: int = 0
    #: Elements a KV cache keeps per token beside K and V (e.g. an indexer's keys), in the cache's dtype.
    cache_per_token: int = 0
    #: Forward FLOPs per visible (query, key) pair beside QK^T and PV (e.g. an indexer's scoring).
    flops_per_pair: int = 0
    #: Training temporaries per token alive at the step's peak, in bytes, beside what every layer keeps.
    train_bytes_per_token: int = 0


class AttentionVariant(nnx.Module):
    #: The variant's own fields under `model.attention`, with their defaults (`name` aside); these three
    #: every variant has. `lc_jax.attention.build` hands a variant only its own.
    FIELDS: ClassVar[dict[str, Any]] = dict(
        impl="auto",  # auto | xla | pallas | reference | cudnn (lc_jax/ops.py)
        block_q=256,  # query / key block of the blockwise kernels (Pallas TPU: multiples of 128)
        block_k=512,
        # Learned attention sinks (gpt-oss): one logit per head for a key every query sees and that carries no
        # value, so a head can attend to nothing (ops.with_sinks; every implementation that returns the lse).
        sinks=False,
    )
    #: Whether the variant runs under context parallelism (ring attention over `mesh.context`).
    RING: ClassVar[bool] = True
    #: Whether the variant can attend from a KV cache (keys whose hidden states are gone).
    CACHE: ClassVar[bool] = True
    #: The stages of training, in order; each gets its own compiled train and eval step.
    STAGES: ClassVar[tuple[str, ...]] = ("main",)
    #: Which keys a query sees (`masks.Mask`, from positions and segments); variants set their own. KV caches
    #: keep `mask.max_distance + 1` slots when it is bounded.
    mask: Mask = CAUSAL

    @classmethod
    def check(cls, cfg, *, head_dim: int | None, itemsize: int | None, vmem_bytes: int | None) -> list[str]:
        """One line per problem with this variant's fields in `cfg` (`model.attention`); [] when usable.

        The blocks must suit the kernel that will run: multiples of 128 for the Pallas TPU kernel, and with
        `vmem_bytes` (the chip a run compiles for) small enough for its VMEM. `head_dim` and `itemsize`
        (the compute dtype's) are None when the model's own fields are invalid.
        """
        why = ops.check_impl(cfg.impl)
        p = [] if why is None else [f"model.attention.impl={why}"]
        impls = ops.names(cfg.impl) if why is None else []
        tpu_kernel = bool({"pallas", "pallas-tpu"} & set(impls)) or ("auto" in impls and bool(vmem_bytes))
        blocks_ok = True
        for f in ("block_q", "block_k"):
            bad = fields.positive(f"model.attention.{f}", cfg[f])
            if not bad and tpu_kernel and cfg[f] % 128:
                bad = [f"model.attention.{f}={cfg[f]}: the Pallas TPU kernel needs a multiple of 128"]
            blocks_ok &= not bad
            p += bad
        if vmem_bytes and blocks_ok and head_dim and itemsize and tpu_kernel:
            try:
                flash_tpu.check_vmem(cfg.block_q, cfg.block_k, head_dim, head_dim, itemsize, vmem_bytes,
                                     where="model.attention.")
            except ValueError as e:
                p.append(str(e))
        return p

    @classmethod
    def stage_at(cls, cfg, step: int) -> str:
        """The stage after `step` steps of this run's own optimizer (a continued run counts from its start)."""
        return cls.STAGES[0]

    @classmethod
    def aux_losses(cls, cfg) -> dict[str, float]:
        """The auxiliary values (keys of `__call__`'s aux) that enter the training objective, with their weights."""
        return {}

    @classmethod
    def optimizer_groups(cls, cfg) -> dict[str, tuple[float, float]]:
        """Parameters trained by an AdamW of their own: module attribute name -> (lr, weight_decay); lr 0 means
        `train.lr`. Everything else is the main group."""
        return {}

    @classmethod
    def cost(cls, cfg, *, d_model: int, num_heads: int) -> Cost:
        """One layer's cost for the calculator (`Cost`); variants replace the fields they change."""
        del d_model  # the base variant adds no projection of its own
        sinks = num_heads if cfg.get("sinks", False) else 0  # one sink logit per head: elementwise
        return Cost(params=(("sinks", sinks),) if sinks else (), elementwise_params=sinks)

    @classmethod
    def frozen_until(cls, cfg) -> int:
        """Steps during which the main group's learning rate is 0 (a retrofit that trains only its own groups)."""
        return 0

    def __init__(self, *, impl: str = "auto", block_q: int = 256, block_k: int = 512, sinks: bool = False,
                 num_heads: int = 1, param_dtype=jnp.float32):
        self.impl = impl
        self.block_sizes = BlockSizes(block_q, block_k)
        # Zero sink logits at the start: the sink takes 1 / (visible keys + 1) of each row while scores are ~0.
        self.sinks = nnx.Param(jnp.zeros((num_heads,), param_dtype), out_sharding=("heads",)) if sinks else None

    def __call__(self, q_BTHD, k_BSKD, v_BSKD, *, q_pos_BT, kv_pos_BS, q_seg_BT=None, kv_seg_BS=None,
                 bias=None, x_BTE=None, stage: str | None = None, diagnostics: bool = False):
        """(out_BTHD, aux): aux maps a name to an f32 [sum, count] pair, summed over layers by the model.

        `bias`: the position scheme's (masks.Bias, params [H, P]) pair, or None.
        """
        del x_BTE, stage, diagnostics  # for variants that score keys from the hidden state, or have stages
        bias_fn, params = bias or (None, None)
        return ops.attention(
            q_BTHD, k_BSKD, v_BSKD, q_pos_BT=q_pos_BT, kv_pos_BS=kv_pos_BS, q_seg_BT=q_seg_BT,
            kv_seg_BS=kv_seg_BS, mask=self.mask, bias=bias_fn, bias_params_HP=params, sinks_H=self.sink_logits(),
            impl=self.impl, block_sizes=self.block_sizes,
        ), {}

    def sink_logits(self):
        """The learned sink logits, f32 [H], or None without sinks."""
        return None if self.sinks is None else self.sinks[...].astype(jnp.float32)
