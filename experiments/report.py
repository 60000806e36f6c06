"""Tables and plots from a sweep's evaluations.

    python -m experiments.report --workdir runs/ablate_positions --out experiments/results/positions

Reads `<workdir>/*/eval/extrapolation.json`, writes `results.md` (a markdown
table of validation loss per evaluation length; '-' where a scheme cannot run
at that length, with the reason below the table), `results.json` and `loss_vs_length.png`.
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    results = load(Path(a.workdir))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
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
