"""Context parallelism: train-step time per token, memory per device, and the longest trainable sequence, vs devices.

For 1, 2, 4 and 8 devices on the `context` axis (ring attention), with the
zig-zag (load-balanced) and contiguous layouts side by side:

  * step time per token of the real jitted train step (forward, ring
    backward, AdamW) at one sequence length, layouts alternated per repeat;
  * peak memory per device of that step, from XLA's compiled memory analysis
    of the partitioned (per-device) program: arguments + outputs - aliased
    (donated) + temporaries;
  * the longest sequence whose step fits a fixed per-device budget, found by
    compiling (not running) the step at growing lengths and bisecting.

    python benchmarks/ring.py                       # 8 fake CPU devices; writes results/ring_cpu.json
    python benchmarks/ring.py --devices 1,2,4 --time-len 4096 --budget-mib 512

On CPU the "devices" are XLA host devices that share this machine's cores, so
the time per token shows the ring's overhead, not a speed-up; the memory
columns are what context parallelism buys, and they carry over to TPUs/GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import quickstart  # noqa: E402
from lc_jax import config as config_lib  # noqa: E402
from lc_jax import sharding, steps  # noqa: E402
from lc_jax import state as state_lib  # noqa: E402

MiB = 2**20


def _config(n: int, seq_len: int, layout: str, args):
    c = quickstart.get_config()
    c.model.max_seq_len = max(seq_len, c.model.max_seq_len)
    c.model.remat = args.remat
    c.data.update(seq_len=seq_len, batch_size=1)
    c.mesh.update(data=1, fsdp=1, tensor=1, context=n, context_layout=layout)
    c.model.attention.update(block_q=args.block, block_k=args.block)
    config_lib.validate(c, num_devices=n)
    return config_lib.resolve(c)


def _setup(n: int, seq_len: int, layout: str, args):
    c = _config(n, seq_len, layout, args)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:n])
    tx, schedule = state_lib.make_optimizer(c.train)
    graphdef, state = state_lib.init_state(c, mesh, tx)
    return c, mesh, state, steps.make_train_step(graphdef, tx, schedule)


def _batch(seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (1, seq_len + 1), dtype=np.int32)
    pos = np.arange(seq_len, dtype=np.int32)[None]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": pos,
            "segment_ids": np.zeros_like(pos), "loss_mask": np.ones((1, seq_len), np.float32)}


def peak_bytes_per_device(n: int, seq_len: int, args, layout: str = "zigzag") -> int:
    """Compile the step for `n` context shards and read the per-device memory of the partitioned program."""
    c, mesh, state, step = _setup(n, seq_len, layout, args)
    abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)  # noqa: E731
    batch = jax.tree.map(abstract, sharding.shard_batch(_batch(seq_len), mesh, layout=layout))
    with jax.set_mesh(mesh):
        mem = step.lower(jax.tree.map(abstract, state), batch).compile().memory_analysis()
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
               + mem.temp_size_in_bytes)


def longest_within(n: int, budget: int, args) -> tuple[int, int]:
    """(longest length, its bytes): double, then bisect, in steps of `2n * block` tokens."""
    quantum = 2 * n * args.block
    lo, lo_bytes, hi = 0, 0, quantum
    while True:
        b = peak_bytes_per_device(n, hi, args)
        if b > budget:
            break
        lo, lo_bytes, hi = hi, b, hi * 2
    while hi - lo > quantum:
        mid = (lo + hi) // 2 // quantum * quantum
        b = peak_bytes_per_device(n, mid, args)
        lo, lo_bytes, hi = (mid, b, hi) if b <= budget else (lo, lo_bytes, mid)
    return lo, lo_bytes


def time_per_token(setups, seq_len: int, repeats: int) -> dict[str, list[float]]:
    """Median-ready step times per token for each (layout -> setup), alternating layouts every repeat."""
    placed = {k: sharding.shard_batch(_batch(seq_len), mesh, layout=k) for k, (_, mesh, _, _) in setups.items()}
    states = {k: s[2] for k, s in setups.items()}
    out = {k: [] for k in setups}
    for r in range(repeats + 1):
        for k, (_, mesh, _, step) in setups.items():
            with jax.set_mesh(mesh):
                t0 = time.perf_counter()
                states[k], m = step(states[k], placed[k])
                jax.block_until_ready(m)
                if r:  # repeat 0 compiles
                    out[k].append((time.perf_counter() - t0) / seq_len)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--layouts", default="zigzag,contiguous")
    ap.add_argument("--time-len", type=int, default=8192, help="sequence length of the timed steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-mib", type=float, default=400.0, help="per-device memory budget for the length search")
    ap.add_argument("--block", type=int, default=256, help="attention block_q = block_k")
    ap.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ring_cpu.json"))
    a = ap.parse_args()
    devices = [int(x) for x in a.devices.split(",")]
    layouts = a.layouts.split(",")
    if max(devices) > jax.device_count():
        raise SystemExit(f"--devices {a.devices}: only {jax.device_count()} devices are present")

    rows = []
    for n in devices:
        setups = {k: _setup(n, a.time_len, k, a) for k in layouts}
        times = time_per_token(setups, a.time_len, a.repeats)
        del setups
        peak = peak_bytes_per_device(n, a.time_len, a)
        longest, longest_bytes = longest_within(n, int(a.budget_mib * MiB), a)
        row = {"devices": n, "time_len": a.time_len, "peak_mib_per_device": peak / MiB,
               "longest_seq_within_budget": longest, "its_peak_mib": longest_bytes / MiB}
        for k in layouts:
            row[f"us_per_token_{k}"] = float(np.median(times[k]) * 1e6)
            row[f"us_per_token_{k}_all"] = [t * 1e6 for t in times[k]]
        rows.append(row)
        cols = "  ".join(f"{k} {row[f'us_per_token_{k}']:8.1f} us/tok" for k in layouts)
        print(f"n={n}: {cols}  peak {row['peak_mib_per_device']:7.1f} MiB/device at {a.time_len}  "
              f"longest within {a.budget_mib:.0f} MiB: {longest}", flush=True)

    base = rows[0]["longest_seq_within_budget"] or 1
    print(f"\n{'devices':>7} " + " ".join(f"{k + ' us/tok':>18}" for k in layouts)
          + f" {'MiB/device @' + str(a.time_len):>16} {'longest seq':>12} {'x vs ' + str(devices[0]):>8}")
    for r in rows:
        print(f"{r['devices']:>7} " + " ".join(f"{r[f'us_per_token_{k}']:>18.1f}" for k in layouts)
              + f" {r['peak_mib_per_device']:>16.1f} {r['longest_seq_within_budget']:>12} "
              f"{r['longest_seq_within_budget'] / base:>8.2f}")
    dev = jax.devices()[0]
    dev_name = (f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"{jax.device_count()} XLA host devices" if dev.platform == "cpu" else dev.device_kind)
    out = {
        "benchmark": "ring",
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": dev_name,
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "model": "configs/quickstart.py (d_model 256, 4 layers, 4 heads / 2 kv, head_dim 64, f32), batch 1",
        "remat": a.remat, "block": a.block, "budget_mib": a.budget_mib, "rows": rows,
        "note": "memory = XLA memory analysis of the per-device program (args + outputs - donated + temps); "
                "CPU host devices share the machine's cores, so time per token is not a speed-up measure",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend with the XLA_FLAGS above
    main()
