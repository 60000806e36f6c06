"""Tables and plots from a sweep's evaluations.

    python -m experiments.report --workdir runs/ablate_positions --out experiments/results/positions

Reads `<workdir>/*/eval/extrapolation.json`, writes `results.md` (a markdown
table of validation loss per evaluation length; '-' where a scheme cannot run
at that length, with the reason below the table), `results.json` and `loss_vs_length.png`.
Sweeps whose members wrote `eval/summary.json` (the attention ablation) get a
table of their validation metrics and step times instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lc_jax.evaluate import plot_extrapolation


def load(workdir: Path) -> list[dict]:
    results = []
    for path in sorted(workdir.glob("*/eval/extrapolation.json")):
        res = json.loads(path.read_text())
        res.setdefault("name", path.parent.parent.name)
        results.append(res)
    if not results:
        raise SystemExit(f"no */eval/extrapolation.json under {workdir}")
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if list(Path(a.workdir).glob("*/eval/summary.json")):
        print(summary_table(Path(a.workdir), out))
        print(f"wrote {out}/results.md, results.json")
        return
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
    (out / "results.md").write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_extrapolation(results, out / "loss_vs_length.png",
                       title=f"validation loss vs evaluation length (trained at {train_len})")
    print("\n".join(md))
    print(f"wrote {out}/results.md, results.json, loss_vs_length.png")


if __name__ == "__main__":
    main()
