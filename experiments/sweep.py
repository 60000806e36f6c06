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
import sys
from pathlib import Path

from absl import logging

from lc_jax import cli, evaluate, train
from lc_jax import config as config_lib
from lc_jax.errors import UserError


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="config module with get_config(arg) and get_sweep()")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--only", nargs="*", help="names of the members to run")
    ap.add_argument("--steps", type=int, default=0, help="override train.steps (smoke runs)")
    a = ap.parse_args(argv)
    logging.set_verbosity(logging.WARNING)

    if not a.config.endswith(".py") or not config_lib.find(a.config).is_file():
        raise UserError(f"--config={a.config!r}: no config module there (a .py file with get_sweep())")
    module = config_lib.load_module(a.config)
    if not hasattr(module, "get_sweep"):
        raise UserError(f"--config={a.config!r}: defines no get_sweep(); sweeps live in the config module")
    members = list(module.get_sweep())
    names = [name for name, _ in members]
    unknown = [n for n in a.only or () if n not in names]
    if unknown:
        raise UserError(f"--only {' '.join(unknown)}: not a member of the sweep; members are {names}")
    if a.steps < 0:
        raise UserError(f"--steps={a.steps}: must be >= 0 (0 keeps train.steps)")
    configs = {}
    for name, arg in members:  # every member's config is checked before the first one trains
        if a.only and name not in a.only:
            continue
        cfg = cli.load(f"{a.config}:{arg}" if arg is not None else a.config)
        if a.steps:
            cfg.train.steps = cfg.train.eval_every = cfg.checkpoint.every = a.steps
        try:
            config_lib.validate(cfg)
        except config_lib.ConfigError as e:
            raise UserError(f"sweep member {name!r}: {e}") from None
        configs[name] = (arg, cfg)
    with train.Stop() as stop:  # one stop for every member (routed by the first); handlers back after
        for name, (arg, cfg) in configs.items():
            workdir = Path(a.workdir) / name
            print(f"=== {name} ({arg})", flush=True)
            try:
                train.train(cfg, workdir, stop=stop)
            except train.Interrupted as e:
                print(f"stopped on {e} (member {name}; rerun the sweep to continue)")
                return 0
            if hasattr(module, "evaluate"):  # the config module says what its ablation measures
                res, out = module.evaluate(workdir), workdir / "eval" / "summary.json"
            else:  # default: loss at 1x..8x the training length under each RoPE scaling
                res, out = evaluate.extrapolation_sweep(workdir), workdir / "eval" / "extrapolation.json"
            res["name"] = name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
