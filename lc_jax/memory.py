"""Memory and cost calculator for long-context runs: KV-cache bytes, weight bytes, attention FLOPs.

    python -m lc_jax.memory --model llama3.1-8b --context 8K,32K,128K
    python -m lc_jax.memory --model configs/base.py:attention=sliding --config.model.attention.window=4096 \
        --context 131072 --kv-quant int8 --json

Plans are made before anything is compiled, so the arithmetic here is plain
Python on a `ModelShape`: built from a preset (published Llama-3.1 shapes) or
from any lc_jax config (`configs/*.py[:arg]`). Conventions, stated once:

* Bytes: GB = 10^9 bytes, GiB = 2^30 bytes; the output always names which.
* KV cache: BOTH K and V, 2 x layers x kv_heads x head_dim x tokens x bytes per
  sequence, with tokens = min(context, max_distance + 1) where a layer's mask bounds
  it (sliding window W, chunk C: a ring buffer, as `lc_jax.model.Transformer.cache_slots`). int8 (`kv_quant`) adds
  one f32 scale per (token, kv head, layer) for K and one for V, the granularity
  `lc_jax.model.LayerKV` stores. The position / segment bookkeeping of lc_jax's
  KVCache (8 bytes per slot and layer) is not counted.
* FLOPs: 2 per multiply-add, matmuls only (no softmax, norms, activations).
  Attention counts the exact visible (query, key) pairs of each layer's mask: causal
  T(T+1)/2 (half of T x T), sliding ~T x W, chunked ~T x C / 2; a top-k variant
  mixes ~T x k and adds its own scoring of every visible pair.
* Attention variants: each says what one of its layers adds (`lc_jax.attention.Cost`:
  mask, top-k, parameters, cache, FLOPs per pair, training temporaries), and this
  module sums those terms over the layers without knowing any variant.
* Training FLOPs: 6 x matmul params x tokens (forward 2, backward 4) plus
  3 x the attention forward (backward = 2 x forward); recomputation (remat, flash
  backward) is not counted, as in model-FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from lc_jax import attention, cli
from lc_jax import config as config_lib
from lc_jax import layers as layers_lib
from lc_jax.attention import Cost
from lc_jax.errors import UserError
from pallas_kernels.flash_attention.masks import Mask

GB, GiB = 10**9, 2**30

# Bytes per element. Quantised weight formats are counted by their elements only (no scales).
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "f32": 4, "f16": 2, "fp8": 1, "int8": 1}
DTYPE_ALIASES: dict[str, str] = {"bfloat16": "bf16", "float32": "f32", "float16": "f16", "fp32": "f32",
                                 "fp16": "f16", "float8": "fp8"}
KV_QUANTS = ("int8",)
KV_SCALE_BYTES = 4  # one f32 scale per (token, kv head) for K and for V, per layer


class CalculatorError(UserError, ValueError):
    """A bad input; the message names the flag (or argument) and the values it allows."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The shape numbers that decide memory and FLOPs (an lc_jax decoder: SwiGLU MLP, RMSNorm, GQA).

    What the attention layers add beyond q/k/v/o is each variant's own `lc_jax.attention.Cost`: `attention`
    is a pattern of them that repeats over the layers (layer i has attention[i % len(attention)]).
    """

    name: str
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    vocab_size: int
    tie_embeddings: bool = False
    learned_positions: int = 0  # rows of a learned absolute-position table (0: none)
    attention: tuple[Cost, ...] = (Cost(),)

    def __post_init__(self):
        for f in ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "vocab_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CalculatorError(f"{self.name}: {f}={v!r} must be a positive int")
        if self.num_heads % self.num_kv_heads:
            raise CalculatorError(f"{self.name}: num_heads={self.num_heads} is not divisible by "
                                  f"num_kv_heads={self.num_kv_heads}")
        if not self.attention or not all(isinstance(c, Cost) for c in self.attention):
            raise CalculatorError(f"{self.name}: attention={self.attention!r} must be a non-empty tuple of "
                                  "lc_jax.attention.Cost (one per layer type of the repeating pattern)")

    def layer_types(self) -> list[tuple[Cost, int]]:
        """(cost, number of layers) per distinct attention cost, in the order of first appearance."""
        counts: dict[Cost, int] = {}
        for i in range(self.num_layers):
            c = self.attention[i % len(self.attention)]
            counts[c] = counts.get(c, 0) + 1
        return list(counts.items())

    def describe(self) -> str:
        types = self.layer_types()
        att = types[0][0].label if len(types) == 1 else ", ".join(f"{n} x {c.label}" for c, n in types)
        return (f"{self.name}: {self.num_layers} layers, d_model {self.d_model}, {self.num_heads} heads / "
                f"{self.num_kv_heads} KV heads x {self.head_dim} dims, MLP {self.mlp_dim}, vocab {self.vocab_size}, "
                f"{'tied' if self.tie_embeddings else 'untied'} embeddings, {att}")


def _llama(name: str, layers: int, d: int, heads: int, mlp: int) -> ModelShape:
    return ModelShape(name=name, num_layers=layers, d_model=d, num_heads=heads, num_kv_heads=8, head_dim=128,
                      mlp_dim=mlp, vocab_size=128256, tie_embeddings=False)


def _sliding(window: int, sinks_h: int = 0) -> Cost:
    return Cost(label=f"sliding window {window}" + (" + sinks" if sinks_h else ""), mask=Mask(window=window),
                params=(("sinks", sinks_h),) if sinks_h else (), elementwise_params=sinks_h)


def _full(sinks_h: int = 0) -> Cost:
    return Cost(label="full attention" + (" + sinks" if sinks_h else ""),
                params=(("sinks", sinks_h),) if sinks_h else (), elementwise_params=sinks_h)


_CHUNKED_8192 = Cost(label="chunked local attention, chunks of 8192", mask=Mask(chunk=8192))

# Published shapes (each model's config.json on Hugging Face). Llama-3.1: GQA with 8 KV heads of 128. The
# hybrid ones repeat their layer pattern from layer 0, as their configs do: Gemma 3 27B five sliding-window
# layers (W=1024) then one global (`sliding_window_pattern` 6: 52 local, 10 global of 62); Llama 4 Scout three
# chunked layers (chunks of 8192) then one global NoPE layer (`no_rope_layers` every 4th: 36 and 12 of 48);
# gpt-oss-120b alternating sliding (W=128) and full layers, learned sinks on every head (18 and 18 of 36).
# Only attention and the KV cache are theirs: Scout and gpt-oss are mixtures of experts and Gemma 3 has
# its own norms, which this dense SwiGLU shape does not count, so their parameters and FLOPs are not.
PRESETS: dict[str, ModelShape] = {
    "llama3.1-8b": _llama("llama3.1-8b", 32, 4096, 32, 14336),
    "llama3.1-70b": _llama("llama3.1-70b", 80, 8192, 64, 28672),
    "llama3.1-405b": _llama("llama3.1-405b", 126, 16384, 128, 53248),
    "gemma3-27b": ModelShape(name="gemma3-27b", num_layers=62, d_model=5376, num_heads=32, num_kv_heads=16,
                             head_dim=128, mlp_dim=21504, vocab_size=262208, tie_embeddings=True,
                             attention=(_sliding(1024),) * 5 + (_full(),)),
    "llama4-scout": ModelShape(name="llama4-scout", num_layers=48, d_model=5120, num_heads=40, num_kv_heads=8,
                               head_dim=128, mlp_dim=16384, vocab_size=202048,
                               attention=(_CHUNKED_8192,) * 3 + (_full(),)),
    "gpt-oss-120b": ModelShape(name="gpt-oss-120b", num_layers=36, d_model=2880, num_heads=64, num_kv_heads=8,
                               head_dim=64, mlp_dim=2880, vocab_size=201088,
                               attention=(_sliding(128, 64), _full(64))),
}


def from_config(config: Any, name: str = "config") -> ModelShape:
    """The shape of the model an lc_jax config builds (`config` or `config.model`), without building it."""
    m = config.model if "model" in config else config
    return ModelShape(
        name=name, num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim or m.d_model // m.num_heads, mlp_dim=m.mlp_dim, vocab_size=m.vocab_size,
        tie_embeddings=bool(m.tie_embeddings), learned_positions=m.max_seq_len if m.position.name == "learned" else 0,
        attention=tuple(attention.cost(t.attention, d_model=m.d_model, num_heads=m.num_heads)
                        for t in layers_lib.per_layer(m)),
    )


# ----------------------------------------------------------------------------- parameters and bytes


def param_breakdown(model: ModelShape) -> dict[str, int]:
    """Parameters by group, mirroring the parameter shapes of `lc_jax.model.Transformer` one for one; the
    attention variants' own parameters (`Cost.params`) under their group names."""
    d, L, H, K, D = model.d_model, model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim
    out = {
        "embed": model.vocab_size * d,
        "positions": model.learned_positions * d,
        "attention": L * (d * H * D + 2 * d * K * D + H * D * d),  # wq, wk, wv, wo
    }
    for cost, layers in model.layer_types():
        for group, n in cost.params:
            out[group] = out.get(group, 0) + layers * n
    return out | {
        "mlp": L * 3 * d * model.mlp_dim,  # SwiGLU: w_gate, w_up, w_down
        "norms": (2 * L + 1) * d,  # two RMSNorms per block, one final
        "head": 0 if model.tie_embeddings else d * model.vocab_size,
    }


