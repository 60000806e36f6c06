"""Deviceless ahead-of-time compilation: plan a TPU run from a laptop.

    python -m lc_jax.aot --config configs/tpu/llama8b_128k.py --topology v5p:4x4x4 [--config.x=y] [--json out.json]

With `libtpu` installed (the `tpu` extra, and the dev set-up), JAX can describe
a TPU slice that is not there (`jax.experimental.topologies.get_topology_desc`)
and run the real TPU compiler for it on any host, Mosaic included. This module
builds the run's mesh over that slice's devices, validates the config against
their count, and lowers and compiles the real train step (Pallas kernels, ring
attention, FSDP, remat) from abstract shapes: no parameter is allocated.

It reports what XLA's memory analysis says each chip holds during the step:

* arguments: this chip's share of the training state (parameters, optimizer
  state, step, RNG) and of the batch;
* outputs: the new state and the metrics, less what the donated state aliases;
* temporaries: activations kept for the backward pass, gradients, collectives'
  buffers and kernel workspaces, at the peak of XLA's buffer assignment;
* generated code;

and whether their sum fits the chip's HBM. Kernel dispatch follows the devices
being compiled for (`lc_jax.ops.platform`), so the TPU step traces the Mosaic
kernels, never the host's interpret-mode ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from lc_jax import attention, cli, layers, sharding, state, steps
from lc_jax.config import ConfigError, resolve, validate

GiB = 2**30

# The terms of a chip's memory during the step, in the order they are reported, and what lowers each.
TERMS = {
    "arguments": "the training state and batch on this chip: raise mesh.fsdp (shards parameters and optimizer state)",
    "outputs": "the step's outputs not aliased to the donated state",
    "temporaries": "activations, gradients and workspaces: set model.remat='full', raise mesh.context, "
                   "or lower data.batch_size / data.seq_len",
    "generated_code": "the compiled program itself",
}


class AOTError(RuntimeError):
    """A compile that cannot be planned as asked; the message names the flag or field and what is allowed."""


def topology_devices(topology: str) -> list:
    """The devices of a TPU slice described by name ('v5p:2x2x1', 'v5e:4x4', 'v6e:2x2'), without a TPU."""
    try:
        import libtpu  # noqa: F401  (the TPU compiler; the `tpu` extra and the dev set-up install it)
    except ImportError:
        raise AOTError("deviceless TPU compilation needs libtpu: pip install -e '.[tpu]' (or '.[dev]')") from None
    from jax.experimental import topologies

    # A deviceless compile holds no TPU: let several processes (pytest workers, a CLI beside a notebook) load
    # libtpu at once, which its lockfile otherwise refuses ("Internal error when accessing libtpu lockfile").
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+){1,2}", topology):
        raise AOTError(f"--topology={topology!r}: expected '<generation>:<shape>', e.g. v5e:2x2, v5p:2x2x1, v6e:4x4")
    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as e:  # noqa: BLE001  (libtpu's message says what it could not parse)
        raise AOTError(f"--topology={topology!r}: libtpu cannot describe it ({str(e).splitlines()[0]}); "
                       "allowed are TPU slices such as v5e:2x2, v5p:2x2x1, v5p:4x4x4, v6e:2x2") from None


def chip_info(mesh) -> dict:
    """Generation, TensorCores, HBM and VMEM bytes of one device of `mesh` (per device, i.e. per chip)."""
    with jax.set_mesh(mesh):
        info = pltpu.get_tpu_info()
    cores = int(info.num_cores)
    return {"chip": info.chip_version.value, "device_kind": mesh.devices.flat[0].device_kind, "cores": cores,
            "hbm_bytes": int(info.hbm_capacity_bytes) * cores, "vmem_bytes": int(info.vmem_capacity_bytes)}


def abstract_batch(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """One global training batch as shapes, sharded like `sharding.shard_batch` places it."""
    B, T = config.data.batch_size, config.data.seq_len
    rows = sharding.logical_sharding(mesh, "batch", "seq")
    ints = ("inputs", "targets", "positions", "segment_ids")
    return {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=rows)
            for k in (*ints, "loss_mask")}


@dataclasses.dataclass
class Report:
    config: str
    topology: str
    devices: int
    mesh: dict[str, int]
    chip: dict
    params: int
    seq_len: int
    batch_size: int
    stage: str
    compile_s: float
    bytes: dict[str, int]  # per chip: arguments, outputs (not aliased), temporaries, generated_code, total
    fits: bool

    @property
    def over_by(self) -> int:
        return self.bytes["total"] - self.chip["hbm_bytes"]

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"gib": {k: v / GiB for k, v in self.bytes.items()},
                                           "hbm_gib": self.chip["hbm_bytes"] / GiB, "message": self.message()}

    def message(self) -> str:
        """One line: fits, or which term is the largest and by how much the total is over."""
        hbm, total = self.chip["hbm_bytes"], self.bytes["total"]
        if self.fits:
            return f"fits: {total / GiB:.2f} GiB of {hbm / GiB:.2f} GiB HBM per chip ({100 * total / hbm:.0f}%)"
        term = max(TERMS, key=lambda t: self.bytes[t])
        return (f"does not fit: {total / GiB:.2f} GiB per chip against {hbm / GiB:.2f} GiB of HBM, over by "
                f"{self.over_by / GiB:.2f} GiB; the largest term is {term} ({self.bytes[term] / GiB:.2f} GiB): "
                f"{TERMS[term]}")

    def table(self) -> str:
        hbm = self.chip["hbm_bytes"]
        lines = [f"{self.config} on {self.topology} ({self.devices} x {self.chip['device_kind']}, "
                 f"{hbm / GiB:.2f} GiB HBM each), mesh {self.mesh}",
                 f"{self.params / 1e6:,.1f}M params, batch {self.batch_size} x {self.seq_len} tokens, "
                 f"{self.stage}; compiled in {self.compile_s:.1f} s", "",
                 f"{'per chip':<16}{'GiB':>10}{'% of HBM':>10}"]
        for t in (*TERMS, "total"):
            lines.append(f"{t:<16}{self.bytes[t] / GiB:>10.3f}{100 * self.bytes[t] / hbm:>9.1f}%")
        return "\n".join(lines + ["", self.message()])


def _bytes(compiled) -> dict[str, int]:
    ma = compiled.memory_analysis()
    out = {"arguments": int(ma.argument_size_in_bytes),
           "outputs": int(ma.output_size_in_bytes) - int(ma.alias_size_in_bytes),
           "temporaries": int(ma.temp_size_in_bytes),
           "generated_code": int(ma.generated_code_size_in_bytes)}
    out["total"] = sum(out.values())
    return out


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# XLA refuses to compile a program over HBM with one of two messages: the temporaries alone, or the total.
_OOM_TEMPS = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM")
_OOM_TOTAL = re.compile(r"Ran out of memory in memory space hbm\. Used ([\d.]+)([KMGT]?) of")


def _oom_bytes(err: Exception) -> tuple[str, int] | None:
    """('temporaries' | 'total', bytes) from XLA's refusal to compile a program that exceeds HBM, else None."""
    for what, pattern in (("temporaries", _OOM_TEMPS), ("total", _OOM_TOTAL)):
        m = pattern.search(str(err))
        if m:
            return what, int(float(m.group(1)) * _UNITS[m.group(2)])
    return None


