"""Train on a Cloud TPU VM with one command: create (or reuse) the slice, copy the code, install, run, stream.

    python -m experiments.tpu_vm launch --name NAME --zone ZONE --accelerator v5p-32 \\
        --config configs/tpu/llama1b_32k.py --workdir gs://BUCKET/runs/1b [--spot] [--queued] [--config.x=y ...]
    python -m experiments.tpu_vm launch ... --resume      # after a preemption: same line, plus --resume
    python -m experiments.tpu_vm {status,logs,delete} --name NAME --zone ZONE [--queued]

Every step is a `gcloud` command (or, for the code, `git ls-files | tar`); `--dry-run` prints them, shell-quoted,
and runs nothing. All inputs, and the config itself (loaded locally, with the overrides, and validated against the
slice's chip count), are checked before the first command, because a mistake found on the slice is paid for.
Training runs detached on every worker (`nohup`, log in ~/lc_jax_train.log) with `--worker=all`; a slice of more
than one host adds `--config.distributed.auto=True`, so each process calls `jax.distributed.initialize()` (which
reads the slice from the TPU metadata). Workers share no disk, so a multi-host run needs a gs:// workdir; so does
a spot run that should survive preemption. `lc_jax.train` resumes from the checkpoints in its workdir by itself:
`--resume` recreates a preempted VM and starts the same command again; nothing here ever deletes a workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from lc_jax import cli
from lc_jax import config as config_lib
from lc_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]  # the checkout the workers get
PYTHON = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]  # e.g. '>=3.11'

# On the workers ('~' is expanded by their shell, so these paths are never quoted).
CODE, VENV, LOG, PID = "~/lc_jax", "~/lc_jax_venv", "~/lc_jax_train.log", "~/lc_jax_train.pid"
TARBALL = "lc_jax.tar.gz"  # in the workers' home directory
POLL_SECONDS = 30.0  # between looks at a VM that is being created or a queued resource that waits for capacity


@dataclasses.dataclass(frozen=True)
class Generation:
    counts_cores: bool  # the number in 'v5p-16' counts TensorCores (2 per chip) on v4/v5p, chips on v5e/v6e
    single_host: int  # the largest slice, in chips, that is one host
    host_chips: int  # chips per host on larger (multi-host) slices
    runtime: str  # default --runtime-version
    sizes: str  # the accelerator sizes gcloud offers, for error messages


# Assumed from Cloud TPU's docs: v4/v5p hosts hold 4 chips (v5p-8 = 4 chips = 1 host, v5p-32 = 16 chips = 4 hosts);
# v5e (gcloud: v5litepod) and v6e put up to 8 chips on a single-host VM (-1, -4, -8) and 4 per host on pods (-16+).
GENERATIONS = {
    "v4": Generation(True, 4, 4, "tpu-ubuntu2204-base", "8, 16, 32, ... (multiples of 8 TensorCores)"),
    "v5p": Generation(True, 4, 4, "v2-alpha-tpuv5", "8, 16, 32, ... (multiples of 8 TensorCores)"),
    "v5litepod": Generation(False, 8, 4, "v2-alpha-tpuv5-lite", "1, 4, 8, 16, 32, 64, 128, 256 (chips)"),
    "v6e": Generation(False, 8, 4, "v2-alpha-tpuv6e", "1, 4, 8, 16, 32, 64, 128, 256 (chips)"),
}
ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod", "v6": "v6e", "v5": "v5p"}  # names people type for them

# What `describe` reports besides READY (ACTIVE for a queued resource): still coming, or gone (preempted: only a
# delete and a create bring it back).
VM_STATES = {"wait": {"CREATING", "STARTING", "RESTARTING"}, "gone": {"PREEMPTED", "TERMINATED"}}
QR_STATES = {"wait": {"ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING"},
             "gone": {"SUSPENDED", "SUSPENDING", "FAILED"}}


class UsageError(UserError):
    """A bad input, found before anything ran: one line, exit 2."""


class LaunchError(Exception):
    """A command failed, or the slice is in a state this launcher will not change on its own: exit 1."""


@dataclasses.dataclass(frozen=True)
class Slice:
    accelerator: str
    generation: str
    chips: int
    hosts: int

    @property
    def runtime(self) -> str:
        return GENERATIONS[self.generation].runtime

    def describe(self) -> str:
        return f"{self.chips} chips on {self.hosts} host{'s' if self.hosts > 1 else ''}"


def parse_accelerator(text: str) -> Slice:
    """'v5p-32' -> 16 chips on 4 hosts; UsageError naming the allowed generations and sizes otherwise."""
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text or "")
    if not m:
        raise UsageError(f"--accelerator={text!r}: expected <generation>-<size>, e.g. v5p-16 or v5litepod-8; "
                         f"generations are {sorted(GENERATIONS)}")
    gen_name, n = m.group(1), int(m.group(2))
    if gen_name not in GENERATIONS:
        hint = f" ({gen_name} is called {ALIASES[gen_name]} by gcloud)" if gen_name in ALIASES else ""
        raise UsageError(f"--accelerator={text!r}: generation {gen_name!r} is not one of {sorted(GENERATIONS)}{hint}")
    gen = GENERATIONS[gen_name]
    ok = (n >= 8 and n % 8 == 0) if gen.counts_cores else (n in (1, 4, 8) or (16 <= n <= 256 and n & (n - 1) == 0))
    if not ok:
        raise UsageError(f"--accelerator={text!r}: {gen_name} sizes are {gen.sizes}")
    chips = n // 2 if gen.counts_cores else n
    return Slice(text, gen_name, chips, 1 if chips <= gen.single_host else chips // gen.host_chips)


def parse_overrides(rest: list[str]) -> list[tuple[str, str]]:
    """The trailing `--config.a.b=value` arguments, as (a.b, value); anything else is a UsageError."""
    out = []
    for a in rest:
        m = re.fullmatch(r"--config\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)=(.*)", a, flags=re.DOTALL)
        if not m:
            raise UsageError(f"unrecognised argument {a!r}: overrides are --config.a.b=value (with '='), e.g. "
                             "--config.train.steps=1000")
        out.append((m.group(1), m.group(2)))
    return out


def check_config(spec: str, overrides: list[tuple[str, str]], sl: Slice) -> str:
    """Load `path.py[:arg]`, apply the overrides, validate on the slice's chips; return the path the workers use."""
    path, sep, arg = spec.partition(":")
    file = Path(path).resolve()
    if not path.endswith(".py") or not file.is_file():
        raise UsageError(f"--config={spec!r}: no such config file; give path.py[:arg], e.g. configs/quickstart.py "
                         f"or configs/tpu/llama1b_32k.py:local")
    if not file.is_relative_to(ROOT):
        raise UsageError(f"--config={spec!r}: not inside the checkout {ROOT}, so the workers would not have it")
    cfg = cli.load(spec, overrides)
    try:
        config_lib.validate(cfg, num_devices=sl.chips)
    except config_lib.ConfigError as e:
        # train.init_from names a run directory on the workers (or in gs://), which this machine cannot see.
        problems = [p for p in e.problems if not p.startswith("train.init_from=")]
        if problems:
            raise UsageError(f"--config={spec!r} on {sl.accelerator} ({sl.chips} chips): invalid config: "
                             + "; ".join(problems)) from None
    return file.relative_to(ROOT).as_posix() + (f":{arg}" if sep else "")


