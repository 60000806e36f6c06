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
import optax
import orbax.checkpoint as ocp
from flax import nnx

from lc_jax import data as data_lib
from lc_jax import evaluate, sharding
from lc_jax.attention import dsa
from lc_jax.config import resolve, validate
from lc_jax.data import make_dataset
from lc_jax.model import Transformer
from pallas_kernels.flash_attention import tpu as flash_tpu


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- optimizer


def _schedule(t, peak: float) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1), end_value=peak * t.min_lr_ratio,
    )


def _adamw(t, schedule, weight_decay: float) -> optax.GradientTransformation:
    # Decay matrices only: norms' scales and other vectors stay undecayed.
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def make_optimizer(t, model_cfg=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up and cosine decay to `min_lr_ratio * lr`, after global-norm clipping.

    With DSA attention (`model_cfg.attention.name == 'dsa'`) the indexer gets its
    own AdamW (`model.attention.dsa.lr`, `weight_decay`, clipped separately) through
    `optax.multi_transform`; in the `frozen` warm-up the main model's learning
    rate is 0 until the sparse stage starts.
    """
    schedule = _schedule(t, t.lr)
    if model_cfg is None or not dsa.is_dsa(model_cfg):
        return _adamw(t, schedule, t.weight_decay), schedule
    ds = model_cfg.attention.dsa
    main = schedule
    if ds.warmup_mode == "frozen":
        main = lambda count: jnp.where(count < ds.warmup_steps, 0.0, schedule(count))  # noqa: E731
    indexer = _adamw(t, _schedule(t, ds.lr or t.lr), ds.weight_decay)
    return optax.multi_transform({"main": _adamw(t, main, t.weight_decay), "indexer": indexer},
                                 dsa.label_params), main


# ----------------------------------------------------------------------------- state


def build_model(config, rngs=None) -> Transformer:
    """An eager, unsharded model (notebooks, tests). Training uses `init_state` instead.

    Fields that default to others are resolved first (on a copy), as training does,
    so a notebook gets the frequencies its run would.
    """
    with nnx.use_eager_sharding(False):
        return Transformer.from_config(resolve(copy.deepcopy(config)).model, rngs=rngs or nnx.Rngs(config.seed))


def fresh_state(config, tx) -> dict:
    """A newly initialised training state (params, optimizer state, step, RNG); trace it, don't call it eagerly."""
    _, params = nnx.split(build_model(config), nnx.Param)
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        # Step at which this optimizer started (continued training restarts it; the schedule follows).
        "phase_start": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(config.seed + 1)),
    }


def abstract_state(config, mesh, tx):
    """(graphdef, the training state as ShapeDtypeStructs carrying the shardings it lives in): nothing allocated.

    Training initialises into these shardings; `lc_jax.aot` compiles the step from them.
    """
    with nnx.use_eager_sharding(False):
        graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: build_model(config)), nnx.Param)
    shapes = jax.eval_shape(lambda: fresh_state(config, tx))
    shardings = sharding.state_shardings(shapes, sharding.param_shardings(abstract_params, mesh), mesh)
    return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def init_state(config, mesh, tx):
    """Initialise directly into the target shardings: no host ever holds the full unsharded model or optimizer."""
    graphdef, abstract = abstract_state(config, mesh, tx)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: fresh_state(config, tx), out_shardings=jax.tree.map(lambda x: x.sharding, abstract))()
    return graphdef, state


def loss_fn(params, graphdef, batch, *, sparse: bool = False, diagnostics: bool = False, kl_weight: float = 1.0):
    """Mean next-token cross-entropy over the tokens that count (same document as their input).

    Returns (objective, (ce, aux)). For DSA models the objective adds
    `kl_weight` x the indexer KL (mean over layers and tokens); `aux` holds the
    (sum, count) pairs the DSA layers report, `sparse` picks the stage and
    `diagnostics` adds the attention-mass recall measurements.
    """
    model = nnx.merge(graphdef, params)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    if dsa.configure(model, sparse=sparse, diagnostics=diagnostics):
        logits, intermediates = nnx.capture(model, nnx.Intermediate)(*args)
        aux = dsa.collect(intermediates)
    else:
        logits, aux = model(*args), {}
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    n = jnp.maximum(mask.sum(), 1.0)
    lm = (ce * mask).sum() / n
    objective = lm
    if "kl" in aux:
        objective = lm + kl_weight * aux["kl"][0] / jnp.maximum(aux["kl"][1], 1.0)
    hit = jnp.argmax(logits, -1) == batch["targets"]  # unused by the train step (XLA drops it there)
    return objective, (ce, aux, hit)


