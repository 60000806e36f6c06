"""Fault injection on tiny runs: real signals and kills on real processes, broken checkpoints, changed configs.

After each fault the next start either resumes with exactly the losses of an uninterrupted run from that
step on, or stops with one line and leaves the workdir as it was.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from tensorboardX.proto import event_pb2

from configs import tiny
from experiments import sweep
from lc_jax import cli, evaluate, memory, sharding, train
from lc_jax.data import corpus

REPO = Path(__file__).resolve().parents[1]


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert len(steps) == len(set(steps)), f"duplicate train rows: {sorted(steps)}"
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _tensorboard(workdir: Path, tag: str) -> dict[int, float]:
    """The scalars TensorBoard shows for `tag`: the event files in the order they were created, where a file
    that starts with SessionLog.START at step P (a resumed writer's purge_step) drops what earlier files
    logged at steps >= P. A step logged twice, or missing, is what a resume must never leave."""
    points: list[tuple[int, float]] = []
    for f in sorted((workdir / "tb").glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3])):
        data, i = f.read_bytes(), 0
        while i + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 16 + n
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                points = [(s, v) for s, v in points if s < event.step]
            points += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    steps = [s for s, _ in points]
    assert len(steps) == len(set(steps)), f"{tag} logged twice at steps {sorted(steps)}"
    return dict(points)


def _files(workdir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in workdir.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- in this process


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 3 and 6 and a loss logged at every step."""
    config = tiny.get_config()
    config.train.log_every = 1
    workdir = tmp_path_factory.mktemp("finished")
    train.train(config, workdir)
    return config, workdir, _losses(workdir)


def _copy(finished, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(finished[1], dest)
    return dest


def _truncate_largest_array(step_dir: Path):
    # The arrays live in the files under state/d/ that state/manifest.ocdbt names (ocdbt.process_*/d/ holds
    # the per-process writes it was merged from, which a restore does not read).
    big = max((p for p in (step_dir / "state" / "d").iterdir()), key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])


CORRUPTIONS = {
    "truncated array file": _truncate_largest_array,
    "deleted _METADATA and manifest": lambda d: [p.unlink() for p in (d / "state").glob("*") if p.is_file()
                                                 and p.name in ("_METADATA", "manifest.ocdbt")],
    "deleted state/": lambda d: shutil.rmtree(d / "state"),
    "garbled data json": lambda d: [p.write_text("{not json") for p in (d / "data").glob("*.json")],
}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's reader thread, after
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))                       # the truncated file's error
def test_a_corrupt_newest_checkpoint_is_moved_aside_and_the_run_falls_back(finished, tmp_path, capsys, corruption):
    config, _, losses = finished
    run = _copy(finished, tmp_path)
    CORRUPTIONS[corruption](run / "checkpoints" / "6")
    train.train(config, run)
    out = capsys.readouterr().out
    assert "warning: checkpoint 6 does not restore" in out and "resumed from" in out and "at step 3" in out
    assert (run / "checkpoints_corrupt" / "6").is_dir()  # kept for inspection, not deleted
    assert _losses(run) == losses  # steps 4..6 retrained exactly, each logged once


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(finished, tmp_path):
    config = finished[0]
    run = _copy(finished, tmp_path)
    for step in ("3", "6"):
        shutil.rmtree(run / "checkpoints" / step / "state")
    with pytest.raises(train.WorkdirError, match=f"{run}: no checkpoint restores"):
        train.train(config, run)
    assert sorted(p.name for p in (run / "checkpoints_corrupt").iterdir()) == ["3", "6"]


def test_a_resume_with_another_model_shape_changes_nothing(finished, tmp_path):
    config = finished[0].copy_and_resolve_references()
    config.model.num_layers = 3
    run = _copy(finished, tmp_path)
    before = _files(run)
    with pytest.raises(train.WorkdirError, match=r"model.num_layers: 2 -> 3"):
        train.train(config, run)
    assert _files(run) == before


def test_intended_changes_resume_and_are_recorded(finished, tmp_path):
    config = finished[0].copy_and_resolve_references()
    config.train.steps = 7
    run = _copy(finished, tmp_path)
    train.train(config, run)
    history = [json.loads(line) for line in open(run / "config_history.jsonl")]
    assert [h["step"] for h in history] == [0, 6]
    assert history[1]["changed"] == {"train.steps": [6, 7]}
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 7
    assert sorted(_losses(run)) == list(range(1, 8))


