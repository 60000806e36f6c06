"""Shared cases for the sparse-attention kernel tests: inputs, selections, and the check against the XLA path.

tests/test_sparse_pallas.py (Mosaic TPU) and tests/test_sparse_gpu.py (Triton) run their kernels in
interpret mode against `pallas_kernels/sparse_attention.py` with these helpers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from kernel_checks import assert_grads_close, assert_outputs_close, tolerances, value_and_vjp

from pallas_kernels import sparse_attention as xla_sparse


def inputs(B, T, S, H, K, D, dtype, seed=0, Dv=None):
    # numpy, not jax.random: eager jax ops would each compile once, seconds per test on 2 cores
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                 for shape in ((B, T, H, D), (B, S, K, D), (B, S, K, Dv or D)))


def select(q_pos_BT, kv_pos_BS, k: int, seed=1):
    """Duplicate-free top-k of random scores over causally visible keys: (idx int32, valid bool) [B, T, k]."""
    q_pos, kv_pos = np.asarray(q_pos_BT), np.asarray(kv_pos_BS)
    scores = np.random.default_rng(seed).uniform(size=(*q_pos.shape, kv_pos.shape[1]))
    scores = np.where(kv_pos[:, None, :] <= q_pos[:, :, None], scores, -np.inf)
    idx = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    return jnp.asarray(idx, jnp.int32), jnp.asarray(np.isfinite(np.take_along_axis(scores, idx, -1)))


def pos(B, T, start=0, step=1):
    return jnp.asarray(np.broadcast_to(start + step * np.arange(T, dtype=np.int32), (B, T)))


def check_against_xla(kernel, q, k, v, idx, valid, *, tol=None, **kw):
    """Compare `kernel`'s out, lse and (dq, dk, dv) under a random (do, dlse) cotangent with the XLA path.

    Tolerances: `kernel_checks.tolerances` (f32 1e-5 / 1e-4, bf16 against the XLA path upcast to f32
    2e-2 / 5e-2).
    """
    atol_o, atol_g = tolerances(q.dtype, tol)
    ours = functools.partial(kernel, idx_BTk=idx, valid_BTk=valid, **kw)
    ref = functools.partial(xla_sparse.sparse_attention, idx_BTk=idx, valid_BTk=valid,
                            **{n: x for n, x in kw.items() if n not in ("block_sizes", "interpret")})
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    rng = np.random.default_rng(42)
    do = jnp.asarray(rng.standard_normal(q.shape[:3] + (v.shape[-1],), np.float32))
    dlse = rng.standard_normal(q.shape[:3], np.float32) * np.asarray(valid).any(-1)[..., None]
    dlse = jnp.asarray(dlse)  # zero where nothing is valid (lse -inf)
    out, lse, grads = value_and_vjp(ours, q, k, v, do, dlse)
    with jax.default_matmul_precision("highest"):  # an f32 ground truth on GPUs too (no TF32)
        out_r, lse_r, grads_r = value_and_vjp(ref, f32(q), f32(k), f32(v), do, dlse)
    assert_outputs_close(out, lse, out_r, lse_r, q, v, atol_o)
    assert_grads_close(grads, grads_r, q.dtype, atol_g)
    return out, lse, grads
