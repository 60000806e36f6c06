"""Checks shared by the kernel tests: a kernel's (out, lse) and (dq, dk, dv) against a reference's."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention.masks import ALIBI, Bias


def tolerances(dtype, tol=None) -> tuple[float, float]:
    """(atol for out / lse, atol for gradients), abs = rel: f32 1e-5 / 1e-4; bf16 inputs against the
    reference on the same values upcast to f32, 2e-2 / 5e-2 (bf16 rounding of p and ds before the matmuls)."""
    if tol is not None:
        return tol
    return (2e-2, 5e-2) if dtype == jnp.bfloat16 else (1e-5, 1e-4)


def assert_outputs_close(out, lse, out_r, lse_r, q, v, atol: float) -> None:
    """out is [B, T, H, Dv] in q's dtype, lse f32 [B, T, H]; both match the reference (-inf rows exactly)."""
    assert out.shape == q.shape[:3] + (v.shape[-1],) and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
    np.testing.assert_allclose(out.astype(jnp.float32), out_r, atol=atol, rtol=atol)
    np.testing.assert_allclose(lse, lse_r, atol=atol, rtol=atol)


def assert_grads_close(grads, grads_r, dtype, atol: float) -> None:
    """(dq, dk, dv) keep the inputs' dtype and match the reference's."""
    for name, g, gr in zip("qkv", grads, grads_r):
        assert g.dtype == dtype, name
        np.testing.assert_allclose(g.astype(jnp.float32), gr, atol=atol, rtol=atol, err_msg=f"d{name}")


@functools.partial(jax.jit, static_argnums=0)
def value_and_vjp(fn, q, k, v, do, dlse, *rest):
    """(out, lse, (dq, dk, dv)) of `fn(q, k, v, *rest)` under the cotangent (do, dlse), as one jitted program.

    One program, not op by op: run eagerly, an interpreted kernel's forward and backward compiled over a
    hundred small programs (about 3x the time of a check). dlse is zeroed on rows whose lse is -inf (nothing
    visible: no gradient flows there).
    """
    (out, lse), vjp = jax.vjp(fn, q, k, v, *rest)
    return out, lse, vjp((do.astype(out.dtype), jnp.where(jnp.isfinite(lse), dlse, 0.0)))[:3]


def check_against_reference(ours: Callable, ref: Callable, q, k, v, *, tol=None, check_zero_dlse: bool = False):
    """Compare `ours`'s out, lse and (dq, dk, dv) under a random (do, dlse) cotangent with `ref`, which runs on
    the inputs upcast to f32 at 'highest' matmul precision (an f32 ground truth on GPUs too: no TF32).
    `check_zero_dlse` also checks the cotangent without its lse part. Returns ours's (out, lse)."""
    atol_o, atol_g = tolerances(q.dtype, tol)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    rng = np.random.default_rng(42)  # numpy: each eager jax op would compile a program of its own
    do = jnp.asarray(rng.standard_normal(q.shape[:3] + (v.shape[-1],), np.float32))
    dlse = jnp.asarray(rng.standard_normal(q.shape[:3], np.float32))
    for dl in [dlse, jnp.zeros_like(dlse)] if check_zero_dlse else [dlse]:
        out, lse, grads = value_and_vjp(ours, q, k, v, do, dl)
        with jax.default_matmul_precision("highest"):
            out_r, lse_r, grads_r = value_and_vjp(ref, f32(q), f32(k), f32(v), do, dl)
        assert_outputs_close(out, lse, out_r, lse_r, q, v, atol_o)
        assert_grads_close(grads, grads_r, q.dtype, atol_g)
    return out, lse


def _affine_distance(q_pos, kv_pos, slope, offset):
    return offset - slope * jnp.abs(q_pos - kv_pos).astype(jnp.float32)


# A bias scheme no kernel knows: two parameters per head (the offset moves each head's lse), so that tests
# check the [H, P] parameter plumbing of every kernel for P > 1.
AFFINE = Bias("affine_distance", _affine_distance, 2)


def affine(H: int) -> dict:
    """AFFINE with distinct per-head slopes and offsets."""
    h = np.arange(H, dtype=np.float32)
    return dict(bias=AFFINE, bias_params_HP=jnp.asarray(np.stack([2.0 ** -(h + 1), 0.5 * h - 1.0], -1)))


def alibi(slopes_H) -> dict:
    """ALiBi as the kernels take it: `masks.ALIBI` with the slopes as bias_params_HP [H, 1] (numpy stays numpy)."""
    return dict(bias=ALIBI, bias_params_HP=slopes_H[:, None])
