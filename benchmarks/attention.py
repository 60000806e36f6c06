"""Causal attention forward+backward: lc_jax's blockwise XLA path against its peers, on this machine.

Each (implementation, length) runs in its own process so that its peak memory
is its own, and the implementations alternate within every repetition so that
machine noise hits them alike. Reported per cell: median wall time of one
fwd+bwd, XLA's planned temp memory (buffer assignment of the compiled program)
and the process's peak RSS above its pre-compile baseline.

    python benchmarks/attention.py                    # 2K, 8K, 16K; writes benchmarks/results/attention_cpu.json
    python benchmarks/attention.py --lengths 2048 --reps 1
    python benchmarks/attention.py --masks --heads 4  # chunked and sink-token masks at 32K

Accelerator mode (the default when jax's default backend is 'gpu' or 'tpu', or
with --accelerator): bf16 causal attention, B=1, H=K=--acc-heads, head_dim in
--acc-head-dims, T in --acc-lengths, forward and forward+backward TFLOP/s for
lc_jax impl='pallas', jax.nn.dot_product_attention implementation='xla' and
'cudnn' (GPU only), tokamax.dot_product_attention (its default implementation)
and, on TPU, jax's splash attention; plus lc_jax pallas with a causal sliding
window W=--acc-window against full causal at the longest T (target: sliding at
least 4x faster), and lc_jax pallas against cuDNN at every T (speed ratio,
target >= 0.8). FLOP convention: forward = 4*B*H*T*T*D, halved for causal
(T*T/2 visible pairs); a window W counts 4*B*H*D*(W*T - W*W/2) (W <= T);
fwd+bwd = 3.5 x forward. All implementations run in ONE process, so memory is
not a per-process peak as on CPU: each row reports XLA's planned temp memory of
its compiled program (custom kernels' scratch as XLA sees it), and the run
reports the device's overall peak_bytes_in_use once. Implementations alternate
order every repetition; time = median over all timed calls (after one warm-up
call per compiled program) with jax.block_until_ready. An implementation that
fails records its error string. Writes
benchmarks/results/attention_<device_kind_slug>.json.

    python benchmarks/attention.py                    # on a GPU/TPU: the full accelerator table
    python benchmarks/attention.py --accelerator --acc-lengths 256 --acc-head-dims 64 --reps 1 --iters 1 \
        --out /tmp/acc.json                           # CPU smoke run of the accelerator path
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
ACC_IMPLS = ("lc_jax_pallas", "jax_xla", "jax_cudnn", "tokamax", "splash")
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
        from pallas_kernels.flash_attention.masks import Mask

        def attn(q, k, v):
            return ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=Mask(), impl="xla")
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


# ----------------------------------------------------------------------------- masks mode (CPU)


def masks_main(a, command: str) -> None:
    """lc_jax's blockwise XLA path under several masks at one length, fwd+bwd, in one process, alternating.

    Targets (issue 17): chunked attention (chunks of --chunk) at most 0.3x full causal time, since it skips
    the blocks in other chunks; sink tokens at most 1.10x the same mask without them.
    """
    import jax
    import jax.numpy as jnp

    from lc_jax import ops
    from pallas_kernels.flash_attention.masks import Mask

    T, B, H, D, C, W, N = a.masks_length, a.batch, a.heads, a.head_dim, a.chunk, a.window, a.sink_tokens
    masks = {
        "full causal": Mask(),
        f"chunked {C}": Mask(chunk=C),
        f"chunked {C} + {N} sink tokens": Mask(chunk=C, sink_tokens=N),
        f"sliding {W}": Mask(window=W),
        f"sliding {W} + {N} sink tokens": Mask(window=W, sink_tokens=N),
    }
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, do = (jax.random.normal(kk, (B, T, H, D), jnp.float32) for kk in ks)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    compiled = {}
    for name, mask in masks.items():
        def fwd_bwd(q, k, v, do, mask=mask):
            out, vjp = jax.vjp(lambda q, k, v: ops.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, mask=mask,
                                                             impl="xla"), q, k, v)
            return out, vjp(do)
        compiled[name] = jax.jit(fwd_bwd).lower(q, k, v, do).compile()
        jax.block_until_ready(compiled[name](q, k, v, do))  # warm-up
        print(f"  compiled and warmed up: {name}", flush=True)
    times: dict[str, list[float]] = {n: [] for n in masks}
    names = list(masks)
    for rep in range(a.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            for _ in range(a.iters):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled[name](q, k, v, do))
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    full = med["full causal"]
    ratios = {
        "chunked_vs_full": med[f"chunked {C}"] / full,
        "chunked_sinks_vs_chunked": med[f"chunked {C} + {N} sink tokens"] / med[f"chunked {C}"],
        "sliding_sinks_vs_sliding": med[f"sliding {W} + {N} sink tokens"] / med[f"sliding {W}"],
    }
    targets = {"chunked_vs_full": 0.3, "chunked_sinks_vs_chunked": 1.10, "sliding_sinks_vs_sliding": 1.10}
    print(f"\nlc_jax blockwise XLA attention fwd+bwd, T={T} B={B} H={H} D={D} f32, CPU ({os.cpu_count()} cores), "
          f"median of {a.reps} alternating reps x {a.iters} calls")
    print(f"{'mask':34} {'time (s)':>9} {'vs full':>8} {'visible pairs vs full':>22}")
    for name, mask in masks.items():
        print(f"{name:34} {med[name]:9.3f} {med[name] / full:8.3f} {mask.pairs(T) / Mask().pairs(T):22.3f}")
    for key, val in ratios.items():
        print(f"{key}: {val:.3f} (target <= {targets[key]}: {'PASS' if val <= targets[key] else 'FAIL'})")
    out = {
        "benchmark": "attention_masks_cpu", "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "shape": {"T": T, "batch": B, "heads": H, "head_dim": D, "dtype": "float32"},
        "blocks": "ops.attention impl='xla' defaults (256 x 512)",
        "timing": {"reps": a.reps, "iters": a.iters, "statistic": "median of all timed calls, masks alternating"},
        "seconds": med, "times_s": times, "ratios": ratios, "targets_max": targets,
        "pass": {k: v <= targets[k] for k, v in ratios.items()},
    }
    path = Path(a.out or RESULTS / "attention_masks_cpu.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- accelerator mode


def _causal_flops(B, H, T, D, window=None):
    """Forward FLOPs, causal pairs counted as T*T/2 (or W*T - W*W/2 with a window W <= T)."""
    pairs = T * T / 2 if window is None or window >= T else window * T - window * window / 2
    return 4 * B * H * D * pairs


def _acc_attn_fn(impl, backend, T, H, D, window):
    """(attn(q, k, v) on [B, T, H, D] bf16, layout transform applied once outside timing) or raises."""
    import jax
    import jax.numpy as jnp

    ident = lambda *xs: xs  # noqa: E731
    if impl.startswith("lc_jax_pallas"):  # "lc_jax_pallas" (the kernel's default blocks) or "lc_jax_pallas@QxK"
        from lc_jax import ops
        from pallas_kernels.flash_attention.masks import Mask
        from pallas_kernels.flash_attention.xla import BlockSizes

        pos = jnp.arange(T, dtype=jnp.int32)[None]
        blocks = None
        if "@" in impl:  # "QxK" or "QxK+approx+skip": the Mosaic GPU kernel's switches on, for an A/B
            q_k, *switches = impl.split("@")[1].split("+")
            bq, bk = (int(n) for n in q_k.split("x"))
            blocks = BlockSizes(bq, bk)
            if switches:
                from pallas_kernels.flash_attention import mosaic_gpu

                blocks = mosaic_gpu.BlockSizes(bq, bk, approx_math="approx" in switches,
                                               skip_full_masks="skip" in switches,
                                               **(dict(warpgroups=2, block_q_dkv=64) if "wg2" in switches else {}))

        def attn(q, k, v):
            p = jnp.broadcast_to(pos, q.shape[:2])
            return ops.attention(q, k, v, q_pos_BT=p, kv_pos_BS=p, mask=Mask(window=window), impl="pallas",
                                 block_sizes=blocks)
        return attn, ident
    if impl in ("jax_xla", "jax_cudnn"):
        if impl == "jax_cudnn" and backend != "gpu":
            raise _Skip("GPU only")
        local = None if window is None else (window - 1, 0)
        kind = impl.split("_")[1]

        def attn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                                implementation=kind)
        return attn, ident
    if impl == "tokamax":
        import tokamax

        def attn(q, k, v):
            return tokamax.dot_product_attention(q, k, v, is_causal=True)
        return attn, ident
    if impl == "splash":
        if backend != "tpu":
            raise _Skip("TPU only")
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

        mask = sm.CausalMask((T, T)) if window is None else sm.LocalMask((T, T), (window - 1, 0), 0)
        kernel = sk.make_splash_mha(sm.MultiHeadMask([mask] * H), head_shards=1, q_seq_shards=1)

        def attn(q, k, v):  # native layout [B, H, T, D]; splash does not scale q
            return jax.vmap(kernel)(q * D**-0.5, k, v)
        return attn, lambda *xs: tuple(x.transpose(0, 2, 1, 3) for x in xs)
    raise ValueError(f"unknown impl {impl!r}; allowed: {ACC_IMPLS}")


# The Mosaic GPU kernel's BlockSizes: approx_math=True, skip_full_masks=True, warpgroups=2 with block_q_dkv=64.
_SWITCHES = ("approx", "skip", "wg2")


def _blocks(text: str) -> str:
    """argparse type of --acc-pallas-blocks: 'QxK' with positive ints, then optional '+approx' / '+skip' / '+wg2'."""
    q_k, *switches = text.split("+")
    q, _, k = q_k.partition("x")
    if not (q.isdigit() and k.isdigit() and int(q) > 0 and int(k) > 0):
        raise argparse.ArgumentTypeError(f"--acc-pallas-blocks {text!r}: expected QxK, e.g. 128x64")
    bad = [x for x in switches if x not in _SWITCHES]
    if bad:
        raise argparse.ArgumentTypeError(f"--acc-pallas-blocks {text!r}: switch {bad[0]!r} is not one of "
                                         f"{', '.join(_SWITCHES)}")
    return "+".join([f"{int(q)}x{int(k)}", *switches])


class _Skip(Exception):
    pass


def _err(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {msg}"[:300]


def accelerator_main(a, command: str):
    import jax
    import jax.numpy as jnp

    sys.argv = sys.argv[:1]  # tokamax parses absl flags from argv on first use
    backend = jax.default_backend()
    dev = jax.devices()[0]
    slug = "".join(c if c.isalnum() else "_" for c in dev.device_kind.lower()).strip("_")
    out_path = a.out or str(RESULTS / f"attention_{slug}{'_acc_mode' if backend == 'cpu' else ''}.json")
    reps, iters = a.reps or 3, a.iters or 10
    B, H = 1, a.acc_heads
    t_max = max(a.acc_lengths)
    print(f"accelerator mode: backend={backend} device={dev.device_kind} B={B} H={H} bf16 causal, "
          f"reps={reps} iters={iters}", flush=True)

    rows = []
    variant_lengths = set(a.acc_variant_lengths or a.acc_lengths)

    def measure(entries, carried, group, T, D, q, k, v, do):
        """Compile fwd and fwd+bwd of every (impl, window) entry (an error or skip is recorded in its row), then
        time them, and the already compiled `carried` cells, alternating over the reps. Returns the new cells."""
        cells, new = {}, []
        for impl, window in entries:
            for mode in ("fwd", "fwd_bwd"):
                flops = _causal_flops(B, H, T, D, window) * (3.5 if mode == "fwd_bwd" else 1.0)
                row = {"impl": impl, "T": T, "D": D, "mode": mode, "window": window, "flops": flops, "group": group}
                new.append(row)
                try:
                    attn, layout = _acc_attn_fn(impl, backend, T, H, D, window)
                    args = layout(q, k, v) + (layout(do)[0],) if mode == "fwd_bwd" else layout(q, k, v)
                    if mode == "fwd":
                        fn = attn
                    else:
                        def fn(q, k, v, do, attn=attn):
                            out, vjp = jax.vjp(attn, q, k, v)
                            return out, vjp(do)
                    compiled = jax.jit(fn).lower(*args).compile()
                    ma = compiled.memory_analysis()
                    row["xla_temp_mb"] = ma.temp_size_in_bytes / 2**20 if ma is not None else None
                    jax.block_until_ready(compiled(*args))  # warm-up
                    cells[(impl, window, mode)] = (row, compiled, args, [])
                except _Skip as e:
                    row["skipped"] = str(e)
                except Exception as e:  # noqa: BLE001 - one failing impl must not end the run
                    row["error"] = _err(e)
                rows.append(row)
        timed, again = dict(cells), []
        for key, (row, compiled, args, _) in carried.items():  # timed again beside the new ones: side by side
            again.append({k: x for k, x in row.items() if k not in ("time_s", "times_s", "tflops")} | {"group": group})
            timed[key] = (again[-1], compiled, args, [])
        rows.extend(again)
        keys = list(timed)
        for rep in range(reps):
            order = keys[rep % len(keys):] + keys[: rep % len(keys)] if keys else []
            for key in order:
                row, compiled, args, times = timed[key]
                if "error" in row:
                    continue
                try:
                    for _ in range(iters):
                        t0 = time.perf_counter()
                        jax.block_until_ready(compiled(*args))
                        times.append(time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001
                    row["error"] = _err(e)
        for row, _, _, times in timed.values():
            if times and "error" not in row:
                row.update(time_s=statistics.median(times), times_s=times,
                           tflops=row["flops"] / statistics.median(times) / 1e12)
        for row in new + again:
            name = row["impl"] + ("" if row["window"] is None else f" W={row['window']}")
            val = f"{row['time_s'] * 1e3:9.3f} ms {row['tflops']:7.2f} TFLOP/s" if "time_s" in row else \
                row.get("skipped") or row.get("error")
            print(f"  D={D:4d} T={T:6d} {group:8s} {row['mode']:7s} {name:24s} {val}", flush=True)
        return cells

    def find(impl, T, D, mode, window, group="targets"):
        return next((r for r in rows if (r["impl"], r["T"], r["D"], r["mode"], r["window"], r["group"])
                     == (impl, T, D, mode, window, group) and "time_s" in r), None)

    def speed_vs_cudnn(impl, group="targets"):  # cuDNN time / impl time per D, T and mode, timed side by side
        out = {}
        for D in a.acc_head_dims:
            for T in a.acc_lengths:
                for mode in ("fwd", "fwd_bwd"):
                    ours, cudnn = find(impl, T, D, mode, None, group), find("jax_cudnn", T, D, mode, None, group)
                    if ours and cudnn:
                        out[f"D{D}_T{T}_{mode}"] = cudnn["time_s"] / ours["time_s"]
        return out

    def variant_results():
        """Per --acc-pallas-blocks variant: its speed / cuDNN's and / the default kernel's (all three timed side by
        side in the variants group), or its errors."""
        res = {}
        for b in a.acc_pallas_blocks:
            impl = f"lc_jax_pallas@{b}"
            r = speed_vs_cudnn(impl, "variants")
            for D in a.acc_head_dims:
                for T in a.acc_lengths:
                    for mode in ("fwd", "fwd_bwd"):
                        ours, base = find(impl, T, D, mode, None, "variants"), \
                            find("lc_jax_pallas", T, D, mode, None, "variants")
                        if ours and base:
                            r[f"vs_default_D{D}_T{T}_{mode}"] = base["time_s"] / ours["time_s"]
            errors = sorted({x["error"] for x in rows if x["impl"] == impl and "error" in x})
            if r or errors:
                res[impl] = {**r, **({"errors": errors} if errors else {})}
        return res

    def write(final: bool = False):
        """The JSON so far (after each group: a later crash or kill loses only what came after it)."""
        sliding = {}
        for D in a.acc_head_dims:
            for mode in ("fwd", "fwd_bwd"):
                full, win = find("lc_jax_pallas", t_max, D, mode, None), find("lc_jax_pallas", t_max, D, mode,
                                                                               a.acc_window)
                sliding[f"D{D}_{mode}"] = full["time_s"] / win["time_s"] if full and win else None
        stats = dev.memory_stats() if final and hasattr(dev, "memory_stats") else None
        out = {
            "benchmark": "attention_accelerator",
            "command": command,
            "complete": final,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": dev.device_kind,
            "backend": backend,
            "num_devices": jax.device_count(),
            "versions": {"python": platform.python_version(), "jax": jax.__version__, **_versions()},
            "shape": {"batch": B, "heads": H, "kv_heads": H, "head_dims": a.acc_head_dims, "dtype": "bfloat16",
                      "causal": True, "window": a.acc_window},
            "flop_convention": "fwd = 4*B*H*T*T*D * 0.5 (causal); window W: 4*B*H*D*(W*T - W*W/2); "
                               "fwd_bwd = 3.5 * fwd",
            "memory_note": "one process: xla_temp_mb is XLA's planned temps per compiled program; "
                           "device_peak_bytes_in_use covers the whole run",
            "timing": {"reps": reps, "iters": iters, "warmup_calls": 1, "statistic": "median of all timed calls",
                       "groups": "per length, 'targets' (the implementations and the window row) are compiled and "
                                 "timed first; then 'variants': the --acc-pallas-blocks variants, timed alternating "
                                 "with the targets' default kernel and cuDNN executables"},
            "device_peak_bytes_in_use": (stats or {}).get("peak_bytes_in_use"),
            "rows": rows,
            "sliding_speedup_vs_full_causal": {"T": t_max, "window": a.acc_window, "target": 4.0, **sliding},
            "pallas_speed_vs_cudnn": {"target": 0.8, **speed_vs_cudnn("lc_jax_pallas")},
            "pallas_variants_speed_vs_cudnn": variant_results(),
        }
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(out, indent=2))
        return out

    for D in a.acc_head_dims:
        for T in a.acc_lengths:
            ks = jax.random.split(jax.random.PRNGKey(0), 4)
            q, k, v, do = (jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in ks)
            entries = [(i, None) for i in a.acc_impls]
            if T == t_max and "lc_jax_pallas" in a.acc_impls:
                entries.append(("lc_jax_pallas", a.acc_window))
            cells = measure(entries, {}, "targets", T, D, q, k, v, do)
            write()
            if a.acc_pallas_blocks and T in variant_lengths:
                carried = {key: c for key, c in cells.items() if key[0] in ("lc_jax_pallas", "jax_cudnn")
                           and key[1] is None}
                measure([(f"lc_jax_pallas@{b}", None) for b in a.acc_pallas_blocks], carried, "variants",
                        T, D, q, k, v, do)
                write()
            del cells, q, k, v, do

    out = write(final=True)
    sliding, vs_cudnn = out["sliding_speedup_vs_full_causal"], out["pallas_speed_vs_cudnn"]
    print(f"\nbf16 causal attention, B={B} H={H}, {dev.device_kind} ({backend}), TFLOP/s "
          f"(causal FLOPs halved, fwd+bwd = 3.5x fwd); median of {reps} alternating reps x {iters} calls")
    names = list(dict.fromkeys((r["impl"], r["window"]) for r in rows if r["group"] == "targets"))
    hdr = "".join(f"{(i if w is None else f'{i} W={w}')[:22]:>24}" for i, w in names)
    for mode in ("fwd", "fwd_bwd"):
        print(f"\n{mode}\n{'D':>4} {'T':>6}{hdr}")
        for D in a.acc_head_dims:
            for T in a.acc_lengths:
                cells_txt = []
                for i, w in names:
                    r = next((r for r in rows if (r["impl"], r["T"], r["D"], r["mode"], r["window"], r["group"])
                              == (i, T, D, mode, w, "targets")), None)
                    cells_txt.append("" if r is None else f"{r['tflops']:.2f}" if "tflops" in r else
                                     "skip" if "skipped" in r else "error")
                print(f"{D:>4} {T:>6}" + "".join(f"{c:>24}" for c in cells_txt))
    print(f"\nlc_jax pallas at T={t_max}: full causal time / sliding W={a.acc_window} time (target >= 4): "
          + ", ".join(f"{k} {v:.2f}x" if v is not None else f"{k} n/a" for k, v in sliding.items()
                      if k.startswith("D")))
    ratios = {k: v for k, v in vs_cudnn.items() if k != "target"}
    if ratios:
        print("lc_jax pallas speed / cuDNN's (cuDNN time / lc_jax time; target >= 0.8): "
              + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    for impl, r in out["pallas_variants_speed_vs_cudnn"].items():
        print(f"  {impl}: " + ", ".join(f"{k} {v:.2f}x" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    if out["device_peak_bytes_in_use"] is not None:
        print(f"device peak_bytes_in_use over the whole run: {out['device_peak_bytes_in_use'] / 2**30:.2f} GiB")
    print(f"wrote {out_path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=None,
                    help="alternating repetitions (CPU: each a fresh process, default 2; accelerator: default 3)")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed calls per process/repetition, after one warm-up (CPU default 2, accelerator 10)")
    ap.add_argument("--mem-limit-gb", type=float, default=12.0, help="skip cells whose planned temps exceed this")
    ap.add_argument("--out", default=None,
                    help="CPU default benchmarks/results/attention_cpu.json; accelerator attention_<device>.json")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--accelerator", action="store_true",
                    help="run the accelerator table (default when jax's backend is gpu or tpu)")
    ap.add_argument("--acc-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--acc-head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--acc-heads", type=int, default=16)
    ap.add_argument("--acc-window", type=int, default=1024, help="sliding window compared at the longest length")
    ap.add_argument("--acc-impls", nargs="+", default=list(ACC_IMPLS), choices=ACC_IMPLS)
    ap.add_argument("--acc-pallas-blocks", nargs="*", default=[], type=_blocks, metavar="QxK",
                    help="also time lc_jax's kernel with these query x key blocks (e.g. 128x128), as "
                         "lc_jax_pallas@QxK; '+approx' / '+skip' / '+wg2' turn the Mosaic GPU kernel's approx_math / "
                         "skip_full_masks / warpgroups=2 (with block_q_dkv=64) on")
    ap.add_argument("--acc-variant-lengths", type=int, nargs="*", default=None,
                    help="the --acc-lengths at which the --acc-pallas-blocks variants are timed (default: all)")
    ap.add_argument("--masks", action="store_true",
                    help="CPU: lc_jax's XLA path under full causal, chunked and sliding masks, with and without sink "
                         "tokens, at --masks-length; writes results/attention_masks_cpu.json")
    ap.add_argument("--masks-length", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--sink-tokens", type=int, default=4)
    a = ap.parse_args()
    command = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    if a.masks:
        a.reps, a.iters = a.reps or 3, a.iters or 1
        masks_main(a, command)
        return

    if a.worker:
        a.iters = 2 if a.iters is None else a.iters
        res = worker(a.worker[0], int(a.worker[1]), a.batch, a.heads, a.head_dim, a.iters, a.mem_limit_gb)
        print("RESULT " + json.dumps(res))
        return

    if a.accelerator or _default_backend() in ("gpu", "tpu"):
        accelerator_main(a, command)
        return
    a.reps = 2 if a.reps is None else a.reps
    a.iters = 2 if a.iters is None else a.iters
    a.out = str(RESULTS / "attention_cpu.json") if a.out is None else a.out

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
        "command": command,
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


def _default_backend() -> str:
    """jax's default backend, or 'cpu' when JAX_PLATFORMS pins it (without initialising jax then)."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return "cpu"
    import jax

    return jax.default_backend()


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
