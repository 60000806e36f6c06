"""The one door to every attention implementation, and the table that picks one.

Models, tests and benchmarks call `attention(...)` here (the contract: DESIGN.md, "The attention
contract"). Which implementation runs is a string from the config, `impl`: one name of `FLASH`, an alias
(`auto`, `pallas`) or several, comma-separated, in order of preference. Every implementation declares
what it cannot compute (`Implementation.declines`, given the call's static facts, `Call`); the first
candidate that does not decline runs, and when all decline one error gives each one's reason. The local
path, the ring (`mesh.context > 1`) and DSA's sparse stage (`SPARSE`) all choose through `choose`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lc_jax import sharding
from pallas_kernels import sparse_attention as _sparse_xla
from pallas_kernels import sparse_attention_gpu as _sparse_triton
from pallas_kernels import sparse_attention_tpu as _sparse_tpu
from pallas_kernels.flash_attention import gpu as _gpu
from pallas_kernels.flash_attention import mosaic_gpu as _mosaic_gpu
from pallas_kernels.flash_attention import reference as _reference
from pallas_kernels.flash_attention import tpu as _tpu
from pallas_kernels.flash_attention import xla as _xla
from pallas_kernels.flash_attention.masks import CAUSAL, Bias, Mask, check_bias
from pallas_kernels.ring_attention import ring_attention as _ring_attention


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


@dataclasses.dataclass(frozen=True)
class GpuPass:
    """One GPU check that passed a kernel: the device and the kernel's code (`source_digest`) it passed with."""

    device: str  # jax's device_kind
    compute_capability: str  # e.g. "9.0": Hopper
    date: str
    jax: str
    run: str  # its results under benchmarks/results/gpu/
    digest: str  # source_digest of the kernel's module at that run


def _code(node) -> str:
    """A syntax tree as text; empty fields are left out, so Python 3.11 and 3.12 write the same tree alike."""
    if isinstance(node, ast.AST):
        fields = ((f, getattr(node, f, None)) for f in node._fields)
        kept = (f"{f}={_code(v)}" for f, v in fields if v is not None and v != [])
        return f"{type(node).__name__}({','.join(kept)})"
    if isinstance(node, list):
        return "[" + ",".join(map(_code, node)) + "]"
    return repr(node)


def source_digest(source: str) -> str:
    """16 hex digits of sha256 over the code's syntax tree without docstrings: comments, formatting and prose
    do not count; any change to what is traced does."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:]
    return hashlib.sha256(_code(tree).encode()).hexdigest()[:16]


# The Pallas GPU kernels, by `GPU_VERIFIED` key: the module that holds each one's kernel bodies and launch
# parameters, what can fail on hardware alone (TMA, barriers, wgmma, shared memory). Their shared jnp helpers
# (masks.py) are not part of the digest: the interpreters run those very functions on every CPU test run.
GPU_KERNELS = {"pallas-mosaic-gpu": _mosaic_gpu, "pallas-triton": _gpu, "sparse-pallas-triton": _sparse_triton}

# The Pallas GPU kernels `make gpu-check` has compiled and checked on GPU hardware (benchmarks/GPU_CHECK.md).
# 'auto' on a GPU takes one (`Implementation.gpu_check`) only while its module's code is the code that passed
# (its digest matches) and on a GPU of the compute capability it passed on (`gpu_verified`); an edited kernel
# waits for the next GPU check. Run 3 of benchmarks/results/gpu/h200/ passed all three over their compiled
# feature matrices (Mosaic GPU in bf16 at D = 64 and 128 and in f32 at D = 64, the Triton kernels against
# references at `highest` precision); the Mosaic GPU and sparse Triton modules have changed since (the
# mask-free loop, two warpgroups, the key-major backward), so only the Triton flash kernel still counts.
_RUN3 = dict(device="NVIDIA H200", compute_capability="9.0", date="2026-11-30", jax="0.11.2",
             run="h200/2026-11-30_run3")
GPU_VERIFIED: dict[str, GpuPass] = {
    "pallas-mosaic-gpu": GpuPass(**_RUN3, digest="024b99f3cc5ce01d"),
    "pallas-triton": GpuPass(**_RUN3, digest="d6cc35952be8e9d2"),
    "sparse-pallas-triton": GpuPass(**_RUN3, digest="94ce565630eaa8e4"),
}


@functools.cache
def kernel_digest(key: str) -> str:
    """The `source_digest` of a GPU kernel's module as it is now."""
    return source_digest(inspect.getsource(GPU_KERNELS[key]))


