"""Plots and the per-position loss record: what training and evaluation draw, in one place.

matplotlib is imported on first use (`pyplot`), so that runs and tests that draw nothing never load it. A
process that has not chosen a backend gets Agg (files only); a notebook keeps its inline one. Each plot has a
`draw_*(ax, ...)` that draws on given axes (a notebook's side-by-side figure) and a `plot_*` that writes a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
from etils import epath


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

    def save(self, path_stem, title: str = "validation loss by position") -> None:
        """Write `<stem>.json` and `<stem>.png` (a local path or gs://, through epath)."""
        path_stem = epath.Path(path_stem)
        path_stem.with_suffix(".json").write_text(json.dumps({
            "protocol": "validation chunks (non-overlapping, as in training); position = tokens of the same "
                        "document before the target within the chunk; equal-width buckets; mean next-token loss "
                        "(nats) per bucket",
            **dataclasses.asdict(self),
        }, indent=2))
        plt = pyplot()
        xs = [s + self.bucket_width / 2 for s, v in zip(self.bucket_start, self.loss) if v is not None]
        ys = [v for v in self.loss if v is not None]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(xs, ys, marker="o", ms=3)
        ax.set_xlabel("token position (context length)")
        ax.set_ylabel("loss (nats / byte)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with path_stem.with_suffix(".png").open("wb") as f:
            fig.savefig(f, format="png", dpi=120)
        plt.close(fig)


def pyplot():
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and "MPLBACKEND" not in os.environ:
        matplotlib.use("Agg")  # a command line or test: files only; Jupyter sets MPLBACKEND to its inline one
    import matplotlib.pyplot as plt

    return plt


def plot_retrieval(result: dict, path: Path):
    """Heatmap: depth or pairs (rows) x length (columns), accuracy in [0, 1]; cells that cannot run are blank.

    MQAR shows per-query accuracy (`token_accuracy`), the others whole-answer accuracy.
    """
    plt = pyplot()
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


def curves_by_scaling(result: dict) -> dict[str, list[tuple[int, dict]]]:
    """An extrapolation result's per-position curves: {evaluation scaling: [(length, curve), ...] by length}."""
    by: dict[str, list[tuple[int, dict]]] = {}
    for key, curve in result["curves"].items():
        label, _, length = key.rpartition("@")
        by.setdefault(label, []).append((int(length), curve))
    return {label: sorted(curves, key=lambda lc: lc[0]) for label, curves in by.items()}


def draw_per_position(ax, result: dict, label: str, title: str | None = None):
    """Loss by position at each evaluation length of one scaling on `ax` (dotted: the training length)."""
    colors = pyplot().get_cmap("viridis")
    curves = curves_by_scaling(result)[label]
    for i, (length, c) in enumerate(curves):
        pts = [(s + c["bucket_width"] / 2, v) for s, v in zip(c["bucket_start"], c["loss"]) if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=2, color=colors(i / max(len(curves) - 1, 1)), label=f"L={length}")
    ax.axvline(result["train_len"], color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_title(title or label, fontsize=9)
    ax.set_xlabel("token position")
    ax.grid(alpha=0.3)


def plot_per_position(result: dict, path: Path):
    """Loss by position at each evaluation length, one panel per evaluation-time scaling."""
    plt = pyplot()
    by = curves_by_scaling(result)
    if not by:
        return
    fig, axes = plt.subplots(1, len(by), figsize=(4 * len(by), 3.5), sharey=True, squeeze=False)
    for ax, label in zip(axes[0], by):
        draw_per_position(ax, result, label)
    axes[0][0].set_ylabel("validation loss (nats / byte)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"loss by position ({result.get('name', result['position'])}; dotted: training length)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_extrapolation(results: list[dict], path: Path, title: str = "validation loss vs evaluation length"):
    """One colour per run, one line style per evaluation-time scaling."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    draw_extrapolation(ax, results, title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_extrapolation(ax, results: list[dict], title: str = "validation loss vs evaluation length"):
    """Loss against evaluation length on `ax`: one colour per run, one line style per evaluation-time scaling."""
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1))]
    colors = pyplot().get_cmap("tab10").colors
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
