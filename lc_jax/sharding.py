"""Meshes and the one table that maps logical axis names onto mesh axes.

Every parameter is created with logical names (`sharding_names` in model.py);
activations are constrained with the same names. Changing a parallelism
strategy means editing `LOGICAL_AXIS_RULES`, nothing else.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lc_jax.config import MESH_AXES, mesh_shape

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),  # activations: batch over data and fsdp
    ("seq", "context"),  # activations: sequence over the ring axis
    ("vocab", "tensor"),
    ("embed", "fsdp"),  # parameters: FSDP shards the model dimension
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.sharding.Mesh(
        np.asarray(devices).reshape(shape), MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    )


def param_shardings(abstract_state, mesh):
    """NamedShardings for an (abstract) nnx.State whose variables carry logical names."""
    return nn.logical_to_mesh_sharding(nnx.get_partition_spec(abstract_state), mesh, LOGICAL_AXIS_RULES)


def logical_sharding(mesh, *logical_axes) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, LOGICAL_AXIS_RULES))


def shard_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Place this process's slice of the global batch onto the mesh (batch over data x fsdp)."""
    def put(x):
        spec = logical_sharding(mesh, "batch", *([None] * (x.ndim - 1)))
        return jax.make_array_from_process_local_data(spec, x)

    return jax.tree.map(put, batch)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
