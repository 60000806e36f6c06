import os
import shutil
import tempfile

# Multi-device tests (ring attention, meshes) run on fake CPU devices; harmless for the rest.
# XLA's CPU backend at -O1 (the default is -O3): the tests' programs are tiny and mostly compiled, not run, and
# LLVM's -O3 pipeline is most of their compile time (the tiny model's initialiser: 4.0 s -> 1.3 s). Not -O0:
# there XLA's CPU code for the reference's ALiBi backward gives NaN that -O1..-O3 do not give from the same HLO
# (jax 0.10.2). Subprocesses the tests start keep -O1 (test_faults.py, multihost_worker.py).
TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=1")
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
