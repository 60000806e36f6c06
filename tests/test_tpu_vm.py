"""The TPU VM launcher, through its dry run: the gcloud commands it would run, and the inputs it refuses.

There is no gcloud here. A dry run prints each command shell-quoted and assumes the slice does not exist yet;
the tests that need another answer (ready, preempted, still queued) replace `Runner.query`, the one call whose
answer steers a launch. Remote command strings are checked by parsing them with `bash -n`.
"""

from __future__ import annotations

import shlex
import subprocess
import tarfile

import pytest

from experiments import tpu_vm

ZONE = "us-east5-a"
BUCKET = "gs://lc-bucket/runs/qs"
SINGLE = ["--name", "lc-test", "--zone", ZONE, "--accelerator", "v5p-8", "--config", "configs/quickstart.py",
          "--workdir", BUCKET, "--config.data.batch_size=4"]  # v5p-8: 4 chips, and quickstart's batch of 2 split 4 ways
POD = ["--name", "lc-1b", "--zone", ZONE, "--accelerator", "v5p-32", "--config", "configs/tpu/llama1b_32k.py",
       "--workdir", "gs://lc-bucket/runs/1b", "--config.data.batch_size=4"]  # 16 chips: fsdp 4 x context 4


def dry(capsys, *argv: str) -> tuple[int, list[list[str]], str, str]:
    """(exit code, the printed commands as argv lists, the printed notes, stderr)."""
    rc = tpu_vm.main([*argv, "--dry-run"])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    notes = "\n".join(line for line in lines if line.startswith("#"))
    return rc, commands, notes, err


def gcloud(*words: str) -> list[str]:
    return ["gcloud", "compute", "tpus", *words]


def remote(cmd: list[str]) -> str:
    """The shell command a `tpu-vm ssh` runs on the workers."""
    (flag,) = [a for a in cmd if a.startswith("--command=")]
    return flag[len("--command="):]


def train_argv(commands: list[list[str]]) -> list[str]:
    """The argv after `python` in the training command started on the workers."""
    (start,) = [remote(c) for c in commands if "ssh" in c and "nohup" in remote(c)]
    return shlex.split(start.split("nohup ~/lc_jax_venv/bin/python ")[1].split(" > ~/lc_jax_train.log")[0])


def test_single_host_spot_launch(capsys):
    rc, cmds, notes, err = dry(capsys, "launch", *SINGLE, "--spot", "--config.train.steps=50")
    assert (rc, err) == (0, "")
    tarball = str(tpu_vm.Path(tpu_vm.tempfile.gettempdir()) / "lc_jax-lc-test.tar.gz")
    root = str(tpu_vm.ROOT)
    assert cmds[:2] == [
        gcloud("tpu-vm", "describe", "lc-test", f"--zone={ZONE}", "--format=value(state,acceleratorType)"),
        gcloud("tpu-vm", "create", "lc-test", f"--zone={ZONE}", "--accelerator-type=v5p-8",
               "--version=v2-alpha-tpuv5", "--spot"),
    ]
    assert cmds[2] == ["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "|",
                       "tar", "-czf", tarball, "-C", root, "--null", "-T", "-"]
    assert cmds[3] == gcloud("tpu-vm", "scp", tarball, "lc-test:lc_jax.tar.gz", f"--zone={ZONE}", "--worker=all")
    ssh_all = gcloud("tpu-vm", "ssh", "lc-test", f"--zone={ZONE}", "--worker=all")
    assert [c[:-1] for c in cmds[4:6]] == [ssh_all, ssh_all]
    assert "tar -xzf ~/lc_jax.tar.gz -C ~/lc_jax" in remote(cmds[4]) and '-e ".[tpu]"' in remote(cmds[4])
    assert train_argv(cmds) == ["-m", "lc_jax.train", "--config", "configs/quickstart.py", "--workdir", BUCKET,
                                "--config.data.batch_size=4", "--config.train.steps=50"]
    assert cmds[6][:-1] == gcloud("tpu-vm", "ssh", "lc-test", f"--zone={ZONE}", "--worker=0")
    assert "tail -n +1 -F" in remote(cmds[6])
    assert len(cmds) == 7 and "4 chips on 1 host," in notes and "spot" in notes


def test_on_demand_local_workdir_and_project(capsys):
    rc, cmds, _, err = dry(capsys, "launch", *SINGLE[:-3], "--workdir", "runs/qs", "--config.data.batch_size=4",
                           "--project", "my-proj")
    assert (rc, err) == (0, "")
    assert cmds[1] == gcloud("tpu-vm", "create", "lc-test", f"--zone={ZONE}", "--project=my-proj",
                             "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5")
    assert all("--project=my-proj" in c for c in cmds if c[0] == "gcloud")
    assert train_argv(cmds)[5] == "runs/qs"
    # A spot VM's disk goes with a preemption: a local workdir is allowed, with a warning.
    rc, _, _, err = dry(capsys, "launch", *SINGLE[:-3], "--workdir", "runs/qs", "--config.data.batch_size=4", "--spot")
    assert rc == 0 and err.startswith("warning: --workdir='runs/qs'") and "gs://" in err


