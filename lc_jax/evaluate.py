"""Long-context evaluation of a trained run.

    python -m lc_jax.evaluate --workdir runs/x [--config.eval.lengths=512,1024] [--config.eval.position.scaling=yarn]

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

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np

from lc_jax import config as config_lib

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


@dataclasses.dataclass
class PerPositionLoss:
    bucket_start: list[int]
    bucket_width: int
    loss: list[float | None]  # None where a bucket saw no token
    tokens: list[int]

    @classmethod
    def from_sums(cls, sums, counts, width: int) -> PerPositionLoss:
        sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
        loss = [float(s / c) if c > 0 else None for s, c in zip(sums, counts)]
        return cls([i * width for i in range(len(sums))], width, loss, [int(c) for c in counts])

    def save(self, path_stem: Path, title: str = "validation loss by position") -> None:
        """Write `<stem>.json` and `<stem>.png`."""
        path_stem = Path(path_stem)
        path_stem.with_suffix(".json").write_text(json.dumps({
            "protocol": "validation chunks (non-overlapping, as in training); position = tokens of the same "
                        "document before the target within the chunk; equal-width buckets; mean next-token loss "
                        "(nats) per bucket",
            **dataclasses.asdict(self),
        }, indent=2))
        plt = _pyplot()
        xs = [s + self.bucket_width / 2 for s, v in zip(self.bucket_start, self.loss) if v is not None]
        ys = [v for v in self.loss if v is not None]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(xs, ys, marker="o", ms=3)
        ax.set_xlabel("token position (context length)")
        ax.set_ylabel("loss (nats / byte)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path_stem.with_suffix(".png"), dpi=120)
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- loading a run


def load_config(workdir: str | Path):
    """The resolved config a run saved; lists become tuples so `--config.x=(a,b)` overrides work."""
    import ml_collections

    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    saved = config_lib.upgrade_saved(json.loads((Path(workdir) / "config.json").read_text()))
    return ml_collections.ConfigDict(tuples(saved))


def load_params(workdir: str | Path, config, step: int | None = None):
    """(step, params) from a run's checkpoint, restored onto this host's default device."""
    import jax
    import orbax.checkpoint as ocp

    from lc_jax import train

    mgr = ocp.CheckpointManager((Path(workdir) / "checkpoints").absolute())
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {Path(workdir) / 'checkpoints'}")
    tx, _ = train.make_optimizer(config.train, config.model)
    abstract = jax.eval_shape(lambda: train.fresh_state(config, tx))
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    mgr.close()
    return step, restored["state"]["params"]


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
    import jax

    from lc_jax import sharding
    from pallas_kernels.ring_attention import check_layout

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
                   min_doc_len: int = 0, sparse: bool = False):
    """Mean loss, loss beyond the training length, and the per-position curve at one length.

    Documents shorter than `min_doc_len` (default: `seq_len`) are left out; a sweep passes its
    longest length so that every length reads the same text, only cut differently.
    """
    import jax

    from lc_jax import sharding, train
    from lc_jax.data import corpus, packing

    docs = corpus.load_documents(source=config.data.source, split="validation", val_fraction=config.data.val_fraction,
                                 files=config.data.files, jsonl_field=config.data.jsonl_field)
    long_docs = [d for d in docs if len(d) >= (min_doc_len or seq_len)] or docs
    stride = eval_stride(config, seq_len)
    src = packing.PackedSequences(long_docs, seq_len=seq_len, packing="concat", seed=0, stride=stride)
    scored = stride or seq_len  # targets per window after the first
    n = max(1, min(len(src), 1 + max(0, max_tokens - seq_len) // scored))
    eval_step, width = train.make_eval_step(graphdef, num_buckets, seq_len, sparse=sparse)
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
        total = out if total is None else {k: total[k] + out[k] for k in total}
    curve = PerPositionLoss.from_sums(total["bucket_sum"], total["bucket_count"], width)
    beyond = [(s, c) for s, c, start in zip(total["bucket_sum"], total["bucket_count"], curve.bucket_start)
              if start >= train_len]
    beyond_loss = float(sum(s for s, _ in beyond) / max(sum(c for _, c in beyond), 1)) if beyond else None
    return {"loss": float(total["sum"] / max(total["count"], 1)), "beyond_loss": beyond_loss,
            "tokens": int(total["count"]), "sequences": n, "documents": len(long_docs)}, curve


def extrapolation_sweep(workdir: str | Path, config=None, *, lengths=None, scalings=None, max_tokens=None,
                        out_dir: str | Path | None = None) -> dict:
    """Validation loss at each length x scaling; learned positions stop at their table size."""
    from flax import nnx

    from lc_jax import train
    from lc_jax.config import ConfigError, resolve, validate

    workdir = Path(workdir)
    config = config or load_config(workdir)
    train_len = config.data.seq_len
    lengths = lengths or [int(x * train_len) for x in config.eval.length_multipliers]
    if scalings is None:
        scalings = [config.eval.position.scaling or None]
        if config.model.position.name == "rope":
            trained = config.model.position.scaling.name
            scalings += [s for s in config.eval.scalings if s not in scalings and s != trained]
    max_tokens = max_tokens or config.eval.max_tokens
    step, params = load_params(workdir, config)
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
                graphdef = nnx.split(nnx.eval_shape(lambda c=c: train.build_model(c)), nnx.Param)[0]
            res, curve = loss_at_length(graphdef, params, c, L, train_len, max_tokens, config.eval.position_buckets,
                                        min_doc_len=max(lengths), sparse=train.dsa_sparse_at(config, step))
            rows.append({"scaling": label, "length": L, "factor": float(c.model.position.scaling.factor), **res})
            curves[f"{label}@{L}"] = dataclasses.asdict(curve)
            print(f"  {label:>22} L={L:>6}: loss {res['loss']:.4f}"
                  + (f", beyond {train_len}: {res['beyond_loss']:.4f}" if res["beyond_loss"] is not None else ""))
    result = {"workdir": str(workdir), "step": step, "train_len": train_len, "position": config.model.position.name,
              "protocol": protocol_text(config), "rows": rows, "curves": curves}
    out_dir = Path(out_dir or workdir / "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "extrapolation.json").write_text(json.dumps(result, indent=2))
    plot_extrapolation([result], out_dir / "extrapolation.png")
    plot_per_position(result, out_dir / "per_position.png")
    return result


# ----------------------------------------------------------------------------- retrieval heatmaps

RETRIEVAL_TASKS = ("passkey", "kv_recall", "mqar")


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
    import jax
    from flax import nnx

    from lc_jax import train
    from lc_jax.config import ConfigError, resolve, validate
    from lc_jax.data import corpus, packing, synthetic

    if task not in RETRIEVAL_TASKS:
        raise ValueError(f"retrieval task {task!r}: allowed values are {list(RETRIEVAL_TASKS)}")
    workdir = Path(workdir)
    config = config or load_config(workdir)
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
    step, params = load_params(workdir, config)
    kwargs = {}
    if task == "kv_recall":
        d = config.data
        docs = corpus.load_documents(source=d.source, split="validation", val_fraction=d.val_fraction, files=d.files,
                                     jsonl_field=d.jsonl_field)
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
            graphdef = nnx.split(nnx.eval_shape(lambda c=c: train.build_model(c)), nnx.Param)[0]
        eval_step, _ = train.make_eval_step(graphdef, 1, L, sparse=train.dsa_sparse_at(config, step))
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
            acc, tok = out["retrieval_acc"], out["retrieval_token_acc"]
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
    plot_retrieval(result, out_dir / f"{task}.png")
    return result


def run_suite(workdir: str | Path, config=None) -> dict:
    """The configured evaluation of a run: `eval/results.json`, `eval/summary.md` and the plots it links.

    Parts: the extrapolation sweep (loss by length x RoPE scaling, per-position
    curves), then each task in `eval.retrieval.tasks` (passkey / kv_recall heatmaps
    over lengths x depths, MQAR over lengths x pairs).
    """
    from tqdm import tqdm

    workdir = Path(workdir)
    config = config or load_config(workdir)
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


def plot_retrieval(result: dict, path: Path):
    """Heatmap: depth or pairs (rows) x length (columns), accuracy in [0, 1]; cells that cannot run are blank.

    MQAR shows per-query accuracy (`token_accuracy`), the others whole-answer accuracy.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(result["lengths"]) + 2, 0.5 * len(result["rows"]) + 1.5))
    im = draw_retrieval(ax, result)
    fig.colorbar(im, ax=ax, label="per-query accuracy" if result["task"] == "mqar" else "accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_retrieval(ax, result: dict, title: str | None = None):
    """One retrieval heatmap on `ax` (the dashed line marks the training length); returns the image."""
    lengths, rows, axis = result["lengths"], result["rows"], result["rows_axis"]
    field = "token_accuracy" if result["task"] == "mqar" else "accuracy"
    grid = np.full((len(rows), len(lengths)), np.nan)
    for cell in result["cells"]:
        if field in cell:
            grid[rows.index(cell[axis]), lengths.index(cell["length"])] = cell[field]
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(rows)), [f"{d:.0%}" for d in rows] if axis == "depth" else [str(p) for p in rows])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth of the key" if axis == "depth" else "key-value pairs")
    ax.axvline(x=max([i for i, L in enumerate(lengths) if L <= result["train_len"]], default=-1) + 0.5, color="k",
               lw=1, ls="--")
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title or f"{result['task']} ({result['position']}, trained at {result['train_len']}, "
                          f"step {result['step']})", fontsize=9)
    return im


