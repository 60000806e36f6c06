"""Two processes on localhost (jax.distributed, gloo CPU collectives), 4 devices each, train a ring-attention model.

The losses must match the same run in one process with 8 devices (rtol 1e-4:
collectives over gloo sum in another order). The mesh puts FSDP across the two
processes (each host feeds its own half of the batch) and the ring inside each.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from lc_jax import train

MESH = dict(data=1, fsdp=2, tensor=1, context=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_two_processes_match_one(tiny_config, tmp_path):
    worker = Path(__file__).with_name("multihost_worker.py")
    port, multi = _free_port(), tmp_path / "multi"
    procs = [subprocess.Popen([sys.executable, str(worker), str(pid), str(port), str(multi), json.dumps(MESH)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert (multi / "checkpoints" / "6").exists()

    c = tiny_config(**{"train.log_every": 1})
    c.mesh.update(MESH)
    single = tmp_path / "single"
    train.train(c, single)
    a, b = _losses(single), _losses(multi)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-4)
