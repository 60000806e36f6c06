"""The one door to every attention implementation.

Models, tests and benchmarks call `attention(...)` here; which kernel runs is a
string (`impl`) so that it can come from a config. See DESIGN.md for the contract.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lc_jax import sharding
from pallas_kernels.flash_attention import gpu as _gpu
from pallas_kernels.flash_attention import mosaic_gpu as _mosaic_gpu
from pallas_kernels.flash_attention import reference as _reference
from pallas_kernels.flash_attention import tpu as _tpu
from pallas_kernels.flash_attention import xla as _xla
from pallas_kernels.flash_attention.masks import CAUSAL, Bias, Mask, check_bias
from pallas_kernels.ring_attention import ring_attention as _ring_attention

IMPLS = ("auto", "xla", "pallas", "reference", "cudnn")


def platform() -> str:
    """The platform the current trace is compiled for: 'tpu', 'gpu' or 'cpu'.

    The devices of the mesh set by `jax.set_mesh` (or `jax.sharding.use_abstract_mesh`)
    decide, else `jax.default_backend()`. A deviceless compile (`lc_jax.aot`: a TPU
    topology's devices on a CPU host; an abstract GPU mesh) therefore traces the TPU
    or GPU kernels, not the host's interpret-mode ones.
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    name = jax.default_backend() if device is None else device.platform
    return {"cuda": "gpu", "rocm": "gpu"}.get(name, name)


# The Pallas GPU kernels `make gpu-check` has run and checked on GPU hardware (benchmarks/GPU_CHECK.md):
# kernel -> (device kind, date, jax version). 'auto' on a GPU uses a Pallas kernel only once it is listed
# here. Kernels: 'triton' (flash_attention/gpu.py, also the ring's per-step kernel), 'mosaic_gpu'
# (flash_attention/mosaic_gpu.py), 'sparse_triton' (sparse_attention_gpu.py, DSA's sparse stage).
# No GPU check has passed yet: every entry waits for its first run on a lent H100/H200.
GPU_VERIFIED: dict[str, tuple[str, str, str]] = {}


def gpu_flash_kernel(dtype, head_dim: int) -> str:
    """The GPU flash kernel 'pallas' runs: Mosaic GPU on Hopper with jax >= 0.11 where its blocks fit, else Triton."""
    return "mosaic_gpu" if _mosaic_gpu.use_by_default() and _mosaic_gpu.supports(dtype, head_dim) else "triton"


def resolve_impl(impl: str, *, gpu_kernel: str = "triton") -> str:
    """Map 'auto' to a concrete implementation for the platform being compiled for (`platform()`).

    'auto': the Pallas kernel on TPU; on a GPU the Pallas kernel `gpu_kernel` once the GPU check has
    passed it (`GPU_VERIFIED`), else the blockwise XLA path (`attention` also takes cuDNN where the call
    fits it); the XLA path on CPU. With impl='pallas' a GPU runs Mosaic GPU on Hopper with jax >= 0.11
    (which deprecates the Pallas Triton lowering), else Triton; the CPU runs the TPU kernel in Pallas
    interpret mode: slow, for tests only. 'cudnn' (GPU only) is cuDNN flash attention through
    `jax.nn.dot_product_attention`, for the plain causal/sliding/full layout only (see `_jax_nn`).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    where = platform()
    if where == "tpu" or (where == "gpu" and gpu_kernel in GPU_VERIFIED):
        return "pallas"
    return "xla"


def _proven_arange(pos_BT, n: int) -> bool:
    """Whether positions are known at trace time to be 0..n-1 in every row (cuDNN masks by index, not position)."""
    try:
        pos = np.asarray(pos_BT)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False
    return pos.shape[-1] == n and bool((pos == np.arange(n)).all())


def cudnn_fits(q, k, q_pos, kv_pos, q_seg, bias, logits_soft_cap, return_lse, mask: Mask) -> bool:
    """Whether cuDNN's flash attention computes exactly this call: the layout 'auto' gives it on a GPU.

    bf16/f16, T == S, positions provably 0..T-1 (concrete, not traced), no segments, bias, soft-cap,
    chunk or lse, a window only when causal, head dim a multiple of 8 up to 128.
    """
    T, S, D = q.shape[1], k.shape[1], q.shape[-1]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and T == S and q_seg is None and bias is None
            and logits_soft_cap is None and not return_lse and _plain(mask)
            and (mask.window is None or mask.causal)
            and D % 8 == 0 and D <= 128 and _proven_arange(q_pos, T) and _proven_arange(kv_pos, S))


def _plain(mask: Mask) -> bool:
    """Whether the mask is causal / window only (what jax.nn can express): any other term rules cuDNN out."""
    return mask == Mask(causal=mask.causal, window=mask.window)


def choose_impl(impl, q, k, q_pos, kv_pos, q_seg, bias, logits_soft_cap, return_lse, mask: Mask) -> str:
    """The implementation `attention` runs: `resolve_impl`, and on a GPU 'auto' takes cuDNN where it fits."""
    if impl == "auto" and platform() == "gpu" and _ambient_mesh() is None and cudnn_fits(
            q, k, q_pos, kv_pos, q_seg, bias, logits_soft_cap, return_lse, mask):
        return "cudnn"
    return resolve_impl(impl, gpu_kernel=gpu_flash_kernel(q.dtype, q.shape[-1]))


def _pallas(q, k, v, block_sizes, **kwargs):
    backend = platform()
    if backend == "gpu":
        gpu = _mosaic_gpu if gpu_flash_kernel(q.dtype, q.shape[-1]) == "mosaic_gpu" else _gpu
        bs = gpu.BlockSizes() if block_sizes is None else block_sizes
        return gpu.attention(q, k, v, block_sizes=bs, **kwargs)
    bs = _tpu.BlockSizes() if block_sizes is None else block_sizes
    return _tpu.attention(q, k, v, block_sizes=bs, interpret=backend == "cpu", **kwargs)


def _jax_nn(q, k, v, *, mask: Mask, scale, implementation):
    """`jax.nn.dot_product_attention` for the plain layout; returns out_BTHD.

    Assumes q and k positions are both 0..T-1 in every row (T == S, no segments):
    jax.nn masks by array index, not by position. GQA (K < H) is handled by jax.nn.
    Window W keeps keys with 0 <= q - k < W when causal, i.e. keys q-W+1..q, which
    is jax.nn's `local_window_size=(W - 1, 0)` (left/right window sizes exclude
    the query itself; cuDNN receives sliding_window_length = W - 1 + 1 = W); when
    not causal, |q - k| < W is `(W - 1, W - 1)`, which the 'xla' implementation
    accepts and cuDNN rejects (it has no right window without a causal mask).
    """
    causal, window = mask.causal, mask.window
    if not _plain(mask):
        raise ValueError(f"impl={implementation!r} takes only causal / window masks, got {mask}; "
                         "use impl='pallas' or 'xla'")
    local = None
    if window is not None:
        if not causal and implementation == "cudnn":
            raise ValueError("impl='cudnn' supports a window only with causal=True "
                             "(cuDNN has no right window); use impl='pallas' or 'xla'")
        local = (window - 1, 0) if causal else (window - 1, window - 1)
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, local_window_size=local, scale=scale, implementation=implementation
    )


def _check_cudnn_args(T, S, q_seg, bias, logits_soft_cap, return_lse, mask: Mask):
    unsupported = [
        (q_seg is not None, "q_seg_BT/kv_seg_BS (segment ids)"),
        (bias is not None, "bias (e.g. ALiBi)"),
        (not _plain(mask), f"{mask} (only causal and window)"),
        (logits_soft_cap is not None, "logits_soft_cap"),
        (return_lse, "return_lse=True"),
        (T != S, f"T != S (T={T}, S={S}; positions must be 0..T-1 for both q and kv)"),
    ]
    for bad, name in unsupported:
        if bad:
            raise ValueError(f"impl='cudnn' does not support {name}; use impl='pallas' or impl='xla'")


def _check_shapes(q, k, v, q_pos, kv_pos, q_seg, kv_seg, mask, bias, bias_params_HP):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
    B, T, H, D = q.shape
    Bk, S, K, Dk = k.shape
    if k.shape[:3] != v.shape[:3] or Bk != B or Dk != D:
        raise ValueError(f"k/v shapes {k.shape}, {v.shape} do not match q {q.shape}")
    if H % K:
        raise ValueError(f"num query heads {H} must be a multiple of num kv heads {K}")
    if q_pos.shape != (B, T) or kv_pos.shape != (B, S):
        raise ValueError(f"q_pos {q_pos.shape} / kv_pos {kv_pos.shape} must be ({B}, {T}) / ({B}, {S})")
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("pass both q_seg and kv_seg, or neither")
    if q_seg is not None and (q_seg.shape != (B, T) or kv_seg.shape != (B, S)):
        raise ValueError(f"q_seg {q_seg.shape} / kv_seg {kv_seg.shape} must be ({B}, {T}) / ({B}, {S})")
    if not isinstance(mask, Mask):
        raise ValueError(f"mask must be a masks.Mask, got {type(mask).__name__}")
    check_bias(bias, bias_params_HP, H)


def attention(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    q_pos_BT: jax.Array,
    kv_pos_BS: jax.Array,
    q_seg_BT: jax.Array | None = None,
    kv_seg_BS: jax.Array | None = None,
    mask: Mask = CAUSAL,
    bias: Bias | None = None,
    bias_params_HP: jax.Array | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    impl: str = "auto",
    return_lse: bool = False,
    block_sizes: _xla.BlockSizes | _tpu.BlockSizes | None = None,
):
    """Masked attention with GQA; the mask (`Mask`: causal, window, chunk) comes from positions and segments.

    `bias` (e.g. `masks.ALIBI`) adds fn(q_pos, kv_pos, *params) to the logits, with head h's fixed
    parameters in row h of `bias_params_HP` [H, bias.num_params].
    Returns out_BTHD, or (out_BTHD, lse_BTH) with `return_lse=True`; the
    log-sum-exp is f32 and -inf for rows that see no key.

    impl='cudnn' (GPU, bf16/f16) ignores q_pos_BT/kv_pos_BS and assumes they are
    0..T-1 in every row (traced values cannot be checked); it rejects segments,
    a bias, a chunk, soft-capping, return_lse and T != S with a ValueError.
    """
    _check_shapes(q_BTHD, k_BSKD, v_BSKD, q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, mask, bias, bias_params_HP)
    impl = choose_impl(impl, q_BTHD, k_BSKD, q_pos_BT, kv_pos_BS, q_seg_BT, bias, logits_soft_cap,
                       return_lse, mask)
    if impl == "cudnn":
        _check_cudnn_args(q_BTHD.shape[1], k_BSKD.shape[1], q_seg_BT, bias, logits_soft_cap, return_lse, mask)
        if platform() != "gpu":
            raise ValueError(f"impl='cudnn' needs a GPU backend (compiling for {platform()!r}); "
                             "use impl='pallas' or impl='xla'")
        return _jax_nn(q_BTHD, k_BSKD, v_BSKD, mask=mask, scale=scale, implementation="cudnn")
    kwargs = dict(
        q_pos_BT=q_pos_BT,
        kv_pos_BS=kv_pos_BS,
        q_seg_BT=q_seg_BT,
        kv_seg_BS=kv_seg_BS,
        mask=mask,
        bias=bias,
        bias_params_HP=None if bias_params_HP is None else jnp.asarray(bias_params_HP, jnp.float32),
        scale=scale,
        logits_soft_cap=logits_soft_cap,
    )
    mesh = _ambient_mesh()
    if mesh is not None:
        out, lse = _on_mesh(mesh, impl, q_BTHD, k_BSKD, v_BSKD, block_sizes, kwargs)
    else:
        out, lse = _local(impl, q_BTHD, k_BSKD, v_BSKD, block_sizes, kwargs)
    return (out, lse) if return_lse else out


def _local(impl, q, k, v, block_sizes, kwargs):
    if impl == "reference":
        return _reference.attention(q, k, v, **kwargs)
    if impl == "pallas":
        return _pallas(q, k, v, block_sizes, **kwargs)
    return _xla.attention(q, k, v, block_sizes=block_sizes, **kwargs)


# ----------------------------------------------------------------------------- meshes


def _ambient_mesh():
    """The mesh set by `jax.set_mesh` if attention should shard over it; None inside shard_map or off-mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return None  # already per-device (e.g. a user's shard_map)
    return mesh