def make_train_step(graphdef, tx, schedule, *, sparse: bool = False, kl_weight: float = 1.0, state_shardings=None):
    """The jitted, donated step. `sparse`: the DSA stage this step function trains (one compiled step per stage).

    `state_shardings` (the state's tree of shardings) pins the new state to the layout it came in, so that
    the optimizer state stays sharded like the parameters whatever XLA's propagation would choose.
    """
    def train_step(state, batch):
        (objective, (ce, aux, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], graphdef, batch, sparse=sparse, kl_weight=kl_weight)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        lr = schedule(state["step"] - state["phase_start"])
        mask = batch["loss_mask"]
        loss = (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr}
        metrics.update({f"dsa_{k}": v[0] / jnp.maximum(v[1], 1.0) for k, v in aux.items()})
        new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
        if state_shardings is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, state_shardings)
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef, num_buckets: int, seq_len: int, *, sparse: bool = False):
    """Sum of losses and token counts, overall and per position bucket (positions = context length).

    Ratios come back as (sum, count) pairs: DSA models' indexer KL and
    attention-mass diagnostics (`dsa_*`), and with synthetic tasks mixed in
    (`answer_mask` in the batch) the retrieval accuracy (every answer token
    right, teacher-forced), the share of answer tokens right, and the loss on
    the text examples alone.
    """
    width = max(1, math.ceil(seq_len / num_buckets))

    def eval_step(params, batch):
        _, (ce, aux, hit) = loss_fn(params, graphdef, batch, sparse=sparse, diagnostics=True)
        mask = batch["loss_mask"]
        bucket = jnp.clip(batch["positions"] // width, 0, num_buckets - 1).reshape(-1)
        per_sum = jax.ops.segment_sum((ce * mask).reshape(-1), bucket, num_buckets)
        per_cnt = jax.ops.segment_sum(mask.reshape(-1), bucket, num_buckets)
        out = {"sum": (ce * mask).sum(), "count": mask.sum(), "bucket_sum": per_sum, "bucket_count": per_cnt}
        out |= {f"dsa_{k}": v for k, v in aux.items()}
        if "answer_mask" in batch:
            answer = batch["answer_mask"] > 0
            has_answer = answer.any(-1)
            right = jnp.all(hit | ~answer, -1) & has_answer
            out["retrieval_acc"] = jnp.stack([right.sum(), has_answer.sum()]).astype(jnp.float32)
            out["retrieval_token_acc"] = jnp.stack([(hit & answer).sum(), answer.sum()]).astype(jnp.float32)
            text = (batch["key_position"][:, 0] < 0)[:, None] * mask
            out["text_loss"] = jnp.stack([(ce * text).sum(), text.sum()])
        return out

    return jax.jit(eval_step), width


def dsa_sparse_at(config, step: int) -> bool:
    """Whether a DSA model is in its sparse stage after `step` steps (a run that continued others counts its own)."""
    if not dsa.is_dsa(config.model):
        return False
    return step >= _phase_start(config) + config.model.attention.dsa.warmup_steps


# ----------------------------------------------------------------------------- metrics


class MetricsWriter:
    """metrics.jsonl plus TensorBoard events; silent on every process but 0."""

    def __init__(self, workdir: Path):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter

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


def _checkpoint_manager(workdir: Path, c) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=c.keep, create=True),
    )


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


def _phase_start(config) -> int:
    """The global step this run's optimizer started at: 0, or the step of the run it continues."""
    if not config.train.init_from:
        return 0
    if config.train.init_from_step:
        return config.train.init_from_step
    mgr = ocp.CheckpointManager((Path(config.train.init_from) / "checkpoints").absolute())
    step = mgr.latest_step()
    mgr.close()
    if step is None:
        raise FileNotFoundError(f"train.init_from={config.train.init_from!r} has no checkpoint")
    return step


