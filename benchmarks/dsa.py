"""DSA memory vs sequence length at fixed k: the sparse stage must grow about linearly in T.

For each length, XLA's memory analysis of the compiled (not run) training step
of a DSA model in its sparse stage and in its dense warm-up, and, for
contrast, of the selection alone done the way public implementations do it
(materialise the T x T index scores, mask, `top_k`) against lc_jax's streaming
top-k. Memory = arguments + outputs - donated + temporaries.

    python benchmarks/dsa.py                          # T = 1K..16K, k = 64; writes results/dsa_cpu.json
    python benchmarks/dsa.py --lengths 1024,4096 --topk 128
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import quickstart  # noqa: E402
from lc_jax import config as config_lib  # noqa: E402
from lc_jax import sharding, train  # noqa: E402
from lc_jax.attention import dsa  # noqa: E402
from pallas_kernels.flash_attention.masks import visible  # noqa: E402

MiB = 2**20


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
    tx, schedule = train.make_optimizer(c.train, c.model)
    graphdef, state = train.init_state(c, mesh, tx)
    step = train.make_train_step(graphdef, tx, schedule, sparse=sparse, kl_weight=1.0)
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
            return jax.lax.top_k(jnp.where(visible(pos, pos), scores, -jnp.inf), topk)
    return _bytes(jax.jit(select).lower(*args).compile())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dsa_cpu.json"))
    a = ap.parse_args()
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
    out = {
        "benchmark": "dsa_memory",
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "model": "configs/quickstart.py:attention=dsa (d_model 256, 4 layers, 4 heads / 2 kv; indexer 4 x 32), "
                 "batch 1, f32",
        "topk": a.topk, "remat": a.remat, "rows": rows,
        "note": "XLA memory analysis of the compiled step (args + outputs - donated + temps), nothing is run",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
