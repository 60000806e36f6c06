"""Generation with a KV cache: chunked prefill, token-by-token decoding, sampling.

    python -m lc_jax.generate --workdir runs/x --prompt "def main(" \
        [--max_new_tokens 200 --temperature 0.8 --top_p 0.95 --seed 0 --chunk 512 --kv_int8]

The cache (`lc_jax.model.KVCache`) holds, per layer, K and V for the K kv heads
only ([B, S, K, D], GQA never repeated) plus the position and segment of every
slot; attention over it goes through the model's own variant and therefore
`lc_jax.ops.attention`, with masks from positions and segment ids (empty slots
carry segment -1), so every kernel, sliding windows and ALiBi work unchanged.

* Sliding window: S = W slots, slot = position mod W (a ring buffer; masks come
  from positions, so the ring order does not matter). Memory is O(W), not O(T).
  Chunks: C slots. Sink tokens (`sink_tokens` N): N more slots that keep the
  first N positions (`LayerKV.slot_of`).
* Positions: learned / sinusoidal embeddings use the token positions, ALiBi
  lives inside attention, NoPE does nothing, static RoPE scalings rotate keys
  before they are cached. Dynamic NTK changes its frequencies with the length,
  so its keys are cached *unrotated* and q and all keys are rotated at every
  step with the current length's frequencies (all keys share one base, as in a
  fresh forward over the prefix). Prefill uses the whole prompt's length for
  every chunk, so chunked prefill equals one-shot prefill; decode step t uses
  t + 1. In deeper layers the cached keys come from hidden states computed when
  their token was processed (inherent to any KV cache), so beyond the original
  length a multi-layer model differs slightly from re-running the prefix.
* int8 cache (`kv_int8`): k and v as int8 with one f32 scale per (token, kv
  head), symmetric absmax over D; dequantised on read. New tokens attend to
  their own keys as the cache will hold them, so chunking stays exact.
* Jit: one compiled forward per (batch, tokens) shape (the prefill chunk, a
  shorter last chunk, and the one-token decode step, which also samples).
* DSA is not supported with a cache yet: `init_cache` raises naming
  model.attention.name.
"""

from __future__ import annotations

import argparse
import functools
import sys
import weakref
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lc_jax import cli
from lc_jax import state as state_lib
from lc_jax.data import tokenizer
from lc_jax.errors import UserError
from lc_jax.model import KVCache, Transformer

#: int8 cache logits stay within this (absolute, f32 logits of O(1)) of the float cache's; see tests.
INT8_LOGIT_ATOL = 5e-2


# ----------------------------------------------------------------------------- sampling


def sample_logits(logits_BV: jax.Array, key: jax.Array, temperature, top_p) -> jax.Array:
    """Next tokens [B] int32: greedy when temperature == 0, else temperature + nucleus (top-p) sampling.

    Top-p keeps the smallest prefix of tokens (by probability) whose mass reaches
    p; the top token is always kept, so p -> 0 is greedy. temperature and top_p
    may be traced (changing them does not recompile).
    """
    logits_BV = logits_BV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BV, -1).astype(jnp.int32)
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = (mass_before_BV < top_p) | (top_p >= 1.0)  # p = 1: no cut, whatever the float rounding
    keep_BV = keep_BV.at[:, 0].set(True)
    threshold_B = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1)
    masked_BV = jnp.where(scaled_BV >= threshold_B[:, None], scaled_BV, -jnp.inf)
    sampled_B = jax.random.categorical(key, masked_BV, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled_B, greedy_B)


# ----------------------------------------------------------------------------- jitted steps


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def forward_step(graphdef, state, tokens_BT, positions_BT, cache: KVCache, rope_len):
    """(logits [B, T, V], cache): one prefill chunk or decode step; compiled once per shape."""
    model = nnx.merge(graphdef.graphdef, state)
    return model.decode(tokens_BT, positions_BT, cache, rope_len=rope_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "vocab_limit"), donate_argnames=("cache",))