def test_training_in_process_gives_the_signal_handlers_back(finished, tmp_path):
    # A notebook (or this test process) keeps its own Ctrl-C once a run with a Stop has ended; a sweep's
    # `with Stop()` block keeps them routed from its first run to its end.
    handlers = lambda: {s: signal.getsignal(s) for s in train.Stop.SIGNALS}  # noqa: E731
    before = handlers()
    config = finished[0].copy_and_resolve_references()
    config.train.steps = 7
    run = _copy(finished, tmp_path)
    train.train(config, run, stop=train.Stop())
    assert handlers() == before
    with train.Stop() as stop:
        config.train.steps = 8
        train.train(config, run, stop=stop)
        assert all(h is not before[s] for s, h in handlers().items())
    assert handlers() == before


@pytest.mark.parametrize("appends", [True, False])
def test_metrics_written_after_the_last_checkpoint_are_not_duplicated(finished, tmp_path, monkeypatch, appends):
    # A kill after steps 4..6 were logged but before checkpoint 6 was written: the resume starts at 3.
    # appends=False: as on gs://, where metrics.jsonl is rewritten (before each checkpoint, and at the end)
    # through the same epath API.
    monkeypatch.setattr(train, "_remote", lambda path: not appends)
    config, _, losses = finished
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "checkpoints" / "6")
    train.train(config, epath.Path(run))
    assert _losses(run) == losses
    assert _tensorboard(run, "train/loss") == {s: float(np.float32(v)) for s, v in losses.items()}


# ----------------------------------------------------------------------------- non-finite steps


def _poison(monkeypatch, bad_calls):
    """The batches placed by calls number `bad_calls` (1-based; call n trains step n, and validation comes only
    at the last step) get a NaN loss mask: that step's loss and gradients are NaN, as with a bad batch."""
    real, calls = sharding.shard_batch, {"n": 0}

    def shard(batch, mesh, **kw):
        calls["n"] += 1
        if calls["n"] in bad_calls:
            batch = {**batch, "loss_mask": np.full_like(batch["loss_mask"], np.nan)}
        return real(batch, mesh, **kw)

    monkeypatch.setattr(sharding, "shard_batch", shard)


def _nonfinite_config(policy, **kw):
    config = tiny.get_config()
    config.train.update(log_every=1, steps=8, eval_every=100, nonfinite=policy, **kw)
    config.checkpoint.every = 3
    return config


def test_nonfinite_stop_names_the_step_and_the_checkpoint_before_it(tmp_path, monkeypatch):
    _poison(monkeypatch, {5})
    with pytest.raises(train.NonFiniteLossError, match=r"at step 5 \(loss=nan.*last good checkpoint is step 3"):
        train.train(_nonfinite_config("stop"), tmp_path)
    assert ocp.CheckpointManager((tmp_path / "checkpoints").absolute()).all_steps() == [3]


def test_nonfinite_stop_without_a_checkpoint_says_so(tmp_path, monkeypatch):
    _poison(monkeypatch, {2})
    with pytest.raises(train.NonFiniteLossError, match="no checkpoint was saved before it"):
        train.train(_nonfinite_config("stop"), tmp_path)


def test_nonfinite_skip_drops_the_update_and_stops_after_the_limit(tmp_path, monkeypatch):
    _poison(monkeypatch, {5})
    train.train(_nonfinite_config("skip"), tmp_path / "once")
    rows = {r["step"]: r for r in map(json.loads, open(tmp_path / "once" / "metrics.jsonl")) if r["split"] == "train"}
    assert [s for s, r in rows.items() if r["skipped"]] == [5]
    assert all(math.isfinite(r["loss"]) for s, r in rows.items() if s != 5)
    _poison(monkeypatch, set(range(4, 20)))
    with pytest.raises(train.NonFiniteLossError, match=r"at step 6 \(3 in a row, train.nonfinite_limit=3\)"):
        train.train(_nonfinite_config("skip", nonfinite_limit=3), tmp_path / "always")


