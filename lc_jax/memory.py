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
    dsa_topk: int | None = None  # DSA sparse attention: keys per query
    index_heads: int = 0  # DSA lightning indexer: H_I heads of d_I dims
    index_dim: int = 0
    learned_positions: int = 0  # rows of a learned absolute-position table (0: none)

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
        if self.window is not None and self.dsa_topk is not None:
            raise CalculatorError(f"{self.name}: a model is either sliding-window or DSA, not both")

    @property
    def attention(self) -> str:
        return "sliding" if self.window is not None else "dsa" if self.dsa_topk is not None else "full"

    def describe(self) -> str:
        att = {"full": "full attention", "sliding": f"sliding window {self.window}",
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
    dsa = att.name == "dsa"
    return ModelShape(
        name=name, num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim or m.d_model // m.num_heads, mlp_dim=m.mlp_dim, vocab_size=m.vocab_size,
        tie_embeddings=bool(m.tie_embeddings), window=att.window if att.name == "sliding" else None,
        dsa_topk=att.dsa.topk if dsa else None, index_heads=att.dsa.index_heads if dsa else 0,
        index_dim=att.dsa.index_dim if dsa else 0,
        learned_positions=m.max_seq_len if m.position.name == "learned" else 0,
    )


# ----------------------------------------------------------------------------- parameters and bytes


def param_breakdown(model: ModelShape) -> dict[str, int]:
    """Parameters by group, mirroring the parameter shapes of `lc_jax.model.Transformer` one for one."""
    d, L, H, K, D = model.d_model, model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim
    hi, di = model.index_heads, model.index_dim
    return {
        "embed": model.vocab_size * d,
        "positions": model.learned_positions * d,
        "attention": L * (d * H * D + 2 * d * K * D + H * D * d),  # wq, wk, wv, wo
        # DSA Indexer: wq [d, H_I, d_I], wk [d, d_I], k_scale [d_I], ww [d, H_I]
        "indexer": L * (d * hi * di + d * di + di + d * hi) if model.dsa_topk is not None else 0,
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
    index_scales = model.num_layers * model.index_dim if model.dsa_topk is not None else 0  # k_scale: elementwise
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
    """Tokens a KV cache holds per sequence: min(context, window) under a sliding window (ring buffer)."""
    _check_context(context)
    return min(context, model.window) if model.window is not None else context


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
    if model.dsa_topk is None:
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
                        "= min(context, window) for sliding attention"
                        + ("; int8 adds one f32 scale per (token, kv head, layer) for K and for V" if kv_quant
                           else ""),
            "attention_flops": "forward QK^T + PV per sequence over visible pairs (causal T(T+1)/2, sliding ~T x W, "
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
        + (f"; tokens = min(context, window {m.window})" if m.window else ""),
        "GB = 10^9 bytes, GiB = 2^30 bytes; TFLOPs = 10^12 FLOPs (2 per multiply-add), per sequence; "
        "train = 6 x matmul params x tokens + 3 x attention",
        "",
    ]
    dsa, sliding = m.dsa_topk is not None, m.window is not None
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
    overrides = overrides or []
    if spec.lower() in PRESETS:
        if overrides:
            raise CalculatorError(f"--config.{overrides[0][0]}: overrides apply to config files, not to the "
                                  f"preset {spec!r}")
        return PRESETS[spec.lower()]
    path, sep, arg = spec.partition(":")
    if not path.endswith(".py") or not Path(path).is_file():
        raise CalculatorError(f"--model={spec!r}: not a preset and not a config file; presets are "
                              f"{list(PRESETS)}, or give a config path like configs/quickstart.py[:arg]")
    from lc_jax import config as config_lib  # imports jax: only when a config is asked for

    try:
        cfg = config_lib.load(path, arg if sep else None)
    except config_lib.ConfigError as e:
        raise CalculatorError(f"--model={spec!r}: {e}") from e
    for key, value in overrides:
        _override(cfg, key, value)
    return from_config(cfg, name=spec)


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
    p.add_argument("--context", required=True, help="tokens per sequence, comma-separated, K/M suffixes: 8K,128K,1M")
    p.add_argument("--dtype", default="bf16", help=f"weights (and KV cache) dtype: {'|'.join(DTYPE_BYTES)}")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype when it differs from --dtype")
    p.add_argument("--kv-quant", default=None, help="int8: int8 K/V plus f32 scales per (token, KV head)")
    p.add_argument("--batch", default="1", help="sequences held in the KV cache (FLOPs stay per sequence)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def _parse_overrides(rest: list[str]) -> list[tuple[str, str]]:
    out, i = [], 0
    while i < len(rest):
        a = rest[i]
        if not a.startswith("--config."):
            raise CalculatorError(f"unrecognised argument {a!r}; flags are --model, --context, --dtype, --kv-dtype, "
                                  "--kv-quant, --batch, --json and --config.a.b=value")
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
        contexts = parse_contexts(args.context)
        model = load_model(args.model, _parse_overrides(rest))
        rep = report(model, contexts, batch=int(args.batch), dtype=args.dtype, kv_dtype=args.kv_dtype,
                     kv_quant=args.kv_quant)
    except CalculatorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=2) if args.json else format_table(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