def test_runtime_default_follows_the_generation(capsys):
    argv = ["--name", "e", "--zone", "us-west4-a", "--config", "configs/quickstart.py", "--workdir", BUCKET,
            "--config.data.batch_size=8"]
    rc, cmds, _, _ = dry(capsys, "launch", *argv, "--accelerator", "v5litepod-8")
    assert rc == 0 and "--version=v2-alpha-tpuv5-lite" in cmds[1]
    rc, cmds, _, _ = dry(capsys, "launch", *argv, "--accelerator", "v6e-8", "--runtime-version", "v2-alpha-tpuv6e")
    assert rc == 0 and "--version=v2-alpha-tpuv6e" in cmds[1]
    rc, cmds, _, _ = dry(capsys, "launch", *argv, "--accelerator", "v5litepod-8", "--runtime-version", "custom-1.0")
    assert rc == 0 and "--version=custom-1.0" in cmds[1]


@pytest.mark.parametrize("accelerator, chips, hosts", [
    ("v5p-8", 4, 1), ("v5p-16", 8, 2), ("v5p-32", 16, 4), ("v4-8", 4, 1), ("v4-32", 16, 4),
    ("v5litepod-1", 1, 1), ("v5litepod-8", 8, 1), ("v5litepod-16", 16, 4), ("v6e-4", 4, 1), ("v6e-256", 256, 64),
])
def test_hosts_per_slice(accelerator, chips, hosts):
    sl = tpu_vm.parse_accelerator(accelerator)
    assert (sl.chips, sl.hosts) == (chips, hosts)


def test_multi_host_adds_distributed_auto(capsys):
    rc, cmds, notes, err = dry(capsys, "launch", *POD, "--spot")
    assert (rc, err) == (0, "")
    assert train_argv(cmds) == ["-m", "lc_jax.train", "--config", "configs/tpu/llama1b_32k.py",
                                "--workdir", "gs://lc-bucket/runs/1b",
                                "--config.data.batch_size=4", "--config.distributed.auto=True"]
    assert "16 chips on 4 hosts" in notes
    copies = [c for c in cmds if c[0] == "gcloud" and c[4] in ("scp", "ssh")]
    workers = [next(a for a in c if a.startswith("--worker=")) for c in copies]
    assert workers == ["--worker=all", "--worker=all", "--worker=all", "--worker=0"]
    # The user's own choice is kept, not doubled.
    rc, cmds, _, _ = dry(capsys, "launch", *POD, "--config.distributed.auto=true")
    assert rc == 0 and train_argv(cmds)[-2:] == ["--config.data.batch_size=4", "--config.distributed.auto=true"]


def test_queued_resource(capsys):
    rc, cmds, notes, _ = dry(capsys, "launch", *POD, "--queued", "--spot")
    assert rc == 0
    describe = gcloud("queued-resources", "describe", "lc-1b", f"--zone={ZONE}",
                      "--format=value(state.state,tpu.nodeSpec[0].node.acceleratorType)")
    assert cmds[:3] == [
        describe,
        gcloud("queued-resources", "create", "lc-1b", f"--zone={ZONE}", "--node-id=lc-1b",
               "--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5", "--spot"),
        describe,  # asked until ACTIVE; the dry run assumes it is at once
    ]
    assert all(c[3] == "tpu-vm" for c in cmds[4:])  # the node it holds is an ordinary TPU VM
    assert "until it is ACTIVE" in notes


def test_resume_dry_run_assumes_the_vm_is_gone(capsys):
    rc, cmds, notes, _ = dry(capsys, "launch", *SINGLE, "--spot", "--resume")
    assert rc == 0
    assert notes.startswith(f"# resuming: lc_jax.train continues from the last checkpoint in {BUCKET}")
    assert "assumes the TPU VM lc-test does not exist" in notes
    assert [c[4] for c in cmds[:2]] == ["describe", "create"]
    assert train_argv(cmds)[4:6] == ["--workdir", BUCKET]  # the same workdir, never wiped
    assert not any("rm -rf" in " ".join(c) for c in cmds)


def answers(monkeypatch, *replies: str | None) -> list[list[str]]:
    """Make `describe` answer `replies` in turn (None: not found); returns the queries made."""
    asked, replies = [], list(replies)

    def query(self, cmd, assume):
        print(shlex.join(cmd))
        asked.append(cmd)
        return replies.pop(0)

    monkeypatch.setattr(tpu_vm.Runner, "query", query)
    return asked