class Runner:
    """Runs commands, echoing them with --verbose; with dry_run prints them (pasteable) and runs nothing.

    `query` is the one command whose answer steers the launch (what state the VM is in); a dry run cannot ask,
    so it answers with the stated assumption, and the printed commands are the ones that assumption leads to.
    """

    def __init__(self, dry_run: bool, verbose: bool):
        self.dry_run, self.verbose = dry_run, verbose

    def note(self, text: str) -> None:
        print(f"# {text}", file=sys.stdout if self.dry_run else sys.stderr, flush=True)

    def _show(self, *cmds: list[str]) -> bool:
        line = " | ".join(shlex.join(c) for c in cmds)
        if self.dry_run:
            print(line, flush=True)
        elif self.verbose:
            print(f"+ {line}", file=sys.stderr, flush=True)
        return not self.dry_run

    def run(self, *cmds: list[str]) -> None:
        """One command, or a pipeline of them (stdout to the next one's stdin); LaunchError if any fails."""
        if not self._show(*cmds):
            return
        procs: list[subprocess.Popen] = []
        for i, cmd in enumerate(cmds):
            stdin = procs[-1].stdout if procs else None
            stdout = subprocess.PIPE if i < len(cmds) - 1 else None
            try:
                procs.append(subprocess.Popen(cmd, stdin=stdin, stdout=stdout))
            except FileNotFoundError:
                raise LaunchError(f"{cmd[0]}: command not found (install the Google Cloud SDK for gcloud)") from None
            if stdin is not None:
                stdin.close()  # the next process owns it now, so the writer sees a closed pipe if it exits
        for cmd, p in zip(cmds, procs):
            if p.wait():
                raise LaunchError(f"exit status {p.returncode}: {shlex.join(cmd)}")

    def query(self, cmd: list[str], assume: str | None) -> str | None:
        """The command's stdout (stripped), None if gcloud says NOT_FOUND; a dry run returns `assume`."""
        if not self._show(cmd):
            return assume
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            raise LaunchError(f"{cmd[0]}: command not found (install the Google Cloud SDK for gcloud)") from None
        if r.returncode == 0:
            return r.stdout.strip()
        if "NOT_FOUND" in r.stderr:
            return None
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise LaunchError(f"{shlex.join(cmd)}: {last}")

    def stream(self, cmd: list[str]) -> None:
        """Show a remote log until it ends or Ctrl-C; leaving it never stops the training."""
        if not self._show(cmd):
            return
        try:
            subprocess.run(cmd)
        except KeyboardInterrupt:
            print("\nstopped streaming; training goes on (`logs` reattaches, `delete` ends it)", file=sys.stderr)

    def sleep(self, seconds: float) -> None:
        if not self.dry_run:
            time.sleep(seconds)


