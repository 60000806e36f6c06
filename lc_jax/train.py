"""Training: validate -> mesh -> abstract init -> shard -> jitted step -> loop, with orbax checkpoints.

    python -m lc_jax.train --config configs/quickstart.py --workdir runs/quickstart [--config.x=y]

A run in a workdir that already holds checkpoints resumes from the latest one:
parameters, optimizer state, step, RNG and the grain iterator all come back, so
the losses continue exactly as if the run had never stopped.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags
from tensorboardX import SummaryWriter
from tqdm import tqdm

from lc_jax import attention, plots, sharding, steps
from lc_jax import data as data_lib
from lc_jax import state as state_lib
from lc_jax.config import resolve, validate
from lc_jax.data import make_dataset
from pallas_kernels.flash_attention import tpu as flash_tpu


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- metrics


class MetricsWriter:
    """metrics.jsonl plus TensorBoard events; silent on every process but 0."""

    def __init__(self, workdir: Path):
        self.active = jax.process_index() == 0
        if self.active:
            self.jsonl = open(workdir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(workdir / "tb"))

    def write(self, step: int, split: str, metrics: dict[str, float]):
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{split}/{k}", v, step)
        self.tb.flush()

    def close(self):
        if self.active:
            self.jsonl.close()
            self.tb.close()


# ----------------------------------------------------------------------------- loop


def _host(x) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(x).items()}


def _stage_at(stages, phase_step: int) -> int:
    return max(i for i, (s0, _, _) in enumerate(stages) if s0 <= max(phase_step, 0))


def _process_dataset(config, d, mesh, *, split: str, seed: int):
    """This process's share of the global batch: the rows its devices hold (see `sharding.process_rows`)."""
    start, rows, shards = sharding.process_rows(mesh, d.batch_size)
    return make_dataset(d, split=split, batch_size=rows, seed=seed, process_index=start // rows,
                        process_count=shards)


def _put(batch, mesh, config, global_batch: int):
    return sharding.shard_batch(batch, mesh, global_batch=global_batch, layout=config.mesh.context_layout)


def _stage_iterator(config, stages, stage: int, mesh):
    """A fresh training iterator for one curriculum stage (its own length, batch and seed)."""
    d = copy.deepcopy(config.data)
    d.seq_len, d.batch_size = stages[stage][1], stages[stage][2]
    return iter(_process_dataset(config, d, mesh, split="train", seed=config.seed + stage))


