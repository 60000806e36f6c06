"""Memory and cost calculator for long-context runs: KV-cache bytes, weight bytes, attention FLOPs.

    python -m lc_jax.memory --model llama3.1-8b --context 8K,32K,128K
    python -m lc_jax.memory --model configs/base.py:attention=sliding --config.model.attention.window=4096 \
        --context 131072 --kv-quant int8 --json

Plans are made before anything is compiled, so the arithmetic here is plain
Python on a `ModelShape`: built from a preset (published Llama-3.1 shapes) or
from any lc_jax config (`configs/*.py[:arg]`). Conventions, stated once:

* Bytes: GB = 10^9 bytes, GiB = 2^30 bytes; the output always names which.
* KV cache: BOTH K and V, 2 x layers x kv_heads x head_dim x tokens x bytes per
  sequence, with tokens = min(context, window) for sliding-window attention (a
  ring buffer, as `lc_jax.model.Transformer.cache_slots`). int8 (`kv_quant`) adds
  one f32 scale per (token, kv head, layer) for K and one for V, the granularity
  `lc_jax.model.LayerKV` stores. The position / segment bookkeeping of lc_jax's
  KVCache (8 bytes per slot, shared by all layers) is not counted.
* FLOPs: 2 per multiply-add, matmuls only (no softmax, norms, activations).
  Attention counts the exact visible (query, key) pairs: causal T(T+1)/2 (half of
  T x T), sliding ~T x W, DSA sparse ~T x k plus the indexer over all causal pairs.
* Training FLOPs: 6 x matmul params x tokens (forward 2, backward 4) plus
  3 x the attention forward (backward = 2 x forward); recomputation (remat, flash
  backward) is not counted, as in model-FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from lc_jax import attention
from lc_jax import config as config_lib

GB, GiB = 10**9, 2**30

# Bytes per element. Quantised weight formats are counted by their elements only (no scales).
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "f32": 4, "f16": 2, "fp8": 1, "int8": 1}
DTYPE_ALIASES: dict[str, str] = {"bfloat16": "bf16", "float32": "f32", "float16": "f16", "fp32": "f32",
                                 "fp16": "f16", "float8": "fp8"}
KV_QUANTS = ("int8",)
KV_SCALE_BYTES = 4  # one f32 scale per (token, kv head) for K and for V, per layer


class CalculatorError(ValueError):
    """A bad input; the message names the flag (or argument) and the values it allows."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The shape numbers that decide memory and FLOPs (an lc_jax decoder: SwiGLU MLP, RMSNorm, GQA)."""

    name: str
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    vocab_size: int
    tie_embeddings: bool = False
    window: int | None = None  # sliding-window attention: keys per query, and the cache's slots
    chunk: int | None = None  # chunked local attention: a query sees the earlier keys of its chunk; the cache's slots
    dsa_topk: int | None = None  # DSA sparse attention: keys per query
    index_heads: int = 0  # DSA lightning indexer: H_I heads of d_I dims
    index_dim: int = 0
    index_norm: str = "layernorm"  # the indexer key's norm: layernorm has a bias, rmsnorm does not
    learned_positions: int = 0  # rows of a learned absolute-position table (0: none)
    sinks: bool = False  # learned attention sinks: one logit per head and layer (elementwise, not a matmul)

    def __post_init__(self):
        for f in ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "vocab_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CalculatorError(f"{self.name}: {f}={v!r} must be a positive int")
        if self.num_heads % self.num_kv_heads:
            raise CalculatorError(f"{self.name}: num_heads={self.num_heads} is not divisible by "
                                  f"num_kv_heads={self.num_kv_heads}")
        if self.window is not None and self.window <= 0:
            raise CalculatorError(f"{self.name}: window={self.window} must be positive (or None)")
        if self.dsa_topk is not None and (self.dsa_topk <= 0 or self.index_heads <= 0 or self.index_dim <= 0):
            raise CalculatorError(f"{self.name}: DSA needs positive dsa_topk, index_heads and index_dim")
        if self.chunk is not None and self.chunk <= 0:
            raise CalculatorError(f"{self.name}: chunk={self.chunk} must be positive (or None)")
        if sum(x is not None for x in (self.window, self.chunk, self.dsa_topk)) > 1:
            raise CalculatorError(f"{self.name}: a model is one of sliding-window, chunked or DSA, not several")

    @property
    def attention(self) -> str:
        if self.window is not None:
            return "sliding"
        return "chunked" if self.chunk is not None else "dsa" if self.dsa_topk is not None else "full"

    def describe(self) -> str:
        att = {"full": "full attention", "sliding": f"sliding window {self.window}",
               "chunked": f"chunked local attention, chunks of {self.chunk}",
               "dsa": f"DSA top-{self.dsa_topk}, indexer {self.index_heads} x {self.index_dim}"}[self.attention]
        return (f"{self.name}: {self.num_layers} layers, d_model {self.d_model}, {self.num_heads} heads / "
                f"{self.num_kv_heads} KV heads x {self.head_dim} dims, MLP {self.mlp_dim}, vocab {self.vocab_size}, "
                f"{'tied' if self.tie_embeddings else 'untied'} embeddings, {att}")


