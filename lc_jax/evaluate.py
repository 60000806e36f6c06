"""Long-context evaluation of a trained run.

    python -m lc_jax.evaluate --workdir runs/x [--config.eval.length_multipliers="(1,2,4)"] \
        [--config.eval.position.scaling=yarn]

Loads the run's config and latest checkpoint, then measures validation loss at
several evaluation lengths, for the trained RoPE scaling and any others named in
`eval.scalings` (context extension at inference: the parameters are unchanged,
only the frequencies). Writes `eval/extrapolation.{json,png}` and prints a table.

Protocol: validation documents at least as long as the longest evaluation
length, packed (`concat`) in a fixed order and cut into non-overlapping chunks of
each length; the first `eval.max_tokens` tokens are scored, so every length reads
the same text. Positions restart at each chunk and each document. Reported per
length: mean loss over all tokens, and over tokens whose position is at or beyond
the training length ("beyond").
Per-position curves bucket each target by its position with equal-width buckets.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from lc_jax import cli, plots, sharding, state, steps
from lc_jax import data as data_lib
from lc_jax.config import RETRIEVAL_TASKS, ConfigError, resolve, validate
from lc_jax.data import packing, synthetic
from lc_jax.errors import UserError
from pallas_kernels.ring_attention import check_layout

# `eval.protocol='sliding'` states this protocol instead of the module docstring's.
SLIDING_PROTOCOL = (
    "validation documents at least as long as the longest evaluation length, packed (`concat`) in a fixed order "
    "and read by sliding windows of each length L that start every S = {stride} tokens; a window scores only its "
    "last S targets (the first window all of them), so every target is scored once, with at least L - S tokens "
    "of context unless its document started later. About `eval.max_tokens` targets are scored, so every length "
    "reads the same text. Positions restart at each window and each document. Reported per length: mean loss over "
    "all scored tokens, and over those whose position is at or beyond the training length (\"beyond\"). "
    "Per-position curves bucket each target by its position with equal-width buckets.")


def protocol_text(config, seq_len: int | None = None) -> str:
    """The stated protocol of the loss evaluation under `config.eval` (S given for one length if `seq_len`)."""
    if config.eval.get("protocol", "chunks") != "sliding":
        return " ".join(__doc__.split("Protocol: ")[1].split())
    stride = config.eval.get("stride", 0)
    return SLIDING_PROTOCOL.format(stride=stride or (seq_len // 2 if seq_len else "L/2"))


def eval_stride(config, seq_len: int) -> int | None:
    """Window stride for `seq_len` under `eval.protocol` (None: non-overlapping chunks)."""
    if config.eval.get("protocol", "chunks") != "sliding":
        return None
    return config.eval.get("stride", 0) or max(1, seq_len // 2)


# ----------------------------------------------------------------------------- extrapolation


def eval_config(config, seq_len: int, scaling: str | None, factor: float = 0.0):
    """A copy of the run's config for evaluation at `seq_len` with RoPE `scaling` (None: as trained)."""
    c = copy.deepcopy(config)
    train_len = config.data.seq_len
    c.data.seq_len = seq_len
    c.model.max_seq_len = max(c.model.max_seq_len, seq_len) if c.model.position.name != "learned" else \
        c.model.max_seq_len
    if scaling is not None:
        sc = c.model.position.scaling
        sc.name = scaling
        if factor:
            sc.factor = float(factor)
        elif scaling == "dynamic_ntk":
            sc.factor = 1.0
        else:
            sc.factor = max(1.0, seq_len / train_len)
        sc.original_max_len = train_len
    return c


def eval_mesh(config, seq_len: int):
    """One sequence at a time: a ring over the run's `mesh.context` devices when that splits `seq_len`, else None.

    A long-context run trained with context parallelism is evaluated the same
    way, so sequences that never fit one device still evaluate.
    """
    ctx = config.mesh.get("context", 1)
    if ctx <= 1 or ctx > jax.device_count():
        return None
    try:
        check_layout(seq_len, ctx, config.mesh.context_layout)
    except ValueError:
        return None
    mesh_cfg = {"data": 1, "fsdp": 1, "tensor": 1, "context": ctx}
    return sharding.make_mesh(mesh_cfg, jax.devices()[:ctx])