def decode_sample_step(graphdef, state, token_B, position_B, cache: KVCache, key, temperature, top_p,
                       vocab_limit: int | None = None):
    """Feed one token per row, sample the next: (next [B], logits [B, V], cache). One dispatch per token."""
    model = nnx.merge(graphdef.graphdef, state)
    logits_B1V, cache = model.decode(token_B[:, None], position_B[:, None], cache, rope_len=position_B.max() + 1)
    logits_BV = _limit_vocab(logits_B1V[:, 0], vocab_limit)
    return sample_logits(logits_BV, key, temperature, top_p), logits_BV, cache


@functools.partial(jax.jit, static_argnames=("vocab_limit",))
def _sample_jit(logits_BV, key, temperature, top_p, vocab_limit: int | None = None):
    return sample_logits(_limit_vocab(logits_BV, vocab_limit), key, temperature, top_p)


def _limit_vocab(logits_BV, vocab_limit):
    """Mask ids >= vocab_limit (the embedding table is padded past the tokenizer's vocabulary)."""
    if vocab_limit is None or vocab_limit >= logits_BV.shape[-1]:
        return logits_BV
    return jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_limit, logits_BV, -jnp.inf)


# ----------------------------------------------------------------------------- prefill and generation


class _Graph:
    """A graphdef as a jit static argument, hashed by identity (a RoPE graphdef holds dicts: unhashable)."""

    def __init__(self, graphdef):
        self.graphdef = graphdef


_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _split(model: Transformer):
    """(graph, state); one graph object per model, so the jitted steps compile once per model and shape."""
    model.check_cache_support()
    graphdef, state = nnx.split(model)
    if model not in _GRAPHS or _GRAPHS[model].graphdef != graphdef:  # new model, or its structure changed
        _GRAPHS[model] = _Graph(graphdef)
    return _GRAPHS[model], state


def check_length(model: Transformer, max_len: int) -> None:
    """Positions past a learned table would be clamped silently by the gather: refuse them."""
    limit = model.position.max_position
    if limit is not None and max_len > limit:
        raise ValueError(f"prompt + new tokens = {max_len} exceeds the {type(model.position).__name__} position "
                         f"table (model.max_seq_len={limit}); shorten the prompt or --max_new_tokens")


def prefill(model: Transformer, tokens_BT, cache: KVCache, *, chunk: int = 512, start: int = 0,
            split=None) -> tuple[jax.Array, KVCache]:
    """Run a prompt through the cache `chunk` tokens at a time; (logits of every prompt token [B, T, V], cache).

    Results equal one-shot prefill for any chunk size: attention masks come from
    positions, and dynamic NTK uses the whole prompt's length in every chunk.
    `start` is the position of the first token (continuing a filled cache).
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    graphdef, state = split or _split(model)
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(start, start + T, dtype=jnp.int32), (B, T))
    rope_len = jnp.asarray(start + T, jnp.int32)
    out = []
    for i in range(0, T, chunk):
        logits_BCV, cache = forward_step(graphdef, state, tokens_BT[:, i:i + chunk], positions_BT[:, i:i + chunk],
                                         cache, rope_len)
        out.append(logits_BCV)
    return jnp.concatenate(out, axis=1), cache


def decode(model: Transformer, tokens_BT, cache: KVCache, *, start: int, split=None) -> tuple[jax.Array, KVCache]:
    """Feed given tokens one at a time (teacher forcing); (logits [B, T, V], cache). For tests and scoring."""
    graphdef, state = split or _split(model)
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    B, T = tokens_BT.shape
    out = []
    for t in range(T):
        pos_B1 = jnp.full((B, 1), start + t, jnp.int32)
        rope_len = jnp.int32(start + t + 1)
        logits_B1V, cache = forward_step(graphdef, state, tokens_BT[:, t:t + 1], pos_B1, cache, rope_len)
        out.append(logits_B1V)
    return jnp.concatenate(out, axis=1), cache


def generate(model: Transformer, prompt_BT, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, chunk: int = 512, kv_int8: bool = False, stop_token: int | None = None,
             vocab_limit: int | None = None) -> np.ndarray:
    """New tokens [B, N] (N <= max_new_tokens; stops early once every row has emitted `stop_token`)."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    prompt_BT = jnp.asarray(prompt_BT, jnp.int32)
    B, P = prompt_BT.shape
    if P == 0:
        raise ValueError("the prompt is empty: generation needs at least one token (BOS)")
    check_length(model, P + max_new_tokens)
    split = _split(model)
    graphdef, state = split
    cache = model.init_cache(B, P + max_new_tokens, int8=kv_int8)
    logits_BTV, cache = prefill(model, prompt_BT, cache, chunk=chunk, split=split)
    key = jax.random.key(seed)
    temp, p = jnp.float32(temperature), jnp.float32(top_p)
    token_B = _sample_jit(logits_BTV[:, -1], jax.random.fold_in(key, 0), temp, p, vocab_limit=vocab_limit)
    out = [np.asarray(token_B)]
    done_B = out[-1] == stop_token
    for i in range(1, max_new_tokens):
        if stop_token is not None and done_B.all():
            break
        token_B, _, cache = decode_sample_step(graphdef, state, token_B, jnp.full((B,), P + i - 1, jnp.int32), cache,
                                               jax.random.fold_in(key, i), temp, p, vocab_limit=vocab_limit)
        out.append(np.asarray(token_B))
        done_B |= out[-1] == stop_token
    return np.stack(out, axis=1)


