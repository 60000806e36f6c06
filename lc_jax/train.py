"""Training: validate -> mesh -> abstract init -> shard -> jitted step -> loop, with orbax checkpoints.

    python -m lc_jax.train --config configs/quickstart.py --workdir runs/quickstart [--config.x=y]

A run in a workdir that already holds checkpoints resumes from the newest one that restores:
parameters, optimizer state, step, RNG and the grain iterator all come back, so
the losses continue exactly as if the run had never stopped. What keeps a run's
work when things go wrong:

* SIGTERM (preemption, SLURM, Kubernetes) and SIGINT ask the run to stop: it saves
  a checkpoint at the end of the current step, says so in one line and exits 0; a
  second signal exits at once. Under `jax.distributed`, JAX's preemption sync point
  (`reached_preemption`) makes every host save at the same step.
* A checkpoint that does not restore is moved aside to `checkpoints_corrupt/`, never
  deleted, and the run falls back to the newest intact one; with none intact it stops.
* `config.json` describes the checkpoints: it is written only once the state is known
  to match it. A resume under another model shape stops before anything changes;
  other changes (steps, schedule, evaluation) are allowed and each start is recorded
  in `config_history.jsonl`.
* `metrics.jsonl` and TensorBoard drop the rows after the step a run resumes from, so
  a kill between a log step and a checkpoint leaves no duplicate or missing step.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from tensorboardX import SummaryWriter
from tqdm import tqdm

from lc_jax import attention, cli, layers, plots, sharding, steps
from lc_jax import data as data_lib
from lc_jax import state as state_lib
from lc_jax.config import resolve, validate
from lc_jax.data import make_dataset
from lc_jax.errors import UserError
from pallas_kernels.flash_attention import tpu as flash_tpu


class NonFiniteLossError(UserError):
    """The run stopped on a non-finite step (`train.nonfinite`); exit 1, the message says what to do."""

    exit_code = 1


class WorkdirError(UserError, ValueError):
    """The workdir cannot take this run: it is not writable, its checkpoints are of another model, or none of
    them restores. Nothing in it was changed (broken checkpoints excepted: they were moved aside)."""


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint at `step`."""

    def __init__(self, step: int, signame: str):
        self.step, self.signame = step, signame
        super().__init__(f"{signame}: checkpoint saved at step {step}; rerun the same command to resume")


