import os
import shutil
import subprocess
import sys
import tempfile


def _xla_accepts(flags: tuple[str, ...]) -> bool:
    """Whether this jaxlib's XLA takes `flags`, tried in a child process: XLA aborts a process on an unknown flag,
    and these are speed settings that a later jaxlib drops (jax 0.12 has no xla_cpu_use_fusion_emitters)."""
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                          capture_output=True).returncode == 0


# XLA's CPU code generation through its older emitters, without XNNPACK: the same programs compile about a
# fifth faster, and the suite's time is mostly XLA compiling (1127 s of 2071 s summed over the tests at
# e049f9e, the deviceless TPU compiles aside). Measured side by side (AMD EPYC, 2 cores, jax 0.10.2):
# test_attention, test_generate and test_dsa took 276 s and 318 s with XLA's defaults, 236 s and 262 s with
# these. Both or neither (the pair is what was measured); tried once per run, and workers and the processes
# tests start inherit the answer.
if "LC_JAX_FAST_COMPILE_FLAGS" not in os.environ:
    _fast = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_use_xnnpack=false")
    os.environ["LC_JAX_FAST_COMPILE_FLAGS"] = " ".join(_fast) if _xla_accepts(_fast) else ""
FAST_COMPILE_FLAGS = tuple(os.environ["LC_JAX_FAST_COMPILE_FLAGS"].split())

# Multi-device tests (ring attention, meshes) run on fake CPU devices; harmless for the rest.
# XLA's CPU backend at -O1 (the default is -O3): the tests' programs are tiny and mostly compiled, not run, and
# LLVM's -O3 pipeline is most of their compile time (the tiny model's initialiser: 4.0 s -> 1.3 s). Not -O0:
# there XLA's CPU code for the reference's ALiBi backward gives NaN that -O1..-O3 do not give from the same HLO
# (jax 0.10.2). Subprocesses the tests start inherit these flags (test_faults.py, multihost_worker.py).
TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=1",
                  *FAST_COMPILE_FLAGS)
_given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_given, *(f for f in TEST_XLA_FLAGS if f.split("=")[0] not in _given)]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache, new for each test run and shared by its xdist workers: many tests compile
# the same programs, and the cache takes minutes off a run. (One directory reused across runs stalled a CI leg:
# see `no_persistent_cache` in tests/test_ring.py.) Workers name it by the run's id; the controller removes it.
CACHE_DIR = os.path.join(tempfile.gettempdir(),
                         f"lc_jax_test_jax_cache_{os.environ.get('PYTEST_XDIST_TESTRUNUID') or os.getpid()}")
os.environ["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import pytest  # noqa: E402

from configs import tiny  # noqa: E402


def tiny_config_factory(arg=None, **overrides):
    """A config small enough to compile and run in seconds, on a slice of the stdlib corpus."""
    c = tiny.get_config(arg)
    for k, v in overrides.items():
        node = c
        *path, leaf = k.split(".")
        for p in path:
            node = node[p]
        node[leaf] = v
    return c


@pytest.fixture
def tiny_config():
    """`tiny_config_factory` as a fixture: tiny_config(arg, **{'dotted.field': value})."""
    return tiny_config_factory


_worker_caches: set[str] = set()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """(xdist, in the controller) A worker is done: note its cache directory, removed once all are."""
    _worker_caches.add(getattr(node, "workeroutput", {}).get("lc_jax_cache", ""))


def pytest_sessionfinish(session):
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller removes the cache
        session.config.workeroutput["lc_jax_cache"] = CACHE_DIR
        return
    for d in {CACHE_DIR, *_worker_caches} - {""}:
        shutil.rmtree(d, ignore_errors=True)