def compile_train_step(config, devices, *, name: str = "config", topology: str = "", stage: str = "auto"):
    """Lower and compile the train step of `config` for `devices`; returns (Report, compiled or None).

    `stage`: one of the attention variant's stages (DSA: 'dense' warm-up or 'sparse'); 'auto' compiles the
    stage of the run's last step.
    Raises ConfigError before anything is traced when the config does not suit the device count.
    """
    chip = chip_info(jax.sharding.Mesh(np.asarray(devices[:1]), ("chip",)))
    validate(config, num_devices=len(devices), vmem_bytes=chip["vmem_bytes"])
    config = resolve(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    att = layers.staged_attention(config.model)
    variant = attention.REGISTRY[att.name]
    if stage == "auto":  # the stage of the last step, where a run spends most of its time
        stage = variant.stage_at(att, config.train.steps - 1)
    if stage not in variant.STAGES:
        raise AOTError(f"--stage={stage!r}: allowed values for model.attention.name={att.name!r} are "
                       f"{['auto', *variant.STAGES]}")
    tx, schedule = state.make_optimizer(config.train, config.model)
    graphdef, abstract = state.abstract_state(config, mesh, tx)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    step = steps.make_train_step(graphdef, tx, schedule, stage=stage, aux_weights=variant.aux_losses(att),
                                 state_shardings=shardings)
    t0 = time.perf_counter()
    compiled, oom = None, None
    with jax.set_mesh(mesh):
        lowered = step.trace(abstract, abstract_batch(config, mesh)).lower(lowering_platforms=("tpu",))
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001  (XLA refuses a program that does not fit HBM)
            oom = _oom_bytes(e)
            if oom is None:
                raise
    seconds = time.perf_counter() - t0
    if compiled is not None:
        mem = _bytes(compiled)
    else:  # XLA names the temporaries or the total; the arguments are this chip's shards of the state and batch
        args = sum(_shard_bytes(x) for x in jax.tree.leaves((abstract, abstract_batch(config, mesh))))
        temps = oom[1] if oom[0] == "temporaries" else max(oom[1] - args, 0)
        mem = {"arguments": args, "outputs": 0, "temporaries": temps, "generated_code": 0}
        mem["total"] = sum(mem.values())
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract["params"]))
    report = Report(config=name, topology=topology, devices=len(devices), mesh=dict(mesh.shape), chip=chip,
                    params=params, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                    stage=stage if len(variant.STAGES) > 1 else "train step", compile_s=seconds, bytes=mem,
                    fits=mem["total"] <= chip["hbm_bytes"])
    return report, compiled


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of an abstract array."""
    shape = x.sharding.shard_shape(x.shape)
    return math.prod(shape) * np.dtype(x.dtype).itemsize


# ----------------------------------------------------------------------------- CLI


def run(config, *, name: str, topology: str = "", stage: str = "auto", json_path: str = "") -> int:
    """Compile `config` for `topology` (default: its `aot.topology`), print the table; 0 fits, 1 does not, 2 error."""
    try:
        topology = topology or config.get("aot", {}).get("topology", "")
        if not topology:
            raise AOTError("--topology is required (the config has no aot.topology): e.g. --topology=v5p:2x2x1")
        report, _ = compile_train_step(config, topology_devices(topology), name=name, topology=topology, stage=stage)
    except (AOTError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.fits else 1


def main(argv: list[str]) -> int:
    """`python -m lc_jax.aot --config path.py[:arg] [--topology v5p:4x4x4] [--stage auto] [--json out.json]
    [--config.a.b=value ...]`."""
    rest, overrides = cli.split_overrides(argv)
    ap = argparse.ArgumentParser(prog="python -m lc_jax.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="config file, e.g. configs/tpu/llama1b_32k.py[:arg]")
    ap.add_argument("--topology", default="", help="TPU slice to compile for, e.g. v5p:4x4x4 (default: the "
                    "config's aot.topology)")
    ap.add_argument("--stage", default="auto", help="variants with stages (DSA: dense, sparse): which stage's step "
                    "to compile")
    ap.add_argument("--json", default="", help="also write the report as JSON to this path")
    args = ap.parse_args(rest)
    config = cli.load(args.config, overrides)
    return run(config, name=args.config, topology=args.topology, stage=args.stage, json_path=args.json)


if __name__ == "__main__":
    sys.exit(cli.run(main))
