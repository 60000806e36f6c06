"""Meshes, the one table that maps logical axis names onto mesh axes, batch placement and multi-host start-up.

Every parameter is created with logical names (`out_sharding` in model.py);
attention shards its activations with the same names (`activation_spec`).
Changing a parallelism strategy means editing `LOGICAL_AXIS_RULES`, nothing else:

  * FSDP: parameters (and with them the optimizer state) split their model
    dimension over `fsdp`; XLA all-gathers them per layer.
  * Tensor parallelism: heads and the MLP hidden dimension over `tensor`.
  * Data parallelism: the batch over (`data`, `fsdp`).
  * Context parallelism: the sequence over `context`; attention becomes ring
    attention (pallas_kernels/ring_attention.py), with tokens laid out by
    `config.mesh.context_layout` (zig-zag balances the causal triangle).
"""

from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.ring_attention import layout_order

MESH_AXES = ("data", "fsdp", "tensor", "context")

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


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Resolve -1 ('the rest') and check the product against the device count; ValueError names the mesh."""
    sizes = [mesh_cfg[a] for a in MESH_AXES]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
                         f"but {num_devices} are present")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor, context) mesh; `context` is innermost so that a ring stays within a host."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.sharding.Mesh(
        np.asarray(devices).reshape(shape), MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    )


def fit(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """`sharding` without the mesh axes that do not divide their dimension: that dimension stays whole there.

    (A vocabulary of 259 byte-level ids over tensor = 2, say.) jit accepts only even shardings as
    argument and result layouts, which training initialises into and `lc_jax.aot` compiles from.
    """
    def keep(entry, size):
        if entry is None:
            return None
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        kept = tuple(a for a in axes if size % sharding.mesh.shape[a] == 0)
        while kept and size % int(np.prod([sharding.mesh.shape[a] for a in kept])):
            kept = kept[:-1]
        return None if not kept else kept[0] if len(kept) == 1 else kept

    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    return NamedSharding(sharding.mesh, P(*(keep(e, n) for e, n in zip(spec, shape))))


def param_shardings(abstract_state, mesh):
    """NamedShardings for an (abstract) nnx.State whose variables carry logical names, fitted to their shapes."""
    shardings = nn.logical_to_mesh_sharding(nnx.get_partition_spec(abstract_state), mesh, LOGICAL_AXIS_RULES)
    return jax.tree.map(lambda s, x: fit(s, x.shape), shardings, abstract_state)


def _path_keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(state_shapes: dict, params_shardings, mesh) -> dict:
    """Shardings for a whole training state (`state.fresh_state`'s tree of shapes).

    Parameters take `params_shardings`. An optimizer leaf whose path ends in a
    parameter's path and has its shape (Adam's mu and nu, inside any chain,
    mask or multi_transform) shards like that parameter, so FSDP divides the
    optimizer state too; everything else (counts, step, RNG) is replicated.
    """
    rep = replicated(mesh)
    params = {}
    for (path, sh), shape in zip(jax.tree_util.tree_flatten_with_path(params_shardings)[0],
                                 jax.tree.leaves(state_shapes["params"]), strict=True):
        params[_path_keys(path)] = (shape.shape, sh)

    def pick(path, leaf):
        keys = _path_keys(path)
        for i in range(1, len(keys)):
            shape, sh = params.get(keys[i:], (None, None))
            if sh is not None and shape == leaf.shape:
                return sh
        return rep

    return jax.tree_util.tree_map_with_path(pick, state_shapes)


def activation_spec(mesh, *logical_axes) -> P:
    """PartitionSpec for logical axes on `mesh`, dropping mesh axes the mesh does not have (user meshes)."""
    spec = nn.logical_to_mesh_axes(logical_axes, LOGICAL_AXIS_RULES)
    names = set(mesh.axis_names)

    def keep(entry):
        if entry is None:
            return None
        entry = tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if a in names)
        return None if not entry else entry[0] if len(entry) == 1 else entry

    return P(*(keep(e) for e in spec))


def logical_sharding(mesh, *logical_axes) -> NamedSharding:
    return NamedSharding(mesh, activation_spec(mesh, *logical_axes))


def axis_size(mesh, logical_axis: str) -> int:
    """How many shards a logical axis is split into on `mesh`."""
    entry = activation_spec(mesh, logical_axis)[0]
    if entry is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry)]))


def process_rows(mesh, global_batch: int) -> tuple[int, int, int]:
    """(first row, rows, shard count) of the global batch that this process's devices hold.

    Processes whose devices hold the same rows (a context ring spanning hosts)
    load the same examples; each feeds the sequence slices its devices need.
    """
    spec = logical_sharding(mesh, "batch")
    rows = {idx[0].indices(global_batch)[:2] for idx in spec.addressable_devices_indices_map((global_batch,)).values()}
    start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
    n = stop - start
    if global_batch % n or start % n:
        raise ValueError(f"this process holds batch rows [{start}, {stop}) of {global_batch}: not an equal, aligned "
                         "share; choose mesh.data x mesh.fsdp so that processes split the batch evenly")
    return start, n, global_batch // n


def context_order(mesh, seq_len: int, layout: str) -> np.ndarray | None:
    """Token order for ring attention on this mesh (None: no context parallelism)."""
    n = axis_size(mesh, "seq")
    return None if n == 1 else layout_order(seq_len, n, layout)


def shard_batch(batch: dict[str, np.ndarray], mesh, *, global_batch: int | None = None,
                layout: str = "zigzag") -> dict[str, jax.Array]:
    """Place this process's rows of the global batch onto the mesh: batch over (data, fsdp), sequence over context.

    With context parallelism the sequence is first reordered on the host into
    the ring's `layout`, so that every device gets its balanced share. Fields
    without a sequence axis (e.g. `key_position` [batch, 1] of synthetic examples)
    shard over the batch only.
    """
    leaves = jax.tree.leaves(batch)
    rows = leaves[0].shape[0]
    global_batch = rows * jax.process_count() if global_batch is None else global_batch
    start, n, _ = process_rows(mesh, global_batch)
    if rows != n:
        raise ValueError(f"shard_batch got {rows} rows, but this process holds {n} rows of the global batch "
                         f"{global_batch}")
    seq_len = max((x.shape[1] for x in leaves if np.ndim(x) > 1), default=None)
    order = context_order(mesh, seq_len, layout) if seq_len is not None else None

    def put(x):
        x = np.asarray(x)
        is_seq = x.ndim > 1 and x.shape[1] == seq_len
        if order is not None and is_seq:
            x = x[:, order]
        sharding = (logical_sharding(mesh, "batch", "seq", *([None] * (x.ndim - 2))) if is_seq
                    else logical_sharding(mesh, "batch", *([None] * (x.ndim - 1))))
        shape = (global_batch, *x.shape[1:])

        def local(idx):  # global index -> this process's rows
            lo, hi, _ = idx[0].indices(global_batch)
            return x[(slice(lo - start, hi - start), *idx[1:])]

        return jax.make_array_from_callback(shape, sharding, local)

    return jax.tree.map(put, batch)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- multi-host


def _cluster_asks() -> str | None:
    """The multi-host environment JAX can configure itself from, if any (what `initialize()` auto-detects)."""
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "TPU pod slice"
    for var, what in (("SLURM_NTASKS", "SLURM"), ("OMPI_COMM_WORLD_SIZE", "Open MPI")):
        if int(os.environ.get(var, "1") or 1) > 1:
            return what
    return None


def sync_processes(name: str) -> None:
    """Wait until every process reaches this point (`name` must be the same on all); free when there is one."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def maybe_initialize_distributed(dist_cfg=None) -> bool:
    """Start JAX's multi-controller runtime where the config or the environment asks for it.

    In order: `config.distributed.coordinator_address` (with num_processes
    and process_id) or the JAX_COORDINATOR_ADDRESS environment variable; a
    multi-host TPU pod slice, SLURM job or Open MPI launch, which JAX
    configures by itself; `config.distributed.auto=True` for other clusters
    JAX detects. A single-host run initialises nothing. Returns whether the
    runtime is (now) running; calling it twice is harmless.
    """
    from jax._src import distributed as _dist  # whether it already runs is not public

    if _dist.global_state.client is not None:
        return True
    cfg = dist_cfg or {}
    if cfg.get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", cfg["cpu_collectives"])
    addr = cfg.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        pid = cfg.get("process_id")
        jax.distributed.initialize(coordinator_address=addr, num_processes=cfg.get("num_processes") or None,
                                   process_id=None if pid in (None, -1) else pid)
        return True
    if _cluster_asks() or cfg.get("auto"):
        jax.distributed.initialize()
        return True
    return False
