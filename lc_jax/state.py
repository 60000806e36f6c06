"""The training state: the model and its optimizer, a fresh or restored state, checkpoints, and loading a run.

Everything that turns a config (or a run directory) into parameters lives here, so that
training, evaluation, generation and the AOT compiler build them the same way.
"""

from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from lc_jax import attention, layers, sharding
from lc_jax import config as config_lib
from lc_jax.model import Transformer

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

    Parameter groups the attention variant declares (`optimizer_groups`: DSA's indexer) get an AdamW of
    their own (own lr and weight decay, clipped separately) through `optax.multi_transform`; while the
    variant keeps the rest frozen (`frozen_until`: DSA's `frozen` warm-up) the main learning rate is 0.
    Returns (optimizer, the main group's schedule).
    """
    schedule = _schedule(t, t.lr)
    variant = None if model_cfg is None else attention.REGISTRY[model_cfg.attention.name]
    groups = {} if variant is None else variant.optimizer_groups(model_cfg.attention)
    if not groups:
        return _adamw(t, schedule, t.weight_decay), schedule
    main = schedule
    if frozen := variant.frozen_until(model_cfg.attention):
        main = lambda count: jnp.where(count < frozen, 0.0, schedule(count))  # noqa: E731
    txs = {"main": _adamw(t, main, t.weight_decay)}
    txs |= {name: _adamw(t, _schedule(t, lr or t.lr), wd) for name, (lr, wd) in groups.items()}
    return optax.multi_transform(txs, lambda params: param_labels(params, tuple(groups))), main


def param_labels(params, groups: tuple[str, ...]):
    """Each leaf's optimizer group: the first of `groups` named on its path (a module attribute), else 'main'."""
    def label(path, _):
        names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        return next((g for g in groups if g in names), "main")

    return jax.tree_util.tree_map_with_path(label, params)


# ----------------------------------------------------------------------------- state


def build_model(config, rngs=None) -> Transformer:
    """An eager, unsharded model (notebooks, tests). Training uses `init_state` instead.

    Fields that default to others are resolved first (on a copy), as training does,
    so a notebook gets the frequencies its run would.
    """
    with nnx.use_eager_sharding(False):
        resolved = config_lib.resolve(copy.deepcopy(config))
        return Transformer.from_config(resolved.model, rngs=rngs or nnx.Rngs(config.seed))


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


# ----------------------------------------------------------------------------- checkpoints and runs


def checkpoint_manager(workdir: epath.Path, c) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=c.keep, create=True),
    )


def phase_start(config) -> int:
    """The global step this run's optimizer started at: 0, or the step of the run it continues."""
    if not config.train.init_from:
        return 0
    if config.train.init_from_step:
        return config.train.init_from_step
    mgr = ocp.CheckpointManager((epath.Path(config.train.init_from) / "checkpoints").absolute())
    step = mgr.latest_step()
    mgr.close()
    if step is None:
        raise FileNotFoundError(f"train.init_from={config.train.init_from!r} has no checkpoint")
    return step


def stage_at(config, step: int) -> str:
    """The attention variant's stage after global step `step` (a run that continued another counts its own)."""
    att = layers.staged_attention(config.model)
    return attention.REGISTRY[att.name].stage_at(att, step - phase_start(config))


def load_config(workdir: str | os.PathLike):
    """The resolved config a run saved; lists become tuples so `--config.x=(a,b)` overrides work."""
    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    saved = config_lib.upgrade_saved(json.loads((epath.Path(workdir) / "config.json").read_text()))
    return ml_collections.ConfigDict(tuples(saved))


def load_params(workdir: str | os.PathLike, config, step: int | None = None):
    """(step, params) from a run's checkpoint, restored onto this host's default device."""
    mgr = ocp.CheckpointManager((epath.Path(workdir) / "checkpoints").absolute())
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {epath.Path(workdir) / 'checkpoints'}")
    tx, _ = make_optimizer(config.train, config.model)
    abstract = jax.eval_shape(lambda: fresh_state(config, tx))
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    mgr.close()
    return step, restored["state"]["params"]


def init_from(config, state):
    """Continued training: take parameters and step from another run; the optimizer starts afresh."""
    src = epath.Path(config.train.init_from)
    src_config = load_config(src)
    step, params = load_params(src, src_config, step=config.train.init_from_step or None)
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