def _gpu_compute_capability() -> str | None:
    """The default GPU's compute capability ("9.0"), or None without one (a deviceless lowering for cuda)."""
    if jax.default_backend() != "gpu":
        return None
    return str(getattr(jax.devices()[0], "compute_capability", "")) or None


def gpu_verified(key: str) -> str | None:
    """Why 'auto' may not take GPU kernel `key` here (no passing GPU check, code edited since, another GPU
    generation), or None when it may."""
    passed = GPU_VERIFIED.get(key)
    if passed is None:
        return "has not passed the GPU check (benchmarks/GPU_CHECK.md)"
    if (now := kernel_digest(key)) != passed.digest:
        return (f"has changed since it passed the GPU check on {passed.device} ({passed.date}; digest "
                f"{passed.digest}, now {now}): the next `make gpu-check` verifies it")
    cc = _gpu_compute_capability()
    if cc is not None and cc != passed.compute_capability:
        return f"passed the GPU check on compute capability {passed.compute_capability} ({passed.device}), not {cc}"
    return None


# ----------------------------------------------------------------------------- the implementation table


@dataclasses.dataclass(frozen=True)
class Call:
    """The static facts of one attention call that decide which implementation can compute it."""

    platform: str  # compiling for: 'tpu', 'gpu' or 'cpu' (`platform()`)
    dtype: Any
    head_dim: int
    q_len: int
    kv_len: int
    mask: Mask = CAUSAL
    bias: bool = False
    segments: bool = False
    soft_cap: bool = False
    lse: bool = False  # the caller needs the log-sum-exp (return_lse, sinks, DSA's KL)
    mesh: bool = False  # on a mesh of several devices
    ring: bool = False  # per step of ring attention (the sequence split over mesh.context)
    arange: bool = False  # positions provably 0..T-1 in every row (cuDNN masks by index, not position)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute attention: what it cannot do (`declines`: the reason, or None) and how to run it.

    `run(q, k, v, *, block_sizes, call, **attention_kwargs) -> (out, lse)`. `ring_kernel` names the kernel
    the ring runs per step with this implementation (None: it cannot run in the ring). `gpu_check`: the
    `GPU_VERIFIED` key `auto` needs before it takes this implementation on a GPU. `per_device` False: it
    runs on the global arrays and lets XLA partition it (cuDNN through jax.nn) instead of under shard_map.
    """

    name: str
    declines: Callable[[Call], str | None]
    run: Callable[..., tuple]
    ring_kernel: str | None = None
    gpu_check: str | None = None
    per_device: bool = True


def _first(*checks: tuple[bool, str]) -> str | None:
    """The reason of the first check that fails (an implementation's `declines`), or None."""
    return next((why for bad, why in checks if bad), None)


def _plain(mask: Mask) -> bool:
    """Whether the mask is causal / window only (what jax.nn can express): any other term rules cuDNN out."""
    return mask == Mask(causal=mask.causal, window=mask.window)


def _cudnn_declines(c: Call) -> str | None:
    """What cuDNN (through jax.nn) cannot compute: the arguments first, then the platform and the shapes."""
    return _first(
        (c.ring, "cannot run inside ring attention"),
        (c.segments, "does not support q_seg_BT/kv_seg_BS (segment ids)"),
        (c.bias, "does not support a bias (e.g. ALiBi)"),
        (not _plain(c.mask), f"does not support {c.mask} (only causal and window)"),
        (c.mask.window is not None and not c.mask.causal,
         "supports a window only with causal=True (cuDNN has no right window)"),
        (c.soft_cap, "does not support logits_soft_cap"),
        (c.lse, "does not support return_lse=True (nor sinks)"),
        (c.q_len != c.kv_len, f"does not support T != S (T={c.q_len}, S={c.kv_len}; positions must be 0..T-1)"),
        (c.platform != "gpu", f"needs a GPU backend (compiling for {c.platform!r})"),
        (jnp.dtype(c.dtype) not in (jnp.bfloat16, jnp.float16), f"needs bf16/f16, got {jnp.dtype(c.dtype).name}"),
        (c.head_dim % 8 or c.head_dim > 128, f"needs a head dim that is a multiple of 8 up to 128, got {c.head_dim}"),
    )


def _run_reference(q, k, v, *, block_sizes, call, **kw):
    return _reference.attention(q, k, v, **kw)


def _run_xla(q, k, v, *, block_sizes, call, **kw):
    return _xla.attention(q, k, v, block_sizes=block_sizes, **kw)


def _run_tpu(q, k, v, *, block_sizes, call, **kw):
    bs = _tpu.BlockSizes() if block_sizes is None else block_sizes
    return _tpu.attention(q, k, v, block_sizes=bs, interpret=call.platform == "cpu", **kw)


def _run_gpu(kernel):
    def run(q, k, v, *, block_sizes, call, **kw):
        return kernel.attention(q, k, v, block_sizes=kernel.BlockSizes() if block_sizes is None else block_sizes, **kw)

    return run


def _run_cudnn(q, k, v, *, block_sizes, call, mask, scale, **kw):
    return _jax_nn(q, k, v, mask=mask, scale=scale, implementation="cudnn"), None


FLASH: dict[str, Implementation] = {
    "reference": Implementation("reference", lambda c: _first(
        (c.ring, "materialises T x S: cannot run inside ring attention")), _run_reference),
    "xla": Implementation("xla", lambda c: None, _run_xla, ring_kernel="xla"),
    "pallas-tpu": Implementation("pallas-tpu", lambda c: _first(
        (c.platform == "gpu", "is the TPU kernel (compiling for a GPU)")), _run_tpu, ring_kernel="pallas"),
    "pallas-mosaic-gpu": Implementation("pallas-mosaic-gpu", lambda c: _first(
        (c.platform != "gpu", f"needs a GPU (compiling for {c.platform!r})"),
        (not _mosaic_gpu.use_by_default(), "needs a Hopper GPU (sm_90) and jax >= 0.11"),
        (not _mosaic_gpu.supports(c.dtype, c.head_dim),
         f"has blocks that do not fit shared memory at {jnp.dtype(c.dtype).name}, head dim {c.head_dim}"),
        (c.ring, "has no per-step backward for ring attention yet (the ring takes pallas-triton)")),
        _run_gpu(_mosaic_gpu), gpu_check="pallas-mosaic-gpu"),
    "pallas-triton": Implementation("pallas-triton", lambda c: _first(
        (c.platform != "gpu", f"needs a GPU (compiling for {c.platform!r})")), _run_gpu(_gpu),
        ring_kernel="pallas_gpu", gpu_check="pallas-triton"),
    "cudnn": Implementation("cudnn", _cudnn_declines, _run_cudnn, per_device=False),
}


def _flash_aliases(name: str, c: Call) -> list[str] | None:
    """`auto`: TPU, the Pallas TPU kernel; GPU, cuDNN where it fits (off a mesh), then the Pallas GPU kernels
    the GPU check has passed, then XLA; CPU, XLA. `pallas`: the platform's Pallas kernel (Mosaic GPU on
    Hopper with jax >= 0.11, else Triton; on a CPU the TPU kernel in interpret mode: slow, for tests)."""
    if name == "auto":
        if c.platform == "tpu":
            return ["pallas-tpu", "xla"]
        if c.platform == "gpu":
            cudnn = ["cudnn"] if c.arange and not c.mesh else []
            return cudnn + _verified(FLASH, ["pallas-mosaic-gpu", "pallas-triton"]) + ["xla"]
        return ["xla"]
    if name == "pallas":
        return ["pallas-mosaic-gpu", "pallas-triton"] if c.platform == "gpu" else ["pallas-tpu"]
    return None


def _run_sparse_xla(q, k, v, idx, valid, *, call, **kw):
    return _sparse_xla.sparse_attention(q, k, v, idx, valid, **kw, return_probs=True)


def _run_sparse_kernel(kernel):
    def run(q, k, v, idx, valid, *, call, **kw):
        extra = {"interpret": True} if call.platform == "cpu" else {}
        out, lse = kernel.sparse_attention(q, k, v, idx, valid, **kw, **extra)
        return out, lse, None

    return run


# DSA's sparse stage: each query over its selected keys. `run(q, k, v, idx, valid, *, call, **kw)` ->
# (out, lse, head-mean probabilities or None); the XLA gather path also returns the probabilities DSA's KL needs.
SPARSE: dict[str, Implementation] = {
    "xla": Implementation("xla", lambda c: None, _run_sparse_xla, per_device=False),
    "pallas-tpu": Implementation("pallas-tpu", lambda c: _first(
        (c.platform == "gpu", "is the TPU kernel (compiling for a GPU)")), _run_sparse_kernel(_sparse_tpu)),
    "pallas-triton": Implementation("pallas-triton", lambda c: _first(
        (c.platform != "gpu", f"needs a GPU (compiling for {c.platform!r})")), _run_sparse_kernel(_sparse_triton),
        gpu_check="sparse-pallas-triton"),
}


def _sparse_aliases(name: str, c: Call) -> list[str] | None:
    """`auto`: TPU, the Pallas TPU kernel; GPU, the Triton kernel once the GPU check has passed it; else the
    XLA gather path. `pallas`: the TPU or Triton kernel on those platforms, the gather path on a CPU. Flash
    names without a sparse twin map onto the gather path (reference, cudnn) or the Triton kernel."""
    if name == "auto":
        return {"tpu": ["pallas-tpu", "xla"], "gpu": _verified(SPARSE, ["pallas-triton"]) + ["xla"]}.get(
            c.platform, ["xla"])
    if name == "pallas":
        return {"tpu": ["pallas-tpu"], "gpu": ["pallas-triton"]}.get(c.platform, ["xla"])
    return {"reference": ["xla"], "cudnn": ["xla"], "pallas-mosaic-gpu": ["pallas-triton"]}.get(name)


TABLES = {"flash": (FLASH, _flash_aliases), "sparse": (SPARSE, _sparse_aliases)}
ALIASES = ("auto", "pallas")
IMPLS = (*ALIASES, *FLASH)  # the names `model.attention.impl` may list


def _verified(table: dict[str, Implementation], candidates: list[str]) -> list[str]:
    return [n for n in candidates if gpu_verified(table[n].gpu_check) is None]


def names(impl) -> list[str]:
    """The names `impl` lists: a comma-separated string or a sequence, in order of preference."""
    parts = impl.split(",") if isinstance(impl, str) else list(impl)
    return [p.strip() for p in parts if p.strip()]


def check_impl(impl) -> str | None:
    """Why `impl` is not a valid setting (an unknown name), or None."""
    if not names(impl) or any(n not in IMPLS for n in names(impl)):
        return f"{impl!r}: allowed values are {list(IMPLS)}, or several comma-separated in order of preference"
    return None


def can_ring(impl) -> bool:
    """Whether an implementation `impl` lists can run inside ring attention (on some platform)."""
    return any(n in ALIASES or FLASH[n].ring_kernel is not None for n in names(impl) if n in IMPLS)


def choose(impl, call: Call, table: str = "flash") -> Implementation:
    """The first implementation `impl` lists (aliases expanded) that does not decline `call`; one ValueError
    giving every candidate's reason when all decline."""
    impls, aliases = TABLES[table]
    if (why := check_impl(impl)) is not None:
        raise ValueError(f"attention impl={why}")
    reasons = []
    for name in names(impl):
        for cand in aliases(name, call) or [name]:
            why = impls[cand].declines(call)
            if why is None:
                return impls[cand]
            reasons.append(f"impl={cand!r} {why}")
    raise ValueError(f"attention impl={impl!r}: no implementation can compute this call: " + "; ".join(reasons)
                     + ". Use impl='pallas' or impl='xla'")


def _proven_arange(pos_BT, n: int) -> bool:
    """Whether positions are known at trace time to be 0..n-1 in every row (cuDNN masks by index, not position)."""
    try:
        pos = np.asarray(pos_BT)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False
    return pos.shape[-1] == n and bool((pos == np.arange(n)).all())


def describe(q_BTHD, k_BSKD, q_pos_BT, kv_pos_BS, *, q_seg_BT=None, mask: Mask = CAUSAL, bias=None,
             logits_soft_cap=None, lse: bool = False) -> Call:
    """The `Call` of an attention call: its static facts, where it runs (platform, mesh, ring) included."""
    mesh = _ambient_mesh()
    T, S = q_BTHD.shape[1], k_BSKD.shape[1]
    return Call(platform=platform(), dtype=q_BTHD.dtype, head_dim=q_BTHD.shape[-1], q_len=T, kv_len=S, mask=mask,
                bias=bias is not None, segments=q_seg_BT is not None, soft_cap=logits_soft_cap is not None,
                lse=lse, mesh=mesh is not None, ring=mesh is not None and sharding.axis_size(mesh, "seq") > 1,
                arange=_proven_arange(q_pos_BT, T) and _proven_arange(kv_pos_BS, S))


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
    sinks_H: jax.Array | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    impl: str = "auto",
    return_lse: bool = False,
    block_sizes: _xla.BlockSizes | _tpu.BlockSizes | None = None,
):
    """Masked attention with GQA; the mask (`Mask`: causal, window, chunk) comes from positions and segments.

    `bias` (e.g. `masks.ALIBI`) adds fn(q_pos, kv_pos, *params) to the logits, with head h's fixed
    parameters in row h of `bias_params_HP` [H, bias.num_params]. `sinks_H` (f32 [H], learnable) adds one
    logit per head for a key every query sees and that carries no value (attention sinks, as in gpt-oss):
    see `with_sinks`. Returns out_BTHD, or (out_BTHD, lse_BTH) with `return_lse=True`; the log-sum-exp is
    f32 and -inf for rows that see no key (with sinks: over the keys and the sink).

    impl='cudnn' (GPU, bf16/f16) masks by index: it assumes positions 0..T-1 in every row (traced values
    cannot be checked), and `auto` takes it only where they are provably so.
    """
    _check_shapes(q_BTHD, k_BSKD, v_BSKD, q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, mask, bias, bias_params_HP)
    if sinks_H is not None and jnp.shape(sinks_H) != (q_BTHD.shape[2],):
        raise ValueError(f"sinks_H must have shape ({q_BTHD.shape[2]},), got {jnp.shape(sinks_H)}")
    call = describe(q_BTHD, k_BSKD, q_pos_BT, kv_pos_BS, q_seg_BT=q_seg_BT, mask=mask, bias=bias,
                    logits_soft_cap=logits_soft_cap, lse=return_lse or sinks_H is not None)
    chosen = choose(impl, call)
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
    if mesh is not None and chosen.per_device:
        out, lse = _on_mesh(mesh, chosen, call, q_BTHD, k_BSKD, v_BSKD, block_sizes, kwargs)
    else:
        out, lse = chosen.run(q_BTHD, k_BSKD, v_BSKD, block_sizes=block_sizes, call=call, **kwargs)
    if sinks_H is not None:
        out, lse = with_sinks(out, lse, sinks_H)
    return (out, lse) if return_lse else out


