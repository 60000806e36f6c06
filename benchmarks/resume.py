"""What a preemption costs: steps lost, and the time from restart to the first new step (quickstart model).

    python benchmarks/resume.py                      # 3 kill -9 at random steps, 1 SIGTERM; ~10 min on 2 cores
    python benchmarks/resume.py --kills 1 --config.train.steps=60 --config.checkpoint.every=20   # smoke

Each trial trains `lc_jax.train` in a fresh workdir in a process of its own, waits for a random step, stops
it (kill -9, or SIGTERM, which saves at the current step), and starts the same command again. Reported per
trial: the step it was stopped at (the last one logged), the step it resumed from, the steps lost (their
difference: redone after the restart), the restart's time to the `resumed` line (imports, validation,
initialisation, compile, restore) and to the first new step, and the time one step takes. Writes a table
and `benchmarks/results/resume_cpu.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}  # lines as they are printed


def _command(workdir: Path, config: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "lc_jax.train", "--config", config, "--workdir", str(workdir),
            "--config.train.log_every=1", "--config.train.progress=False", *overrides]


def _last_step(workdir: Path) -> int:
    try:
        rows = [json.loads(x) for x in open(workdir / "metrics.jsonl") if x.endswith("\n")]
    except OSError:
        return 0
    return max((r["step"] for r in rows if r["split"] == "train"), default=0)


def _watch(proc: subprocess.Popen, workdir: Path, until, timeout: float) -> float:
    """Seconds until `until(step)` holds for the newest logged step, polling every 20 ms."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended early (exit {proc.returncode}); rerun its command to see why")
        if until(_last_step(workdir)):
            return time.monotonic() - t0
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout} s")


def trial(config: str, overrides: list[str], how: str, kill_at: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="lc_jax_resume_") as tmp:
        workdir = Path(tmp) / "run"
        cmd = _command(workdir, config, overrides)
        first = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        _watch(first, workdir, lambda s: s >= kill_at, timeout)
        stopped_at = _last_step(workdir)
        first.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGTERM)
        out, _ = first.communicate(timeout=timeout)
        saved = re.search(r"checkpoint saved at step (\d+)", out)
        stopped_at = int(saved.group(1)) if saved else stopped_at  # SIGTERM finishes the step it was in

        t0 = time.monotonic()
        again = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 bufsize=1)
        line = ""
        while "resumed from" not in line and "model:" not in line:
            line = again.stdout.readline()
            if not line and again.poll() is not None:
                raise RuntimeError(f"the restart ended early (exit {again.returncode})")
        resumed_s = time.monotonic() - t0
        m = re.search(r"at step (\d+)", line)
        resumed_from = int(m.group(1)) if m else 0
        # The rows the killed run logged after its checkpoint go first (the restart drops them), then a new
        # step comes.
        _watch(again, workdir, lambda s: s <= resumed_from, timeout)
        first_new_s = time.monotonic() - t0 + _watch(again, workdir, lambda s: s > resumed_from, timeout)
        t1, s1 = time.monotonic(), _last_step(workdir)
        _watch(again, workdir, lambda s: s >= s1 + 5, timeout)
        step_s = (time.monotonic() - t1) / (_last_step(workdir) - s1)
        again.kill()
        again.communicate()
    return {"how": how, "stopped_at": stopped_at, "resumed_from": resumed_from,
            "steps_lost": stopped_at - resumed_from, "restart_to_resumed_s": round(resumed_s, 2),
            "restart_to_first_new_step_s": round(first_new_s, 2), "step_s": round(step_s, 3),
            "lost_time_s": round(first_new_s + (stopped_at - resumed_from) * step_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.py")
    ap.add_argument("--kills", type=int, default=3, help="kill -9 trials (plus one SIGTERM)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "resume_cpu.json"))
    args, overrides = ap.parse_known_args()
    every = next((int(o.split("=")[1]) for o in overrides if o.startswith("--config.checkpoint.every=")), 100)
    steps = next((int(o.split("=")[1]) for o in overrides if o.startswith("--config.train.steps=")), 300)
    rng = random.Random(args.seed)
    plan = [("kill -9", rng.randint(every // 2, min(steps - 10, 2 * every))) for _ in range(args.kills)]
    plan.append(("SIGTERM", rng.randint(every // 2, min(steps - 10, 2 * every))))
    rows = []
    for how, at in plan:
        rows.append(trial(args.config, overrides, how, at, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
    head = ["how", "stopped at", "resumed from", "steps lost", "restart->resumed s", "restart->new step s",
            "step s", "time lost s"]
    keys = ["how", "stopped_at", "resumed_from", "steps_lost", "restart_to_resumed_s", "restart_to_first_new_step_s",
            "step_s", "lost_time_s"]
    table = [head] + [[str(r[k]) for k in keys] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print(f"\n{args.config} {' '.join(overrides)}, checkpoint every {every} steps")
    for i, r in enumerate(table):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    result = {"benchmark": "resume", "config": args.config, "overrides": overrides, "checkpoint_every": every,
              "rows": rows, "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                        "python": platform.python_version()},
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": "python benchmarks/resume.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
