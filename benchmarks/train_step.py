"""Training throughput (tokens/s) of a config's model on this machine, the number later issues compare.

Times the real jitted, donated train step of `lc_jax.train` on real batches
from the config's data pipeline; compile time is excluded and reported apart.

    python benchmarks/train_step.py                                   # quickstart model, seq 2048
    python benchmarks/train_step.py --config configs/quickstart.py --steps 10 --set model.attention.impl=reference

`--impls xla,pallas,cudnn` times each attention implementation in turn on the
same batches and writes one JSON with a row per implementation; one that cannot
train this model (impl='cudnn' cannot mask packed documents) records its error
and the others still run (what benchmarks/gpu_check.sh does on a GPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax

from lc_jax import config as config_lib
from lc_jax import sharding, steps
from lc_jax import state as state_lib
from lc_jax.data import make_dataset


def _set(cfg, assignment: str):
    key, value = assignment.split("=", 1)
    node = cfg
    *path, leaf = key.split(".")
    for p in path:
        node = node[p]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value.lower() == "true"


def measure(cfg, mesh, batches: list) -> dict:
    """Compile (first step) and median step time of `cfg`'s model over `batches` (the first two are warm-up)."""
    tx, schedule = state_lib.make_optimizer(cfg.train)
    graphdef, state = state_lib.init_state(cfg, mesh, tx)
    step_fn = steps.make_train_step(graphdef, tx, schedule)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        state, m = step_fn(state, batches[0])
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        state, m = step_fn(state, batches[1])
        jax.block_until_ready(m)
        times = []
        for b in batches[2:]:
            t0 = time.perf_counter()
            state, m = step_fn(state, b)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    med = statistics.median(times)
    return {"params": sum(x.size for x in jax.tree.leaves(state["params"])), "attention_impl": cfg.model.attention.impl,
            "median_step_s": med, "tokens_per_s": tokens / med, "compile_and_first_step_s": compile_s,
            "final_loss": float(m["loss"]), "step_times_s": times}


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.py")
    ap.add_argument("--steps", type=int, default=8, help="timed steps after 2 warm-up steps")
    ap.add_argument("--set", action="append", default=[], help="override, e.g. model.attention.impl=xla")
    ap.add_argument("--impls", default=None,
                    help="comma list of model.attention.impl values to time in turn (one JSON row each)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step_cpu.json"))
    a = ap.parse_args()

    cfg = config_lib.load(a.config)
    for s in a.set:
        _set(cfg, s)
    config_lib.validate(cfg, num_devices=jax.device_count())
    mesh = sharding.make_mesh(cfg.mesh)
    it = iter(make_dataset(cfg.data, split="train", batch_size=cfg.data.batch_size, seed=cfg.seed))
    batches = [sharding.shard_batch(next(it), mesh) for _ in range(a.steps + 2)]

    tokens = cfg.data.batch_size * cfg.data.seq_len
    device = jax.devices()[0]
    dev_name = (f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
                if device.platform == "cpu" else f"{device.device_kind} x{jax.device_count()}")
    out = {
        "benchmark": "train_step",
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": dev_name,
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "config": a.config, "overrides": a.set, "seq_len": cfg.data.seq_len, "batch_size": cfg.data.batch_size,
        "dtype": cfg.model.dtype,
    }
    if a.impls is None:
        res = measure(cfg, mesh, batches)
        print(f"{a.config}: {res['params'] / 1e6:.2f}M params, {tokens} tokens/step, {dev_name}")
        print(f"{'step time (s)':>14} {'tokens/s':>10} {'compile (s)':>12}")
        print(f"{res['median_step_s']:>14.3f} {res['tokens_per_s']:>10.0f} {res['compile_and_first_step_s']:>12.1f}")
        out.update(res)
    else:
        print(f"{a.config}: {tokens} tokens/step, {cfg.model.dtype}, {dev_name}, {a.steps} timed steps")
        print(f"{'impl':>8} {'step time (s)':>14} {'tokens/s':>10} {'compile (s)':>12}")
        rows = []
        for impl in a.impls.split(","):
            cfg.model.attention.impl = impl
            try:
                config_lib.validate(cfg, num_devices=jax.device_count())
                row = measure(cfg, mesh, batches)
                print(f"{impl:>8} {row['median_step_s']:>14.4f} {row['tokens_per_s']:>10.0f} "
                      f"{row['compile_and_first_step_s']:>12.1f}", flush=True)
            except Exception as e:  # noqa: BLE001 - one impl that cannot train must not end the run
                row = {"attention_impl": impl, "error": _error(e)}
                print(f"{impl:>8} {row['error']}", flush=True)
            rows.append(row)
        out["rows"] = rows
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
