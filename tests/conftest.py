import os

# Multi-device tests (ring attention, meshes) run on fake CPU devices; harmless for the rest.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from configs import base  # noqa: E402


def tiny_config_factory(arg=None, **overrides):
    """A config small enough to compile and run in seconds, on a slice of the stdlib corpus."""
    c = base.get_config(arg)
    c.model.update(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                   max_seq_len=64, dtype="float32")
    c.model.attention.update(window=16, block_q=16, block_k=16)
    c.data.update(seq_len=64, batch_size=8, max_docs=12)
    c.train.update(steps=6, lr=1e-3, warmup_steps=2, log_every=2, eval_every=3, eval_batches=1, progress=False)
    c.checkpoint.update(every=3, keep=5)
    c.eval.position_buckets = 4
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
