"""Run every member of a config module's sweep: train from scratch, then the extrapolation evaluation.

    python -m experiments.sweep --config configs/ablations/positions.py --workdir runs/ablate_positions [--only rope]

A config module may define `evaluate(workdir) -> dict` (written to
`<member>/eval/summary.json`); otherwise each member gets the extrapolation
sweep (`eval/extrapolation.json`). Each member gets `<workdir>/<name>/`. Training resumes from a member's
checkpoints, so an interrupted sweep continues where it stopped and a finished member trains no further
step; its evaluation runs again (it is cheap next to training, and picks up changed `eval.*` settings).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from absl import logging

from lc_jax import config as config_lib
from lc_jax import evaluate, train


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="config module with get_config(arg) and get_sweep()")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--only", nargs="*", help="names of the members to run")
    ap.add_argument("--steps", type=int, default=0, help="override train.steps (smoke runs)")
    a = ap.parse_args()
    logging.set_verbosity(logging.WARNING)

    module = config_lib.load_module(a.config)
    for name, arg in module.get_sweep():
        if a.only and name not in a.only:
            continue
        cfg = module.get_config(arg)
        if a.steps:
            cfg.train.steps = cfg.train.eval_every = cfg.checkpoint.every = a.steps
        workdir = Path(a.workdir) / name
        print(f"=== {name} ({arg})", flush=True)
        train.train(cfg, workdir)
        if hasattr(module, "evaluate"):  # the config module says what its ablation measures
            res, out = module.evaluate(workdir), workdir / "eval" / "summary.json"
        else:  # default: loss at 1x..8x the training length under each RoPE scaling
            res, out = evaluate.extrapolation_sweep(workdir), workdir / "eval" / "extrapolation.json"
        res["name"] = name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