def test_nonfinite_rewind_reloads_the_last_good_checkpoint_and_leaves_the_batch_out(tmp_path, monkeypatch):
    _poison(monkeypatch, set())
    train.train(_nonfinite_config("rewind"), tmp_path / "clean")
    clean = _losses(tmp_path / "clean")
    _poison(monkeypatch, {5})  # the 5th batch placed trains step 5
    train.train(_nonfinite_config("rewind", rewind_lr_scale=0.5), tmp_path / "run")
    log = json.loads((tmp_path / "run" / "nonfinite.json").read_text())
    assert log == {"rewinds": [{"bad_step": 5, "to": 3, "lr_scale": 0.5}]}
    rows = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 9))  # the rows of the abandoned steps 4, 5 are gone
    losses = _losses(tmp_path / "run")
    assert [losses[s] for s in (1, 2, 3, 4)] == [clean[s] for s in (1, 2, 3, 4)]  # step 4 sees step 3's state
    assert all(math.isfinite(v) for v in losses.values())
    lr = {r["step"]: r["lr"] for r in rows}
    clean_lr = {r["step"]: r["lr"] for r in map(json.loads, open(tmp_path / "clean" / "metrics.jsonl"))
                if r["split"] == "train"}
    assert lr[3] == clean_lr[3] and lr[6] == pytest.approx(0.5 * clean_lr[6], rel=1e-6)


def test_a_run_stopped_after_a_rewind_resumes_as_if_never_stopped(tmp_path, monkeypatch):
    config = _nonfinite_config("rewind", rewind_lr_scale=0.5)
    _poison(monkeypatch, {5})
    train.train(config, tmp_path / "whole")
    monkeypatch.undo()

    stop, real, calls = train.Stop(), sharding.shard_batch, {"n": 0}

    def shard(batch, mesh, **kw):  # step 5's batch is bad again; a SIGTERM arrives while step 6 trains
        calls["n"] += 1            # (call 6 places step 4 after the rewind, call 8 step 6)
        if calls["n"] == 5:
            batch = {**batch, "loss_mask": np.full_like(batch["loss_mask"], np.nan)}
        if calls["n"] == 8:
            stop.signum = signal.SIGTERM
        return real(batch, mesh, **kw)

    monkeypatch.setattr(sharding, "shard_batch", shard)
    with pytest.raises(train.Interrupted, match="checkpoint saved at step 6"):
        train.train(config, tmp_path / "run", stop=stop)
    monkeypatch.undo()
    train.train(config, tmp_path / "run")  # the rewind's record (nonfinite.json) carries the scaled rate over
    assert (tmp_path / "run" / "nonfinite.json").read_text() == (tmp_path / "whole" / "nonfinite.json").read_text()
    assert _losses(tmp_path / "run") == _losses(tmp_path / "whole")


# ----------------------------------------------------------------------------- real processes and signals

STEPS = 48  # tiny steps take milliseconds: room for a stop to land well before the end


def _command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "lc_jax.train", "--config", "configs/tiny.py", "--workdir", str(workdir),
            f"--config.train.steps={STEPS}", "--config.train.log_every=1", "--config.train.eval_every=1000",
            "--config.checkpoint.every=6"]


# One CPU device each (conftest's fake devices left out), the suite's other XLA flags kept.
_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": _flags, "PYTHONUNBUFFERED": "1"}
RUN_S = 300  # far more than a 24-step run takes on 2 busy cores; a hang fails the test instead of stalling CI


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=RUN_S)


