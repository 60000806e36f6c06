"""Attention over gathered top-k keys: the sparse stage of DSA (lc_jax/attention/dsa.py).

Each query t attends only to its own k selected keys idx[t, :] (shared by all
heads of the query; under GQA every query head reads the selected rows of its
kv head). Nothing of size T x S exists: queries are processed in blocks of
`block_q`, and each block gathers its [block_q, k] key/value rows, so memory is
O(T * k) and compute O(T * k * H * D).

This is the XLA gather path (every backend; the CPU path). The block function
is rematerialised in the backward pass (`jax.checkpoint`), so the gathered rows
are never stored for all blocks at once; gradients reach K and V through the
transpose of the gather (a scatter-add into [S, K, D]). Blocks are small (a
few MiB of gathered rows, `default_block_q`), so that on CPU those rows are
still in cache when the dots read them. (A hand-written flash-style backward
with one scatter-add buffer was no faster than autodiff at that block size.)

Layout as the flash kernels: block size, block body, wrapper with shape
validation. Beside it are the Pallas kernels that read only the selected rows:
`sparse_attention_tpu.py` (Mosaic TPU, row DMAs; DSA uses it on TPU) and
`sparse_attention_gpu.py` (Triton, gather loads and atomic dK/dV; DSA uses it
on GPU with attention.impl 'pallas', and with 'auto' while its code is what a
GPU check passed, `lc_jax.ops.GPU_VERIFIED`: run 3 on an H200 passed an earlier
version). Everything else, impl 'xla' included, runs this path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash_attention.masks import Bias, check_qkv, head_params, pad_axis, scores

# Query blocks are sized by the bytes of their gathered K|V rows (bq x k x K x 2D): about 4 MiB stays in the CPU's
# cache between the gather and the dots that read it. At k = 512 that is 8 queries for 2 kv heads of 64 (2.0x
# faster fwd+bwd than 128) and 2 for 4 kv heads of 128 (2.0x); larger blocks spill to memory.
BLOCK_BYTES = 4 * 2**20
MAX_BLOCK_Q = 128


def default_block_q(k: int, K: int, D: int, Dv: int, itemsize: int) -> int:
    """The largest power of two <= MAX_BLOCK_Q whose gathered rows fit BLOCK_BYTES (at least 1)."""
    rows = max(1, BLOCK_BYTES // max(1, k * K * (D + Dv) * itemsize))
    return int(min(MAX_BLOCK_Q, 1 << (rows.bit_length() - 1)))


def gather_rows(x_BSX, idx_BTk):
    """x[b, idx[b, t, j]] for every (b, t, j): [B, T, k, ...]. The one gather the sparse path makes."""
    return jax.vmap(lambda x, i: x[i])(x_BSX, idx_BTk)


def check_selection(q_BTHD, k_BSKD, v_BSKD, idx_BTk, valid_BTk, q_pos_BT, kv_pos_BS, bias, bias_params_HP):
    """The Pallas sparse kernels' input contract: (B, T, S, H, K, D), or a ValueError naming the argument."""
    B, T, S, H, K, D = check_qkv(q_BTHD, k_BSKD, v_BSKD, bias, bias_params_HP)
    if idx_BTk.ndim != 3 or idx_BTk.shape != valid_BTk.shape or idx_BTk.shape[:2] != (B, T):
        raise ValueError(f"idx {idx_BTk.shape} / valid {valid_BTk.shape} must both be ({B}, {T}, k)")
    if not jnp.issubdtype(idx_BTk.dtype, jnp.integer):
        raise ValueError(f"idx_BTk must be an integer array, got {idx_BTk.dtype}")
    if valid_BTk.dtype != jnp.bool_:
        raise ValueError(f"valid_BTk must be a bool array, got {valid_BTk.dtype}")
    if q_pos_BT.shape != (B, T) or kv_pos_BS.shape != (B, S):
        raise ValueError(f"q_pos {q_pos_BT.shape} / kv_pos {kv_pos_BS.shape} must be ({B}, {T}) / ({B}, {S})")
    if k_BSKD.dtype != q_BTHD.dtype or v_BSKD.dtype != q_BTHD.dtype:
        raise ValueError(f"q / k / v dtypes must match, got {q_BTHD.dtype} / {k_BSKD.dtype} / {v_BSKD.dtype}")
    return B, T, S, H, K, D


def query_blocks(T: int, block_q: int):
    """(to_blocks, from_blocks): [B, T, ...] <-> [n, B, bq, ...] with zero padding to whole blocks."""
    bq = min(block_q, T)
    pad = -T % bq
    n = (T + pad) // bq

    def to_blocks(x):
        x = pad_axis(x, 1, pad, 0)
        return x.reshape(x.shape[0], n, bq, *x.shape[2:]).swapaxes(0, 1)

    def from_blocks(x):
        return x.swapaxes(0, 1).reshape(x.shape[1], n * bq, *x.shape[3:])[:, :T]

    return to_blocks, from_blocks