def num_params(model: ModelShape) -> int:
    """Total parameters; equals `lc_jax.model.count_params` of the built model."""
    return sum(param_breakdown(model).values())


def matmul_params(model: ModelShape) -> int:
    """Parameters multiplied per token (the N of 6ND): blocks and the output head (tied or not).

    The input embedding and learned positions are lookups, and norms and the variants' elementwise
    parameters (`Cost.elementwise_params`) are not matmuls, so they are left out.
    """
    p = param_breakdown(model)
    variants = sum(layers * (sum(n for _, n in c.params) - c.elementwise_params) for c, layers in model.layer_types())
    return p["attention"] + variants + p["mlp"] + model.d_model * model.vocab_size


def dtype_bytes(dtype: str, flag: str = "dtype") -> int:
    """Bytes per element of `dtype` (bf16|f32|f16|fp8|int8, or the long names bfloat16 etc.)."""
    key = DTYPE_ALIASES.get(dtype, dtype)
    if key not in DTYPE_BYTES:
        raise CalculatorError(f"{flag}={dtype!r}: allowed values are {list(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


def weight_bytes(model: ModelShape, dtype: str = "bf16") -> int:
    """Bytes of all parameters stored in `dtype` (element bytes only: no quantisation scales)."""
    return num_params(model) * dtype_bytes(dtype)


def cached_tokens(cost: Cost, context: int) -> int:
    """Tokens one layer's KV cache holds per sequence: min(context, sink tokens + mask.max_distance + 1) when
    the mask bounds how far back a query sees (a sliding window W, a chunk C: a ring buffer, with the sink
    tokens kept beside it), else the context (`Mask.cache_slots`)."""
    _check_context(context)
    return cost.mask.cache_slots(context)


def kv_cache_bytes(model: ModelShape, context: int, batch: int = 1, dtype: str = "bf16",
                   kv_quant: str | None = None) -> int:
    """KV-cache bytes for `batch` sequences of `context` tokens, counting BOTH K and V.

    Per layer 2 x kv_heads x head_dim x tokens x bytes x batch (tokens: `cached_tokens` of its type). With
    kv_quant='int8' the elements take 1 byte each (`dtype` is ignored) and each layer adds one f32 scale per
    (token, kv head) for K and one for V: 2 x kv_heads x tokens x 4 bytes x batch (`lc_jax.model.LayerKV`).
    """
    if kv_quant not in (None, *KV_QUANTS):
        raise CalculatorError(f"kv_quant={kv_quant!r}: allowed values are [None, {', '.join(map(repr, KV_QUANTS))}]")
    if not isinstance(batch, int) or batch <= 0:
        raise CalculatorError(f"batch={batch!r}: must be a positive int")
    slots = sum(2 * layers * model.num_kv_heads * cached_tokens(c, context) * batch  # K and V
                for c, layers in model.layer_types())
    if kv_quant == "int8":
        return slots * model.head_dim * 1 + slots * KV_SCALE_BYTES
    return slots * model.head_dim * dtype_bytes(dtype)


def extra_cache_bytes(model: ModelShape, context: int, batch: int = 1, dtype: str = "bf16") -> int:
    """What a cache keeps beside K and V (`Cost.cache_per_token`, e.g. an indexer's keys); 0 for most."""
    return sum(layers * c.cache_per_token * cached_tokens(c, context) * batch * dtype_bytes(dtype)
               for c, layers in model.layer_types())


# ----------------------------------------------------------------------------- FLOPs


def attention_flops(model: ModelShape, context: int, causal: bool = True, sparse: bool = True) -> int:
    """Forward FLOPs of the attention scores and mixing, per sequence (2 per multiply-add).

    QK^T and PV each cost H x D multiply-adds per visible pair per layer: 4 x H x D x pairs, the pairs being
    exactly those the layer's mask lets through (`masks.Mask.pairs`: causal T(T+1)/2, sliding ~T x W, chunked
    ~T x C / 2). A top-k variant mixes min(visible, k) keys per query, unless `sparse=False` (a dense
    warm-up), and a variant's own scoring (`Cost.flops_per_pair`) covers every visible pair. `causal=False`
    counts the same masks without causality. The q/k/v/o projections are not here: they are per-token
    matmuls, counted in 6 x params x tokens.
    """
    _check_context(context)
    per_pair = 4 * model.num_heads * model.head_dim
    flops = 0
    for c, layers in model.layer_types():
        mask = dataclasses.replace(c.mask, causal=causal)
        mixed = mask.pairs(context, c.keys_per_query if sparse else None)
        flops += layers * (per_pair * mixed + c.flops_per_pair * mask.pairs(context))
    return flops


def total_train_flops(model: ModelShape, context: int, sequences: int = 1, causal: bool = True) -> int:
    """Training FLOPs (forward + backward) for `sequences` sequences of `context` tokens.

    6 x matmul_params x tokens + 3 x attention forward (its backward is two of the same matmuls). A top-k
    variant's own scoring counts under the same x3, an upper bound (an indexer may run under stop-gradient).
    """
    return sequences * (6 * matmul_params(model) * context + 3 * attention_flops(model, context, causal))


# ----------------------------------------------------------------------------- training memory per chip

# Per-chip training memory is plain arithmetic for the state and a calibrated model for the rest: what XLA keeps
# alive at the peak of its buffer assignment is not derivable from shapes alone. The coefficients are a
# non-negative least-squares fit, weighted by each run's total, to deviceless TPU compiles of lc_jax train steps
# (libtpu 0.0.42, jax 0.10.2, remat='full', bf16 compute, Pallas kernels): 9 variations of a 2-layer model on
# v5p:2x2x1, the 1B model at 8K and 16K tokens per chip, and the Llama-3.1-8B shape at 8K-92K tokens per chip
# (context parallelism 1 and 16); every total within 12%. The peak comes before most gradients exist (they get
# no weight), and XLA keeps most layers' FSDP-gathered weights from the forward pass for the backward.
# benchmarks/tpu_aot.py prints the calculator beside the compiler for every configs/tpu/* run.
GATHERED_WEIGHTS_SHARE = 0.75  # of all parameters, gathered over fsdp in the compute dtype, alive at the peak
SAVED_COPIES = 1  # remat='full': each block's input in the compute dtype
LAYER_BYTES_PER_TOKEN_UNIT = 8.4  # one layer's recompute + backward at the peak, per token and unit of d + mlp
LOGIT_COPIES = 0.75  # f32 [tokens, vocab] logits and the cross-entropy's softmax, per chip
EMBED_COPIES = 2.2  # f32 [vocab, d]: embedding and head gathered over fsdp, and their unsharded gradients
PROGRAM_BYTES_PER_LAYER = 50 * 2**20  # generated code: layers are unrolled
REMAT_SAVED = ("full", "dots", "none")


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """What decides a training step's memory per chip, beyond the model's shape."""

    seq_len: int
    batch: int  # global sequences per step
    mesh: dict[str, int]  # resolved sizes of data, fsdp, tensor, context
    remat: str = "full"  # none | dots | full (model.remat)
    dtype: str = "bf16"  # activations
    param_dtype: str = "f32"  # parameters, gradients and both AdamW moments

    def __post_init__(self):
        for f in ("seq_len", "batch"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise CalculatorError(f"{f}={getattr(self, f)!r} must be a positive int")
        if self.remat not in REMAT_SAVED:
            raise CalculatorError(f"remat={self.remat!r}: allowed values are {list(REMAT_SAVED)}")
        sizes = {a: self.mesh.get(a, 1) for a in ("data", "fsdp", "tensor", "context")}
        if any(not isinstance(v, int) or v <= 0 for v in sizes.values()):
            raise CalculatorError(f"mesh={self.mesh}: sizes must be resolved positive ints")
        if self.batch % (sizes["data"] * sizes["fsdp"]) or self.seq_len % sizes["context"]:
            raise CalculatorError(f"batch {self.batch} x seq_len {self.seq_len} does not split over mesh {sizes}")

    @property
    def tokens_per_chip(self) -> int:
        m = self.mesh
        return self.batch // (m.get("data", 1) * m.get("fsdp", 1)) * (self.seq_len // m.get("context", 1))


def _saved_per_token_layer(model: ModelShape, remat: str, a: int) -> int:
    """Bytes per token and layer kept from the forward pass for the backward, by remat policy."""
    d, F, qkv = model.d_model, model.mlp_dim, (model.num_heads + 2 * model.num_kv_heads) * model.head_dim
    if remat == "full":  # only each block's input (the residual stream)
        return d * a
    if remat == "dots":  # the block input and every matmul output: q/k/v, attention out, o, gate, up, down
        return a * (d + qkv + model.num_heads * model.head_dim + d + 2 * F + d)
    # none: the above plus both norms' outputs, the SwiGLU product and the attention's f32 log-sum-exp
    return a * (3 * d + qkv + model.num_heads * model.head_dim + d + 3 * F + d) + 4 * model.num_heads


def train_memory(model: ModelShape, run: TrainRun) -> dict[str, int]:
    """Bytes per chip of one training step (AdamW), by term; 'total' is what must fit the chip's HBM.

    arguments: parameters and both AdamW moments in `param_dtype`, sharded over fsdp x tensor (replicated
    over data and context), as `lc_jax.sharding.state_shardings` lays them out. temporaries, at the peak:
    the weights FSDP gathered, activations saved for the backward (by remat policy), one layer's working set,
    the logits, the embedding / head (the module constants say how much of each), and what the attention
    variants keep per token (`Cost.train_bytes_per_token`, e.g. a top-k selection).
    """
    m = run.mesh
    shards = m.get("fsdp", 1) * m.get("tensor", 1)
    p, a = dtype_bytes(run.param_dtype, "param_dtype"), dtype_bytes(run.dtype, "dtype")
    n, tp = run.tokens_per_chip, m.get("tensor", 1)
    P = num_params(model)
    saved = _saved_per_token_layer(model, run.remat, a) * (SAVED_COPIES if run.remat == "full" else 1)
    out = {
        "parameters": P * p // shards,
        "optimizer": 2 * P * p // shards,
        "gathered_weights": int(GATHERED_WEIGHTS_SHARE * P * a / tp),
        "saved_activations": model.num_layers * n * saved,
        "layer_working_set": int(LAYER_BYTES_PER_TOKEN_UNIT * n * (model.d_model + model.mlp_dim) / tp),
        "logits": int(LOGIT_COPIES * n * model.vocab_size * 4 / tp),
        "embedding": int(EMBED_COPIES * model.vocab_size * model.d_model * p / tp),
        "attention_extras": sum(layers * n * c.train_bytes_per_token for c, layers in model.layer_types()),
        "program": PROGRAM_BYTES_PER_LAYER * model.num_layers,
    }
    out["arguments"] = out["parameters"] + out["optimizer"]
    out["temporaries"] = sum(out[k] for k in ("gathered_weights", "saved_activations", "layer_working_set", "logits",
                                              "embedding", "attention_extras"))
    out["total"] = out["arguments"] + out["temporaries"] + out["program"]
    return out


def train_run_from_config(config: Any, num_devices: int) -> TrainRun:
    """The TrainRun of a config on `num_devices` (mesh axes of -1 take the remaining devices)."""
    sizes = {a: config.mesh[a] for a in ("data", "fsdp", "tensor", "context")}
    known = 1
    for v in sizes.values():
        known *= v if v != -1 else 1
    sizes = {a: (num_devices // known if v == -1 else v) for a, v in sizes.items()}
    total = 1
    for v in sizes.values():
        total *= v
    if total != num_devices:
        raise CalculatorError(f"mesh {dict(config.mesh)} does not resolve over {num_devices} devices")
    return TrainRun(seq_len=config.data.seq_len, batch=config.data.batch_size, mesh=sizes, remat=config.model.remat,
                    dtype=DTYPE_ALIASES.get(config.model.dtype, config.model.dtype),
                    param_dtype=DTYPE_ALIASES.get(config.model.param_dtype, config.model.param_dtype))


def format_train_table(model: ModelShape, run: TrainRun, mem: dict[str, int], hbm_bytes: int | None = None) -> str:
    """The per-chip terms as a table, in GiB, with the share of HBM when the chip is known."""
    lines = [model.describe(),
             f"training: batch {run.batch} x {run.seq_len} tokens, mesh {run.mesh}, remat {run.remat}, "
             f"{run.tokens_per_chip:,} tokens per chip; AdamW state in {run.param_dtype}", "",
             f"{'per chip':<20}{'GiB':>10}" + (f"{'% of HBM':>10}" if hbm_bytes else "")]
    for k in ("parameters", "optimizer", "gathered_weights", "saved_activations", "layer_working_set", "logits",
              "embedding", "attention_extras", "program", "total"):
        if mem[k] or k == "total":
            row = f"{k:<20}{mem[k] / GiB:>10.3f}"
            lines.append(row + (f"{100 * mem[k] / hbm_bytes:>9.1f}%" if hbm_bytes else ""))
    return "\n".join(lines)


def _check_context(context: int) -> None:
    if not isinstance(context, int) or isinstance(context, bool) or context <= 0:
        raise CalculatorError(f"context={context!r}: must be a positive int (tokens)")


# ----------------------------------------------------------------------------- the report


def report(model: ModelShape, contexts: list[int], *, batch: int = 1, dtype: str = "bf16",
           kv_dtype: str | None = None, kv_quant: str | None = None) -> dict[str, Any]:
    """Everything the CLI prints, as plain data (exact integers plus GB / GiB / TFLOPs).

    Per-layer-type lists ("attention", "layers", a row's "cached_tokens") follow `ModelShape.layer_types`.
    """
    kv_dtype = kv_dtype or dtype
    dtype_bytes(dtype, "--dtype")
    dtype_bytes(kv_dtype, "--kv-dtype")
    params, wbytes = num_params(model), weight_bytes(model, dtype)
    types = model.layer_types()
    rows = []
    for T in contexts:
        kv = kv_cache_bytes(model, T, batch, kv_dtype, kv_quant)
        extra = extra_cache_bytes(model, T, batch, kv_dtype)
        attn, train = attention_flops(model, T), total_train_flops(model, T)
        rows.append({
            "context": T, "cached_tokens": [cached_tokens(c, T) for c, _ in types], "params": params,
            "kv_cache_gb_by_type": [kv_cache_bytes(dataclasses.replace(model, num_layers=n, attention=(c,)), T, batch,
                                                   kv_dtype, kv_quant) / GB for c, n in types],
            "weight_bytes": wbytes, "weights_gb": wbytes / GB, "weights_gib": wbytes / GiB,
            "kv_cache_bytes": kv, "kv_cache_gb": kv / GB, "kv_cache_gib": kv / GiB,
            "extra_cache_bytes": extra, "total_bytes": wbytes + kv + extra, "total_gb": (wbytes + kv + extra) / GB,
            "attention_flops": attn, "attention_tflops": attn / 1e12,
            "train_flops": train, "train_tflops": train / 1e12, "attention_share_of_train": attn * 3 / train,
        })
    return {
        "model": dataclasses.asdict(model), "attention": [c.label for c, _ in types], "layers": [n for _, n in types],
        "param_breakdown": param_breakdown(model), "matmul_params": matmul_params(model), "dtype": dtype,
        "kv_dtype": "int8" if kv_quant else kv_dtype, "kv_quant": kv_quant, "batch": batch, "rows": rows,
        "units": {"GB": "10^9 bytes", "GiB": "2^30 bytes", "TFLOPs": "10^12 FLOPs, 2 per multiply-add"},
        "conventions": {
            "kv_cache": "K and V: 2 x layers x kv_heads x head_dim x cached_tokens x bytes x batch; cached_tokens "
                        "= min(context, max_distance + 1) of the layer's mask (window W, chunk C), else context"
                        + ("; int8 adds one f32 scale per (token, kv head, layer) for K and for V" if kv_quant
                           else ""),
            "extra_cache": "what a variant caches beside K and V per token (e.g. an indexer's keys), in kv_dtype",
            "attention_flops": "forward QK^T + PV per sequence over each layer's visible pairs (causal T(T+1)/2, "
                               "sliding ~T x W, chunked ~T x C / 2, top-k ~T x k), plus a variant's own scoring "
                               "of every visible pair",
            "train_flops": "per sequence: 6 x matmul_params x context + 3 x attention_flops (no recomputation)",
        },
    }


def _num(x: float) -> str:
    if x >= 100:
        return f"{x:,.1f}"
    if x >= 1 or x == 0:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _params(n: int) -> str:
    for unit, div in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_table(model: ModelShape, rep: dict[str, Any]) -> str:
    """A plain-text table of `report(model, ...)`: one row per context, the conventions spelled out above it."""
    m, types = model, model.layer_types()
    kv_q = rep["kv_quant"]
    kv_what = ("int8 + one f32 scale per (token, KV head) for K and for V" if kv_q
               else f"{rep['kv_dtype']} ({dtype_bytes(rep['kv_dtype'])} B/element)")
    bounded = [f"{c.label}: min(context, {c.mask.cache_slots(2**62)})" for c, _ in types
               if c.mask.max_distance is not None]
    r0 = rep["rows"][0]
    lines = [
        m.describe(),
        f"params {r0['params']:,} ({_params(r0['params'])}); weights in {rep['dtype']}: "
        f"{_num(r0['weights_gb'])} GB = {_num(r0['weights_gib'])} GiB",
        f"KV cache: K and V, 2 x {m.num_layers} layers x {m.num_kv_heads} KV heads x {m.head_dim} dims x tokens "
        f"x batch {rep['batch']}, {kv_what}" + (f"; tokens = {', '.join(bounded)}" if bounded else ""),
        "GB = 10^9 bytes, GiB = 2^30 bytes; TFLOPs = 10^12 FLOPs (2 per multiply-add), per sequence; "
        "train = 6 x matmul params x tokens + 3 x attention",
        "",
    ]
    extra = any(c.cache_per_token for c, _ in types)
    header = ["context"] + (["cached tokens"] if bounded else []) + ["params", "weights GB", "KV cache GB",
                                                                     "KV cache GiB"]
    header += ["KV GB by type"] if len(types) > 1 else []
    header += ["other cache GB", "weights+caches GB"] if extra else ["weights+KV GB"]
    header += ["attn fwd TFLOPs", "train TFLOPs", "attn % of train"]
    table = [header]
    for r in rep["rows"]:
        row = [f"{r['context']:,}"] + (["/".join(f"{t:,}" for t in r["cached_tokens"])] if bounded else [])
        row += [_params(r["params"]), _num(r["weights_gb"]), _num(r["kv_cache_gb"]), _num(r["kv_cache_gib"])]
        row += ["/".join(_num(x) for x in r["kv_cache_gb_by_type"])] if len(types) > 1 else []
        row += [_num(r["extra_cache_bytes"] / GB)] if extra else []
        row += [_num(r["total_gb"]), _num(r["attention_tflops"]), _num(r["train_tflops"]),
                f"{100 * r['attention_share_of_train']:.1f}%"]
        table.append(row)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def parse_contexts(text: str) -> list[int]:
    """'8192,32K,128K,1M' -> [8192, 32768, 131072, 1048576] (K = 1024, M = 1024^2, as context lengths go)."""
    out = []
    for item in text.split(","):
        s = item.strip().upper()
        mult = {"K": 2**10, "M": 2**20}.get(s[-1:], 1)
        digits = s[:-1] if mult > 1 else s
        if not digits.isdigit() or int(digits) <= 0:
            raise CalculatorError(f"--context: {item.strip()!r} is not a positive token count; allowed: integers or "
                                  "a K/M suffix (K = 1024, M = 1048576), comma-separated, e.g. 8192,32K,128K,1M")
        out.append(int(digits) * mult)
    return out


def load_model(spec: str, overrides: list[tuple[str, str]] | None = None) -> ModelShape:
    """A preset name, or a config file `path.py[:arg]` (get_config(arg)) with `--config.x=y` overrides."""
    return load(spec, overrides)[0]


def load(spec: str, overrides: list[tuple[str, str]] | None = None) -> tuple[ModelShape, Any]:
    """(shape, config) of a preset (config None) or of a config file with overrides."""
    overrides = overrides or []
    if spec.lower() in PRESETS:
        if overrides:
            raise CalculatorError(f"--config.{overrides[0][0]}: overrides apply to config files, not to the "
                                  f"preset {spec!r}")
        return PRESETS[spec.lower()], None
    path, sep, arg = spec.partition(":")
    if not path.endswith(".py") or not config_lib.find(path).is_file():
        raise CalculatorError(f"--model={spec!r}: not a preset and not a config file; presets are "
                              f"{list(PRESETS)}, or give a config path like configs/quickstart.py[:arg]")
    cfg = cli.load(spec, overrides, flag="--model")
    return from_config(cfg, name=spec), cfg


# HBM per chip as libtpu reports it (pltpu.get_tpu_info: per TensorCore x cores per chip), and chips per slice.
TPU_HBM_BYTES = {"v4": 2 * 17_200_000_000, "v5e": 17_200_000_000, "v5p": 2 * 51_500_000_000,
                 "v6e": 34_400_000_000}


def topology_chips(topology: str) -> tuple[str, int]:
    """('v5p', 64) for 'v5p:4x4x4': the generation and its chip count (one device per chip)."""
    gen, _, shape = topology.partition(":")
    dims = shape.split("x")
    if gen not in TPU_HBM_BYTES or not dims or not all(x.isdigit() and int(x) > 0 for x in dims):
        raise CalculatorError(f"topology={topology!r}: expected <generation>:<shape> with a generation of "
                              f"{list(TPU_HBM_BYTES)}, e.g. v5p:4x4x4 or v5e:2x2")
    n = 1
    for x in dims:
        n *= int(x)
    return gen, n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lc_jax.memory", description=__doc__.split("\n\n")[0],
        epilog="Config files also take --config.a.b=value overrides, e.g. --config.model.attention.window=4096.")
    p.add_argument("--model", required=True,
                   help=f"a preset ({', '.join(PRESETS)}) or a config file path.py[:arg]")
    p.add_argument("--context", default=None,
                   help="tokens per sequence, comma-separated, K/M suffixes: 8K,128K,1M (--train: data.seq_len)")
    p.add_argument("--dtype", default="bf16", help=f"weights (and KV cache) dtype: {'|'.join(DTYPE_BYTES)}")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype when it differs from --dtype")
    p.add_argument("--kv-quant", default=None, help="int8: int8 K/V plus f32 scales per (token, KV head)")
    p.add_argument("--batch", default="1", help="sequences held in the KV cache (FLOPs stay per sequence)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--train", action="store_true",
                   help="per-chip memory of the config's training step (AdamW) on its mesh, by term")
    p.add_argument("--topology", default=None,
                   help="--train: the TPU slice, e.g. v5p:4x4x4 (default: the config's aot.topology)")
    return p


def _parse_overrides(rest: list[str]) -> list[tuple[str, str]]:
    others, overrides = cli.split_overrides(rest)
    if others:
        raise CalculatorError(f"unrecognised argument {others[0]!r}; flags are --model, --context, --dtype, "
                              "--kv-dtype, --kv-quant, --batch, --json, --train, --topology and --config.a.b=value")
    return overrides


def _main(argv: list[str]) -> int:
    args, rest = _parser().parse_known_args(argv)
    if args.kv_quant is not None and args.kv_quant not in KV_QUANTS:
        raise CalculatorError(f"--kv-quant={args.kv_quant!r}: allowed values are {list(KV_QUANTS)}")
    if not args.batch.isdigit() or int(args.batch) <= 0:
        raise CalculatorError(f"--batch={args.batch!r}: must be a positive integer")
    dtype_bytes(args.dtype, "--dtype")
    if args.kv_dtype is not None:
        dtype_bytes(args.kv_dtype, "--kv-dtype")
    if args.train:
        return _train_main(args, _parse_overrides(rest))
    if args.context is None:
        raise CalculatorError("--context is required (tokens per sequence, e.g. 8K,128K), unless --train")
    contexts = parse_contexts(args.context)
    model = load_model(args.model, _parse_overrides(rest))
    rep = report(model, contexts, batch=int(args.batch), dtype=args.dtype, kv_dtype=args.kv_dtype,
                 kv_quant=args.kv_quant)
    print(json.dumps(rep, indent=2) if args.json else format_table(model, rep))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Print the table (or JSON); return 0, or 2 with one line naming the bad flag (`lc_jax.cli.run`)."""
    return cli.run(_main, argv)


def _plan(spec: str, overrides, topology: str | None, context: int | None):
    model, cfg = load(spec, overrides)
    if cfg is None:
        raise CalculatorError(f"--train needs a config file (its batch, mesh and remat), not the preset {spec!r}")
    topology = topology or cfg.get("aot", {}).get("topology")
    if not topology:
        raise CalculatorError("--train: give --topology (e.g. v5p:4x4x4); the config has no aot.topology")
    gen, chips = topology_chips(topology)
    if context is not None:
        cfg.data.seq_len = context
    run = train_run_from_config(cfg, chips)
    return model, run, topology, TPU_HBM_BYTES[gen], train_memory(model, run)


def train_plan(spec: str, overrides: list[tuple[str, str]] | None = None, topology: str | None = None,
               context: int | None = None) -> dict[str, Any]:
    """The per-chip training memory of a config file on a TPU slice, as plain data (the CLI's --train)."""
    model, run, topology, hbm, mem = _plan(spec, overrides, topology, context)
    return {"model": dataclasses.asdict(model), "run": dataclasses.asdict(run), "topology": topology,
            "hbm_bytes": hbm, "bytes": mem, "fits": mem["total"] <= hbm}


def _train_main(args, overrides) -> int:
    contexts = parse_contexts(args.context) if args.context else [None]
    for T in contexts:
        if args.json:
            print(json.dumps(train_plan(args.model, overrides, args.topology, T), indent=2))
            continue
        model, run, topology, hbm, mem = _plan(args.model, overrides, args.topology, T)
        print(format_train_table(model, run, mem, hbm))
        print(f"{'fits' if mem['total'] <= hbm else 'does not fit'} a {topology} chip ({hbm / GiB:.2f} GiB HBM); "
              "calibrated against deviceless compiles: python -m lc_jax.aot gives the compiler's own figure\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