class Stop:
    """Set by SIGTERM / SIGINT while `install`ed; the loop saves and stops at the end of its current step.

    `train` routes the signals here once jax.distributed is up and puts the handlers it replaced back when it
    returns, so a notebook or a test process that trains in-process keeps its own Ctrl-C. Inside a
    `with Stop() as stop:` block (a sweep: several runs, one stop) they stay routed until the block ends.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._replaced: dict | None = None
        self._held = False  # inside `with`: the block, not `train`, gives the handlers back

    def install(self) -> bool:
        """Route SIGTERM and SIGINT here; True if this call did (`train` calls it once jax.distributed is up).
        Under jax.distributed nothing is routed: a stop must be collective, and JAX's preemption notifier
        already turns SIGTERM into one sync point for every host (`reached_preemption`), while Ctrl-C on one
        host ends that host."""
        if self._replaced is not None or jax.process_count() > 1:
            return False
        self._replaced = {s: signal.signal(s, lambda signum, _: self.request(signum)) for s in self.SIGNALS}
        return True

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        for s, handler in (self._replaced or {}).items():
            signal.signal(s, handler)
        self._replaced = None

    def __enter__(self) -> Stop:
        self._held = True
        return self

    def __exit__(self, *exc) -> None:
        self._held = False
        self.restore()

    def request(self, signum: int) -> None:
        if self.signum is not None:  # a second signal: no more waiting
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
              "(send it again to exit at once)", flush=True)


# ----------------------------------------------------------------------------- metrics


class MetricsWriter:
    """metrics.jsonl plus TensorBoard events; silent on every process but 0.

    On a local disk each row is appended as it comes. Object stores (gs://) cannot append, so there the
    file is rewritten at most every `REMOTE_FLUSH_S` seconds and at every `flush` (before each checkpoint):
    the rows a checkpoint's step covers are always written before it.
    """

    REMOTE_FLUSH_S = 60.0

    def __init__(self, workdir: epath.Path, start: int = 0,
                 on_write: Callable[[int, str, dict], None] | None = None):
        """Rows after `start` (the step the run resumes from) were written by a run that died before its next
        checkpoint: they are dropped, from metrics.jsonl and (purge_step) from TensorBoard. `on_write` sees
        each new row."""
        self.active, self.workdir, self.on_write = jax.process_index() == 0, workdir, on_write
        if not self.active:
            return
        self.path, self.remote = workdir / "metrics.jsonl", _remote(workdir)
        rows = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        self.rows = [r for r in rows if r.strip() and _row_step(r) <= start]
        if len(self.rows) != len(rows):
            self.path.write_text("".join(self.rows))
        self.jsonl = None if self.remote else self.path.open("a")
        self.flushed = time.monotonic()
        self.tb = SummaryWriter(str(workdir / "tb"), purge_step=start + 1)

    def restart(self, step: int):
        """Drop what was written after `step` (a rewind): the rows, and in TensorBoard by purge_step."""
        if self.active:
            self.close()
            self.__init__(self.workdir, step, self.on_write)

    def write(self, step: int, split: str, metrics: dict[str, float]):
        if not self.active:
            return
        row = json.dumps({"step": step, "split": split, **metrics}) + "\n"
        self.rows.append(row)
        if self.jsonl is not None:
            self.jsonl.write(row)
            self.jsonl.flush()
        elif time.monotonic() - self.flushed > self.REMOTE_FLUSH_S:
            self.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{split}/{k}", v, step)
        self.tb.flush()
        if self.on_write is not None:
            self.on_write(step, split, metrics)

    def flush(self):
        if self.active and self.remote:
            self.path.write_text("".join(self.rows))
            self.flushed = time.monotonic()

    def close(self):
        if self.active:
            self.flush()
            if self.jsonl is not None:
                self.jsonl.close()
            self.tb.close()


def _remote(path: epath.Path) -> bool:
    return "://" in str(path)


def _row_step(row: str) -> float:
    try:
        return json.loads(row)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        return math.inf


# ----------------------------------------------------------------------------- the workdir


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        return {k: v for key, sub in d.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def _saved_steps(workdir: epath.Path) -> list[int]:
    """Checkpoint steps in the workdir, read without creating anything."""
    ckpt = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def check_resumable(config, workdir: epath.Path, tx) -> dict | None:
    """The saved config's fields when `workdir` holds checkpoints to resume (None for a fresh run).

    A resume whose training state would differ in shape (another model, another optimizer) is a
    `WorkdirError` listing the fields that differ; nothing is written. Checked abstractly, before compiling.
    """
    if not _saved_steps(workdir) or not (workdir / "config.json").exists():
        return None
    try:
        saved = state_lib.load_config(workdir)
    except (ValueError, OSError) as e:
        raise WorkdirError(f"{workdir / 'config.json'} is unreadable ({e}); it describes the checkpoints beside "
                           "it: restore it, or train in another workdir") from None
    shapes = lambda c, t: jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(  # noqa: E731
        lambda: state_lib.fresh_state(c, t)))
    saved_tx, _ = state_lib.make_optimizer(saved.train, saved.model)
    if shapes(saved, saved_tx) != shapes(config, tx):
        old, new = _flat(saved.to_dict()), _flat(config.to_dict())
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
                if k.startswith(("model.", "train.")) and old.get(k) != new.get(k)]
        raise WorkdirError(f"{workdir} holds checkpoints of another model or optimizer; differing fields (saved -> "
                           f"now): {'; '.join(diff) or 'none named, the parameter shapes differ'}. Nothing was "
                           "changed: train in another workdir, or drop those overrides to resume")
    return _flat(saved.to_dict())


def record_config(config, workdir: epath.Path, start: int, saved: dict | None) -> None:
    """Write config.json (the state now matches it) and add this start, with what changed, to the history."""
    now = _flat(config.to_dict())
    entry = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "step": start}
    if saved is not None:
        entry["changed"] = {k: [saved.get(k), now.get(k)] for k in sorted(saved.keys() | now.keys())
                            if saved.get(k) != now.get(k)}
    history = workdir / "config_history.jsonl"  # rewritten, not appended: object stores cannot append
    history.write_text((history.read_text() if history.exists() else "") + json.dumps(entry) + "\n")
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def _check_writable(workdir: epath.Path) -> None:
    """Create `workdir` and make sure files can be written there, before anything is compiled."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"--workdir={str(workdir)!r}: cannot write there ({e.strerror or e})") from None


def _move_aside(workdir: epath.Path, step: int) -> epath.Path:
    dest = workdir / "checkpoints_corrupt" / str(step)
    n = 1
    while dest.exists():
        dest, n = workdir / "checkpoints_corrupt" / f"{step}.{n}", n + 1
    dest.parent.mkdir(exist_ok=True)
    (workdir / "checkpoints" / str(step)).rename(dest)
    return dest


def restore_newest(mgr, workdir: epath.Path, restore, is_main: bool):
    """(step, restore(step)) of the newest checkpoint that restores, or (None, None) when there is none.

    One that fails to restore is moved aside with a warning naming its step and the reason; if checkpoints
    existed and none restores, `WorkdirError`: a run never starts afresh over a workdir that has them.
    """
    tried = []
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            restored = restore(step)
        except Exception as e:  # noqa: BLE001  (any failure to read it back: the files are what is wrong)
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            if is_main:
                print(f"warning: checkpoint {step} does not restore ({type(e).__name__}: {reason}); moved to "
                      f"{_move_aside(workdir, step)}", flush=True)
            tried.append(step)
            sharding.sync_processes(f"lc_jax_moved_aside_{step}")
            mgr.reload()
            continue
        if is_main:
            print(f"resumed from {workdir / 'checkpoints'} at step {step}")
        return step, restored
    if tried:
        raise WorkdirError(f"{workdir}: no checkpoint restores (steps {tried} moved to "
                           f"{workdir / 'checkpoints_corrupt'}); not starting afresh over them: repair or remove "
                           "them, or train in another workdir")
    return None, None


# ----------------------------------------------------------------------------- non-finite steps


class Rewind(Exception):
    """Go back to checkpoint `to` (raised by `NonFinite.check`, handled by the loop)."""

    def __init__(self, to: int):
        self.to = to


class NonFinite:
    """`train.nonfinite`: what a step with a non-finite loss or gradient norm does.

    stop: raise `NonFiniteLossError` naming the step, the metric and the last checkpoint saved before it.
    skip: the step's update was dropped in the train step (`steps.make_train_step(skip_nonfinite=True)`); stop
      after `nonfinite_limit` in a row.
    rewind: back to the last checkpoint before the step, leave its batch out, scale the learning rate by
      `rewind_lr_scale`; stop after `nonfinite_limit` rewinds. Rewinds are kept in `nonfinite.json`, so a
      resumed run leaves out the same batches with the same learning rates as the run it continues.
    """

    def __init__(self, t, workdir: epath.Path, mgr):
        self.policy, self.limit, self.scale = t.nonfinite, t.nonfinite_limit, float(t.rewind_lr_scale)
        self.path, self.mgr, self.checked, self.in_a_row = workdir / "nonfinite.json", mgr, -1, 0
        self.rewinds = json.loads(self.path.read_text())["rewinds"] if self.path.exists() else []

    def skips_batch(self, step: int) -> bool:
        """Whether the batch that would train step `step` is one a rewind left out."""
        return any(r["bad_step"] == step for r in self.rewinds)

    def step_args(self, step: int) -> tuple:
        """The train step's extra arguments: under `rewind`, the learning-rate factor for the update that leaves
        step `step` (from the rewinds to `step` or before). Other policies pass none, so that their step is the
        program it always was (a traced factor of 1 changes XLA's fusion, and with it the last bits)."""
        if self.policy != "rewind":
            return ()
        return (jnp.float32(math.prod(r["lr_scale"] for r in self.rewinds if r["to"] <= step)),)

    def check(self, step: int, m: dict[str, float]) -> None:
        """Apply the policy to the metrics of step `step` (each step counts once, however often it is checked)."""
        if step <= self.checked:
            return
        self.checked = step
        bad = not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]))
        self.in_a_row = self.in_a_row + 1 if bad else 0
        if not bad or (self.policy == "skip" and self.in_a_row < self.limit):
            return
        what = f"loss={m['loss']}, grad_norm={m['grad_norm']}"
        good = max((s for s in self.mgr.all_steps() if s < step), default=None)
        if self.policy == "rewind" and good is not None and len(self.rewinds) < self.limit:
            self.rewinds.append({"bad_step": step, "to": good, "lr_scale": self.scale})
            if jax.process_index() == 0:
                self.path.write_text(json.dumps({"rewinds": self.rewinds}, indent=2))
            print(f"non-finite step {step} ({what}): rewinding to checkpoint {good}, leaving its batch out"
                  + (f", learning rate x{self.scale}" if self.scale != 1 else ""), flush=True)
            self.checked, self.in_a_row = good, 0
            raise Rewind(good)
        why = {"stop": "", "skip": f" ({self.in_a_row} in a row, train.nonfinite_limit={self.limit})",
               "rewind": f" (after {len(self.rewinds)} rewinds, train.nonfinite_limit={self.limit})"}[self.policy]
        last = ("no checkpoint was saved before it" if good is None else
                f"the last good checkpoint is step {good} in {self.mgr.directory}; lower train.lr or raise "
                "train.warmup_steps, or set train.nonfinite=skip|rewind, and rerun to resume from it")
        raise NonFiniteLossError(f"non-finite loss at step {step}{why} ({what}); stopping: {last}")


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


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