def run_eval(eval_step, params, config, mesh, width) -> dict:
    ds = _process_dataset(config, config.data, mesh, split="validation", seed=config.seed)
    n = len(ds) if config.train.eval_batches == 0 else min(config.train.eval_batches, len(ds))
    if n == 0:
        raise ValueError(f"the validation split has fewer than data.batch_size={config.data.batch_size} sequences")
    total = None
    for i in range(n):
        out = eval_step(params, _put(ds[i], mesh, config, config.data.batch_size))
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    total = jax.device_get(total)
    loss = float(total["sum"] / max(total["count"], 1.0))
    extra = {k: float(v[0] / max(v[1], 1.0)) for k, v in total["ratios"].items()}
    per_pos = plots.PerPositionLoss.from_sums(total["bucket_sum"], total["bucket_count"], width)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(total["count"]), **extra}, per_pos


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train (or resume) in `workdir`; returns the final validation metrics."""
    sharding.maybe_initialize_distributed(config.get("distributed"))
    validate(config, num_devices=jax.device_count(), vmem_bytes=flash_tpu.chip_vmem())
    config = resolve(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    mesh = sharding.make_mesh(config.mesh)
    tx, schedule = state_lib.make_optimizer(config.train, config.model)
    graphdef, state = state_lib.init_state(config, mesh, tx)
    shardings = jax.tree.map(lambda x: x.sharding, state)  # where the state lives, whatever it is restored from
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))

    stages = data_lib.curriculum(config.data)
    mgr = state_lib.checkpoint_manager(workdir, config.checkpoint)
    phase_start = state_lib.phase_start(config)
    resume_step = mgr.latest_step()
    start = phase_start if resume_step is None else resume_step
    if resume_step is None and config.train.init_from:
        state = state_lib.init_from(config, state)
    # The curriculum stage follows from the step; its iterator state comes back from the checkpoint.
    data = {"stage": _stage_at(stages, start - phase_start)}
    data["iter"] = _stage_iterator(config, stages, data["stage"], mesh)
    if resume_step is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = mgr.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data["iter"])))
        state = restored["state"]
        if is_main:
            print(f"resumed from {workdir / 'checkpoints'} at step {start}")

    def save(step: int, force: bool = False):
        mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data["iter"])), force=force)

    # One compiled step per stage of the attention variant (DSA: dense warm-up, then sparse).
    att = config.model.attention
    variant = attention.REGISTRY[att.name]
    train_steps = {s: steps.make_train_step(graphdef, tx, schedule, stage=s, aux_weights=variant.aux_losses(att),
                                            state_shardings=shardings)
                   for s in variant.STAGES}
    eval_steps = {s: steps.make_eval_step(graphdef, config.eval.position_buckets, config.data.seq_len, stage=s)
                  for s in variant.STAGES}
    width = eval_steps[variant.STAGES[0]][1]
    stage_at = lambda step: variant.stage_at(att, step - phase_start)  # noqa: E731
    writer = MetricsWriter(workdir)
    last_step = phase_start + config.train.steps  # the global step this run ends at
    if is_main:
        plan = ", ".join(f"step {s0}: {b}x{L}" for s0, L, b in stages)
        print(f"model: {n_params / 1e6:.2f}M params | batches {plan} | mesh {dict(mesh.shape)}")

    bar = None
    if is_main and config.train.progress:
        bar = tqdm(total=config.train.steps, initial=start - phase_start, dynamic_ncols=True, desc="train")

    all_finite = jax.jit(lambda t: jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(t)])))

    def check(step: int, m: dict[str, float]):
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            last = mgr.latest_step()
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}); stopping. "
                f"The last good checkpoint is step {last} in {workdir / 'checkpoints'}; "
                "lower train.lr or raise train.warmup_steps and rerun to resume from it.")

    # Metrics of step s are checked after step s+1 is dispatched, so the host never stalls the device.
    pending, window_t0, window_steps = None, time.perf_counter(), 0
    val_metrics, per_pos = None, None
    try:
        with jax.set_mesh(mesh):
            for step in range(start, last_step):
                stage = _stage_at(stages, step - phase_start)
                if stage != data["stage"]:  # curriculum: the next sequence length starts here
                    data["stage"], data["iter"] = stage, _stage_iterator(config, stages, stage, mesh)
                    if bar is not None:
                        bar.write(f"step {step}: curriculum stage {stage}, seq_len {stages[stage][1]}")
                tokens_per_step = stages[stage][1] * stages[stage][2]
                # Remember where the iterator was: a batch drawn but not trained on goes back on interrupt.
                data["untrained"] = (data["iter"].get_state(), step)
                batch = _put(next(data["iter"]), mesh, config, stages[stage][2])
                state, metrics = train_steps[stage_at(step)](state, batch)
                data["untrained"] = None
                done = step + 1
                if pending is not None:
                    check(pending[0], _host(pending[1]))
                pending = (done, metrics)
                window_steps += 1
                if (done - phase_start) % config.train.log_every == 0 or done == last_step:
                    m = _host(metrics)
                    check(done, m)
                    m["tokens_per_s"] = window_steps * tokens_per_step / (time.perf_counter() - window_t0)
                    m["perplexity"] = math.exp(min(m["loss"], 50.0))
                    writer.write(done, "train", m)
                    if bar is not None:
                        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}")
                    window_t0, window_steps = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                if (done - phase_start) % config.train.eval_every == 0 or done == last_step:
                    val_metrics, per_pos = run_eval(eval_steps[stage_at(done)][0], state["params"], config, mesh,
                                                    width)
                    writer.write(done, "validation", val_metrics)
                    if bar is not None:
                        bar.write(f"step {done}: validation loss {val_metrics['loss']:.4f}")
                preempted = mgr.reached_preemption(done)
                if (done - phase_start) % config.checkpoint.every == 0 or done == last_step or preempted:
                    check(done, _host(metrics))  # never write a checkpoint of a diverged state
                    if not bool(all_finite(state["params"])):
                        check(done, {"loss": float("nan"), "grad_norm": float("nan")})
                    save(done, force=True)
                    if preempted:
                        mgr.wait_until_finished()
                        raise SystemExit(f"preempted: checkpoint saved at step {done}")
    except KeyboardInterrupt:
        # Keep the work done so far: save the state as it is, unless already saved or diverged. If a
        # batch was drawn but its step not taken, the iterator goes back so that the resume trains on it.
        current = int(jax.device_get(state["step"]))
        if data.get("untrained") is not None and data["untrained"][1] == current:
            data["iter"].set_state(data["untrained"][0])
        if mgr.latest_step() != current and bool(all_finite(state["params"])):
            save(current, force=True)
            print(f"\ninterrupted: checkpoint saved at step {current}")
        raise
    finally:
        mgr.wait_until_finished()
        mgr.close()
        writer.close()
        if bar is not None:
            bar.close()

    if per_pos is not None and is_main:
        per_pos.save(workdir / "per_position_loss", title=f"validation loss by position (step {last_step})")
    return val_metrics or {}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO

    try:
        train(flags.FLAGS.config, flags.FLAGS.workdir)
    except NonFiniteLossError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/quickstart.py[:arg]", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, plots")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
