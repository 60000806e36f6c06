"""Context extension: evaluation with another RoPE scaling, continued training, and the length curriculum."""

import json

import pytest

from lc_jax import evaluate, sharding, train
from lc_jax import state as state_lib
from lc_jax.config import ConfigError, load, validate


def _train_losses(workdir):
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {r["step"]: r for r in rows if r["split"] == "train"}


def test_eval_with_other_scalings_beyond_training_length(tiny_config, tmp_path):
    c = tiny_config(**{"model.max_seq_len": 64})
    train.train(c, tmp_path)
    res = evaluate.extrapolation_sweep(tmp_path, lengths=[64, 128], scalings=[None, "linear", "yarn", "dynamic_ntk"],
                                       max_tokens=256)
    rows = {(r["scaling"], r["length"]): r for r in res["rows"]}
    assert len(rows) == 8 and all("loss" in r for r in rows.values())
    assert rows[("yarn", 128)]["factor"] == 2.0 and rows[("dynamic_ntk", 128)]["factor"] == 1.0
    assert rows[("yarn", 128)]["beyond_loss"] is not None
    # Scaling with factor 1 at the training length is plain RoPE: identical loss.
    assert rows[("linear", 64)]["loss"] == pytest.approx(rows[("trained (none)", 64)]["loss"], abs=1e-6)
    assert (tmp_path / "eval" / "extrapolation.png").exists() and (tmp_path / "eval" / "per_position.png").exists()

    # The sliding-window protocol: as many scored targets, each with at least L - S tokens of context
    # (the validation documents are longer than L, so only the first window scores shorter contexts).
    c = state_lib.load_config(tmp_path)
    c.eval.update(protocol="sliding", stride=32, position_buckets=4)
    slide = evaluate.extrapolation_sweep(tmp_path, c, lengths=[128], scalings=[None], max_tokens=256)
    row, curve = slide["rows"][0], slide["curves"]["trained (none)@128"]
    assert "sliding windows" in slide["protocol"] and "S = 32" in slide["protocol"]
    # The first window's 128 targets, then 32 per window (less one at each document boundary).
    assert row["sequences"] == 5 and 128 + 4 * 32 - 4 <= row["tokens"] <= 128 + 4 * 32
    # Buckets of 32 positions: later windows score only positions 96..127 (or a new document's first ones).
    assert sum(curve["tokens"][:3]) <= 96 + 8 and curve["tokens"][3] >= 32 + 4 * 32 - 8
    with pytest.raises(ConfigError, match="eval.stride=200: allowed 0"):
        validate(tiny_config(**{"eval.protocol": "sliding", "eval.stride": 200}))
    with pytest.raises(ConfigError, match="eval.protocol='strided': allowed values are"):
        validate(tiny_config(**{"eval.protocol": "strided"}))


def test_learned_positions_refuse_longer_evaluation(tiny_config, tmp_path):
    c = tiny_config("position=learned")
    train.train(c, tmp_path)
    res = evaluate.extrapolation_sweep(tmp_path, lengths=[64, 128], max_tokens=128)
    short, long = sorted(res["rows"], key=lambda r: r["length"])
    assert "loss" in short and "learned position embeddings cannot represent" in long["error"]


def test_continued_training_carries_model_and_step_only(tiny_config, tmp_path):
    src = tmp_path / "src"
    train.train(tiny_config(), src)
    c = tiny_config(**{"train.init_from": str(src), "train.steps": 3, "data.seq_len": 128, "model.max_seq_len": 128,
                       "model.position.scaling.name": "yarn", "model.position.scaling.factor": 2.0,
                       "model.position.scaling.original_max_len": 64, "train.warmup_steps": 2})
    dst = tmp_path / "dst"
    train.train(c, dst)
    ext = load("configs/extend.py", f"init_from={src},scaling=yarn,factor=2")
    validate(ext)
    assert ext.data.seq_len == 128 and ext.model.position.scaling.original_max_len == 64
    rows = _train_losses(dst)
    assert sorted(rows) == [8, 9]  # global steps continue from 6 (logged every 2 of this phase, and the last)
    src_rows = _train_losses(src)
    assert rows[8]["loss"] < src_rows[2]["loss"]  # starts from trained weights, not from scratch
    # The restarted optimizer's schedule is still warming up: lr at this phase's step 1 of 2 is half the peak.
    assert rows[8]["lr"] == pytest.approx(c.train.lr / 2)