_STEP_FUNCTIONS: dict[tuple, tuple] = {}
STEP_FUNCTIONS_KEPT = 4


def _step_functions(config: ml_collections.ConfigDict, mesh, make: Callable[[], tuple]) -> tuple:
    """The jitted train and eval steps of this resolved config on this mesh, made once per process.

    A notebook that reruns a cell, a sweep that resumes a member, or a resume after a rewind in the same
    process would otherwise trace, lower and compile the same step again (seconds each, most of a tiny run).
    What the steps close over (graph, optimizer, schedule, shardings, stage, policy) follows from the
    config and the mesh, so those are the key; the newest `STEP_FUNCTIONS_KEPT` are kept.
    """
    key = (json.dumps(config.to_dict(), sort_keys=True, default=repr), tuple(mesh.shape.items()),
           tuple(d.id for d in mesh.devices.flat))
    if key not in _STEP_FUNCTIONS:
        _STEP_FUNCTIONS[key] = make()
        while len(_STEP_FUNCTIONS) > STEP_FUNCTIONS_KEPT:
            del _STEP_FUNCTIONS[next(iter(_STEP_FUNCTIONS))]
    return _STEP_FUNCTIONS[key]


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, stop: Stop | None = None,
          on_metrics: Callable[[int, str, dict], None] | None = None) -> dict:
    """Train (or resume) in `workdir`; returns the final validation metrics.

    With `stop` (the command line's), SIGTERM and SIGINT save at the end of the step and raise `Interrupted`;
    without it (notebooks), KeyboardInterrupt saves and re-raises. `on_metrics(step, split, metrics)` sees each
    row as it is written to metrics.jsonl (on process 0): a notebook's live loss plot.
    """
    sharding.maybe_initialize_distributed(config.get("distributed"))
    routed = stop is not None and stop.install()
    try:
        return _train(config, epath.Path(workdir), stop, on_metrics)
    finally:
        if routed and not stop._held:
            stop.restore()


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, stop: Stop | None,
           on_metrics: Callable[[int, str, dict], None] | None = None) -> dict:
    validate(config, num_devices=jax.device_count(), vmem_bytes=flash_tpu.chip_vmem())
    config = resolve(config)
    data_lib.check(config.data, config.data.batch_size)
    is_main = jax.process_index() == 0
    tx, schedule = state_lib.make_optimizer(config.train, config.model)
    saved_config = check_resumable(config, workdir, tx)
    _check_writable(workdir)

    mesh = sharding.make_mesh(config.mesh)
    graphdef, state = state_lib.init_state(config, mesh, tx)
    shardings = jax.tree.map(lambda x: x.sharding, state)  # where the state lives, whatever it is restored from
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))

    stages = data_lib.curriculum(config.data)
    mgr = state_lib.checkpoint_manager(workdir, config.checkpoint)
    phase_start = state_lib.phase_start(config)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)

    def new_data(step: int) -> dict:
        """The training iterator at the start of the curriculum stage of `step` (a restore then sets it)."""
        stage = _stage_at(stages, step - phase_start)
        return {"stage": stage, "iter": _stage_iterator(config, stages, stage, mesh)}

    def restore(step: int):
        data = new_data(step)
        restored = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data["iter"])))
        return restored["state"], data

    start, restored = restore_newest(mgr, workdir, restore, is_main)
    if restored is not None:
        state, data = restored
    else:
        start = phase_start
        if config.train.init_from:
            state = state_lib.init_from(config, state)
        data = new_data(start)
    if is_main:
        record_config(config, workdir, start, saved_config)

    def save(step: int, force: bool = False):
        writer.flush()  # the rows up to `step` are written before the checkpoint that covers them
        mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data["iter"])), force=force)

    # One compiled step per stage of the attention variant (DSA: dense warm-up, then sparse).
    att = layers.staged_attention(config.model)
    variant = attention.REGISTRY[att.name]
    nonfinite = NonFinite(config.train, workdir, mgr)
    train_steps, eval_steps = _step_functions(config, mesh, lambda: (
        {s: steps.make_train_step(graphdef, tx, schedule, stage=s, aux_weights=variant.aux_losses(att),
                                  state_shardings=shardings, skip_nonfinite=nonfinite.policy == "skip")
         for s in variant.STAGES},
        {s: steps.make_eval_step(graphdef, config.eval.position_buckets, config.data.seq_len, stage=s)
         for s in variant.STAGES}))
    width = eval_steps[variant.STAGES[0]][1]
    stage_at = lambda step: variant.stage_at(att, step - phase_start)  # noqa: E731
    writer = MetricsWriter(workdir, start, on_metrics)
    last_step = phase_start + config.train.steps  # the global step this run ends at
    if is_main:
        plan = ", ".join(f"step {s0}: {b}x{L}" for s0, L, b in stages)
        print(f"model: {n_params / 1e6:.2f}M params | batches {plan} | mesh {dict(mesh.shape)}")

    bar = None
    if is_main and config.train.progress:
        bar = tqdm(total=config.train.steps, initial=start - phase_start, dynamic_ncols=True, desc="train")

    def check_saveable(done: int, metrics) -> None:
        """Never write a checkpoint of a diverged state."""
        nonfinite.check(done, _host(metrics))
        if not bool(_all_finite(state["params"])):
            nonfinite.check(done, {"loss": float("nan"), "grad_norm": float("nan")})

    # Metrics of step s are checked after step s+1 is dispatched, so the host never stalls the device.
    pending, window_t0, window_steps = None, time.perf_counter(), 0
    val_metrics, per_pos = None, None
    step = start
    try:
        with jax.set_mesh(mesh):
            while step < last_step:
                try:
                    stage = _stage_at(stages, step - phase_start)
                    if stage != data["stage"]:  # curriculum: the next sequence length starts here
                        data["stage"], data["iter"] = stage, _stage_iterator(config, stages, stage, mesh)
                        if bar is not None:
                            bar.write(f"step {step}: curriculum stage {stage}, seq_len {stages[stage][1]}")
                    tokens_per_step = stages[stage][1] * stages[stage][2]
                    # Remember where the iterator was: a batch drawn but not trained on goes back on interrupt.
                    data["untrained"] = (data["iter"].get_state(), step)
                    if nonfinite.skips_batch(step + 1):  # the batch a rewind left out
                        next(data["iter"])
                    batch = _put(next(data["iter"]), mesh, config, stages[stage][2])
                    state, metrics = train_steps[stage_at(step)](state, batch, *nonfinite.step_args(step))
                    data["untrained"] = None
                    done = step + 1
                    if pending is not None:
                        nonfinite.check(pending[0], _host(pending[1]))
                    pending = (done, metrics)
                    window_steps += 1
                    if (done - phase_start) % config.train.log_every == 0 or done == last_step:
                        m = _host(metrics)
                        nonfinite.check(done, m)
                        m["tokens_per_s"] = window_steps * tokens_per_step / (time.perf_counter() - window_t0)
                        m["perplexity"] = math.exp(min(m["loss"], 50.0))
                        writer.write(done, "train", m)
                        if bar is not None:
                            bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}")
                        window_t0, window_steps = time.perf_counter(), 0
                    if bar is not None:
                        bar.update(1)
                    if (done - phase_start) % config.train.eval_every == 0 or done == last_step:
                        val_metrics, per_pos = run_eval(eval_steps[stage_at(done)][0], state["params"], config,
                                                        mesh, width)
                        writer.write(done, "validation", val_metrics)
                        if bar is not None:
                            bar.write(f"step {done}: validation loss {val_metrics['loss']:.4f}")
                    preempted = mgr.reached_preemption(done)
                    if (done - phase_start) % config.checkpoint.every == 0 or done == last_step or preempted:
                        check_saveable(done, metrics)
                        save(done, force=True)
                        if preempted:
                            mgr.wait_until_finished()
                            raise Interrupted(done, "preempted")
                    if stop is not None and stop.signum is not None:
                        if mgr.latest_step() != done:
                            check_saveable(done, metrics)
                            save(done, force=True)
                        mgr.wait_until_finished()
                        raise Interrupted(done, signal.Signals(stop.signum).name)
                    step = done
                except Rewind as r:  # back to the last good checkpoint; its batch is left out from now on
                    mgr.wait_until_finished()
                    state, data = restore(r.to)
                    step, pending = r.to, None
                    writer.restart(r.to)
                    if bar is not None:
                        bar.reset(total=config.train.steps)
                        bar.update(r.to - phase_start)
    except KeyboardInterrupt:
        # Keep the work done so far: save the state as it is, unless already saved or diverged. If a
        # batch was drawn but its step not taken, the iterator goes back so that the resume trains on it.
        current = int(jax.device_get(state["step"]))
        if data.get("untrained") is not None and data["untrained"][1] == current:
            data["iter"].set_state(data["untrained"][0])
        if mgr.latest_step() != current and bool(_all_finite(state["params"])):
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


def main(argv: list[str]) -> int:
    """`python -m lc_jax.train --config path.py[:arg] --workdir DIR [--config.a.b=value ...] [--verbose]`."""
    rest, overrides = cli.split_overrides(argv)
    ap = argparse.ArgumentParser(prog="python -m lc_jax.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="config file, e.g. configs/quickstart.py[:arg]")
    ap.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, plots")
    args = ap.parse_args(rest)
    config = cli.load(args.config, overrides)
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    try:
        train(config, args.workdir, stop=Stop())
    except Interrupted as e:
        print(f"stopped on {e}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