def constrain(x: jax.Array, *logical_axes: str | None) -> jax.Array:
    """Pin an activation's layout on the ambient mesh by logical axes (`lc_jax.sharding` rules); off a mesh, x.

    The model pins its residual stream and logits to (batch over data x fsdp, sequence over context):
    left to itself, XLA may meet an FSDP-sharded weight by gathering the activations' batch instead of
    the weight (seen at fsdp 64: every chip held the whole batch's logits).
    """
    mesh = _ambient_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(
        mesh, sharding.activation_spec(mesh, *logical_axes)))


def per_device(fn, args: tuple, in_axes: tuple, out_axes):
    """`fn(*args)` as a per-device program: under `shard_map` over the ambient mesh, each argument split by its
    logical axes (`in_axes`, one tuple per argument; `out_axes` likewise, a tuple of tuples for several
    outputs), or called directly off a mesh. Arguments that are None stay None.

    A Pallas kernel cannot be partitioned by XLA, so a kernel called on a mesh of several devices must run
    per device; attention goes through `_on_mesh`, other kernels (DSA's sparse attention) through here.
    """
    mesh = _ambient_mesh()
    if mesh is None:
        return fn(*args)
    present = [i for i, a in enumerate(args) if a is not None]

    def inner(*xs):
        full = [None] * len(args)
        for i, x in zip(present, xs):
            full[i] = x
        return fn(*full)

    spec = lambda axes: sharding.activation_spec(mesh, *axes)  # noqa: E731
    outs = jax.tree.map(spec, out_axes, is_leaf=lambda a: isinstance(a, tuple) and all(
        isinstance(x, str | None) for x in a))
    return jax.shard_map(inner, mesh=mesh, in_specs=tuple(spec(in_axes[i]) for i in present),
                         out_specs=outs)(*(args[i] for i in present))


