import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lc_jax import sharding, steps, train


def _losses(workdir):
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_resume_matches_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
    c = tiny_config(**{"train.log_every": 1, "checkpoint.every": 100})
    monkeypatch.setattr(train, "_STEP_FUNCTIONS", {})  # the three runs below make their step once
    made, make = [], steps.make_train_step
    monkeypatch.setattr(steps, "make_train_step", lambda *a, **kw: made.append(kw["stage"]) or make(*a, **kw))
    straight = tmp_path / "straight"
    final = train.train(c, straight)

    # Interrupt the second run as it places the batch of step 4 (call 5: call 4 is step 3's validation
    # batch). That batch was drawn but not trained on: the checkpoint of step 3 must not skip it.
    resumed = tmp_path / "resumed"
    real_shard, calls = sharding.shard_batch, {"n": 0}

    def interrupting_shard(batch, mesh, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_shard(batch, mesh, **kw)

    monkeypatch.setattr(sharding, "shard_batch", interrupting_shard)
    with pytest.raises(KeyboardInterrupt):
        train.train(c, resumed)
    monkeypatch.setattr(sharding, "shard_batch", real_shard)
    assert ocp.CheckpointManager((resumed / "checkpoints").absolute()).latest_step() == 3
    final_resumed = train.train(c, resumed)

    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == list(range(1, 7)) and sorted(b) == list(range(1, 7))
    assert all(a[s] == b[s] for s in a), (a, b)  # exact, data order included
    assert final == final_resumed
    assert len(made) == len(set(made)) > 0  # one step per stage of the attention variant, for all three runs


def test_step_functions_are_kept_per_config_and_mesh(tiny_config, monkeypatch):
    monkeypatch.setattr(train, "_STEP_FUNCTIONS", {})
    c, mesh = tiny_config(), sharding.make_mesh(tiny_config().mesh)
    assert train._step_functions(c, mesh, lambda: "a") == "a"
    assert train._step_functions(tiny_config(), mesh, lambda: "b") == "a"  # an equal config: the same steps
    other = tiny_config(**{"train.lr": 2e-3})
    assert train._step_functions(other, mesh, lambda: "c") == "c"
    four = sharding.make_mesh(c.mesh, jax.devices()[:4])
    assert train._step_functions(c, four, lambda: "d") == "d"  # another mesh: new steps
    for i in range(train.STEP_FUNCTIONS_KEPT):
        train._step_functions(tiny_config(**{"seed": 100 + i}), mesh, lambda: "x")
    assert train._step_functions(c, mesh, lambda: "e") == "e"  # the oldest were dropped


def test_run_writes_artifacts(tiny_config, tmp_path):
    c = tiny_config(**{"checkpoint.keep": 2})
    seen = []
    train.train(c, tmp_path, on_metrics=lambda step, split, m: seen.append({"step": step, "split": split, **m}))
    assert (tmp_path / "config.json").exists()
    assert (tmp_path / "per_position_loss.png").stat().st_size > 1000
    curve = json.loads((tmp_path / "per_position_loss.json").read_text())
    assert len(curve["loss"]) == c.eval.position_buckets and all(v is not None for v in curve["loss"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert {"loss", "perplexity", "lr", "grad_norm", "tokens_per_s"} <= set(train_rows[0])
    assert any(r["split"] == "validation" for r in rows)
    assert seen == rows  # a notebook's live plot sees every row as it is written
    assert list((tmp_path / "tb").iterdir())
    assert ocp.CheckpointManager((tmp_path / "checkpoints").absolute()).all_steps() == [3, 6]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
    c = tiny_config(**{"train.lr": 1e30, "train.warmup_steps": 0, "train.grad_clip": 0.0, "train.steps": 20,
                       "checkpoint.every": 1, "train.eval_every": 100})
    with pytest.raises(train.NonFiniteLossError, match="non-finite loss at step") as e:
        train.train(c, tmp_path)
    mgr = ocp.CheckpointManager((tmp_path / "checkpoints").absolute())
    last = mgr.latest_step()
    assert last is not None and f"last good checkpoint is step {last}" in str(e.value)
    restored = mgr.restore(last, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored["state"]["params"]))


def test_invalid_config_fails_before_compiling(tiny_config, tmp_path):
    from lc_jax.config import ConfigError

    with pytest.raises(ConfigError, match="model.position.name"):
        train.train(tiny_config(**{"model.position.name": "xpos"}), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
