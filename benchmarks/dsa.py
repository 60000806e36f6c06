"""DSA against full causal attention: time and memory of one layer, and memory of a whole step vs T.

`--mode layer` (default; the issue's target): forward + backward of one
attention layer at T = 4K, 16K, 32K with k = 512. Full: causal attention on
the CPU path (`ops.attention`, blockwise XLA flash). DSA, everything its sparse
stage runs: the lightning indexer (projections of the detached hidden state),
the top-k selection (`--select`: host = numpy introselect in a callback, the CPU
default; xla = the streaming lax.top_k; threshold = a sampled threshold, then
top_k over the candidates), sparse attention over the selected
rows, and the indexer KL over the selected set, with gradients for q, k, v and
the indexer. Time: the median of `--repeats` runs after a warm-up, all
variants alternating in one process so they share the machine's noise; memory:
XLA's analysis of each compiled function. Writes results/dsa_layer_cpu.json.

On a GPU (benchmarks/gpu_check.sh): `--full-impl pallas` for lc_jax's flash
kernel as the full baseline, `--sparse xla,pallas` for DSA's sparse stage by
the XLA gather path and by the Pallas kernel DSA runs with attention.impl
'pallas' (Triton on GPU, Mosaic on TPU; on CPU the Triton one, interpreted),
`--dtype bfloat16`, and query blocks sized for the device rather than for a
CPU cache (`--sparse-block-q`, `--index-block-q`). `pallas-key-major` is the
Triton kernel with its key-major dk / dv backward (`sparse_attention_gpu.BlockSizes.backward`)
instead of atomics. Variants are every (--select, --sparse) pair, or with `--zip`
the pairs in order. A variant that fails records its error; the others still run.
The parts are timed for the first variant that builds, and another variant's
selection or sparse attention where it differs. Off CPU it writes
dsa_layer_<layer>_<device>.json.

`--mode step`: XLA's memory analysis of the compiled (not run) training step
of a DSA model in its sparse stage and in its dense warm-up, and, for contrast,
of the selection alone done the way public implementations do it (materialise
the T x T index scores, mask, `top_k`) against lc_jax's streaming top-k.
Memory = arguments + outputs - donated + temporaries. Writes results/dsa_cpu.json.

    python benchmarks/dsa.py                                   # layer: T = 4K, 16K, 32K, k = 512
    python benchmarks/dsa.py --layer wide --repeats 1           # a 2048-wide layer
    python benchmarks/dsa.py --mode step                       # step memory: T = 1K..16K, k = 64
    python benchmarks/dsa.py --lengths 1024,4096 --topk 128
    python benchmarks/dsa.py --layer wide --lengths 65536 --topk 2048 --select xla --sparse xla,pallas \
        --full-impl pallas --dtype bfloat16 --sparse-block-q 256 --index-block-q 512   # GPU, the issue's target
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import quickstart  # noqa: E402
from lc_jax import config as config_lib  # noqa: E402
from lc_jax import ops, sharding, steps  # noqa: E402
from lc_jax import state as state_lib  # noqa: E402
from lc_jax.attention import dsa  # noqa: E402
from pallas_kernels import sparse_attention_gpu, sparse_attention_tpu  # noqa: E402
from pallas_kernels.flash_attention.masks import Mask  # noqa: E402
from pallas_kernels.flash_attention.xla import BlockSizes  # noqa: E402
from pallas_kernels.sparse_attention import sparse_attention  # noqa: E402

MiB = 2**20
SPARSE = ("xla", "pallas", "pallas-key-major")  # --sparse choices


def _bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def step_bytes(T: int, topk: int, sparse: bool, remat: str) -> int:
    c = quickstart.get_config("attention=dsa")
    c.model.update(max_seq_len=T, remat=remat)
    c.model.attention.dsa.update(topk=topk, warmup_steps=0 if sparse else 10**9, index_block_q=128,
                                 index_block_k=512)
    c.data.update(seq_len=T, batch_size=1)
    c.mesh.update(data=1)
    config_lib.validate(c, num_devices=1)
    c = config_lib.resolve(c)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    tx, schedule = state_lib.make_optimizer(c.train, c.model)
    graphdef, state = state_lib.init_state(c, mesh, tx)
    step = steps.make_train_step(graphdef, tx, schedule, stage="sparse" if sparse else "dense",
                                 aux_weights={"dsa_kl": 1.0})
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    batch = {"inputs": spec((1, T), jnp.int32), "targets": spec((1, T), jnp.int32),
             "positions": spec((1, T), jnp.int32), "segment_ids": spec((1, T), jnp.int32),
             "loss_mask": spec((1, T), jnp.float32)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with jax.set_mesh(mesh):
        return _bytes(step.lower(abstract, batch).compile())


def selection_bytes(T: int, topk: int, streaming: bool, J: int = 4, d: int = 32) -> int:
    spec = jax.ShapeDtypeStruct
    args = (spec((1, T, J, d), jnp.float32), spec((1, T, J), jnp.float32), spec((1, T, d), jnp.float32),
            spec((1, T), jnp.int32))
    if streaming:
        def select(iq, w, ik, pos):
            return dsa.streaming_topk(iq, w, ik, q_pos_BT=pos, kv_pos_BS=pos, topk=topk, block_q=128, block_k=512)
    else:
        def select(iq, w, ik, pos):
            scores = dsa.index_scores(iq, w, ik)  # [1, T, T]
            return jax.lax.top_k(jnp.where(Mask().visible(pos[:, :, None], pos[:, None, :]), scores, -jnp.inf), topk)
    return _bytes(jax.jit(select).lower(*args).compile())


# Layer shapes (--layer). quickstart: one layer of configs/quickstart.py, where the indexer (4 x 32 per pair)
# costs about as much as the main attention's QK (4 heads x 64). wide: a 2048-wide layer (16 heads of 128, GQA 4)
# with the same indexer, closer to DeepSeek-V3.2's proportion (an indexer pair ~1/17 the cost of an attention pair).
LAYERS = {
    "quickstart": dict(H=4, K=2, D=64, E=256, J=4, d=32, rope=16),
    "wide": dict(H=16, K=4, D=128, E=2048, J=4, d=32, rope=16),
}
LAYER = LAYERS["quickstart"]


def _runs_xla(impl: str, q, k, pos) -> bool:
    """Whether `ops.attention` picks the blockwise XLA path for this layer's full attention under `impl`."""
    pos = jnp.arange(q.shape[1], dtype=jnp.int32)[None] if pos is None else pos
    return ops.choose(impl, ops.describe(q, k, pos, pos)).name == "xla"