class Gcloud:
    """The gcloud command lines for one TPU VM (or the queued resource that holds it)."""

    def __init__(self, a: argparse.Namespace):
        self.name, self.zone, self.queued = a.name, a.zone, a.queued
        self.common = [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])

    def _tpu(self, verb: str, *args: str) -> list[str]:
        group = "queued-resources" if self.queued and verb in ("create", "describe", "delete") else "tpu-vm"
        return ["gcloud", "compute", "tpus", group, verb, self.name, *self.common, *args]

    def describe(self, state_only: bool = True) -> list[str]:
        """With state_only: '<state>\t<accelerator type>', what the launch decides on."""
        fields = "state.state,tpu.nodeSpec[0].node.acceleratorType" if self.queued else "state,acceleratorType"
        return self._tpu("describe", *([f"--format=value({fields})"] if state_only else []))

    def create(self, sl: Slice, runtime: str, spot: bool) -> list[str]:
        extra = ["--spot"] if spot else []
        if self.queued:
            return self._tpu("create", f"--node-id={self.name}", f"--accelerator-type={sl.accelerator}",
                             f"--runtime-version={runtime}", *extra)
        return self._tpu("create", f"--accelerator-type={sl.accelerator}", f"--version={runtime}", *extra)

    def delete(self) -> list[str]:
        return self._tpu("delete", *(["--force"] if self.queued else []), "--quiet")

    def scp(self, local: str, remote: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.name}:{remote}", *self.common,
                "--worker=all"]

    def ssh(self, worker: str, command: str) -> list[str]:
        return self._tpu("ssh", f"--worker={worker}", f"--command={command}")


# --- what runs on the workers -----------------------------------------------------------------------------

