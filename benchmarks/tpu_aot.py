"""Per-chip HBM of every configs/tpu/* run, compiled for its TPU slice on this CPU host, beside lc_jax.memory's plan.

    python benchmarks/tpu_aot.py                        # every config + the longest-context search (about an hour)
    python benchmarks/tpu_aot.py --configs llama1b_32k --no-search

For each config, `lc_jax.aot` compiles the real train step for the config's
`aot.topology` (no TPU: libtpu's compiler runs here) and reports XLA's memory
analysis per chip; `python -m lc_jax.memory --train` predicts the same run from
shapes. The table gives both totals and their difference.

The search: the longest context per chip for the Llama-3.1-8B shape
(configs/tpu/llama8b_128k.py) on a v5p-128 slice (64 chips) with context
parallelism 1, 4 and 16; fsdp takes the rest of the slice and the batch is one
sequence per ring. It starts at the calculator's longest fitting length, then
brackets the compiler's fit / no-fit verdict with at most three compiles per
degree (about five minutes each). Writes benchmarks/results/tpu_aot.json.
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

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; libtpu must not look for a local TPU

import jax  # noqa: E402

from lc_jax import aot, memory  # noqa: E402
from lc_jax import config as config_lib  # noqa: E402

CONFIGS = ("llama1b_32k", "sliding1b_128k", "dsa1b_32k", "llama8b_128k", "gemma3_1b_128k")
RESULTS = Path(__file__).parent / "results"
SEARCH_CONFIG, SEARCH_TOPOLOGY, SEARCH_CONTEXTS = "llama8b_128k", "v5p:4x4x4", (1, 4, 16)
STEP_PER_CHIP = 2048  # search granularity: tokens per chip


def _path(name: str) -> str:
    return f"configs/tpu/{name}.py"


def compile_config(name: str, cfg=None, topology: str | None = None, reuse: dict | None = None) -> dict:
    """Compile one run (or take `reuse`, an earlier row's compiled figures) and predict it; the row of the table."""
    cfg = cfg or config_lib.load(_path(name))
    topology = topology or cfg.aot.topology
    if reuse is None:
        report, _ = aot.compile_train_step(cfg, aot.topology_devices(topology), name=name, topology=topology)
        row = {"config": name, "topology": topology, "chips": report.devices, "mesh": report.mesh,
               "seq_len": report.seq_len, "batch": report.batch_size, "stage": report.stage,
               "hbm_gib": report.chip["hbm_bytes"] / aot.GiB, "compile_s": round(report.compile_s, 1),
               "compiled_gib": {k: v / aot.GiB for k, v in report.bytes.items()}, "fits": report.fits,
               "message": report.message()}
    else:
        row = {k: v for k, v in reuse.items() if not k.startswith("calculator")}
    plan = memory.train_memory(memory.from_config(cfg, name), memory.TrainRun(
        seq_len=cfg.data.seq_len, batch=cfg.data.batch_size, mesh=row["mesh"], remat=cfg.model.remat,
        dtype=memory.DTYPE_ALIASES.get(cfg.model.dtype, cfg.model.dtype)))
    return row | {"calculator_gib": {k: v / aot.GiB for k, v in plan.items()},
                  "calculator_vs_compiler": plan["total"] / aot.GiB / row["compiled_gib"]["total"] - 1}


def _search_config(cp: int, seq_len: int):
    cfg = config_lib.load(_path(SEARCH_CONFIG))
    _, chips = memory.topology_chips(SEARCH_TOPOLOGY)
    fsdp = chips // cp
    cfg.mesh.update(data=1, fsdp=fsdp, tensor=1, context=cp)
    cfg.data.update(seq_len=seq_len, batch_size=fsdp)
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, seq_len)
    return cfg


def _predicted_longest(cp: int) -> int:
    """The calculator's longest fitting length (a multiple of cp x STEP_PER_CHIP)."""
    gen, _ = memory.topology_chips(SEARCH_TOPOLOGY)
    best, n = cp * STEP_PER_CHIP, 1
    while n < 256:
        cfg = _search_config(cp, cp * STEP_PER_CHIP * n)
        plan = memory.train_memory(memory.from_config(cfg), memory.train_run_from_config(cfg, cp * cfg.mesh.fsdp))
        if plan["total"] > memory.TPU_HBM_BYTES[gen]:
            break
        best, n = cp * STEP_PER_CHIP * n, n + 1
    return best


