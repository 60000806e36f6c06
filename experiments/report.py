"""Tables and plots from a sweep's evaluations.

    python -m experiments.report --workdir runs/ablate_positions --out experiments/results/positions

Reads `<workdir>/*/eval/extrapolation.json`, writes `results.md` (a markdown
table of validation loss per evaluation length; '-' where a scheme cannot run
at that length, with the reason below the table), `results.json` and `loss_vs_length.png`.
Sweeps whose members wrote `eval/summary.json` (the attention ablation) get a
table of their validation metrics and step times instead. Members whose
evaluation suite ran retrieval tasks (`eval/results.json`, e.g. the passkey
sweep) add a table per task (accuracy by depth or pairs x length, per member)
and `<task>_heatmaps.png`, one panel per member side by side; `retrieval.json` keeps the grids.
Members' `metrics.jsonl` add how training went: a table of every validation row and
`training_curves.png` (training loss, and validation retrieval accuracy where the mix has a task).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lc_jax import cli
from lc_jax.errors import UserError
from lc_jax.plots import draw_retrieval, plot_extrapolation, pyplot


def load(workdir: Path) -> list[dict]:
    results = []
    for path in sorted(workdir.glob("*/eval/extrapolation.json")):
        res = json.loads(path.read_text())
        res.setdefault("name", path.parent.parent.name)
        results.append(res)
    if not results:
        raise UserError(f"--workdir={str(workdir)!r}: no */eval/extrapolation.json under it; run python -m "
                        "experiments.sweep first")
    return results


def table(results: list[dict], field: str = "loss") -> tuple[str, list[str]]:
    lengths = sorted({r["length"] for res in results for r in res["rows"]})
    lines = ["| run | eval scaling | " + " | ".join(str(L) for L in lengths) + " |",
             "|---|---|" + "---:|" * len(lengths)]
    notes = []
    for res in results:
        by: dict[str, dict[int, dict]] = {}
        for r in res["rows"]:
            by.setdefault(r["scaling"], {})[r["length"]] = r
        for scaling, cells in by.items():
            vals = []
            for L in lengths:
                r = cells.get(L)
                if r is None or r.get(field) is None:
                    vals.append("-")
                    if r is not None and "error" in r:
                        notes.append(f"{res['name']} @ {L}: {r['error']}")
                else:
                    vals.append(f"{r[field]:.3f}")
            lines.append(f"| {res['name']} | {scaling} | " + " | ".join(vals) + " |")
    return "\n".join(lines), notes


SUMMARY_COLUMNS = (  # (field of the final validation metrics, header, format)
    ("text_loss", "val loss (text)", "{:.3f}"),
    ("retrieval_acc", "passkey acc", "{:.1%}"),
    ("retrieval_token_acc", "passkey digits", "{:.1%}"),
    ("dsa_recall", "mass recall: DSA", "{:.3f}"),
    ("dsa_recall_oracle", "oracle top-k", "{:.3f}"),
    ("dsa_recall_window", "last-k window", "{:.3f}"),
    ("dsa_recall_random", "random k", "{:.3f}"),
    ("dsa_older_than_window", "selected beyond window", "{:.1%}"),
    ("dsa_kl", "indexer KL", "{:.3f}"),
)


def summary_table(workdir: Path, out: Path) -> str:
    """Markdown table of each member's final validation metrics and median step time (eval/summary.json)."""
    results = [json.loads(p.read_text()) | {"name": p.parent.parent.name}
               for p in sorted(workdir.glob("*/eval/summary.json"))]
    lines = ["| run | step | " + " | ".join(h for _, h, _ in SUMMARY_COLUMNS) + " | step time (s) |",
             "|---|---:|" + "---:|" * (len(SUMMARY_COLUMNS) + 1)]
    for r in results:
        v = r["validation"]
        cells = [fmt.format(v[f]) if f in v else "-" for f, _, fmt in SUMMARY_COLUMNS]
        lines.append(f"| {r['name']} | {r['step']} | " + " | ".join(cells) + f" | {r['median_step_s']:.2f} |")
    md = "\n".join([f"# {workdir.name}", "", "\n".join(lines), ""])
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return md