def pack_commands(tarball: str) -> tuple[list[str], list[str]]:
    """A pipeline that packs the checkout as it is now: tracked files (with their edits) and new, unignored ones."""
    return (["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            ["tar", "-czf", tarball, "-C", str(ROOT), "--null", "-T", "-"])


def unpack_command() -> str:
    """Unpack the copied checkout over the previous one (never removed: a local workdir may live inside it)."""
    return f"mkdir -p {CODE} && tar -xzf ~/{TARBALL} -C {CODE} && rm ~/{TARBALL}"


def clone_command(repo: str, ref: str) -> str:
    """Check out `ref` of `repo` in place, keeping untracked files (a local workdir, say)."""
    return (f"mkdir -p {CODE} && cd {CODE} && git init -q && git fetch -q --depth=1 {shlex.quote(repo)} "
            f"{shlex.quote(ref)} && git checkout -q -f --detach FETCH_HEAD")


def install_command() -> str:
    """A venv with the project's Python (TPU images ship an older one; uv fetches it) and `pip install -e .[tpu]`."""
    uv = "~/.local/bin/uv"
    return (f'python3 -m pip install -q --user uv && {uv} venv -q --allow-existing --python "{PYTHON}" '
            f'{VENV} && cd {CODE} && {uv} pip install -q --python {VENV}/bin/python -e ".[tpu]"')


def train_argv(config: str, workdir: str, overrides: list[str]) -> list[str]:
    return ["-m", "lc_jax.train", "--config", config, "--workdir", workdir, *overrides]


def start_command(argv: list[str]) -> str:
    """Start training detached (its pid in PID, output in LOG); refuse if the last one still runs."""
    running = f'[ -e {PID} ] && kill -0 "$(cat {PID})" 2>/dev/null'
    return (f"cd {CODE} || exit 1; if {running}; then echo \"$(hostname): lc_jax.train already runs "
            f"(pid $(cat {PID})), see {LOG}\" >&2; exit 1; fi; mv -f {LOG} {LOG}.prev 2>/dev/null; "
            f"PYTHONUNBUFFERED=1 nohup {VENV}/bin/python {shlex.join(argv)} > {LOG} 2>&1 < /dev/null & "
            f"echo $! > {PID}")


def tail_command() -> str:
    """Follow the log from its start until the training process exits."""
    return (f'if [ -e {PID} ]; then tail -n +1 -F --pid="$(cat {PID})" {LOG}; '
            f'else echo "$(hostname): no training was started here" >&2; exit 1; fi')


def status_command() -> str:
    running = f'[ -e {PID} ] && kill -0 "$(cat {PID})" 2>/dev/null'
    return (f'if {running}; then echo "$(hostname): training runs (pid $(cat {PID}))"; '
            f'else echo "$(hostname): no training runs"; fi; tail -n 2 {LOG} 2>/dev/null; true')


# --- the subcommands --------------------------------------------------------------------------------------

def ensure_slice(run: Runner, g: Gcloud, a: argparse.Namespace, sl: Slice) -> None:
    """Reuse a ready slice, wait for one that is coming, recreate a preempted one under --resume, else create."""
    kind, states = ("queued resource", QR_STATES) if g.queued else ("TPU VM", VM_STATES)
    ready = "ACTIVE" if g.queued else "READY"

    def look(assume: str | None) -> str | None:
        found = run.query(g.describe(), assume=assume and f"{assume}\t{sl.accelerator}")
        if found is None:
            return None
        state, _, accelerator = found.partition("\t")
        if accelerator and accelerator != sl.accelerator:
            raise LaunchError(f"{kind} {g.name} is a {accelerator}, not --accelerator={sl.accelerator}: `delete` it "
                              "or choose another --name")
        return state

    if run.dry_run:
        run.note(f"dry run: assumes the {kind} {g.name} does not exist (one that is {ready} is reused; one that is "
                 f"{'/'.join(sorted(states['gone']))} is deleted and recreated under --resume)")
    state = look(assume=None)
    if state in states["gone"]:
        if not a.resume:
            raise LaunchError(f"{kind} {g.name} is {state}: rerun with --resume to recreate it and continue from "
                              f"{a.workdir}'s last checkpoint, or `delete` it")
        run.note(f"{g.name} is {state}: deleting it to create it again")
        run.run(g.delete())
        state = None
    if state is None:
        run.note(f"creating {g.name}: {sl.accelerator}, {sl.describe()}, "
                 f"runtime {a.runtime_version}, {'spot' if a.spot else 'on-demand'}")
        run.run(g.create(sl, a.runtime_version, a.spot))
        if not g.queued:
            state = ready  # `tpu-vm create` returns once the VM is up
        else:
            run.note(f"a queued resource waits for capacity: asking every {POLL_SECONDS:.0f}s until it is {ready}")
            state = look(assume=ready)
    elif state == ready:
        run.note(f"reusing {g.name} ({state})")
    while state in states["wait"]:
        run.note(f"{g.name} is {state}; looking again in {POLL_SECONDS:.0f}s")
        run.sleep(POLL_SECONDS)
        state = look(assume=ready)
    if state != ready:
        raise LaunchError(f"{kind} {g.name} is {state}: not usable; wait, or `delete` it and launch again")


def launch(run: Runner, a: argparse.Namespace, sl: Slice, config: str, overrides: list[str]) -> None:
    g = Gcloud(a)
    if a.resume:
        run.note(f"resuming: lc_jax.train continues from the last checkpoint in {a.workdir}")
    ensure_slice(run, g, a, sl)
    if a.ref:
        run.note(f"code: {a.repo} at {a.ref}, cloned on every worker")
        setup = clone_command(a.repo, a.ref)
    else:
        local = str(Path(tempfile.gettempdir()) / f"lc_jax-{a.name}.tar.gz")
        run.note(f"code: the checkout {ROOT} as it is now (tracked and new files, not ignored ones)")
        run.run(*pack_commands(local))
        run.run(g.scp(local, TARBALL))
        setup = unpack_command()
    run.run(g.ssh("all", f"{setup} && {install_command()}"))
    run.run(g.ssh("all", start_command(train_argv(config, a.workdir, overrides))))
    run.note(f"training started on {sl.describe()}; streaming worker 0's log (Ctrl-C leaves it running)")
    run.stream(g.ssh("0", tail_command()))


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--name", help="the TPU VM (and queued resource) name, e.g. lc-1b")
    common.add_argument("--zone", help="e.g. us-east5-a (v5p), us-west4-a (v5e), us-east1-d (v6e)")
    common.add_argument("--project", help="the Google Cloud project (default: gcloud's configured one)")
    common.add_argument("--queued", action="store_true", help="a queued resource (gcloud ... queued-resources)")
    common.add_argument("--dry-run", action="store_true", help="print the commands, shell-quoted; run nothing")
    common.add_argument("--verbose", action="store_true", help="echo each command before running it")
    p = _Parser(prog="python -m experiments.tpu_vm", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="{launch,status,logs,delete}",
                           parser_class=_Parser)
    la = sub.add_parser("launch", parents=[common], allow_abbrev=False,
                        help="create or reuse the slice, copy the code, install, train, stream worker 0's log",
                        epilog="Trailing --config.a.b=value arguments are passed on to lc_jax.train.")
    la.add_argument("--accelerator", help=f"e.g. v5p-16, v5litepod-8; generations: {', '.join(GENERATIONS)}")
    la.add_argument("--runtime-version", help="TPU software version (default: per generation, "
                    + ", ".join(f"{k}: {v.runtime}" for k, v in GENERATIONS.items()) + ")")
    cost = la.add_mutually_exclusive_group()
    cost.add_argument("--spot", action="store_true", help="spot capacity: cheaper, may be preempted (see --resume)")
    cost.add_argument("--on-demand", dest="spot", action="store_false", help="on-demand capacity (the default)")
    la.add_argument("--config", help="config file path.py[:arg] inside this checkout")
    la.add_argument("--workdir", help="run directory; gs://BUCKET/... (required for more than one host)")
    la.add_argument("--ref", help="install this git ref of --repo on the workers instead of copying the checkout")
    la.add_argument("--repo", help="the git URL the workers clone --ref from")
    la.add_argument("--resume", action="store_true",
                    help="relaunch after a preemption: recreate the slice if it is gone, continue from the workdir")
    sub.add_parser("status", parents=[common], allow_abbrev=False, help="the slice's state and each worker's training")
    lg = sub.add_parser("logs", parents=[common], allow_abbrev=False, help="stream a worker's training log")
    lg.add_argument("--worker", default="0", help="the worker whose log to show (default 0, the one that logs metrics)")
    sub.add_parser("delete", parents=[common], allow_abbrev=False, help="delete the slice (the workdir stays)")
    return p


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one UsageError line instead of usage text."""

    def error(self, message: str):
        raise UsageError(message)


NAME_RE = r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?"
ZONE_RE = r"[a-z]+-[a-z]+[0-9]+-[a-z]"


def check_common(a: argparse.Namespace, rest: list[str]) -> None:
    if a.name is None:
        raise UsageError("--name is required: the TPU VM's name, e.g. --name=lc-1b")
    if not re.fullmatch(NAME_RE, a.name):
        raise UsageError(f"--name={a.name!r}: allowed are 1-63 lowercase letters, digits and hyphens, starting with a "
                         "letter and not ending with a hyphen")
    if a.zone is None:
        raise UsageError("--zone is required: the zone of the slice, e.g. --zone=us-east5-a")
    if not re.fullmatch(ZONE_RE, a.zone):
        raise UsageError(f"--zone={a.zone!r}: expected <region>-<letter>, e.g. us-east5-a or europe-west4-b")
    if a.command != "launch" and rest:
        raise UsageError(f"unrecognised argument {rest[0]!r}: `{a.command}` takes --name, --zone, --project, "
                         "--queued, --dry-run, --verbose" + (", --worker" if a.command == "logs" else ""))


def check_launch(a: argparse.Namespace, rest: list[str]) -> tuple[Slice, str, list[str]]:
    """Every launch input, and the config on the slice; returns (slice, config for the workers, overrides)."""
    if a.accelerator is None:
        raise UsageError("--accelerator is required, e.g. v5p-16 or v5litepod-8; generations are "
                         f"{sorted(GENERATIONS)}")
    sl = parse_accelerator(a.accelerator)
    a.runtime_version = a.runtime_version or sl.runtime
    if not re.fullmatch(r"[a-z0-9][-a-z0-9.]*", a.runtime_version):
        raise UsageError(f"--runtime-version={a.runtime_version!r}: expected a TPU software version such as "
                         f"{sl.runtime} (the default for {sl.generation})")
    if a.workdir is None:
        raise UsageError("--workdir is required: the run directory, e.g. gs://BUCKET/runs/NAME")
    if a.workdir.startswith("gs://") and not re.fullmatch(r"gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/.*)?", a.workdir):
        raise UsageError(f"--workdir={a.workdir!r}: expected gs://BUCKET/path with a valid bucket name")
    if sl.hosts > 1 and not a.workdir.startswith("gs://"):
        raise UsageError(f"--workdir={a.workdir!r}: {a.accelerator} has {sl.hosts} hosts, which share no disk; "
                         f"give a gs:// path, e.g. gs://BUCKET/runs/{a.name}")
    if (a.ref is None) != (a.repo is None):
        flag, value = ("--ref", a.ref) if a.ref else ("--repo", a.repo)
        raise UsageError(f"{flag}={value!r} needs {'--repo' if a.ref else '--ref'} too: the workers install --ref of "
                         "--repo (without both, they get a copy of this checkout)")
    if a.config is None:
        raise UsageError("--config is required: a config file path.py[:arg], e.g. configs/tpu/llama1b_32k.py")
    pairs = parse_overrides(rest)
    if sl.hosts > 1 and not any(k == "distributed.auto" for k, _ in pairs):
        pairs.append(("distributed.auto", "True"))  # every process calls jax.distributed.initialize()
    config = check_config(a.config, pairs, sl)
    return sl, config, [f"--config.{k}={v}" for k, v in pairs]


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; 0 on success, 1 when a command fails, 2 (one line on stderr) on a bad input."""
    try:
        a, rest = _parser().parse_known_args(argv)
        check_common(a, rest)
        if a.command == "launch":
            sl, config, overrides = check_launch(a, rest)
        elif a.command == "logs" and not a.worker.isdigit():
            raise UsageError(f"--worker={a.worker!r}: a worker index 0, 1, ... (0 is the one that logs metrics)")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except SystemExit as e:  # --help
        return int(e.code or 0)

    run, g = Runner(a.dry_run, a.verbose), Gcloud(a)
    if a.command == "launch" and not a.workdir.startswith("gs://") and a.spot:
        print(f"warning: --workdir={a.workdir!r} is on the VM's disk, which a preemption deletes; a spot run that "
              "should resume needs a gs:// workdir", file=sys.stderr)
    try:
        if a.command == "launch":
            launch(run, a, sl, config, overrides)
        elif a.command == "status":
            run.run(g.describe(state_only=False))
            run.run(g.ssh("all", status_command()))
        elif a.command == "logs":
            run.stream(g.ssh(a.worker, tail_command()))
        else:
            run.note(f"deleting {g.name}; the workdir and its checkpoints stay")
            run.run(g.delete())
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