def with_sinks(out_BTHD, lse_BTH, sinks_H):
    """(out, lse) of attention with one more logit per head, s_h, for a key that carries no value.

    softmax over (keys, sink) = softmax over keys x exp(lse - lse'), with lse' = logaddexp(lse, s_h): the
    output shrinks by the mass the sink takes. Computed from (out, lse), so every implementation that
    returns the log-sum-exp supports sinks, forward and backward: the sink logits get their gradient
    through lse', and q, k, v theirs through the kernels' (out, lse) backward.
    """
    lse_new = jnp.logaddexp(lse_BTH, jnp.asarray(sinks_H, jnp.float32)[None, None, :])
    keep = jnp.exp(lse_BTH - lse_new)  # 0 where the row sees no key
    return (out_BTHD.astype(jnp.float32) * keep[..., None]).astype(out_BTHD.dtype), lse_new


def sparse_attention(q_BTHD, k_BSKD, v_BSKD, idx_BTk, valid_BTk, *, q_pos_BT, kv_pos_BS, bias=None,
                     bias_params_HP=None, impl="auto"):
    """DSA's sparse stage through the `SPARSE` table: (out, lse, head-mean probabilities or None), each query
    over its selected keys. A Pallas kernel runs per device on a mesh."""
    call = describe(q_BTHD, k_BSKD, q_pos_BT, kv_pos_BS, bias=bias, lse=True)
    chosen = choose(impl, call, "sparse")
    kw = dict(bias=bias, bias_params_HP=bias_params_HP)
    if not chosen.per_device:
        return chosen.run(q_BTHD, k_BSKD, v_BSKD, idx_BTk, valid_BTk, call=call, q_pos_BT=q_pos_BT,
                          kv_pos_BS=kv_pos_BS, **kw)

    def run(q, k, v, idx, valid, q_pos, kv_pos, params):
        out, lse, _ = chosen.run(q, k, v, idx, valid, call=call, q_pos_BT=q_pos, kv_pos_BS=kv_pos, bias=bias,
                                 bias_params_HP=params)
        return out, lse

    rows, heads = ("batch", "seq"), ("batch", "seq", "heads")
    out, lse = per_device(
        run, (q_BTHD, k_BSKD, v_BSKD, idx_BTk, valid_BTk, q_pos_BT, kv_pos_BS, bias_params_HP),
        (heads + (None,), ("batch", "seq", "kv_heads", None), ("batch", "seq", "kv_heads", None),
         rows + (None,), rows + (None,), rows, rows, ("heads", None)),
        (heads + (None,), heads))
    return out, lse, None


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


