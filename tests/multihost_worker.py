"""One process of the two-process test in test_multihost.py: `python tests/multihost_worker.py PID PORT WORKDIR MESH`.

Each process owns 4 fake CPU devices; gloo carries the collectives between them.
"""

import json
import os
import sys

# 4 fake devices; importing tests.conftest below adds the suite's other XLA flags.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.conftest import tiny_config_factory  # noqa: E402


def main(pid: int, port: int, workdir: str, mesh: str):
    from lc_jax import train

    c = tiny_config_factory(**{"train.log_every": 1})
    c.mesh.update(json.loads(mesh))
    c.distributed.update(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid,
                         cpu_collectives="gloo")
    train.train(c, workdir)
    import jax

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