def plot_per_position(result: dict, path: Path):
    """Loss by position at each evaluation length, one panel per evaluation-time scaling."""
    plt = _pyplot()
    by: dict[str, list[tuple[int, dict]]] = {}
    for key, curve in result["curves"].items():
        label, _, length = key.rpartition("@")
        by.setdefault(label, []).append((int(length), curve))
    if not by:
        return
    fig, axes = plt.subplots(1, len(by), figsize=(4 * len(by), 3.5), sharey=True, squeeze=False)
    colors = plt.get_cmap("viridis")
    for ax, (label, curves) in zip(axes[0], by.items()):
        curves.sort(key=lambda lc: lc[0])
        for i, (length, c) in enumerate(curves):
            pts = [(s + c["bucket_width"] / 2, v) for s, v in zip(c["bucket_start"], c["loss"]) if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=2, color=colors(i / max(len(curves) - 1, 1)), label=f"L={length}")
        ax.axvline(result["train_len"], color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("token position")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss (nats / byte)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"loss by position ({result.get('name', result['position'])}; dotted: training length)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_extrapolation(results: list[dict], path: Path, title: str = "validation loss vs evaluation length"):
    """One colour per run, one line style per evaluation-time scaling."""
    plt = _pyplot()
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1))]
    colors = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, res in enumerate(results):
        by = {}
        for r in res["rows"]:
            if "loss" in r:
                by.setdefault(r["scaling"], []).append((r["length"], r["loss"]))
        name = res.get("name", res["position"])
        for j, (label, pts) in enumerate(by.items()):
            pts.sort()
            ax.plot(*zip(*pts), marker="o", ms=3, color=colors[i % len(colors)], ls=styles[j % len(styles)],
                    label=f"{name}: {label}" if len(by) > 1 else name)
        ax.axvline(res["train_len"], color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    from absl import flags, logging

    logging.set_verbosity(logging.WARNING)
    results = run_suite(flags.FLAGS.workdir, flags.FLAGS.config)
    out = Path(flags.FLAGS.workdir) / "eval"
    print(f"wrote {out / 'results.json'}, {out / 'summary.md'} and the plots of: {', '.join(results)}")


def _workdir_from_argv(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--workdir="):
            return a.split("=", 1)[1]
        if a == "--workdir" and i + 1 < len(argv):
            return argv[i + 1]
    raise SystemExit("usage: python -m lc_jax.evaluate --workdir runs/x [--config.eval.<field>=value ...]")


if __name__ == "__main__":
    import sys

    from absl import app, flags
    from ml_collections import config_flags

    # The run's own config is the default; --config.x=y overrides any field of it (eval.* usually).
    config_flags.DEFINE_config_dict("config", load_config(_workdir_from_argv(sys.argv)), lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory with config.json and checkpoints/")
    app.run(main)