def _llama(name: str, layers: int, d: int, heads: int, mlp: int) -> ModelShape:
    return ModelShape(name=name, num_layers=layers, d_model=d, num_heads=heads, num_kv_heads=8, head_dim=128,
                      mlp_dim=mlp, vocab_size=128256, tie_embeddings=False)


# Published Llama-3.1 shapes (config.json of meta-llama/Llama-3.1-*): GQA with 8 KV heads, head_dim 128.
PRESETS: dict[str, ModelShape] = {
    "llama3.1-8b": _llama("llama3.1-8b", 32, 4096, 32, 14336),
    "llama3.1-70b": _llama("llama3.1-70b", 80, 8192, 64, 28672),
    "llama3.1-405b": _llama("llama3.1-405b", 126, 16384, 128, 53248),
}


def from_config(config: Any, name: str = "config") -> ModelShape:
    """The shape of the model an lc_jax config builds (`config` or `config.model`), without building it."""
    m = config.model if "model" in config else config
    att = m.attention
    return ModelShape(
        name=name, num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim or m.d_model // m.num_heads, mlp_dim=m.mlp_dim, vocab_size=m.vocab_size,
        tie_embeddings=bool(m.tie_embeddings), learned_positions=m.max_seq_len if m.position.name == "learned" else 0,
        **attention.REGISTRY[att.name].memory_shape(att),  # the variant says what bounds its cache and FLOPs
    )


# ----------------------------------------------------------------------------- parameters and bytes


def _index_norm_params(model: ModelShape) -> int:
    return model.index_dim * (2 if model.index_norm == "layernorm" else 1)


def param_breakdown(model: ModelShape) -> dict[str, int]:
    """Parameters by group, mirroring the parameter shapes of `lc_jax.model.Transformer` one for one."""
    d, L, H, K, D = model.d_model, model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim
    hi, di = model.index_heads, model.index_dim
    return {
        "embed": model.vocab_size * d,
        "positions": model.learned_positions * d,
        "attention": L * (d * H * D + 2 * d * K * D + H * D * d),  # wq, wk, wv, wo
        # DSA Indexer: wq [d, H_I, d_I], wk [d, d_I], k_scale [d_I] (+ k_bias [d_I] for layernorm), ww [d, H_I]
        "indexer": L * (d * hi * di + d * di + _index_norm_params(model) + d * hi) if model.dsa_topk is not None else 0,
        "sinks": L * H if model.sinks else 0,  # one sink logit per head and layer
        "mlp": L * 3 * d * model.mlp_dim,  # SwiGLU: w_gate, w_up, w_down
        "norms": (2 * L + 1) * d,  # two RMSNorms per block, one final
        "head": 0 if model.tie_embeddings else d * model.vocab_size,
    }


def num_params(model: ModelShape) -> int:
    """Total parameters; equals `lc_jax.model.count_params` of the built model."""
    return sum(param_breakdown(model).values())


def matmul_params(model: ModelShape) -> int:
    """Parameters multiplied per token (the N of 6ND): blocks and the output head (tied or not).

    The input embedding and learned positions are lookups and norms are elementwise, so they are left out.
    """
    p = param_breakdown(model)
    index_scales = model.num_layers * _index_norm_params(model) if model.dsa_topk is not None else 0  # elementwise
    return p["attention"] + p["indexer"] - index_scales + p["mlp"] + model.d_model * model.vocab_size


