"""The one door to every attention implementation.

Models, tests and benchmarks call `attention(...)` here; which kernel runs is a
string (`impl`) so that it can come from a config. See DESIGN.md for the contract.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import gpu as _gpu
from pallas_kernels.flash_attention import reference as _reference
from pallas_kernels.flash_attention import tpu as _tpu
from pallas_kernels.flash_attention import xla as _xla

IMPLS = ("auto", "xla", "pallas", "reference", "cudnn")


def resolve_impl(impl: str) -> str:
    """Map 'auto' to a concrete implementation for the default backend.

    'auto': the Pallas kernel on TPU, the blockwise XLA path elsewhere. The GPU
    Pallas kernel is reachable with impl='pallas' but is not the GPU default until
    it has been run on GPU hardware. 'pallas' on CPU runs the TPU kernel in Pallas
    interpret mode: slow, for tests only. 'cudnn' (GPU only) is cuDNN flash
    attention through `jax.nn.dot_product_attention`; it covers only the plain
    causal/sliding/full layout (see `_jax_nn`), never chosen by 'auto'.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "tpu" else "xla"
    return impl


def _pallas(q, k, v, block_sizes, **kwargs):
    backend = jax.default_backend()
    if backend == "gpu":
        bs = _gpu.BlockSizes() if block_sizes is None else block_sizes
        return _gpu.attention(q, k, v, block_sizes=bs, **kwargs)
    bs = _tpu.BlockSizes() if block_sizes is None else block_sizes
    return _tpu.attention(q, k, v, block_sizes=bs, interpret=backend == "cpu", **kwargs)


def _jax_nn(q, k, v, *, causal, window, scale, implementation):
    """`jax.nn.dot_product_attention` for the plain layout; returns out_BTHD.

    Assumes q and k positions are both 0..T-1 in every row (T == S, no segments):
    jax.nn masks by array index, not by position. GQA (K < H) is handled by jax.nn.
    Window W keeps keys with 0 <= q - k < W when causal, i.e. keys q-W+1..q, which
    is jax.nn's `local_window_size=(W - 1, 0)` (left/right window sizes exclude
    the query itself; cuDNN receives sliding_window_length = W - 1 + 1 = W); when
    not causal, |q - k| < W is `(W - 1, W - 1)`, which the 'xla' implementation
    accepts and cuDNN rejects (it has no right window without a causal mask).
    """
    local = None
    if window is not None:
        if not causal and implementation == "cudnn":
            raise ValueError("impl='cudnn' supports a window only with causal=True "
                             "(cuDNN has no right window); use impl='pallas' or 'xla'")
        local = (window - 1, 0) if causal else (window - 1, window - 1)
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, local_window_size=local, scale=scale, implementation=implementation
    )


def _check_cudnn_args(T, S, q_seg, alibi_slopes, logits_soft_cap, return_lse):
    unsupported = [
        (q_seg is not None, "q_seg_BT/kv_seg_BS (segment ids)"),
        (alibi_slopes is not None, "alibi_slopes_H"),
        (logits_soft_cap is not None, "logits_soft_cap"),
        (return_lse, "return_lse=True"),
        (T != S, f"T != S (T={T}, S={S}; positions must be 0..T-1 for both q and kv)"),
    ]
    for bad, name in unsupported:
        if bad:
            raise ValueError(f"impl='cudnn' does not support {name}; use impl='pallas' or impl='xla'")


def _check_shapes(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, alibi_slopes):
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
    if window is not None and window <= 0:
        raise ValueError(f"window must be a positive int or None, got {window}")
    if alibi_slopes is not None and alibi_slopes.shape != (H,):
        raise ValueError(f"alibi_slopes must have shape ({H},), got {alibi_slopes.shape}")


def attention(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    q_pos_BT: jax.Array,
    kv_pos_BS: jax.Array,
    q_seg_BT: jax.Array | None = None,
    kv_seg_BS: jax.Array | None = None,
    causal: bool = True,
    window: int | None = None,
    alibi_slopes_H: jax.Array | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    impl: str = "auto",
    return_lse: bool = False,
    block_sizes: _xla.BlockSizes | _tpu.BlockSizes | None = None,
):
    """Causal/sliding/segment-masked attention with GQA; masks come from positions and segments.

    Returns out_BTHD, or (out_BTHD, lse_BTH) with `return_lse=True`; the
    log-sum-exp is f32 and -inf for rows that see no key.

    impl='cudnn' (GPU, bf16/f16) ignores q_pos_BT/kv_pos_BS and assumes they are
    0..T-1 in every row (traced values cannot be checked); it rejects segments,
    ALiBi, soft-capping, return_lse and T != S with a ValueError.
    """
    _check_shapes(q_BTHD, k_BSKD, v_BSKD, q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS, window, alibi_slopes_H)
    impl = resolve_impl(impl)
    if impl == "cudnn":
        _check_cudnn_args(q_BTHD.shape[1], k_BSKD.shape[1], q_seg_BT, alibi_slopes_H, logits_soft_cap, return_lse)
        if jax.default_backend() != "gpu":
            raise ValueError(f"impl='cudnn' needs a GPU backend (default backend is {jax.default_backend()!r}); "
                             "use impl='pallas' or impl='xla'")
        return _jax_nn(q_BTHD, k_BSKD, v_BSKD, causal=causal, window=window, scale=scale, implementation="cudnn")
    kwargs = dict(
        q_pos_BT=q_pos_BT,
        kv_pos_BS=kv_pos_BS,
        q_seg_BT=q_seg_BT,
        kv_seg_BS=kv_seg_BS,
        causal=causal,
        window=window,
        alibi_slopes_H=None if alibi_slopes_H is None else jnp.asarray(alibi_slopes_H, jnp.float32),
        scale=scale,
        logits_soft_cap=logits_soft_cap,
    )
    if impl == "reference":
        out, lse = _reference.attention(q_BTHD, k_BSKD, v_BSKD, **kwargs)
    elif impl == "pallas":
        out, lse = _pallas(q_BTHD, k_BSKD, v_BSKD, block_sizes, **kwargs)
    else:
        out, lse = _xla.attention(q_BTHD, k_BSKD, v_BSKD, block_sizes=block_sizes, **kwargs)
    return (out, lse) if return_lse else out