def _on_mesh(mesh, chosen: Implementation, call: Call, q, k, v, block_sizes, kwargs):
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
    spec = lambda *axes: sharding.activation_spec(mesh, *axes)  # noqa: E731
    qs, kvs, rows = spec("batch", "seq", "heads", None), spec("batch", "seq", "kv_heads", None), spec("batch", "seq")
    params = kwargs.pop("bias_params_HP")
    segs = (kwargs.pop("q_seg_BT"), kwargs.pop("kv_seg_BS"))
    q_pos, kv_pos = kwargs.pop("q_pos_BT"), kwargs.pop("kv_pos_BS")

    def per_device(q, k, v, q_pos, kv_pos, segs, params):
        kw = dict(kwargs, q_pos_BT=q_pos, kv_pos_BS=kv_pos, q_seg_BT=(segs or (None,))[0],
                  kv_seg_BS=(segs or (None, None))[1], bias_params_HP=(params or (None,))[0])
        if n_ctx == 1:
            return chosen.run(q, k, v, block_sizes=block_sizes, call=call, **kw)
        kernel = chosen.ring_kernel  # `choose` saw call.ring: only implementations with a ring kernel accept it
        defaults = {"xla": None, "pallas": _tpu.BlockSizes(), "pallas_gpu": _gpu.BlockSizes()}[kernel]
        return _ring_attention(q, k, v, **kw, axis_name=spec("seq")[0], kernel=kernel,
                               block_sizes=block_sizes or defaults,
                               interpret=kernel != "xla" and call.platform == "cpu")

    # Absent segments / bias parameters travel as empty tuples (shard_map specs must match the pytree).
    segs = () if segs[0] is None else segs
    params = () if params is None else (params,)
    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(qs, kvs, kvs, rows, rows, (rows,) * len(segs),
                                                        (spec("heads", None),) * len(params)),
                       out_specs=(qs, spec("batch", "seq", "heads")))
    return fn(q, k, v, q_pos, kv_pos, segs, params)