def _block(q_b, idx_b, valid_b, qp_b, *, k, v, kv_pos, bias, params, scale):
    """out [B, bq, H, Dv], lse [B, bq, H] and head-mean probabilities [B, bq, k] of one query block."""
    B, bq, H, D = q_b.shape
    K = k.shape[2]
    G = H // K
    k_sel = gather_rows(k, idx_b)  # [B, bq, k, K, D]
    v_sel = gather_rows(v, idx_b)
    s = jnp.einsum("bqkgd,bqjkd->bqkgj", q_b.reshape(B, bq, K, G, D), k_sel,
                   preferred_element_type=jnp.float32) * scale
    if bias is not None:
        kp_sel = gather_rows(kv_pos, idx_b)  # [B, bq, k]
        s, _, _ = scores(s, qp_b[:, :, None, None, None], kp_sel[:, :, None, None, :], None, None, params,
                         mask=None, bias=bias, soft_cap=None)
    s = jnp.where(valid_b[:, :, None, None, :], s, -jnp.inf)
    m = s.max(-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    l = p.sum(-1)
    l_safe = jnp.where(l == 0, 1.0, l)
    out = jnp.einsum("bqkgj,bqjkd->bqkgd", p.astype(v.dtype), v_sel, preferred_element_type=jnp.float32)
    out = (out / l_safe[..., None]).reshape(B, bq, H, v.shape[-1])
    lse = jnp.where(l == 0, -jnp.inf, m_safe + jnp.log(l_safe)).reshape(B, bq, H)
    probs = lax.stop_gradient(p / l_safe[..., None]).mean((2, 3))
    return out.astype(q_b.dtype), lse, probs


def sparse_attention(q_BTHD, k_BSKD, v_BSKD, idx_BTk, valid_BTk, *, q_pos_BT, kv_pos_BS, bias: Bias | None = None,
                     bias_params_HP=None, scale=None, block_q: int | None = None, return_probs: bool = False):
    """Attention of each query to its selected keys; returns (out_BTHD, lse_BTH), lse -inf where nothing is valid.

    `idx_BTk` (int) indexes the key axis; `valid_BTk` (bool) marks real
    selections (a query with fewer than k visible keys has fewer valid ones).
    Visibility is the selector's job: every valid index is attended to; `bias`
    (with bias_params_HP [H, P], see `masks.Bias`) is added to the logits.
    `block_q` None sizes blocks by `default_block_q`. `return_probs` adds the
    attention probabilities at the selected keys averaged over heads ([B, T, k],
    stop-gradient): what DSA's indexer KL needs, so that it does not gather and
    score the selected keys a second time.
    """
    B, T, S, H, K, D = check_qkv(q_BTHD, k_BSKD, v_BSKD, bias, bias_params_HP)
    if idx_BTk.shape != valid_BTk.shape or idx_BTk.shape[:2] != (B, T):
        raise ValueError(f"idx {idx_BTk.shape} / valid {valid_BTk.shape} must both be ({B}, {T}, k)")
    if q_pos_BT.shape != (B, T) or kv_pos_BS.shape != (B, S):
        raise ValueError(f"q_pos {q_pos_BT.shape} / kv_pos {kv_pos_BS.shape} must be ({B}, {T}) / ({B}, {S})")
    if block_q is None:
        block_q = default_block_q(idx_BTk.shape[-1], K, D, v_BSKD.shape[-1], jnp.dtype(k_BSKD.dtype).itemsize)
    if not isinstance(block_q, int) or block_q <= 0:
        raise ValueError(f"block_q must be a positive int or None, got {block_q!r}")
    scale = float(D**-0.5 if scale is None else scale)
    params = head_params(bias_params_HP, K, lambda x_KG: x_KG[None, None, :, :, None])
    idx = jnp.clip(idx_BTk.astype(jnp.int32), 0, S - 1)

    blocks, unblock = query_blocks(T, block_q)
    body = jax.checkpoint(functools.partial(_block, k=k_BSKD, v=v_BSKD, kv_pos=kv_pos_BS.astype(jnp.int32),
                                            bias=bias, params=params, scale=scale))
    out, lse, probs = lax.map(lambda a: body(*a), (blocks(q_BTHD), blocks(idx), blocks(valid_BTk),
                                                   blocks(q_pos_BT.astype(jnp.int32))))
    out, lse = unblock(out), unblock(lse)
    return (out, lse, unblock(probs)) if return_probs else (out, lse)