def dtype_bytes(dtype: str, flag: str = "dtype") -> int:
    """Bytes per element of `dtype` (bf16|f32|f16|fp8|int8, or the long names bfloat16 etc.)."""
    key = DTYPE_ALIASES.get(dtype, dtype)
    if key not in DTYPE_BYTES:
        raise CalculatorError(f"{flag}={dtype!r}: allowed values are {list(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


def weight_bytes(model: ModelShape, dtype: str = "bf16") -> int:
    """Bytes of all parameters stored in `dtype` (element bytes only: no quantisation scales)."""
    return num_params(model) * dtype_bytes(dtype)


def cached_tokens(model: ModelShape, context: int) -> int:
    """Tokens a KV cache holds per sequence: min(context, window) under a sliding window, min(context, chunk)
    under chunked attention (a ring buffer either way), else the context."""
    _check_context(context)
    span = model.window or model.chunk
    return min(context, span) if span is not None else context


def kv_cache_bytes(model: ModelShape, context: int, batch: int = 1, dtype: str = "bf16",
                   kv_quant: str | None = None) -> int:
    """KV-cache bytes for `batch` sequences of `context` tokens, counting BOTH K and V.

    2 x layers x kv_heads x head_dim x tokens x bytes x batch (tokens: `cached_tokens`). With kv_quant='int8'
    the elements take 1 byte each (`dtype` is ignored) and each layer adds one f32 scale per (token, kv head)
    for K and one for V: 2 x layers x kv_heads x tokens x 4 bytes x batch (`lc_jax.model.LayerKV`).
    """
    if kv_quant not in (None, *KV_QUANTS):
        raise CalculatorError(f"kv_quant={kv_quant!r}: allowed values are [None, {', '.join(map(repr, KV_QUANTS))}]")
    if not isinstance(batch, int) or batch <= 0:
        raise CalculatorError(f"batch={batch!r}: must be a positive int")
    slots = 2 * model.num_layers * model.num_kv_heads * cached_tokens(model, context) * batch  # K and V
    if kv_quant == "int8":
        return slots * model.head_dim * 1 + slots * KV_SCALE_BYTES
    return slots * model.head_dim * dtype_bytes(dtype)


def indexer_cache_bytes(model: ModelShape, context: int, batch: int = 1, dtype: str = "bf16") -> int:
    """DSA only: the indexer keys k_I (d_I per token per layer) that decoding would also keep; 0 otherwise."""
    if model.dsa_topk is None:
        return 0
    return model.num_layers * model.index_dim * cached_tokens(model, context) * batch * dtype_bytes(dtype)


# ----------------------------------------------------------------------------- FLOPs


def visible_pairs(context: int, causal: bool = True, window: int | None = None) -> int:
    """(query, key) pairs a mask lets through: causal T(T+1)/2; a window W keeps min(t+1, W) keys per query.

    Non-causal: T^2, or with a window the band |t - s| < W.
    """
    _check_context(context)
    T = context
    w = T if window is None else min(window, T)
    if causal:
        return w * (w + 1) // 2 + (T - w) * w
    return T + 2 * ((w - 1) * T - (w - 1) * w // 2)


def chunked_pairs(context: int, chunk: int, causal: bool = True) -> int:
    """(query, key) pairs of chunked local attention: each whole chunk of C tokens C(C+1)/2 (causal) or C^2,
    and the last, partial chunk of r tokens r(r+1)/2 or r^2."""
    _check_context(context)
    n, r = divmod(context, chunk)
    return n * chunk * (chunk + 1) // 2 + r * (r + 1) // 2 if causal else n * chunk * chunk + r * r


def attention_flops(model: ModelShape, context: int, causal: bool = True, dsa_sparse: bool = True) -> int:
    """Forward FLOPs of the attention scores and mixing, per sequence (2 per multiply-add).

    QK^T and PV each cost H x D multiply-adds per visible pair per layer: 4 x H x D x pairs x layers.
    Sliding: pairs ~ T x W. DSA (sparse stage): each query attends to min(visible, k) keys, and the
    indexer scores every visible pair with H_I dot products of d_I plus their weighted sum:
    2 x H_I x (d_I + 1) per pair. `dsa_sparse=False` is the dense warm-up (dense attention plus indexer).
    The q/k/v/o projections are not here: they are per-token matmuls, counted in 6 x params x tokens.
    """
    T = context
    per_pair = 4 * model.num_heads * model.head_dim
    if model.chunk is not None:
        flops = per_pair * chunked_pairs(T, model.chunk, causal)
    elif model.dsa_topk is None:
        flops = per_pair * visible_pairs(T, causal, model.window)
    else:
        if not dsa_sparse:
            main = visible_pairs(T, causal)
        elif causal:  # query t sees t+1 keys and keeps min(t+1, k): the same count as a window of k
            main = visible_pairs(T, True, model.dsa_topk)
        else:
            main = T * min(T, model.dsa_topk)
        flops = per_pair * main + 2 * model.index_heads * (model.index_dim + 1) * visible_pairs(T, causal)
    return model.num_layers * flops


def total_train_flops(model: ModelShape, context: int, sequences: int = 1, causal: bool = True) -> int:
    """Training FLOPs (forward + backward) for `sequences` sequences of `context` tokens.

    6 x matmul_params x tokens + 3 x attention forward (its backward is two of the same matmuls). DSA counts
    its sparse stage with the indexer under the same x3, an upper bound: its scores for the top-k run under
    stop-gradient.
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
# DSA's sparse stage: 4-byte [tokens, k] tensors per layer (selection, index scores, sparse-KL terms) alive at
# the peak. Fitted to configs/tpu/dsa1b_32k.py alone (41 of its 47 GiB of temporaries), so its row in
# benchmarks/tpu_aot.py is not a check of this term.
DSA_SELECTION_COPIES = 10
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
    the logits, the embedding / head, DSA's selection (the module constants say how much of each).
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
        "dsa_selection": int(DSA_SELECTION_COPIES * model.num_layers * n * model.dsa_topk * 4) if model.dsa_topk else 0,
        "program": PROGRAM_BYTES_PER_LAYER * model.num_layers,
    }
    out["arguments"] = out["parameters"] + out["optimizer"]
    out["temporaries"] = sum(out[k] for k in ("gathered_weights", "saved_activations", "layer_working_set", "logits",
                                              "embedding", "dsa_selection"))
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
              "embedding", "dsa_selection", "program", "total"):
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
    """Everything the CLI prints, as plain data (exact integers plus GB / GiB / TFLOPs)."""
    kv_dtype = kv_dtype or dtype
    dtype_bytes(dtype, "--dtype")
    dtype_bytes(kv_dtype, "--kv-dtype")
    params, wbytes = num_params(model), weight_bytes(model, dtype)
    rows = []
    for T in contexts:
        kv = kv_cache_bytes(model, T, batch, kv_dtype, kv_quant)
        idx = indexer_cache_bytes(model, T, batch, kv_dtype)
        attn, train = attention_flops(model, T), total_train_flops(model, T)
        rows.append({
            "context": T, "cached_tokens": cached_tokens(model, T), "params": params,
            "weight_bytes": wbytes, "weights_gb": wbytes / GB, "weights_gib": wbytes / GiB,
            "kv_cache_bytes": kv, "kv_cache_gb": kv / GB, "kv_cache_gib": kv / GiB,
            "indexer_cache_bytes": idx, "total_bytes": wbytes + kv + idx, "total_gb": (wbytes + kv + idx) / GB,
            "attention_flops": attn, "attention_tflops": attn / 1e12,
            "train_flops": train, "train_tflops": train / 1e12, "attention_share_of_train": attn * 3 / train,
        })
    return {
        "model": dataclasses.asdict(model), "attention": model.attention, "param_breakdown": param_breakdown(model),
        "matmul_params": matmul_params(model), "dtype": dtype, "kv_dtype": "int8" if kv_quant else kv_dtype,
        "kv_quant": kv_quant, "batch": batch, "rows": rows,
        "units": {"GB": "10^9 bytes", "GiB": "2^30 bytes", "TFLOPs": "10^12 FLOPs, 2 per multiply-add"},
        "conventions": {
            "kv_cache": "K and V: 2 x layers x kv_heads x head_dim x cached_tokens x bytes x batch; cached_tokens "
                        "= min(context, window) for sliding attention, min(context, chunk) for chunked attention"
                        + ("; int8 adds one f32 scale per (token, kv head, layer) for K and for V" if kv_quant
                           else ""),
            "attention_flops": "forward QK^T + PV per sequence over visible pairs (causal T(T+1)/2, sliding ~T x W, "
                               "chunked ~T x C / 2, "
                               "DSA ~T x k + indexer 2 x H_I x (d_I + 1) per causal pair)",
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


def format_table(rep: dict[str, Any]) -> str:
    """A plain-text table: one row per context, with the conventions spelled out above it."""
    m = ModelShape(**rep["model"])
    kv_q = rep["kv_quant"]
    kv_what = ("int8 + one f32 scale per (token, KV head) for K and for V" if kv_q
               else f"{rep['kv_dtype']} ({dtype_bytes(rep['kv_dtype'])} B/element)")
    r0 = rep["rows"][0]
    lines = [
        m.describe(),
        f"params {r0['params']:,} ({_params(r0['params'])}); weights in {rep['dtype']}: "
        f"{_num(r0['weights_gb'])} GB = {_num(r0['weights_gib'])} GiB",
        f"KV cache: K and V, 2 x {m.num_layers} layers x {m.num_kv_heads} KV heads x {m.head_dim} dims x tokens "
        f"x batch {rep['batch']}, {kv_what}"
        + (f"; tokens = min(context, window {m.window})" if m.window else "")
        + (f"; tokens = min(context, chunk {m.chunk})" if m.chunk else ""),
        "GB = 10^9 bytes, GiB = 2^30 bytes; TFLOPs = 10^12 FLOPs (2 per multiply-add), per sequence; "
        "train = 6 x matmul params x tokens + 3 x attention",
        "",
    ]
    dsa, sliding = m.dsa_topk is not None, m.window is not None or m.chunk is not None
    header = ["context"] + (["cached tokens"] if sliding else []) + ["params", "weights GB", "KV cache GB",
                                                                     "KV cache GiB"]
    header += ["indexer cache GB", "weights+caches GB"] if dsa else ["weights+KV GB"]
    header += ["attn fwd TFLOPs", "train TFLOPs", "attn % of train"]
    table = [header]
    for r in rep["rows"]:
        row = [f"{r['context']:,}"] + ([f"{r['cached_tokens']:,}"] if sliding else [])
        row += [_params(r["params"]), _num(r["weights_gb"]), _num(r["kv_cache_gb"]), _num(r["kv_cache_gib"])]
        row += [_num(r["indexer_cache_bytes"] / GB)] if dsa else []
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
    if not path.endswith(".py") or not Path(path).is_file():
        raise CalculatorError(f"--model={spec!r}: not a preset and not a config file; presets are "
                              f"{list(PRESETS)}, or give a config path like configs/quickstart.py[:arg]")
    try:
        cfg = config_lib.load(path, arg if sep else None)
    except config_lib.ConfigError as e:
        raise CalculatorError(f"--model={spec!r}: {e}") from e
    for key, value in overrides:
        _override(cfg, key, value)
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


def _override(cfg: Any, key: str, value: str) -> None:
    """Set `--config.key=value`, typed like the field it replaces (as ml_collections' config flags do)."""
    *parents, leaf = key.split(".")
    node = cfg
    try:
        for p in parents:
            node = node[p]
        old = node[leaf]
    except (KeyError, TypeError):
        raise CalculatorError(f"--config.{key}: no such config field") from None
    try:
        if isinstance(old, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            new: Any = value.lower() in ("true", "1")
        elif isinstance(old, (int, float, str)):
            new = type(old)(value)
        else:
            new = ast.literal_eval(value)
        node[leaf] = new
    except (ValueError, TypeError, SyntaxError):
        raise CalculatorError(f"--config.{key}={value!r}: expected a {type(old).__name__} "
                              f"(the field holds {old!r})") from None


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
    out, i = [], 0
    while i < len(rest):
        a = rest[i]
        if not a.startswith("--config."):
            raise CalculatorError(f"unrecognised argument {a!r}; flags are --model, --context, --dtype, --kv-dtype, "
                                  "--kv-quant, --batch, --json, --train, --topology and --config.a.b=value")
        key, eq, value = a[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise CalculatorError(f"{a}: needs a value (--config.a.b=value)")
            value, i = rest[i + 1], i + 1
        out.append((key, value))
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the table (or JSON); return 0, or 2 with a message naming the bad flag."""
    args, rest = _parser().parse_known_args(argv)
    try:
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
    except CalculatorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=2) if args.json else format_table(rep))
    return 0


def train_plan(spec: str, overrides: list[tuple[str, str]] | None = None, topology: str | None = None,
               context: int | None = None) -> dict[str, Any]:
    """The per-chip training memory of a config file on a TPU slice, as plain data (the CLI's --train)."""
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
    mem = train_memory(model, run)
    return {"model": dataclasses.asdict(model), "run": dataclasses.asdict(run), "topology": topology,
            "hbm_bytes": TPU_HBM_BYTES[gen], "bytes": mem, "fits": mem["total"] <= TPU_HBM_BYTES[gen]}


def _train_main(args, overrides) -> int:
    contexts = parse_contexts(args.context) if args.context else [None]
    for T in contexts:
        plan = train_plan(args.model, overrides, args.topology, T)
        if args.json:
            print(json.dumps(plan, indent=2))
            continue
        model, run = ModelShape(**plan["model"]), TrainRun(**plan["run"])
        print(format_train_table(model, run, plan["bytes"], plan["hbm_bytes"]))
        verdict = "fits" if plan["fits"] else "does not fit"
        print(f"{verdict} a {plan['topology']} chip ({plan['hbm_bytes'] / GiB:.2f} GiB HBM); calibrated against "
              "deviceless compiles: python -m lc_jax.aot gives the compiler's own figure\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