def _init_from(config, state):
    """Continued training: take parameters and step from another run; the optimizer starts afresh."""
    src = Path(config.train.init_from)
    src_config = evaluate.load_config(src)
    step, params = evaluate.load_params(src, src_config, step=config.train.init_from_step or None)
    want = jax.tree.map(lambda x: (x.shape, x.dtype), state["params"])
    got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    if want != got:
        raise ValueError(f"train.init_from={str(src)!r}: its parameters do not match this model's shapes; "
                         "only position scaling, lengths and training settings may change")
    shardings = jax.tree.map(lambda x: x.sharding, state["params"])
    if jax.process_index() == 0:
        print(f"initialised from {src} at step {step}; optimizer restarts")
    at = lambda: jax.device_put(jnp.asarray(step, jnp.int32), state["step"].sharding)  # noqa: E731  (2 buffers: donated)
    return {**state, "params": jax.device_put(params, shardings), "step": at(), "phase_start": at()}


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
    extra = {k: float(v[0] / max(v[1], 1.0)) for k, v in total.items()
             if k.startswith("dsa_") or k in ("retrieval_acc", "retrieval_token_acc", "text_loss")}
    per_pos = evaluate.PerPositionLoss.from_sums(total["bucket_sum"], total["bucket_count"], width)
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
    tx, schedule = make_optimizer(config.train, config.model)
    graphdef, state = init_state(config, mesh, tx)
    shardings = jax.tree.map(lambda x: x.sharding, state)  # where the state lives, whatever it is restored from
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))

    stages = data_lib.curriculum(config.data)
    mgr = _checkpoint_manager(workdir, config.checkpoint)
    phase_start = _phase_start(config)
    resume_step = mgr.latest_step()
    start = phase_start if resume_step is None else resume_step
    if resume_step is None and config.train.init_from:
        state = _init_from(config, state)
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

    # DSA trains dense, then sparse from `warmup_steps` on: one compiled step per stage.
    sparse_from = phase_start + config.model.attention.dsa.warmup_steps if dsa.is_dsa(config.model) else None
    kl_weight = config.model.attention.dsa.kl_weight if sparse_from is not None else 0.0
    train_steps = {s: make_train_step(graphdef, tx, schedule, sparse=s, kl_weight=kl_weight, state_shardings=shardings)
                   for s in (False, True)}
    eval_steps = {s: make_eval_step(graphdef, config.eval.position_buckets, config.data.seq_len, sparse=s)
                  for s in (False, True)}
    width = eval_steps[False][1]
    is_sparse = lambda step: sparse_from is not None and step >= sparse_from  # noqa: E731
    writer = MetricsWriter(workdir)
    steps = phase_start + config.train.steps  # the global step this run ends at
    if is_main:
        plan = ", ".join(f"step {s0}: {b}x{L}" for s0, L, b in stages)
        print(f"model: {n_params / 1e6:.2f}M params | batches {plan} | mesh {dict(mesh.shape)}")

    bar = None
    if is_main and config.train.progress:
        from tqdm import tqdm

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
            for step in range(start, steps):
                stage = _stage_at(stages, step - phase_start)
                if stage != data["stage"]:  # curriculum: the next sequence length starts here
                    data["stage"], data["iter"] = stage, _stage_iterator(config, stages, stage, mesh)
                    if bar is not None:
                        bar.write(f"step {step}: curriculum stage {stage}, seq_len {stages[stage][1]}")
                tokens_per_step = stages[stage][1] * stages[stage][2]
                # Remember where the iterator was: a batch drawn but not trained on goes back on interrupt.
                data["untrained"] = (data["iter"].get_state(), step)
                batch = _put(next(data["iter"]), mesh, config, stages[stage][2])
                state, metrics = train_steps[is_sparse(step)](state, batch)
                data["untrained"] = None
                done = step + 1
                if pending is not None:
                    check(pending[0], _host(pending[1]))
                pending = (done, metrics)
                window_steps += 1
                if (done - phase_start) % config.train.log_every == 0 or done == steps:
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
                if (done - phase_start) % config.train.eval_every == 0 or done == steps:
                    val_metrics, per_pos = run_eval(eval_steps[is_sparse(done)][0], state["params"], config, mesh,
                                                    width)
                    writer.write(done, "validation", val_metrics)
                    if bar is not None:
                        bar.write(f"step {done}: validation loss {val_metrics['loss']:.4f}")
                preempted = mgr.reached_preemption(done)
                if (done - phase_start) % config.checkpoint.every == 0 or done == steps or preempted:
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
        per_pos.save(workdir / "per_position_loss", title=f"validation loss by position (step {steps})")
    return val_metrics or {}


def main(argv):
    del argv
    from absl import flags, logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO

    try:
        train(flags.FLAGS.config, flags.FLAGS.workdir)
    except NonFiniteLossError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/quickstart.py[:arg]", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, plots")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
