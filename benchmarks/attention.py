"""Causal attention forward+backward: lc_jax's blockwise XLA path against its peers, on this machine.

Each (implementation, length) runs in its own process so that its peak memory
is its own, and the implementations alternate within every repetition so that
machine noise hits them alike. Reported per cell: median wall time of one
fwd+bwd, XLA's planned temp memory (buffer assignment of the compiled program)
and the process's peak RSS above its pre-compile baseline.

    python benchmarks/attention.py                    # 2K, 8K, 16K; writes benchmarks/results/attention_cpu.json
    python benchmarks/attention.py --lengths 2048 --reps 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("lc_jax_xla", "jax_xla", "tokamax_xla_chunked")
RESULTS = Path(__file__).parent / "results"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(impl: str, T: int, B: int, H: int, D: int, iters: int, mem_limit_gb: float) -> dict:
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, do = (jax.random.normal(kk, (B, T, H, D), jnp.float32) for kk in ks)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    if impl == "lc_jax_xla":
        from lc_jax import ops

        def attn(q, k, v):
            return ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, causal=True, impl="xla")
    elif impl == "jax_xla":
        def attn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    elif impl == "tokamax_xla_chunked":
        sys.argv = sys.argv[:1]  # tokamax parses absl flags from argv on first use
        import tokamax

        def attn(q, k, v):
            return tokamax.dot_product_attention(q, k, v, is_causal=True, implementation="xla_chunked")
    else:
        raise ValueError(f"unknown impl {impl!r}; allowed: {IMPLS}")

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(do)

    jax.block_until_ready((q, k, v, do))
    baseline = _rss_mb()
    compiled = jax.jit(fwd_bwd).lower(q, k, v, do).compile()
    ma = compiled.memory_analysis()
    temp_mb = ma.temp_size_in_bytes / 2**20 if ma is not None else float("nan")
    result = {"impl": impl, "T": T, "xla_temp_mb": temp_mb}
    if temp_mb / 1024 > mem_limit_gb:
        return {**result, "skipped": f"XLA plans {temp_mb / 1024:.1f} GiB of temps (> {mem_limit_gb} GiB limit)"}
    jax.block_until_ready(compiled(q, k, v, do))  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, do))
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**result, "time_s": statistics.median(times), "times_s": times, "peak_rss_mb": peak,
            "peak_rss_above_baseline_mb": peak - baseline}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions (each a fresh process)")
    ap.add_argument("--iters", type=int, default=2, help="timed calls per process, after one warm-up")
    ap.add_argument("--mem-limit-gb", type=float, default=12.0, help="skip cells whose planned temps exceed this")
    ap.add_argument("--out", default=str(RESULTS / "attention_cpu.json"))
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        res = worker(a.worker[0], int(a.worker[1]), a.batch, a.heads, a.head_dim, a.iters, a.mem_limit_gb)
        print("RESULT " + json.dumps(res))
        return

    cells: dict[tuple[str, int], list[dict]] = {}
    for T in a.lengths:
        for rep in range(a.reps):
            order = a.impls[rep % len(a.impls):] + a.impls[: rep % len(a.impls)]  # rotate who goes first
            for impl in order:
                cmd = [sys.executable, __file__, "--worker", impl, str(T), "--batch", str(a.batch), "--heads",
                       str(a.heads), "--head-dim", str(a.head_dim), "--iters", str(a.iters),
                       "--mem-limit-gb", str(a.mem_limit_gb)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                res = json.loads(line[-1][7:]) if line else {
                    "impl": impl, "T": T, "failed": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
                cells.setdefault((impl, T), []).append(res)
                print(f"  T={T:6d} rep={rep} {impl:22s} "
                      + (f"{res['time_s']:.3f}s" if "time_s" in res else res.get("skipped") or res.get("failed")),
                      flush=True)

    rows = []
    for (impl, T), runs in cells.items():
        timed = [r for r in runs if "time_s" in r]
        row = {"impl": impl, "T": T, "xla_temp_mb": runs[0].get("xla_temp_mb")}
        if timed:
            row.update(time_s=statistics.median(r["time_s"] for r in timed),
                       peak_rss_above_baseline_mb=max(r["peak_rss_above_baseline_mb"] for r in timed))
        else:
            row["note"] = runs[0].get("skipped") or runs[0].get("failed")
        rows.append(row)

    def ratio(T, field, num, den):
        a_ = next((r for r in rows if r["impl"] == num and r["T"] == T and field in r), None)
        b_ = next((r for r in rows if r["impl"] == den and r["T"] == T and field in r), None)
        return a_[field] / b_[field] if a_ and b_ and b_[field] else None

    print(f"\nCausal attention fwd+bwd, B={a.batch} H={a.heads} D={a.head_dim} f32, CPU "
          f"({os.cpu_count()} cores), median of {a.reps} alternating runs x {a.iters} calls")
    print(f"{'T':>6} {'impl':22} {'time (s)':>9} {'XLA temps (MiB)':>16} {'peak RSS (MiB)':>15}")
    for r in sorted(rows, key=lambda r: (r["T"], a.impls.index(r["impl"]))):
        t = f"{r['time_s']:.3f}" if "time_s" in r else "-"
        rss = f"{r['peak_rss_above_baseline_mb']:.0f}" if "peak_rss_above_baseline_mb" in r else "-"
        temps = f"{r['xla_temp_mb']:.0f}" if r.get("xla_temp_mb") is not None else "-"
        print(f"{r['T']:>6} {r['impl']:22} {t:>9} {temps:>16} {rss:>15}  {r.get('note', '')}")
    ratios = {}
    for T in a.lengths:
        ratios[T] = {
            "time_vs_tokamax_chunked": ratio(T, "time_s", "lc_jax_xla", "tokamax_xla_chunked"),
            "xla_temps_vs_tokamax_chunked": ratio(T, "xla_temp_mb", "lc_jax_xla", "tokamax_xla_chunked"),
            "rss_vs_tokamax_chunked": ratio(T, "peak_rss_above_baseline_mb", "lc_jax_xla", "tokamax_xla_chunked"),
            "time_vs_jax_xla": ratio(T, "time_s", "lc_jax_xla", "jax_xla"),
        }
        print(f"T={T}: lc_jax / tokamax chunked: "
              + ", ".join(f"{k.split('_vs')[0]} {v:.2f}x" for k, v in ratios[T].items()
                          if v is not None and k.endswith("tokamax_chunked")))

    import jax

    out = {
        "benchmark": "attention_cpu",
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "versions": {"python": platform.python_version(), "jax": jax.__version__, **_versions()},
        "shape": {"batch": a.batch, "heads": a.heads, "head_dim": a.head_dim, "dtype": "float32", "causal": True},
        "rows": rows,
        "ratios": {str(k): v for k, v in ratios.items()},
        "raw": {f"{i}@{T}": runs for (i, T), runs in cells.items()},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("jaxlib", "flax", "tokamax"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    main()
