"""Lowering for an accelerator from this CPU host through public API, on every jax the project supports.

An abstract mesh whose device names the platform (`jax.sharding.AbstractDevice`)
makes `jax.jit(f).trace(...).lower(lowering_platforms=...)` run the real Pallas
lowering for TPU (Mosaic) or CUDA (Triton, Mosaic GPU) without such a device, and
tells the kernels what chip they are traced for (`pltpu.get_tpu_info`,
`lc_jax.ops.platform`). jax >= 0.11 needs this for cuda (lowering from the
host's CPU devices fails there); jax 0.10 accepts it too.
"""

from __future__ import annotations

import contextlib

import jax

# A device kind per platform: what the kernels see as the chip they are compiled for.
DEVICE_KINDS = {"tpu": "TPU v5 lite", "cuda": "NVIDIA H100 80GB HBM3"}


@contextlib.contextmanager
def abstract_mesh(platform: str, device_kind: str | None = None, axes: dict[str, int] | None = None):
    """Trace under an abstract mesh (`axes`: name -> size; default one device) of `platform` ('tpu' or 'cuda')."""
    axes = axes or {"x": 1}
    dev = jax.sharding.AbstractDevice(device_kind=device_kind or DEVICE_KINDS[platform],
                                      num_cores=1 if platform == "tpu" else None, platform=platform)
    mesh = jax.sharding.AbstractMesh(tuple(axes.values()), tuple(axes),
                                     (jax.sharding.AxisType.Explicit,) * len(axes), abstract_device=dev)
    with jax.sharding.use_abstract_mesh(mesh):
        yield mesh


def lower_for(platform: str, fn, *args, device_kind: str | None = None) -> str:
    """The StableHLO text of `jax.jit(fn)(*args)` lowered for `platform`; args may be arrays or ShapeDtypeStructs.

    Constants that `fn` closes over must be numpy arrays: a jax array lives on this host's CPU, and
    lowering a computation that holds one for another platform fails.
    """
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    with abstract_mesh(platform, device_kind):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