def longest_context(cp: int, log, budget: int = 3) -> dict:
    """Bracket the longest fitting length with at most `budget` compiles, starting at the calculator's guess.

    Lengths are multiples of cp x STEP_PER_CHIP. The first compile decides the direction; the bracket then
    widens by half the guess at a time until the verdict turns, and is halved while compiles remain.
    Returns the longest length compiled that fits and the shortest that does not.
    """
    step = cp * STEP_PER_CHIP
    guess = _predicted_longest(cp)
    tried: dict[int, dict] = {}

    def fits(L: int) -> bool:
        row = compile_config(SEARCH_CONFIG, _search_config(cp, L), SEARCH_TOPOLOGY)
        tried[L] = {"fits": row["fits"], "compiled_gib": row["compiled_gib"]["total"],
                    "calculator_gib": row["calculator_gib"]["total"], "compile_s": row["compile_s"]}
        log(f"  context parallelism {cp:>2}: {L:>8,} tokens ({L // cp:,} per chip): "
            f"{'fits' if row['fits'] else 'does not fit'}, compiled {row['compiled_gib']['total']:.1f} GiB, "
            f"calculator {row['calculator_gib']['total']:.1f} GiB ({row['compile_s']:.0f} s)")
        return row["fits"]

    lo, hi = None, None  # longest that fits, shortest that does not
    L, stride = guess, max(step, guess // 2 // step * step)
    while len(tried) < budget:
        if fits(L):
            lo = L
        else:
            hi = L
        if lo is not None and hi is not None:
            if hi - lo <= step:
                break
            L = lo + (hi - lo) // 2 // step * step
        else:
            L = L + stride if hi is None else max(step, L - stride)
            if L in tried:
                break
    return {"context_parallelism": cp, "fsdp": 64 // cp, "longest_fitting": lo or 0,
            "tokens_per_chip": (lo or 0) // cp, "shortest_not_fitting": hi, "calculator_guess": guess,
            "tried": {str(k): v for k, v in sorted(tried.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--no-search", action="store_true", help="skip the longest-context search")
    ap.add_argument("--contexts", type=int, nargs="+", default=list(SEARCH_CONTEXTS),
                    help="context-parallel degrees of the search")
    ap.add_argument("--out", default=str(RESULTS / "tpu_aot.json"))
    ap.add_argument("--reuse", action="store_true",
                    help="take the configs' compiled figures and the finished search degrees from --out (same jax "
                         "and libtpu) and recompute the calculator's; an interrupted search resumes")
    a = ap.parse_args()

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.time()
    rows = []
    header = (f"{'config':<16}{'topology':<12}{'mesh (data,fsdp,tensor,ctx)':<29}{'HBM':>7}{'compiled':>10}"
              f"{'calculator':>12}{'diff':>8}  fits   compile")
    log(header)
    previous, previous_search = {}, {}
    if a.reuse and Path(a.out).exists():
        old = json.loads(Path(a.out).read_text())
        if (old.get("jax"), old.get("libtpu")) == (jax.__version__, _libtpu_version()):
            previous = {r["config"]: r for r in old["configs"]}
            previous_search = {s["context_parallelism"]: s for s in old.get("search", [])}
    for name in a.configs:
        r = compile_config(name, reuse=previous.get(name))
        rows.append(r)
        mesh = ",".join(str(r["mesh"][k]) for k in ("data", "fsdp", "tensor", "context"))
        log(f"{name:<16}{r['topology']:<12}{mesh:<29}{r['hbm_gib']:>7.1f}{r['compiled_gib']['total']:>10.2f}"
            f"{r['calculator_gib']['total']:>12.2f}{100 * r['calculator_vs_compiler']:>7.1f}%  "
            f"{'yes' if r['fits'] else 'no':<6}{r['compile_s']:>6.0f} s")
    log("GiB per chip; compiled = XLA's arguments + outputs (not aliased) + temporaries + generated code")
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": datetime.date.today().isoformat(),
           "host": platform.processor() or platform.machine(), "jax": jax.__version__,
           "libtpu": _libtpu_version(), "configs": rows, "search": []}
    _write(a.out, out)
    search = out["search"]
    if not a.no_search:
        log(f"\nlongest context per chip, {SEARCH_CONFIG} on {SEARCH_TOPOLOGY} (64 chips), one sequence per ring:")
        for cp in a.contexts:
            s = previous_search.get(cp) or longest_context(cp, log)
            search.append(s)
            log(f"context parallelism {cp:>2} (fsdp {s['fsdp']}): longest that fits {s['longest_fitting']:,} tokens "
                f"({s['tokens_per_chip']:,} per chip), shortest that does not "
                f"{s['shortest_not_fitting'] or 'not reached'}; the calculator guessed {s['calculator_guess']:,}")
            _write(a.out, out)
    out["seconds"] = round(time.time() - t0)
    _write(a.out, out)
    log(f"wrote {a.out}")


def _write(path: str, out: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")


def _libtpu_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("libtpu")
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