def test_resume_recreates_a_preempted_vm(capsys, monkeypatch):
    answers(monkeypatch, "PREEMPTED\tv5p-8")
    rc, cmds, notes, _ = dry(capsys, "launch", *SINGLE, "--spot", "--resume")
    assert rc == 0
    assert cmds[1] == gcloud("tpu-vm", "delete", "lc-test", f"--zone={ZONE}", "--quiet")
    assert cmds[2][4] == "create" and "--spot" in cmds[2]
    assert "lc-test is PREEMPTED: deleting it" in notes


def test_preempted_vm_without_resume_is_left_alone(capsys, monkeypatch):
    answers(monkeypatch, "PREEMPTED\tv5p-8")
    rc, cmds, _, err = dry(capsys, "launch", *SINGLE, "--spot")
    assert rc == 1 and "--resume" in err and len(err.splitlines()) == 1
    assert [c[4] for c in cmds] == ["describe"]


def test_queued_resume_force_deletes_a_suspended_resource(capsys, monkeypatch):
    answers(monkeypatch, "SUSPENDED\tv5p-32", "WAITING_FOR_RESOURCES\tv5p-32", "ACTIVE\tv5p-32")
    monkeypatch.setattr(tpu_vm, "POLL_SECONDS", 0.0)
    rc, cmds, notes, _ = dry(capsys, "launch", *POD, "--queued", "--spot", "--resume")
    assert rc == 0
    assert cmds[1] == gcloud("queued-resources", "delete", "lc-1b", f"--zone={ZONE}", "--force", "--quiet")
    assert [c[4] for c in cmds[:5]] == ["describe", "delete", "create", "describe", "describe"]
    assert "lc-1b is WAITING_FOR_RESOURCES" in notes


def test_a_ready_vm_is_reused(capsys, monkeypatch):
    answers(monkeypatch, "READY\tv5p-8")
    rc, cmds, notes, _ = dry(capsys, "launch", *SINGLE)
    assert rc == 0 and "create" not in [c[4] for c in cmds if c[0] == "gcloud"]
    assert "reusing lc-test (READY)" in notes and train_argv(cmds)[:2] == ["-m", "lc_jax.train"]


def test_a_vm_of_another_size_is_refused(capsys, monkeypatch):
    answers(monkeypatch, "READY\tv5p-16")
    rc, cmds, _, err = dry(capsys, "launch", *SINGLE)
    assert rc == 1 and "v5p-16, not --accelerator=v5p-8" in err and len(cmds) == 1


def test_a_creating_vm_is_waited_for(capsys, monkeypatch):
    asked = answers(monkeypatch, "CREATING\tv5p-8", "CREATING\tv5p-8", "READY\tv5p-8")
    monkeypatch.setattr(tpu_vm, "POLL_SECONDS", 0.0)
    rc, cmds, _, _ = dry(capsys, "launch", *SINGLE)
    assert rc == 0 and len(asked) == 3 and "create" not in [c[4] for c in cmds if c[0] == "gcloud"]


def test_install_a_git_ref(capsys):
    rc, cmds, notes, _ = dry(capsys, "launch", *SINGLE, "--ref", "v0.1", "--repo", "https://github.com/me/lc_jax")
    assert rc == 0
    assert not any(c[0] == "git" or "scp" in c for c in cmds)  # nothing of this checkout travels
    setup = remote(cmds[2])
    assert "git fetch -q --depth=1 https://github.com/me/lc_jax v0.1 && git checkout -q -f --detach FETCH_HEAD" \
        in setup and '-e ".[tpu]"' in setup


def test_delete_status_logs(capsys):
    assert dry(capsys, "delete", "--name", "lc-test", "--zone", ZONE)[1] == [
        gcloud("tpu-vm", "delete", "lc-test", f"--zone={ZONE}", "--quiet")]
    assert dry(capsys, "delete", "--name", "lc-1b", "--zone", ZONE, "--queued")[1] == [
        gcloud("queued-resources", "delete", "lc-1b", f"--zone={ZONE}", "--force", "--quiet")]
    rc, cmds, _, _ = dry(capsys, "status", "--name", "lc-test", "--zone", ZONE)
    assert rc == 0 and cmds[0] == gcloud("tpu-vm", "describe", "lc-test", f"--zone={ZONE}")
    assert cmds[1][:-1] == gcloud("tpu-vm", "ssh", "lc-test", f"--zone={ZONE}", "--worker=all")
    rc, cmds, _, _ = dry(capsys, "logs", "--name", "lc-test", "--zone", ZONE, "--worker", "2")
    assert rc == 0 and cmds[0][:-1] == gcloud("tpu-vm", "ssh", "lc-test", f"--zone={ZONE}", "--worker=2")


