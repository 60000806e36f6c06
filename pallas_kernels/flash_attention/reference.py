"""Plain attention that materialises the [T, S] scores: the ground truth for every kernel.

Gradients come from JAX autodiff. Rows with no visible key output zeros and a
log-sum-exp of -inf (every implementation follows this convention).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.flash_attention.masks import CAUSAL, Bias, Mask, head_params, scores


def attention(
    q_BTHD,
    k_BSKD,
    v_BSKD,
    *,
    q_pos_BT,
    kv_pos_BS,
    q_seg_BT=None,
    kv_seg_BS=None,
    mask: Mask = CAUSAL,
    bias: Bias | None = None,
    bias_params_HP=None,
    scale=None,
    logits_soft_cap=None,
):
    """Returns (out_BTHD, lse_BTH)."""
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    G = H // K
    scale = D**-0.5 if scale is None else scale
    q_BTKGD = q_BTHD.reshape(B, T, K, G, D)
    s_BKGTS = jnp.einsum(
        "btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32
    ) * scale
    qp_B11T1, kp_B111S = q_pos_BT[:, None, None, :, None], kv_pos_BS[:, None, None, None, :]
    segs = (None, None) if q_seg_BT is None else (q_seg_BT[:, None, None, :, None], kv_seg_BS[:, None, None, None, :])
    params = head_params(bias_params_HP, K, lambda x_KG: x_KG[None, :, :, None, None])
    s_BKGTS, vis_B11TS, _ = scores(s_BKGTS, qp_B11T1, kp_B111S, *segs, params, mask=mask, bias=bias,
                                   soft_cap=logits_soft_cap)
    s_BKGTS = jnp.where(vis_B11TS, s_BKGTS, -jnp.inf)
    m_BKGT = s_BKGTS.max(-1)
    m_BKGT = jnp.where(jnp.isfinite(m_BKGT), m_BKGT, 0.0)
    p_BKGTS = jnp.exp(s_BKGTS - m_BKGT[..., None])
    l_BKGT = p_BKGTS.sum(-1)
    safe_l = jnp.where(l_BKGT == 0, 1.0, l_BKGT)
    out_BKGTD = jnp.einsum(
        "bkgts,bskd->bkgtd", p_BKGTS / safe_l[..., None], v_BSKD.astype(jnp.float32)
    )
    lse_BKGT = jnp.where(l_BKGT == 0, -jnp.inf, m_BKGT + jnp.log(safe_l))
    out_BTHD = out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q_BTHD.dtype)
    lse_BTH = lse_BKGT.transpose(0, 3, 1, 2).reshape(B, T, H)
    return out_BTHD, lse_BTH
