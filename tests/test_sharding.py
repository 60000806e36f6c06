"""Meshes: a sharded training step equals the one-device step, checkpoints move between meshes, bad meshes fail early.

All on 8 fake CPU devices (conftest). Sharding changes only the order of sums,
so the one-step comparison checks the loss (1e-5 relative), the gradients
(1e-4 relative, plus 1e-5 of each tensor's largest gradient) and the parameters
relative to the learning rate (see the test); losses after resuming on another
mesh 1e-4 relative.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lc_jax import evaluate, sharding, steps, train
from lc_jax import state as state_lib
from lc_jax.config import ConfigError, validate
from lc_jax.data import make_dataset


def _one_step(c, devices):
    """(loss, gradients, parameters after one step, lr of that step, the sharded state) on a mesh of `devices`."""
    mesh = sharding.make_mesh(c.mesh, devices)
    tx, schedule = state_lib.make_optimizer(c.train)
    graphdef, state = state_lib.init_state(c, mesh, tx)
    batch = next(iter(make_dataset(c.data, split="train", batch_size=c.data.batch_size, seed=c.seed)))
    step = steps.make_train_step(graphdef, tx, schedule)
    grad_fn = jax.jit(jax.grad(lambda params, batch: steps.loss_fn(params, graphdef, batch)[0]))
    with jax.set_mesh(mesh):
        batch = sharding.shard_batch(batch, mesh, layout=c.mesh.context_layout)
        grads = jax.device_get(grad_fn(state["params"], batch))
        state, metrics = step(state, batch)
    return float(metrics["loss"]), grads, jax.device_get(state["params"]), float(metrics["lr"]), state


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=2, tensor=1, context=2),
                                  dict(data=1, fsdp=2, tensor=2, context=2, context_layout="contiguous")])
def test_train_step_on_mesh_matches_one_device(tiny_config, mesh):
    # Sharding changes only the order of sums. So the loss and the gradients match to f32 rounding of
    # their sums (relative to each tensor's largest gradient), and after one AdamW step, whose update
    # is lr x sign(g) where |g| >> eps, every parameter whose gradient is clear of that rounding noise
    # matches; one whose gradient is within it may move the other way, by at most 2 x lr.
    c = tiny_config(**{"train.warmup_steps": 0, "model.position.name": "rope"})
    c.mesh.update(mesh)
    loss, grads, params, lr, state = _one_step(c, jax.devices())
    # The parameters really are sharded as the rules say: FSDP over the model dim, heads over tensor.
    wq = state["params"]["blocks"][0]["attn"]["wq"]
    spec = tuple(wq.sharding.spec) + (None,) * 3
    assert spec[:2] == ("fsdp", "tensor" if mesh["tensor"] > 1 else None)
    # ... and so is the optimizer state (Adam's mu and nu), like the parameters it belongs to.
    mu = state["opt_state"][1][0].mu["blocks"][0]["attn"]["wq"]
    assert mu.sharding.spec == wq.sharding.spec
    c1 = tiny_config(**{"train.warmup_steps": 0, "model.position.name": "rope"})
    c1.mesh.update(data=1)
    loss1, grads1, params1, lr1, _ = _one_step(c1, jax.devices()[:1])
    assert loss == pytest.approx(loss1, rel=1e-5) and lr == lr1 > 0

    def compare(g, g1, p, p1):
        noise = 1e-5 * np.abs(g1).max()
        np.testing.assert_allclose(g, g1, rtol=1e-4, atol=noise)
        clear = np.abs(g1) > 10 * noise
        np.testing.assert_allclose(p[clear], p1[clear], rtol=0, atol=1e-3 * lr)
        assert np.abs(p - p1).max() <= 2.01 * lr

    jax.tree.map(compare, grads, grads1, params, params1)


def _metrics(workdir, split):
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if r["split"] == split}


def test_checkpoint_saved_on_one_mesh_resumes_on_another(tiny_config, tmp_path, monkeypatch):
    """3 steps on (fsdp=2, tensor=2, context=2), resumed on (data=2, context=4): the losses of one run on data=8."""
    def config(**mesh):
        c = tiny_config(**{"model.attention.name": "sliding", "model.position.name": "alibi"})
        c.mesh.update(dict(data=1, fsdp=1, tensor=1, context=1) | mesh)
        return c

    straight = tmp_path / "straight"
    train.train(config(data=8), straight)

    moved = tmp_path / "moved"
    real, calls = sharding.shard_batch, {"n": 0}

    def interrupting(batch, mesh, **kw):  # stop as step 4's batch is placed (call 4 is step 3's validation)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(batch, mesh, **kw)

    monkeypatch.setattr(sharding, "shard_batch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train.train(config(fsdp=2, tensor=2, context=2), moved)
    monkeypatch.setattr(sharding, "shard_batch", real)
    assert (moved / "checkpoints" / "3").exists()
    train.train(config(data=2, context=4), moved)

    for split in ("train", "validation"):
        a, b = _metrics(straight, split), _metrics(moved, split)
        assert sorted(a) == sorted(b)
        np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-4)


def test_mesh_validation_errors(tiny_config):
    c = tiny_config()
    c.mesh.update(data=1, context=8)  # zig-zag over 8 shards needs multiples of 16: 64 is fine
    validate(c, num_devices=8)
    c.data.seq_len = 40
    with pytest.raises(ConfigError, match=r"data.seq_len=40.*allowed lengths are multiples of 16"):
        validate(c, num_devices=8)
    c = tiny_config()
    c.mesh.update(data=2, tensor=4)
    with pytest.raises(ConfigError, match=r"model.num_kv_heads=2 is not divisible by mesh.tensor=4"):
        validate(c, num_devices=8)
    c = tiny_config(**{"model.attention.impl": "cudnn"})
    c.mesh.update(data=4, context=2)
    with pytest.raises(ConfigError, match=r"impl='cudnn' cannot run inside ring attention"):
        validate(c, num_devices=8)
    c = tiny_config()
    c.mesh.context_layout = "striped"
    allowed = r"mesh.context_layout='striped': allowed values are \['zigzag', 'contiguous'\]"
    with pytest.raises(ConfigError, match=allowed):
        validate(c, num_devices=8)
    c = tiny_config(**{"distributed.cpu_collectives": "nccl"})
    with pytest.raises(ConfigError, match=r"distributed.cpu_collectives='nccl': allowed values are \['', 'gloo'"):
        validate(c)
    c = tiny_config()
    c.mesh.update(data=3)
    with pytest.raises(ConfigError, match="does not divide 8 devices"):
        validate(c, num_devices=8)


def test_process_rows_and_layout_on_one_process(tiny_config):
    c = tiny_config()
    c.mesh.update(data=2, fsdp=2, context=2)
    mesh = sharding.make_mesh(c.mesh)
    assert sharding.process_rows(mesh, 8) == (0, 8, 1)
    batch = {"inputs": np.arange(8 * 64).reshape(8, 64)}
    placed = sharding.shard_batch(batch, mesh, layout="zigzag")["inputs"]
    # Device (data 0, fsdp 0, context 1) holds rows 0-1 and zig-zag chunks 1 and 2 of 4 (tokens 16-47).
    shard = next(s for s in placed.addressable_shards if s.index[1].start == 32)
    assert np.asarray(shard.data)[0].tolist() == list(range(16, 48))


@pytest.mark.parametrize("env,cfg,expect", [
    ({}, {}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1"}, {}, None),  # a single-host TPU VM needs no runtime
    ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, {}, {}),
    ({"SLURM_NTASKS": "2"}, {}, {}),
    ({}, {"auto": True}, {}),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, {}, {"coordinator_address": "h:1", "num_processes": None, "process_id": None}),
    ({}, {"coordinator_address": "h:2", "num_processes": 2, "process_id": 1},
     {"coordinator_address": "h:2", "num_processes": 2, "process_id": 1}),
])
def test_distributed_starts_where_asked(monkeypatch, env, cfg, expect):
    for var in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    started = sharding.maybe_initialize_distributed(cfg)
    assert started == (expect is not None) and calls == ([] if expect is None else [expect])


def test_evaluation_rings_over_the_runs_context_devices(tiny_config, tmp_path):
    """A run trained with mesh.context=4 is evaluated on a 4-device ring: same losses as one device."""
    c = tiny_config(**{"train.steps": 2, "train.eval_every": 2, "checkpoint.every": 2})
    c.mesh.update(data=2, context=4)
    train.train(c, tmp_path)
    ring = evaluate.extrapolation_sweep(tmp_path, lengths=[64, 128], scalings=[None], max_tokens=256)
    assert evaluate.eval_mesh(c, 128) is not None and evaluate.eval_mesh(c, 100) is None
    c.mesh.update(data=8, context=1)
    single = evaluate.extrapolation_sweep(tmp_path, c, lengths=[64, 128], scalings=[None], max_tokens=256)
    np.testing.assert_allclose([r["loss"] for r in ring["rows"]], [r["loss"] for r in single["rows"]], rtol=1e-5)