def _on_mesh(mesh, impl, q, k, v, block_sizes, kwargs):
    """Attention under `shard_map`: batch over (data, fsdp), heads over tensor, sequence over the ring.

    Kernels are per-device programs (a Pallas call cannot be partitioned by
    XLA), so the batch and head shards run locally; when the sequence is split
    over `context`, the ring passes K/V between devices.
    """
    B, T, H, _ = q.shape
    K = k.shape[2]
    n_ctx, n_batch, n_heads = (sharding.axis_size(mesh, a) for a in ("seq", "batch", "heads"))
    for what, size, shards, axes in (("batch", B, n_batch, "data x fsdp"), ("sequence length", T, n_ctx, "context"),
                                     ("query heads", H, n_heads, "tensor"), ("kv heads", K, n_heads, "tensor")):
        if size % shards:
            raise ValueError(f"attention on mesh {dict(mesh.shape)}: {what} {size} does not split over "
                             f"mesh {axes} = {shards}")
    if n_ctx > 1 and k.shape[1] != T:
        raise ValueError(f"context parallelism needs keys sharded like queries (T={T}, S={k.shape[1]})")
    if n_ctx > 1 and impl not in ("xla", "pallas"):
        raise ValueError(f"impl={impl!r} cannot run inside ring attention (mesh.context={n_ctx}); "
                         "use model.attention.impl='xla' or 'pallas'")
    spec = lambda *axes: sharding.activation_spec(mesh, *axes)  # noqa: E731
    qs, kvs, rows = spec("batch", "seq", "heads", None), spec("batch", "seq", "kv_heads", None), spec("batch", "seq")
    params = kwargs.pop("bias_params_HP")
    segs = (kwargs.pop("q_seg_BT"), kwargs.pop("kv_seg_BS"))
    q_pos, kv_pos = kwargs.pop("q_pos_BT"), kwargs.pop("kv_pos_BS")

    def per_device(q, k, v, q_pos, kv_pos, segs, params):
        kw = dict(kwargs, q_pos_BT=q_pos, kv_pos_BS=kv_pos, q_seg_BT=(segs or (None,))[0],
                  kv_seg_BS=(segs or (None, None))[1], bias_params_HP=(params or (None,))[0])
        if n_ctx == 1:
            return _local(impl, q, k, v, block_sizes, kw)
        backend = platform()
        kernel = "xla" if impl != "pallas" else "pallas_gpu" if backend == "gpu" else "pallas"
        defaults = {"xla": None, "pallas": _tpu.BlockSizes(), "pallas_gpu": _gpu.BlockSizes()}[kernel]
        return _ring_attention(q, k, v, **kw, axis_name=spec("seq")[0], kernel=kernel,
                               block_sizes=block_sizes or defaults, interpret=kernel != "xla" and backend == "cpu")

    # Absent segments / bias parameters travel as empty tuples (shard_map specs must match the pytree).
    segs = () if segs[0] is None else segs
    params = () if params is None else (params,)
    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(qs, kvs, kvs, rows, rows, (rows,) * len(segs),
                                                        (spec("heads", None),) * len(params)),
                       out_specs=(qs, spec("batch", "seq", "heads")))
    return fn(q, k, v, q_pos, kv_pos, segs, params)