def _start(workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(_command(workdir), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_step(proc: subprocess.Popen, workdir: Path, step: int, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        try:
            if max(_row_steps(workdir), default=0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    raise AssertionError(f"no step {step} within {timeout} s")


def _row_steps(workdir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl") if line.endswith("\n")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run, in a process of its own (one CPU device, as the interrupted ones)."""
    workdir = tmp_path_factory.mktemp("reference")
    done = _run(_command(workdir))
    assert done.returncode == 0, done.stderr
    return _losses(workdir)


def _wait_for_a_save(proc: subprocess.Popen, workdir: Path, since: float, timeout: float = 120.0) -> str:
    """Wait until an asynchronous save of this process is under way (orbax writes `<step>.orbax-checkpoint-tmp`
    first): one created at or after `since`, not a temporary directory an earlier kill -9 left behind."""
    def new(p: Path) -> bool:
        try:
            return p.stat().st_mtime >= since
        except FileNotFoundError:  # orbax removed it meanwhile
            return False

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        saving = [p.name for p in (workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*") if new(p)]
        if saving:
            return saving[0]
        time.sleep(0.002)
    raise AssertionError(f"no save began within {timeout} s")


def _stop(workdir: Path, sig: signal.Signals, at: int) -> int:
    """Start the run (again), send `sig` once step `at` is logged; return the step it resumed from."""
    proc = _start(workdir)
    try:
        _wait_for_step(proc, workdir, at)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # no-op once it has exited; never leave a run behind a failed wait
    if sig == signal.SIGKILL:
        return _resumed_from(out)
    assert proc.returncode == 0 and "Traceback" not in err, err
    line = [x for x in out.splitlines() if x.startswith("stopped on")]
    assert len(line) == 1 and f"stopped on {sig.name}: checkpoint saved at step" in line[0], out
    saved = int(line[0].split("at step ")[1].split(";")[0])
    assert at <= saved < STEPS
    assert max(_row_steps(workdir)) == saved  # nothing logged after the step it saved
    return _resumed_from(out)


def _kill_during_save(workdir: Path, at: int) -> tuple[int, Path]:
    """Start the run (again), kill -9 it once step `at` is logged and the next save has begun; return the step
    it resumed from and that save's temporary directory (still there if the kill interrupted the save)."""
    started = time.time()  # a stale temporary directory (an earlier kill -9 mid-save) is older
    proc = _start(workdir)
    try:
        _wait_for_step(proc, workdir, at)
        saving = _wait_for_a_save(proc, workdir, since=started)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return _resumed_from(out), workdir / "checkpoints" / saving


def _resumed_from(out: str) -> int:
    return next((int(x.rsplit(" ", 1)[1]) for x in out.splitlines() if x.startswith("resumed from")), 0)


def _newest_checkpoint(workdir: Path) -> int:
    return max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


KILL_DURING_SAVE_TRIES = 3  # a tiny save can commit between seeing its temporary directory and the kill


def test_signals_and_kill_9_lose_nothing_and_resume_exactly(reference, tmp_path):
    # One run stopped four times, each start resuming where the previous stop left it: SIGTERM (what
    # preemption sends), SIGINT (Ctrl-C), kill -9 a few steps after a random one (saves come every 6), then
    # kill -9 while the save after a random step is being written. LC_JAX_FAULTS_SEED=<seed> replays the kill points.
    seed = int(os.environ.get("LC_JAX_FAULTS_SEED") or os.getpid())
    rng = random.Random(seed)
    assert _stop(tmp_path, signal.SIGTERM, 3) == 0
    first = max(_row_steps(tmp_path))
    assert _stop(tmp_path, signal.SIGINT, first + 2) == first
    second = max(_row_steps(tmp_path))
    kill_at = rng.randint(second + 1, second + 6)
    assert _stop(tmp_path, signal.SIGKILL, kill_at) == second, f"seed {seed}: killed after step {kill_at}"
    tries = []
    for _ in range(KILL_DURING_SAVE_TRIES):
        newest = _newest_checkpoint(tmp_path)
        kill_at = rng.randint(newest + 1, newest + 6)
        resumed, saving = _kill_during_save(tmp_path, kill_at)
        tries.append(f"killed after step {kill_at} saving {saving.name}")
        assert resumed == newest, f"seed {seed}: {tries}: resumed from {resumed}, not {newest}"
        step = int(saving.name.split(".")[0])
        if saving.exists() and not (saving.parent / str(step)).exists():
            break  # the save was interrupted: left uncommitted
    else:
        raise AssertionError(f"seed {seed}: each kill -9 came after its save had committed: {tries}")
    intact = _newest_checkpoint(tmp_path)
    assert intact == newest < step, f"seed {seed}: {tries}: checkpoints {sorted(os.listdir(saving.parent))}"
    done = _run(_command(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "does not restore" not in done.stdout, done.stdout
    # The newest intact checkpoint, not the interrupted save nor an older one (a replay from there would
    # give the same losses).
    assert _resumed_from(done.stdout) == intact, f"seed {seed}: {tries}\n{done.stdout}"
    assert _losses(tmp_path) == reference, f"seed {seed}: {tries}"  # every step once, each loss as uninterrupted
    shown = _tensorboard(tmp_path, "train/loss")
    assert shown == {s: float(np.float32(v)) for s, v in reference.items()}, f"seed {seed}"  # TensorBoard too


# ----------------------------------------------------------------------------- bad input: one line, nothing written


def _one_line_error(capsys, main, argv, needle, code=2):
    assert cli.run(main, argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1, err
    return err


def _train_argv(workdir, *overrides, config="configs/tiny.py"):
    return ["--config", config, "--workdir", str(workdir), *overrides]


@pytest.mark.parametrize("argv,needle", [
    (["--config", "configs/base.py:postion=alibi"], "did you mean 'position'?"),
    (["--config", "configs/extend.py:init_from=runs/nowhere"], "init_from='runs/nowhere': no config.json there"),
    (["--config", "configs/nothing.py"], "no config file 'configs/nothing.py'"),
    (["--config.model.attention.windw=3"], "did you mean --config.model.attention.window?"),
    (["--config.model.num_layers=two"], "--config.model.num_layers='two': expected a int"),
    (["--config.model.position.name=xpos"], "model.position.name='xpos'"),
    (["--config.eval.scalings=('yarnn',)"], "eval.scalings='yarnn'"),
    (["--config.eval.length_multipliers=(0,2)"], "eval.length_multipliers=(0, 2)"),
    (["--config.eval.retrieval.tasks=('paskey',)"], "eval.retrieval.tasks='paskey'"),
    (["--config.train.nonfinite=ignore"], "train.nonfinite='ignore'"),
    (["--config.data.source=files", "--config.data.files=/nowhere/*.txt"], "data.files='/nowhere/*.txt' matches no "
                                                                            "file"),
])
def test_a_bad_config_is_one_line_and_writes_nothing(tmp_path, capsys, argv, needle):
    config = argv[1] if argv[0] == "--config" else "configs/tiny.py"
    overrides = argv[2:] if argv[0] == "--config" else argv
    _one_line_error(capsys, train.main, _train_argv(tmp_path / "run", *overrides, config=config), needle)
    assert not (tmp_path / "run").exists()


def _files_run(tmp_path, capsys, files, *extra, needle, code=2):
    argv = _train_argv(tmp_path / "run", "--config.data.source=files", f"--config.data.files={files}",
                       "--config.data.max_docs=0", *extra)
    return _one_line_error(capsys, train.main, argv, needle, code)


def test_data_errors_name_the_files_and_what_to_do(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(3):
        (empty / f"{i}.txt").write_text("")
    _files_run(tmp_path, capsys, f"{empty}/*.txt", needle="none of its 3 files has a document; skipped 3 empty")
    few = tmp_path / "few"
    few.mkdir()
    names = (few / f"{i}.txt" for i in range(100))
    for path in [p for p in names if not corpus.in_validation(str(p), 0.05)][:3]:  # none in the 5% by hash
        path.write_text("some text " * 200)
    _files_run(tmp_path, capsys, f"{few}/*.txt", needle="raise data.val_fraction (now 0.05) or name validation files")
    assert not (tmp_path / "run").exists()


def test_bad_jsonl_lines_are_skipped_and_counted(tmp_path, capsys):
    lines = [json.dumps({"text": "good document " * 40})] * 30 + ["{not json", json.dumps({"body": "x"})]
    path = tmp_path / "docs.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe broken\n")
    argv = _train_argv(tmp_path / "run", "--config.data.source=files", f"--config.data.files={path}",
                       f"--config.data.val_files={path}", "--config.train.steps=1", "--config.data.max_docs=0")
    assert cli.run(train.main, argv) == 0
    err = capsys.readouterr().err
    assert f"1 malformed JSON line (e.g. {path}:31" in err and f"{path}:32" in err and f"{path}:33" in err


def test_an_unwritable_workdir_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    _one_line_error(capsys, train.main, _train_argv(tmp_path / "file" / "run"), "cannot write there")


def test_sweep_only_names_unknown_members(tmp_path, capsys):
    argv = ["--config", "configs/ablations/positions.py", "--workdir", str(tmp_path), "--only", "rope", "ropee"]
    _one_line_error(capsys, sweep.main, argv, "--only ropee: not a member of the sweep")
    assert not list(tmp_path.iterdir())


def test_evaluate_and_memory_report_bad_input_in_one_line(finished, tmp_path, capsys):
    _one_line_error(capsys, evaluate.main, ["--workdir", str(tmp_path)], "no config.json there")
    _one_line_error(capsys, evaluate.main, ["--workdir", str(finished[1]), "--config.eval.scalings=('x',)"],
                    "eval.scalings='x'")
    _one_line_error(capsys, memory._main, ["--model", "configs/base.py:postion=alibi", "--context", "8K"],
                    "did you mean 'position'?")


def test_a_real_process_prints_no_traceback(tmp_path):
    out = _run([sys.executable, "-m", "lc_jax.train", "--config", "configs/base.py:postion=alibi",
                "--workdir", str(tmp_path / "run")])
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: --config='configs/base.py:postion=alibi': invalid config: config arg 'postion' is not one of "
        "['attention', 'pattern', 'position']; did you mean 'position'?"]
    verbose = _run([sys.executable, "-m", "lc_jax.train", "--config", "configs/base.py:postion=alibi",
                    "--workdir", str(tmp_path / "run"), "--verbose"])
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
