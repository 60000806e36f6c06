import os
import tempfile

# Multi-device tests (ring attention, meshes) run on fake CPU devices; harmless for the rest.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the fault suite's processes) compile the same small programs: a persistent compilation
# cache, shared by the xdist workers and the processes they start, halves their time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "lc_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

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