def layer_fns(T: int, topk: int, index_block_k: int, select: str, *, sparse: str = "xla", index_block_q: int = 128,
              sparse_block_q: int | None = None, full_impl: str = "auto", dtype=jnp.float32):
    """Jitted value-and-grad functions of one layer at length T and their inputs.

    {"full": (fn, args), "dsa": (fn, args)}, and DSA's parts alone for the
    breakdown: "dsa_select" (indexer + top-k selection by `select`, no
    gradient: the selection is discrete), "dsa_attention" (sparse attention
    over a fixed selection by `sparse`: "xla", the gather path, which also
    returns the head-mean probabilities the KL uses, or "pallas", the kernel
    DSA runs with attention.impl='pallas', after which the KL scores the
    selected keys itself; "pallas-key-major", the Triton kernel with its
    key-major backward) and "dsa_kl" (the indexer KL over it, gradient to
    the indexer). `sparse_block_q` is the query block of the gather path and
    of the KL (None: sized for a CPU cache by `default_block_q`).
    """
    g = LAYER
    rng = np.random.default_rng(0)
    rand = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)  # noqa: E731
    q, k, v, do = rand(1, T, g["H"], g["D"]), rand(1, T, g["K"], g["D"]), rand(1, T, g["K"], g["D"]), \
        rand(1, T, g["H"], g["D"])
    x = rand(1, T, g["E"])
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    with nnx.use_eager_sharding(False):  # one device: the logical sharding annotations stay metadata
        indexer = dsa.Indexer(d_model=g["E"], index_heads=g["J"], index_dim=g["d"], index_rope_dim=g["rope"],
                              param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, iparams = nnx.split(indexer)
    P = dict(q_pos_BT=pos, kv_pos_BS=pos)
    sg = jax.lax.stop_gradient
    # The blockwise XLA path gets the CPU-tuned blocks; the Pallas kernels their own defaults.
    full_blocks = BlockSizes(256, 512) if _runs_xla(full_impl, q, k, pos) else None

    def full(q, k, v):
        out = ops.attention(q, k, v, **P, mask=Mask(), impl=full_impl, block_sizes=full_blocks)
        return (out.astype(jnp.float32) * do).sum()

    def index(iparams):
        return nnx.merge(graphdef, iparams)(sg(x), pos)

    def select_(iq, w, ik):
        return dsa.select_topk(sg(iq), sg(w), sg(ik), impl=select, **P, topk=topk, block_q=index_block_q,
                               block_k=index_block_k)

    def attend(q, k, v, idx, valid):  # (out, lse, head-mean probabilities or None), as DSA._sparse_attention
        if sparse == "xla":
            return sparse_attention(q, k, v, idx, valid, **P, block_q=sparse_block_q, return_probs=True)
        if ops.platform() == "tpu":
            if sparse != "pallas":
                raise ValueError(f"--sparse {sparse}: the TPU kernel has one backward; use pallas")
            return *sparse_attention_tpu.sparse_attention(q, k, v, idx, valid, **P), None
        bs = sparse_attention_gpu.BlockSizes(backward="key_major" if sparse == "pallas-key-major" else "atomic")
        return *sparse_attention_gpu.sparse_attention(q, k, v, idx, valid, **P, block_sizes=bs,
                                                      interpret=ops.platform() == "cpu"), None

    def kl(q, k, lse, iq, w, ik, idx, valid, probs):
        return dsa.sparse_kl(q, k, lse, iq, w, ik, idx, valid, **P, block_q=sparse_block_q, probs_BTk=probs).sum()

    def sparse_(q, k, v, iparams):
        iq, w, ik = index(iparams)
        idx, valid = select_(iq, w, ik)
        out, lse, probs = attend(q, k, v, idx, valid)
        return (out.astype(jnp.float32) * do).sum() + kl(q, k, lse, iq, w, ik, idx, valid, probs)

    iq, w, ik = jax.jit(index)(iparams)
    idx, valid = jax.jit(select_)(iq, w, ik)
    _, lse, probs = jax.jit(attend)(q, k, v, idx, valid)
    vg = jax.value_and_grad
    return {
        "full": (jax.jit(vg(full, argnums=(0, 1, 2))), (q, k, v)),
        "dsa": (jax.jit(vg(sparse_, argnums=(0, 1, 2, 3))), (q, k, v, iparams)),
        "dsa_select": (jax.jit(lambda p: select_(*index(p))), (iparams,)),
        "dsa_attention": (jax.jit(vg(lambda q, k, v: (attend(q, k, v, idx, valid)[0].astype(jnp.float32) * do).sum(),
                                     argnums=(0, 1, 2))), (q, k, v)),
        "dsa_kl": (jax.jit(vg(lambda iq, w, ik: kl(q, k, lse, iq, w, ik, idx, valid, probs), argnums=(0, 1, 2))),
                   (iq, w, ik)),
    }


def _time(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]


def layer_main(a) -> None:
    global LAYER
    LAYER = LAYERS[a.layer]
    dtype = jnp.dtype(a.dtype)
    rows = []
    selects, sparses = a.select.split(","), a.sparse.split(",")
    pairs = zip(selects, sparses) if a.zip else ((s, p) for p in sparses for s in selects)
    variants = {f"dsa@{s}" + ("" if p == "xla" else f"+{p}"): (s, p) for s, p in pairs}
    names = ["full", *variants]
    print(f"{'T':>6} {'k':>4} " + " ".join(f"{n + ' s':>11}" for n in names) + " "
          + " ".join(f"{'full/' + n:>14}" for n in names[1:]) + f" {'full MiB':>9} {'DSA MiB':>8}")

    def write() -> None:  # after each row's timings and again after its parts: a time box loses only parts
        probe = jnp.zeros((1, 1024, LAYER["H"], LAYER["D"]), dtype)
        full_how = ("blockwise XLA flash, blocks 256 x 512" if _runs_xla(a.full_impl, probe, probe, None)
                    else "the Pallas flash kernel, its default blocks")
        _write(a, {
            "benchmark": "dsa_layer_vs_full",
            "layer": f"{a.layer}: one attention layer, batch 1, {dtype.name}: {LAYER['H']} query heads / {LAYER['K']} "
                     f"kv heads of {LAYER['D']}, d_model {LAYER['E']}; DSA indexer {LAYER['J']} heads x {LAYER['d']} "
                     f"(RoPE on {LAYER['rope']}); full = ops.attention impl {a.full_impl} ({full_how}); DSA = indexer "
                     f"+ top-k selection (dsa@host: scores by XLA, numpy introselect in a host callback; dsa@xla: "
                     f"streaming lax.top_k; query block {a.index_block_q}, key block {a.index_block_k}) + sparse "
                     "attention (XLA gather path returning the head-mean probabilities, query block "
                     f"{a.sparse_block_q or 'default_block_q'}; '+pallas': the Pallas sparse kernel, the KL then "
                     "scoring the selected keys itself) + sparse KL, with gradients for q, k, v and the indexer",
            "measure": f"forward + backward (value_and_grad), median of {a.repeats} runs after a warm-up, full and DSA "
                       "alternating in one process; parts: one run each after a warm-up; memory: XLA memory analysis "
                       "(args + outputs - donated + temps; host-callback buffers are not counted)",
            "rows": rows,
        }, "dsa_layer_cpu.json" if a.layer == "quickstart" else f"dsa_layer_{a.layer}_cpu.json")

    for T in (int(x) for x in a.lengths.split(",")):
        opts = dict(index_block_q=a.index_block_q, sparse_block_q=a.sparse_block_q, full_impl=a.full_impl,
                    dtype=dtype)
        fns, errors = {}, {}
        for n, (s, p) in variants.items():  # one variant that cannot build must not end the run
            try:
                fns[n] = layer_fns(T, a.topk, a.index_block_k, s, sparse=p, **opts)
            except Exception as e:  # noqa: BLE001
                errors[n] = _error(e)
        runs = {"full": next(iter(fns.values()))["full"]} if fns else {}
        runs.update({n: f["dsa"] for n, f in fns.items()})
        compiled, mem = {}, {}
        for n, (fn, args) in runs.items():
            try:
                compiled[n] = fn.lower(*args).compile()
                mem[n] = _bytes(compiled[n]) / MiB
                _time(compiled[n], args)  # warm up
            except Exception as e:  # noqa: BLE001
                errors[n] = _error(e)
                compiled.pop(n, None)
        times = {n: [] for n in compiled}
        for _ in range(a.repeats):  # alternate, so that all see the same machine
            for n, c in compiled.items():
                times[n].append(_time(c, runs[n][1]))
        med = {n: float(np.median(t)) for n, t in times.items()}
        # The parts are timed for the first variant whose whole step compiled (one that failed would only
        # fail again, and its parts would explain no time in the row).
        lead = next((n for n in fns if n in compiled), None)
        row = {"T": T, "topk": a.topk, "seconds": med, "runs_s": times, "mib": mem,
               "full_over_dsa": {n: med["full"] / med[n] for n in names[1:] if n in med and "full" in med},
               "dsa_parts_s": {}, "dsa_parts_select": variants[lead or names[1]][0], "dsa_parts_variant": lead}
        if errors:
            row["errors"] = errors
        rows.append(row)
        fmt = lambda d, n, f: format(d[n], f) if n in d else "-"  # noqa: E731
        print(f"{T:>6} {a.topk:>4} " + " ".join(f"{fmt(med, n, '.3f'):>11}" for n in names) + " "
              + " ".join(f"{fmt(row['full_over_dsa'], n, '.2f') + 'x':>14}" for n in names[1:])
              + f" {fmt(mem, 'full', '.1f'):>9} {fmt(mem, names[1], '.1f'):>8}", flush=True)
        for n, e in errors.items():
            print(f"  {n}: {e}", flush=True)
        write()
        parts = row["dsa_parts_s"]
        # One timed run each, after a warm-up: the lead's three parts, then the other variants' sparse attention.
        # Another variant's selection and sparse attention where they differ from the lead's.
        todo = [(part, lead, part) for part in ("dsa_select", "dsa_attention", "dsa_kl")] if lead else []
        for n in (n for n in fns if n != lead and lead is not None):
            for part, i in (("dsa_select", 0), ("dsa_attention", 1)):
                if variants[n][i] != variants[lead][i]:
                    todo.append((f"{part}@{n}", n, part))
        for name, n, part in todo:
            fn, args = fns[n][part]
            try:
                _time(fn, args)
                parts[name] = _time(fn, args)
            except Exception as e:  # noqa: BLE001
                errors[name] = _error(e)
        print(f"{'':>6} {'':>4}   parts (s): select / attention / KL of {lead}: "
              + " / ".join(fmt(parts, p, ".2f") for p in ("dsa_select", "dsa_attention", "dsa_kl")), flush=True)
        for name, n, part in todo[3:]:
            print(f"{'':>6} {'':>4}   {part.removeprefix('dsa_')} of {n}: {fmt(parts, name, '.2f')}", flush=True)
        for name, _, _ in todo:
            if name in errors:
                print(f"  {name}: {errors[name]}", flush=True)
        if errors:
            row["errors"] = errors
        write()


def _write(a, out: dict, default_name: str) -> None:
    """Write `out` with the run's provenance; off CPU the default name ends in the device kind, not _cpu."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        device = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    else:
        device = f"{dev.device_kind} x{jax.device_count()}"
        slug = "".join(c if c.isalnum() else "_" for c in dev.device_kind.lower()).strip("_")
        default_name = default_name.removesuffix("_cpu.json") + f"_{slug}.json"
    out = {**out, "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "device": device,
           "versions": {"python": platform.python_version(), "jax": jax.__version__}}
    path = Path(a.out or Path(__file__).parent / "results" / default_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="layer", choices=["layer", "step"])
    ap.add_argument("--lengths", default=None, help="default: 4096,16384,32768 (layer), 1024..16384 (step)")
    ap.add_argument("--topk", type=int, default=None, help="default: 512 (layer), 64 (step)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per length (layer)")
    ap.add_argument("--index-block-k", type=int, default=4096, help="DSA key block of the index scores (layer)")
    ap.add_argument("--select", default="host,xla", help="DSA selection impl(s) to time side by side (layer): "
                    f"{', '.join(dsa.SELECT_IMPLS[1:])}")
    ap.add_argument("--zip", action="store_true",
                    help="pair --select and --sparse positionally instead of timing every combination (layer)")
    ap.add_argument("--layer", default="quickstart", choices=sorted(LAYERS), help="layer shapes (layer mode)")
    ap.add_argument("--sparse", default="xla",
                    help="DSA sparse attention(s) to time side by side (layer): xla (gather path), pallas (kernel), "
                         "pallas-key-major (the Triton kernel with its key-major backward)")
    ap.add_argument("--full-impl", default="auto", choices=ops.IMPLS, help="ops.attention impl of full (layer)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="q, k, v, x dtype (layer)")
    ap.add_argument("--index-block-q", type=int, default=128, help="DSA query block of the selection (layer)")
    ap.add_argument("--sparse-block-q", type=int, default=None,
                    help="query block of the XLA sparse attention and the KL (layer; default: sized for a CPU cache)")
    ap.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if bad := set(a.sparse.split(",")) - set(SPARSE):
        ap.error(f"--sparse {sorted(bad)}: allowed {', '.join(SPARSE)}")
    if bad := set(a.select.split(",")) - set(dsa.SELECT_IMPLS[1:]):
        ap.error(f"--select {sorted(bad)}: allowed {', '.join(dsa.SELECT_IMPLS[1:])}")
    if a.zip and len(a.select.split(",")) != len(a.sparse.split(",")):
        ap.error(f"--zip pairs --select {a.select} with --sparse {a.sparse}: give both the same number of values")
    layer = a.mode == "layer"
    a.lengths = a.lengths or ("4096,16384,32768" if layer else "1024,2048,4096,8192,16384")
    a.topk = a.topk or (512 if layer else 64)
    if layer:
        return layer_main(a)
    rows = []
    print(f"{'T':>6} {'sparse step MiB':>16} {'dense warm-up MiB':>18} {'select streaming':>17} "
          f"{'select T x T':>13}")
    for T in (int(x) for x in a.lengths.split(",")):
        row = {"T": T, "sparse_step_mib": step_bytes(T, a.topk, True, a.remat) / MiB,
               "dense_step_mib": step_bytes(T, a.topk, False, a.remat) / MiB,
               "select_streaming_mib": selection_bytes(T, a.topk, True) / MiB,
               "select_dense_mib": selection_bytes(T, a.topk, False) / MiB}
        rows.append(row)
        print(f"{T:>6} {row['sparse_step_mib']:>16.1f} {row['dense_step_mib']:>18.1f} "
              f"{row['select_streaming_mib']:>17.1f} {row['select_dense_mib']:>13.1f}", flush=True)
    # Growth per doubling of T: ~2.0 is linear, ~4.0 quadratic.
    for key in ("sparse_step_mib", "select_streaming_mib", "select_dense_mib"):
        ratios = [b[key] / a_[key] for a_, b in zip(rows, rows[1:])]
        print(f"{key}: growth per doubling {', '.join(f'{r:.2f}' for r in ratios)}")
    _write(a, {
        "benchmark": "dsa_memory",
        "model": "configs/quickstart.py:attention=dsa (d_model 256, 4 layers, 4 heads / 2 kv; indexer 4 x 32), "
                 "batch 1, f32",
        "topk": a.topk, "remat": a.remat, "rows": rows,
        "note": "XLA memory analysis of the compiled step (args + outputs - donated + temps), nothing is run",
    }, "dsa_cpu.json")


if __name__ == "__main__":
    main()