# ----------------------------------------------------------------------------- loading a run and the CLI


def load_model(workdir: str | Path) -> tuple[Transformer, int]:
    """(model with the run's latest checkpoint, step)."""
    config = state_lib.load_config(workdir)
    step, params = state_lib.load_params(workdir, config)
    with nnx.use_eager_sharding(False):
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: state_lib.build_model(config)), nnx.Param)
    return nnx.merge(graphdef, params), step


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lc_jax.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="run directory with config.json and checkpoints/")
    ap.add_argument("--prompt", required=True, help="text to continue (byte-level, BOS is prepended)")
    ap.add_argument("--max_new_tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top_p", type=float, default=0.95, help="nucleus mass in (0, 1]; 1: off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk size in tokens")
    ap.add_argument("--kv_int8", action="store_true", help="int8 KV cache (one f32 scale per token and kv head)")
    return ap


def main(argv: Sequence[str] | None = None) -> str:
    """Parse flags, load the run, print and return the continuation. Bad flags raise `UserError`."""
    args = _parser().parse_args(argv)
    if args.max_new_tokens <= 0:
        raise UserError(f"--max_new_tokens={args.max_new_tokens}: must be positive")
    if args.temperature < 0:
        raise UserError(f"--temperature={args.temperature}: must be >= 0 (0: greedy)")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p={args.top_p}: must be in (0, 1]")
    if args.chunk <= 0:
        raise UserError(f"--chunk={args.chunk}: must be positive")
    if not (Path(args.workdir) / "config.json").exists():
        raise UserError(f"--workdir={args.workdir!r}: no config.json there (not a training run directory)")
    model, _ = load_model(args.workdir)
    try:
        model.check_cache_support()
        check_length(model, len(args.prompt.encode()) + 1 + args.max_new_tokens)
    except (ValueError, NotImplementedError) as e:
        raise UserError(str(e)) from None
    prompt = np.concatenate([[tokenizer.BOS], tokenizer.encode(args.prompt.encode())]).astype(np.int32)
    new_BN = generate(model, prompt[None], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed, chunk=args.chunk, kv_int8=args.kv_int8,
                      stop_token=tokenizer.EOS, vocab_limit=tokenizer.VOCAB_SIZE)
    ids = new_BN[0].tolist()
    if tokenizer.EOS in ids:
        ids = ids[: ids.index(tokenizer.EOS)]
    text = tokenizer.decode(ids)
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(cli.run(lambda argv: main(argv) and 0))