def test_remote_commands_are_valid_shell(capsys):
    _, cmds, _, _ = dry(capsys, "launch", *SINGLE, "--config.data.files=it's my/*.txt")
    _, more, _, _ = dry(capsys, "status", "--name", "lc-test", "--zone", ZONE)
    scripts = [remote(c) for c in cmds + more if c[0] == "gcloud" and c[4] == "ssh"]
    assert len(scripts) == 4
    for script in scripts:
        subprocess.run(["bash", "-n", "-c", script], check=True)
    assert "--config.data.files=it's my/*.txt" in train_argv(cmds)  # quoted once for the workers' shell


def test_pack_holds_the_checkout(tmp_path, capfd):
    out = tmp_path / "code.tar.gz"
    tpu_vm.Runner(dry_run=False, verbose=False).run(*tpu_vm.pack_commands(str(out)))
    with tarfile.open(out) as t:
        names = set(t.getnames())
    assert {"pyproject.toml", "lc_jax/train.py", "experiments/tpu_vm.py", "configs/quickstart.py"} <= names
    assert not any(n.startswith(".venv/") or n.startswith(".git/") for n in names)


def test_a_failing_command_is_an_error():
    with pytest.raises(tpu_vm.LaunchError, match="exit status 1"):
        tpu_vm.Runner(dry_run=False, verbose=False).run(["true"], ["false"])


BAD = [
    (["--accelerator", "v5e-8"], "--accelerator='v5e-8'", "v5litepod"),
    (["--accelerator", "v3-8"], "--accelerator='v3-8'", "['v4', 'v5litepod', 'v5p', 'v6e']"),
    (["--accelerator", "v5p16"], "--accelerator='v5p16'", "<generation>-<size>"),
    (["--accelerator", "v5p-12"], "--accelerator='v5p-12'", "multiples of 8"),
    (["--accelerator", "v6e-12"], "--accelerator='v6e-12'", "1, 4, 8, 16"),
    (["--name", "My_VM"], "--name='My_VM'", "lowercase letters"),
    (["--zone", "useast5"], "--zone='useast5'", "us-east5-a"),
    (["--runtime-version", "V 2"], "--runtime-version='V 2'", "v2-alpha-tpuv5"),
    (["--config", "configs/nope.py"], "--config='configs/nope.py'", "path.py[:arg]"),
    (["--config", "configs/tpu/llama1b_32k.py:bogus=1"], "--config='configs/tpu/llama1b_32k.py:bogus=1'", "'local'"),
    (["--config", "/etc/hostname"], "--config='/etc/hostname'", "path.py[:arg]"),
    (["--workdir", "gs://"], "--workdir='gs://'", "gs://BUCKET/path"),
    (["--ref", "main"], "--ref='main'", "--repo"),
    (["--config.train.steps"], "'--config.train.steps'", "--config.a.b=value"),
    (["--config..x=1"], "'--config..x=1'", "--config.a.b=value"),
    (["--bogus"], "'--bogus'", "--config.a.b=value"),
    (["--config.train.stepz=3"], "--config.train.stepz", "did you mean --config.train.steps?"),
    (["--config.train.steps=lots"], "--config.train.steps='lots'", "expected a int"),
    (["--config.data.batch_size=3"], "--config='configs/quickstart.py' on v5p-8 (4 chips)", "data.batch_size=3"),
    (["--spot", "--on-demand"], "--on-demand", "--spot"),
]


@pytest.mark.parametrize("extra, flag, allowed", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_is_one_line_and_exit_2(capsys, extra, flag, allowed):
    rc, cmds, notes, err = dry(capsys, "launch", *SINGLE, *extra)
    assert (rc, cmds, notes) == (2, [], "")  # nothing was run, or printed as if to be run
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert flag in err and allowed in err


@pytest.mark.parametrize("argv, flag", [
    (["launch", "--zone", ZONE], "--name is required"),
    (["delete", "--name", "lc-test"], "--zone is required"),
    (["launch", *SINGLE[:4]], "--accelerator is required"),
    (["launch", *SINGLE[:6]], "--workdir is required"),
    (["delete", "--name", "lc-test", "--zone", ZONE, "--config.x=1"], "'--config.x=1'"),
    (["logs", "--name", "lc-test", "--zone", ZONE, "--worker", "all"], "--worker='all'"),
    (["launch", *POD[:-3], "--workdir", "runs/1b", "--config.data.batch_size=4"], "gs://BUCKET/runs/lc-1b"),
    ([], "{launch,status,logs,delete}"),
    (["start"], "invalid choice: 'start'"),
])
def test_missing_or_misplaced_input(capsys, argv, flag):
    rc, cmds, _, err = dry(capsys, *argv)
    assert (rc, cmds) == (2, []) and len(err.splitlines()) == 1 and flag in err