def test_bad_init_from(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="train.init_from"):
        validate(tiny_config(**{"train.init_from": str(tmp_path / "nope")}))


def test_curriculum_stages_and_resume_across_them(tiny_config, tmp_path, monkeypatch):
    c = tiny_config(**{"data.curriculum": "0:32,3:64", "train.log_every": 1, "checkpoint.every": 100})
    straight = tmp_path / "straight"
    train.train(c, straight)
    a = _train_losses(straight)
    assert a[1]["tokens_per_s"] > 0 and sorted(a) == list(range(1, 7))

    real, calls = sharding.shard_batch, {"n": 0}
    shapes = []

    def interrupting(batch, mesh, **kw):
        calls["n"] += 1
        shapes.append(batch["inputs"].shape)
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(batch, mesh, **kw)

    monkeypatch.setattr(sharding, "shard_batch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train.train(c, tmp_path / "resumed")
    monkeypatch.setattr(sharding, "shard_batch", real)
    # Equal tokens per step in both stages; call 4 is the validation batch after step 3.
    assert shapes[:3] == [(16, 32)] * 3 and shapes[4] == (8, 64)
    train.train(c, tmp_path / "resumed")
    b = _train_losses(tmp_path / "resumed")
    assert all(a[s]["loss"] == b[s]["loss"] for s in a), ({s: a[s]["loss"] for s in a}, {s: b[s]["loss"] for s in b})


def test_curriculum_validation(tiny_config):
    with pytest.raises(ConfigError, match="last stage"):
        validate(tiny_config(**{"data.curriculum": "0:32,3:48"}))
    with pytest.raises(ConfigError, match="start at 0"):
        validate(tiny_config(**{"data.curriculum": "5:32,3:64"}))
    with pytest.raises(ConfigError, match="expected 'step:seq_len"):
        validate(tiny_config(**{"data.curriculum": "0-32"}))


def test_retrieval_heatmaps_and_the_suite_summary(tiny_config, tmp_path):
    """Passkey, needle and MQAR grids run on a trained tiny model; the suite writes results.json and summary.md."""
    c = tiny_config(**{"train.steps": 2, "train.eval_every": 2, "checkpoint.every": 2})
    c.eval.update(length_multipliers=(1, 2), scalings=("none",), max_tokens=128)
    c.eval.retrieval.update(tasks=("passkey", "mqar"), depths=2, samples=2, mqar_pairs=(4,))
    train.train(c, tmp_path)
    for task in ("passkey", "kv_recall"):
        res = evaluate.retrieval_grid(tmp_path, task=task, lengths=[64, 128, 256], depths=[0.0, 0.5, 1.0], samples=2)
        cells = {(x["length"], x["depth"]): x for x in res["cells"]}
        assert sorted(cells) == [(L, d) for L in (64, 128, 256) for d in (0, .5, 1)]
        assert all("too short" in cells[64, d]["error"] for d in (0, .5, 1))  # 64 tokens cannot hold the task
        scored = [x for x in res["cells"] if x["length"] > 64]
        assert all(0 <= x["accuracy"] <= x["token_accuracy"] + 1e-9 <= 1 + 1e-9 for x in scored)
        assert (tmp_path / "eval" / f"{task}.json").exists() and (tmp_path / "eval" / f"{task}.png").exists()
    with pytest.raises(ValueError, match="allowed values are"):
        evaluate.retrieval_grid(tmp_path, task="niah")

    results = evaluate.run_suite(tmp_path, state_lib.load_config(tmp_path))
    assert list(results) == ["extrapolation", "passkey", "mqar"]
    assert [(x["length"], x["pairs"]) for x in results["mqar"]["cells"]] == [(64, 4), (128, 4)]
    assert all(0 <= x["token_accuracy"] <= 1 for x in results["mqar"]["cells"])
    summary = (tmp_path / "eval" / "summary.md").read_text()
    for plot in ("extrapolation.png", "per_position.png", "passkey.png", "mqar.png"):
        assert f"]({plot})" in summary and (tmp_path / "eval" / plot).exists()
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["mqar"]["rows_axis"] == "pairs"