def loss_at_length(graphdef, params, config, seq_len: int, train_len: int, max_tokens: int, num_buckets: int,
                   min_doc_len: int = 0, stage: str | None = None):
    """Mean loss, loss beyond the training length, and the per-position curve at one length.

    Documents shorter than `min_doc_len` (default: `seq_len`) are left out; a sweep passes its
    longest length so that every length reads the same text, only cut differently.
    """
    docs = data_lib.documents(config.data, "validation")
    long_docs = [d for d in docs if len(d) >= (min_doc_len or seq_len)] or docs
    stride = eval_stride(config, seq_len)
    src = packing.PackedSequences(long_docs, seq_len=seq_len, packing="concat", seed=0, stride=stride)
    scored = stride or seq_len  # targets per window after the first
    n = max(1, min(len(src), 1 + max(0, max_tokens - seq_len) // scored))
    eval_step, width = steps.make_eval_step(graphdef, num_buckets, seq_len, stage=stage)
    mesh = eval_mesh(config, seq_len)
    if mesh is not None:
        params = jax.device_put(params, sharding.replicated(mesh))
    total = None
    for i in range(n):
        ex = {k: v[None] for k, v in src[i].items()}
        if mesh is None:
            out = eval_step(params, ex)
        else:
            with jax.set_mesh(mesh):
                out = eval_step(params, sharding.shard_batch(ex, mesh, layout=config.mesh.context_layout))
        out = jax.device_get(out)
        total = out if total is None else jax.tree.map(np.add, total, out)
    curve = plots.PerPositionLoss.from_sums(total["bucket_sum"], total["bucket_count"], width)
    beyond = [(s, c) for s, c, start in zip(total["bucket_sum"], total["bucket_count"], curve.bucket_start)
              if start >= train_len]
    beyond_loss = float(sum(s for s, _ in beyond) / max(sum(c for _, c in beyond), 1)) if beyond else None
    return {"loss": float(total["sum"] / max(total["count"], 1)), "beyond_loss": beyond_loss,
            "tokens": int(total["count"]), "sequences": n, "documents": len(long_docs)}, curve


def extrapolation_sweep(workdir: str | Path, config=None, *, lengths=None, scalings=None, max_tokens=None,
                        out_dir: str | Path | None = None) -> dict:
    """Validation loss at each length x scaling; learned positions stop at their table size."""
    workdir = Path(workdir)
    config = config or state.load_config(workdir)
    train_len = config.data.seq_len
    lengths = lengths or [int(x * train_len) for x in config.eval.length_multipliers]
    if scalings is None:
        scalings = [config.eval.position.scaling or None]
        if config.model.position.name == "rope":
            trained = config.model.position.scaling.name
            scalings += [s for s in config.eval.scalings if s not in scalings and s != trained]
    max_tokens = max_tokens or config.eval.max_tokens
    step, params = state.load_params(workdir, config)
    rows, curves = [], {}
    for scaling in scalings:
        for L in lengths:
            label = scaling or f"trained ({config.model.position.scaling.name})"
            c = eval_config(config, L, scaling, config.eval.position.factor)
            try:
                validate(c)
            except ConfigError as e:
                rows.append({"scaling": label, "length": L, "error": "; ".join(e.problems)})
                continue
            c = resolve(c)
            with nnx.use_eager_sharding(False):
                graphdef = nnx.split(nnx.eval_shape(lambda c=c: state.build_model(c)), nnx.Param)[0]
            res, curve = loss_at_length(graphdef, params, c, L, train_len, max_tokens, config.eval.position_buckets,
                                        min_doc_len=max(lengths), stage=state.stage_at(config, step))
            rows.append({"scaling": label, "length": L, "factor": float(c.model.position.scaling.factor), **res})
            curves[f"{label}@{L}"] = dataclasses.asdict(curve)
            print(f"  {label:>22} L={L:>6}: loss {res['loss']:.4f}"
                  + (f", beyond {train_len}: {res['beyond_loss']:.4f}" if res["beyond_loss"] is not None else ""))
    result = {"workdir": str(workdir), "step": step, "train_len": train_len, "position": config.model.position.name,
              "protocol": protocol_text(config), "rows": rows, "curves": curves}
    out_dir = Path(out_dir or workdir / "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "extrapolation.json").write_text(json.dumps(result, indent=2))
    plots.plot_extrapolation([result], out_dir / "extrapolation.png")
    plots.plot_per_position(result, out_dir / "per_position.png")
    return result


# ----------------------------------------------------------------------------- retrieval heatmaps

def retrieval_grid(workdir: str | Path, config=None, *, task: str = "passkey", lengths=None, depths=None,
                   pairs=None, samples: int | None = None, out_dir: str | Path | None = None) -> dict:
    """Accuracy of a retrieval task on a grid of lengths x depths (or x pairs): `eval/<task>.{json,png}`.

    passkey: the landmark-attention format (filler, "The pass key is N. Remember
    it.", the question); kv_recall: a key-value sentence planted in validation
    text (needle in a haystack); mqar: Zoology's multi-query associative recall,
    `pairs` key-value pairs then all keys queried, spread over the length by a
    gap. Scored teacher-forced: `accuracy` counts a sample only if every answer
    token is the argmax prediction, `token_accuracy` is the share of answer
    tokens right (for MQAR: per-query accuracy, Zoology's measure).
    `samples` examples per cell, seeded per cell. `eval.position.scaling` (and
    factor) applies a RoPE scaling at evaluation, as in the extrapolation sweep.
    """
    if task not in RETRIEVAL_TASKS:
        raise ValueError(f"retrieval task {task!r}: allowed values are {list(RETRIEVAL_TASKS)}")
    workdir = Path(workdir)
    config = config or state.load_config(workdir)
    r = config.eval.get("retrieval", {})
    train_len = config.data.seq_len
    lengths = lengths or [int(x * train_len) for x in config.eval.length_multipliers]
    depths = list(depths if depths is not None else np.linspace(0.0, 1.0, int(r.get("depths", 5))))
    axis = "pairs" if task == "mqar" else "depth"
    if task == "mqar":
        rows = [int(p) for p in (pairs or r.get("mqar_pairs", (4, 8, 16)))]
    else:
        rows = [float(d) for d in depths]
    samples = samples or int(r.get("samples", 8))
    step, params = state.load_params(workdir, config)
    kwargs = {}
    if task == "kv_recall":
        docs = data_lib.documents(config.data, "validation")
        kwargs["haystack_tokens"] = packing.PackedSequences(docs, seq_len=max(lengths), packing="concat").tokens
    cells = []
    scaling = config.eval.position.scaling or None
    for L in lengths:
        c = eval_config(config, L, scaling, config.eval.position.factor)
        try:
            validate(c)
        except ConfigError as e:
            cells += [{"length": L, axis: v, "error": "; ".join(e.problems)} for v in rows]
            continue
        c = resolve(c)
        with nnx.use_eager_sharding(False):
            graphdef = nnx.split(nnx.eval_shape(lambda c=c: state.build_model(c)), nnx.Param)[0]
        eval_step, _ = steps.make_eval_step(graphdef, 1, L, stage=state.stage_at(config, step))
        for i, v in enumerate(rows):
            rng = np.random.default_rng([config.seed, L, i])
            try:
                if task == "mqar":  # the gap spreads pairs and queries over the whole length
                    gap = max(0, L + 1 - synthetic.mqar_length(v))
                    exs = [synthetic.mqar(rng, L, v, gap=gap) for _ in range(samples)]
                else:
                    exs = [getattr(synthetic, task)(rng, L, v, **kwargs) for _ in range(samples)]
            except ValueError as e:  # e.g. a length too short for the fact and the question
                cells.append({"length": L, axis: v, "error": str(e)})
                continue
            batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
            out = jax.device_get(eval_step(params, batch))
            acc, tok = out["ratios"]["retrieval_acc"], out["ratios"]["retrieval_token_acc"]
            cells.append({"length": L, axis: v, "accuracy": float(acc[0] / max(acc[1], 1)),
                          "token_accuracy": float(tok[0] / max(tok[1], 1)), "samples": samples})
        print(f"  {task} L={L:>6}: " + " ".join(f"{x['accuracy']:.2f}" if "accuracy" in x else "-"
                                                for x in cells if x["length"] == L))
    position = config.model.position.name + (f" + {scaling} at eval" if scaling else "")
    result = {"workdir": str(workdir), "step": step, "task": task, "train_len": train_len,
              "position": position, "lengths": lengths, "rows_axis": axis, "rows": rows,
              "protocol": "teacher-forced; a sample is right when every answer token is the argmax", "cells": cells}
    out_dir = Path(out_dir or workdir / "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{task}.json").write_text(json.dumps(result, indent=2))
    plots.plot_retrieval(result, out_dir / f"{task}.png")
    return result


def run_suite(workdir: str | Path, config=None) -> dict:
    """The configured evaluation of a run: `eval/results.json`, `eval/summary.md` and the plots it links.

    Parts: the extrapolation sweep (loss by length x RoPE scaling, per-position
    curves), then each task in `eval.retrieval.tasks` (passkey / kv_recall heatmaps
    over lengths x depths, MQAR over lengths x pairs).
    """
    workdir = Path(workdir)
    config = config or state.load_config(workdir)
    parts = ["extrapolation", *config.eval.get("retrieval", {}).get("tasks", ())]
    results = {}
    for part in tqdm(parts, desc="evaluate", disable=len(parts) == 1):
        results[part] = (extrapolation_sweep(workdir, config) if part == "extrapolation"
                         else retrieval_grid(workdir, config, task=part))
    out = workdir / "eval"
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "summary.md").write_text(summary_markdown(results))
    return results


def summary_markdown(results: dict) -> str:
    """Short tables of every part, each followed by a link to its plot (paths relative to eval/)."""
    ex = results["extrapolation"]
    lines = [f"# Evaluation: {ex['workdir']} (step {ex['step']}, trained at {ex['train_len']} tokens, "
             f"{ex['position']} positions)", "", "## Loss by evaluation length (nats/byte)", "",
             f"Protocol: {ex['protocol']}", ""]
    lengths = sorted({r["length"] for r in ex["rows"]})
    lines += ["| eval scaling | " + " | ".join(str(L) for L in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    by: dict[str, dict[int, dict]] = {}
    for r in ex["rows"]:
        by.setdefault(r["scaling"], {})[r["length"]] = r
    for scaling, cells in by.items():
        vals = [f"{cells[L]['loss']:.3f}" if "loss" in cells.get(L, {}) else "-" for L in lengths]
        lines.append(f"| {scaling} | " + " | ".join(vals) + " |")
    lines += ["", "![loss vs length](extrapolation.png)", "", "Loss by token position at each length:", "",
              "![loss by position](per_position.png)", ""]
    for task, res in results.items():
        if task == "extrapolation":
            continue
        field = "token_accuracy" if task == "mqar" else "accuracy"
        what = "per-query accuracy" if task == "mqar" else "accuracy (every answer token right)"
        axis = res["rows_axis"]
        lines += [f"## {task}: {what}, teacher-forced", "",
                  f"| {axis} | " + " | ".join(str(L) for L in res["lengths"]) + " |",
                  "|---|" + "---:|" * len(res["lengths"])]
        for v in res["rows"]:
            cells = {c["length"]: c for c in res["cells"] if c[axis] == v}
            vals = [f"{cells[L][field]:.2f}" if field in cells.get(L, {}) else "-" for L in res["lengths"]]
            lines.append(f"| {f'{v:.0%}' if axis == 'depth' else v} | " + " | ".join(vals) + " |")
        lines += ["", f"![{task}]({task}.png)", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`python -m lc_jax.evaluate --workdir DIR [--config.eval.<field>=value ...] [--verbose]`: the run's own
    config, with overrides of any field (eval.* usually), validated before anything is loaded."""
    rest, overrides = cli.split_overrides(argv)
    ap = argparse.ArgumentParser(prog="python -m lc_jax.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="run directory with config.json and checkpoints/")
    args = ap.parse_args(rest)
    if not (Path(args.workdir) / "config.json").is_file():
        raise UserError(f"--workdir={args.workdir!r}: no config.json there (not a training run directory)")
    config = state.load_config(args.workdir)
    for key, value in overrides:
        cli.override(config, key, value)
    validate(config)
    logging.set_verbosity(logging.WARNING)
    results = run_suite(args.workdir, config)
    out = Path(args.workdir) / "eval"
    print(f"wrote {out / 'results.json'}, {out / 'summary.md'} and the plots of: {', '.join(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