def retrieval_sections(workdir: Path, out: Path) -> list[str]:
    """Markdown tables and side-by-side heatmaps of every retrieval task in the members' eval/results.json."""
    by_task: dict[str, list[tuple[str, dict]]] = {}
    for path in sorted(workdir.glob("*/eval/results.json")):
        for task, res in json.loads(path.read_text()).items():
            if task != "extrapolation":
                by_task.setdefault(task, []).append((path.parent.parent.name, res))
    # The grids themselves, to redraw them (notebooks/04) or compare with a new run: {task: {member: grid}}.
    if by_task:
        (out / "retrieval.json").write_text(json.dumps({t: dict(m) for t, m in by_task.items()}, indent=2))
    md = []
    for task, members in by_task.items():
        first = members[0][1]
        field = "token_accuracy" if task == "mqar" else "accuracy"
        axis, lengths = first["rows_axis"], first["lengths"]
        md += [f"## {task}: {'per-query accuracy' if task == 'mqar' else 'accuracy (every answer token right)'}, "
               f"{first['protocol'].split(';')[0]}", "",
               f"| run | {axis} | " + " | ".join(str(L) for L in lengths) + " |", "|---|---|" + "---:|" * len(lengths)]
        for name, res in members:
            for v in res["rows"]:
                cells = {c["length"]: c for c in res["cells"] if c[axis] == v}
                vals = [f"{cells[L][field]:.2f}" if field in cells.get(L, {}) else "-" for L in lengths]
                label = f"{v:.0%}" if axis == "depth" else str(v)
                md.append(f"| {name} | {label} | " + " | ".join(vals) + " |")
        plt = pyplot()
        fig, axes = plt.subplots(1, len(members), figsize=(3.2 * len(members) + 1, 0.45 * len(first["rows"]) + 1.8),
                                 squeeze=False)
        for i, (ax, (name, res)) in enumerate(zip(axes[0], members)):
            im = draw_retrieval(ax, res, title=f"{name} (step {res['step']})")
            if i:  # one shared row axis, labelled on the first panel
                ax.set_ylabel("")
                ax.tick_params(labelleft=False)
        fig.colorbar(im, ax=list(axes[0]), label=field.replace("_", " "))
        fig.suptitle(f"{task}: trained at {first['train_len']} tokens (dashed line)", fontsize=10)
        fig.savefig(out / f"{task}_heatmaps.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        md += ["", f"![{task}]({task}_heatmaps.png)", ""]
    return md


VALIDATION_FIELDS = (("loss", "loss"), ("text_loss", "text loss"), ("retrieval_acc", "retrieval accuracy"))


def training_section(workdir: Path, out: Path) -> list[str]:
    """Each member's validation rows during training (metrics.jsonl) as a table, and its curves as a plot."""
    runs = {}
    for path in sorted(workdir.glob("*/metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        runs[path.parent.name] = ([r for r in rows if r.get("split") == "train" and "loss" in r],
                                  [r for r in rows if r.get("split") == "validation"])
    if not any(val for _, val in runs.values()):
        return []
    fields = [(f, label) for f, label in VALIDATION_FIELDS if any(f in r for _, val in runs.values() for r in val)]
    md = ["## During training: validation rows (metrics.jsonl)", "",
          "| run | step | " + " | ".join(label for _, label in fields) + " |", "|---|---:|" + "---:|" * len(fields)]
    for name, (_, val) in runs.items():
        for r in val:
            md.append(f"| {name} | {r['step']} | " + " | ".join(
                f"{r[f]:.3f}" if f in r else "-" for f, _ in fields) + " |")
    retrieval = any(f == "retrieval_acc" for f, _ in fields)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if retrieval else 1, figsize=(12 if retrieval else 7, 4), squeeze=False)
    for name, (train, val) in runs.items():
        line, = axes[0][0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label=name)
        if retrieval:
            pts = [(r["step"], r["retrieval_acc"]) for r in val if "retrieval_acc" in r]
            if pts:
                axes[0][1].plot(*zip(*pts), marker="o", ls=":", color=line.get_color())
    axes[0][0].set(xlabel="step", ylabel="loss (nats / byte)", title="training loss (one batch of the mix per point)")
    if retrieval:
        axes[0][1].set(xlabel="step", ylabel="accuracy", ylim=(-0.03, 1.03),
                       title="validation retrieval (every answer token right)")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    axes[0][-1].legend(*axes[0][0].get_legend_handles_labels(), fontsize=7, loc="upper left",
                       bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return md + ["", "![training curves](training_curves.png)", ""]


def kv_cache_section(workdir: Path) -> list[str]:
    """A table of the calculator's KV cache per token for members whose evaluation recorded it (summary.json)."""
    rows, ctx = [], None
    for path in sorted(workdir.glob("*/eval/summary.json")):
        kv = json.loads(path.read_text()).get("kv_cache")
        if isinstance(kv, dict):
            b = kv["bytes_per_token"]  # window-bounded caches come to well under a byte per token at 128K
            cell = f"{b:,.0f}" if b >= 10 else f"{b:.3g}"
            rows.append(f"| {path.parent.parent.name} | {cell} | {kv['describe']} |")
            ctx = kv["context"]
    if not rows:
        return []
    return [f"## KV cache per token at {ctx:,} tokens (lc_jax.memory: K and V in bf16, batch 1)", "",
            "| run | bytes per token | layers |", "|---|---:|---|", *rows, ""]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if not Path(a.workdir).is_dir():
        raise UserError(f"--workdir={a.workdir!r}: no such directory (a sweep's workdir)")
    if not any(Path(a.workdir).glob("*/eval/*.json")):
        raise UserError(f"--workdir={a.workdir!r}: no member has eval/*.json yet; run python -m experiments.sweep "
                        "first")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if any("validation" in json.loads(p.read_text()) for p in Path(a.workdir).glob("*/eval/summary.json")):
        print(summary_table(Path(a.workdir), out))
        print(f"wrote {out}/results.md, results.json")
        return 0
    results = load(Path(a.workdir))
    all_tab, notes = table(results, "loss")
    beyond_tab, _ = table(results, "beyond_loss")
    train_len = results[0]["train_len"]
    md = [f"# {Path(a.workdir).name}", "",
          f"Trained at {train_len} tokens; step {results[0]['step']}. Validation loss (nats/byte).", "",
          f"Protocol: {results[0]['protocol']}", "",
          "## Mean loss over all tokens", "", all_tab, "",
          f"## Loss on tokens at positions >= {train_len} (beyond the training length)", "", beyond_tab, ""]
    if notes:
        md += ["## Not evaluated", ""] + [f"- {n}" for n in sorted(set(notes))] + [""]
    md += retrieval_sections(Path(a.workdir), out)
    md += kv_cache_section(Path(a.workdir))
    md += training_section(Path(a.workdir), out)
    (out / "results.md").write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_extrapolation(results, out / "loss_vs_length.png",
                       title=f"validation loss vs evaluation length (trained at {train_len})")
    print("\n".join(md))
    print(f"wrote {out}/results.md, results.json, loss_vs_length.png")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
