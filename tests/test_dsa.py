"""DSA (lc_jax/attention/dsa.py, pallas_kernels/sparse_attention.py): selection, sparse attention, losses, stages.

Tolerances: f32 values 1e-5 and gradients 1e-4 (blockwise sums in another order);
gradient isolation is exact (== 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from kernel_checks import alibi, value_and_vjp

from lc_jax import state as state_lib
from lc_jax import steps
from lc_jax.attention import dsa
from lc_jax.config import ConfigError, validate
from lc_jax.data import make_dataset
from pallas_kernels.flash_attention import reference
from pallas_kernels.flash_attention.masks import Mask
from pallas_kernels.sparse_attention import sparse_attention

B, T, H, K, D, J, DI = 2, 50, 4, 2, 8, 3, 6


def _tensors(seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    q, k, v = (jax.random.normal(ks[0], (B, T, H, D)), jax.random.normal(ks[1], (B, T, K, D)),
               jax.random.normal(ks[2], (B, T, K, D)))
    iq, w, ik = (jax.random.normal(ks[3], (B, T, J, DI)), jax.random.normal(ks[4], (B, T, J)),
                 jax.random.normal(ks[5], (B, T, DI)))
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seg = jnp.broadcast_to((jnp.arange(T) >= 20).astype(jnp.int32), (B, T))
    pos = jnp.where(seg == 1, pos - 20, pos)  # packed: the second document restarts its positions
    return q, k, v, iq, w, ik, dict(q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg)


def _visible(m):
    """The causal, same-document mask [B, T, S] DSA selects within."""
    return Mask().visible(m["q_pos_BT"][:, :, None], m["kv_pos_BS"][:, None, :], m["q_seg_BT"][:, :, None],
                          m["kv_seg_BS"][:, None, :])


def _brute_scores(iq, w, ik, m):
    scores = jnp.einsum("btj,btjs->bts", w, jax.nn.relu(jnp.einsum("btjd,bsd->btjs", iq, ik)))
    return jnp.where(_visible(m), scores, -jnp.inf)


# threshold: every 2nd score sampled, so that rows of 64 (T = 50 padded to key blocks of 16) have a plan for
# k = 1 and 5 (16 and 64: rows too short to sample, plain top_k). The plan's `ok` per query block of these
# inputs: k = 5 keeps 5..17 of every row (cap 20), the sampled path in all 4 blocks; k = 1 has rows where 5
# or 6 scores reach the sampled maximum (cap 4), the top_k fallback in all 4 blocks.
THRESHOLD_SMALL = functools.partial(dsa.threshold_topk, stride=2)
THRESHOLD_PATH = {1: [False] * 4, 5: [True] * 4, 16: [], 64: []}  # ok per query block; [] is no plan


def _record_threshold_plans(monkeypatch) -> list:
    """Patch dsa.threshold_plan to append each query block's `ok` (from the running program) to a list."""
    oks, plan = [], dsa.threshold_plan

    def recording(x, k, **kw):
        p = plan(x, k, **kw)
        if p is not None:
            jax.debug.callback(lambda ok: oks.append(bool(ok)), p[2])
        return p

    monkeypatch.setattr(dsa, "threshold_plan", recording)
    return oks


@pytest.mark.parametrize("select", [dsa.streaming_topk, dsa.host_topk, THRESHOLD_SMALL],
                         ids=["streaming", "host", "threshold"])
@pytest.mark.parametrize("topk", [1, 5, 16, 64])
def test_topk_selection_equals_brute_force(select, topk, monkeypatch):
    """The selected scores are the k largest visible ones (ties, e.g. ReLU zeros, may pick either key)."""
    _, _, _, iq, w, ik, m = _tensors()
    oks = _record_threshold_plans(monkeypatch)
    idx, valid = jax.block_until_ready(
        jax.jit(lambda *a: select(*a, **m, topk=topk, block_q=16, block_k=16))(iq, w, ik))
    jax.effects_barrier()  # the callbacks have run
    if select is THRESHOLD_SMALL:  # the path this case means to test is the one that ran
        assert oks == THRESHOLD_PATH[topk], f"plan ok per query block {oks}, want {THRESHOLD_PATH[topk]}"
    scores = _brute_scores(iq, w, ik, m)
    vals, ref_idx = jax.lax.top_k(scores, min(topk, T))
    ref_valid = jnp.isfinite(vals)
    np.testing.assert_array_equal(np.sort(valid, -1), np.sort(ref_valid, -1))  # fewer than k visible: those only
    picked = np.take_along_axis(np.asarray(scores), np.asarray(idx), -1)
    np.testing.assert_array_equal(np.sort(np.where(valid, picked, -np.inf), -1),
                                  np.sort(np.where(ref_valid, vals, -np.inf), -1))
    assert np.isfinite(picked[np.asarray(valid)]).all()  # every valid pick is visible
    for row, ok in zip(np.asarray(idx).reshape(-1, idx.shape[-1]), np.asarray(valid).reshape(-1, idx.shape[-1])):
        assert len(set(row[ok])) == ok.sum()  # no key twice
    if select is not dsa.host_topk:  # lax.top_k breaks ties by index, as the brute force does
        np.testing.assert_array_equal(np.sort(np.where(valid, idx, -1), -1),
                                      np.sort(np.where(ref_valid, ref_idx, -1), -1))


@pytest.mark.parametrize("case", ["sampled", "fallback"])
def test_row_topk_by_threshold_equals_top_k(case):
    # Rows of 8192 scores with a masked suffix (causal: some rows see fewer than k keys, one sees none) and
    # k = 256. "sampled": random scores, where the threshold keeps between k and 4 k of every row (the plan
    # is ok: at least 390 kept in rows with 256 or more visible keys), so the compacted top_k decides;
    # "fallback": scores rounded to a few integers, whose ties put far more than 4 k at the threshold, so
    # the plan fails and top_k runs over the whole rows. Either way the result must be lax.top_k's.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 8192)).astype(np.float32)
    if case == "fallback":
        x = np.round(x / 2)
    visible = np.arange(8192) < rng.integers(0, 8192, size=(3, 8, 1))
    visible[0, 0], visible[0, 1] = False, np.arange(8192) < 60  # no key; fewer than k
    x = jnp.asarray(np.where(visible, x, -np.inf))
    k = 256
    _, _, ok, _ = dsa.threshold_plan(x, k)
    assert bool(ok) == (case == "sampled")
    vals, idx = (np.asarray(a) for a in jax.jit(dsa.row_topk, static_argnums=1)(x, k))
    want_vals, want_idx = (np.asarray(a) for a in jax.lax.top_k(x, k))
    np.testing.assert_array_equal(np.sort(vals, -1), np.sort(want_vals, -1))
    # The same keys where a score is finite (slots past the visible keys are -inf, their index is not used).
    np.testing.assert_array_equal(np.sort(np.where(vals > -np.inf, idx, -1), -1),
                                  np.sort(np.where(want_vals > -np.inf, want_idx, -1), -1))


def test_select_threshold_is_the_config_value_for_threshold_topk():
    # model.attention.dsa.select='threshold' reaches threshold_topk (rows of 64 here: plain top_k inside).
    _, _, _, iq, w, ik, m = _tensors()
    kw = dict(**m, topk=5, block_q=16, block_k=16)
    got = jax.jit(lambda *a: dsa.select_topk(*a, impl="threshold", **kw))(iq, w, ik)
    want = jax.jit(lambda *a: dsa.streaming_topk(*a, **kw))(iq, w, ik)
    for g, w_ in zip(got, want):
        np.testing.assert_array_equal(np.sort(g, -1), np.sort(w_, -1))


def test_select_impl_names_the_allowed_values():
    _, _, _, iq, w, ik, m = _tensors()
    with pytest.raises(ValueError, match="dsa.select='gpu'.*auto"):
        dsa.select_topk(iq, w, ik, impl="gpu", **m, topk=4)


def test_sparse_attention_with_k_at_least_T_equals_full_attention():
    q, k, v, iq, w, ik, m = _tensors()
    slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625], jnp.float32)
    idx, valid = dsa.streaming_topk(iq, w, ik, **m, topk=T, block_q=16, block_k=16)

    def sparse(q, k, v):
        return sparse_attention(q, k, v, idx, valid, q_pos_BT=m["q_pos_BT"], kv_pos_BS=m["kv_pos_BS"],
                                **alibi(slopes), block_q=16)

    rng = np.random.default_rng(3)
    do, dlse = (jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in (q.shape, q.shape[:3]))
    out, lse, grads = value_and_vjp(sparse, q, k, v, do, dlse)
    ref = lambda q, k, v: reference.attention(q, k, v, **m, **alibi(slopes))  # noqa: E731
    out_r, lse_r, grads_r = value_and_vjp(ref, q, k, v, do, dlse)
    np.testing.assert_allclose(out, out_r, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, lse_r, atol=1e-5, rtol=1e-5)
    for g, g_r in zip(grads, grads_r):
        np.testing.assert_allclose(g, g_r, atol=1e-4, rtol=1e-4)


def test_dense_and_sparse_kl_match_brute_force():
    q, k, v, iq, w, ik, m = _tensors()
    _, lse = reference.attention(q, k, v, **m)
    mask = _visible(m)
    s = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, H // K, 2)) * D**-0.5
    p = jnp.where(mask[:, None], jax.nn.softmax(jnp.where(mask[:, None], s, -jnp.inf), -1), 0).mean(1)

    def brute(iq):
        logq = jax.nn.log_softmax(_brute_scores(iq, w, ik, m), -1)
        return jnp.where(mask, p * (jnp.log(jnp.where(p > 0, p, 1)) - jnp.where(mask, logq, 0)), 0).sum(-1)

    brute = jax.jit(brute)  # each function one program (op by op, dozens of compiles)
    grad_of = lambda f: jax.jit(jax.grad(lambda a: f(a).sum()))  # noqa: E731
    kl = jax.jit(lambda iq: dsa.dense_kl(q, k, lse, iq, w, ik, **m, block_q=16, block_k=16))
    np.testing.assert_allclose(kl(iq), brute(iq), atol=1e-5)
    np.testing.assert_allclose(grad_of(kl)(iq), grad_of(brute)(iq), atol=1e-4)
    idx, valid = dsa.streaming_topk(iq, w, ik, **m, topk=T, block_q=16, block_k=16)
    sparse = dsa.sparse_kl(q, k, lse, iq, w, ik, idx, valid, q_pos_BT=m["q_pos_BT"], kv_pos_BS=m["kv_pos_BS"],
                           block_q=16)
    np.testing.assert_allclose(sparse, brute(iq), atol=1e-5)
    # The probabilities the sparse attention returns are p at the selected keys, and give the same KL and gradient.
    *_, probs = sparse_attention(q, k, v, idx, valid, q_pos_BT=m["q_pos_BT"], kv_pos_BS=m["kv_pos_BS"],
                                 return_probs=True)
    np.testing.assert_allclose(np.where(valid, probs, 0), np.take_along_axis(np.asarray(p), np.asarray(idx), -1)
                               * np.asarray(valid), atol=1e-6)
    kl_p = jax.jit(lambda iq: dsa.sparse_kl(q, k, None, iq, w, ik, idx, valid, q_pos_BT=m["q_pos_BT"],
                                            kv_pos_BS=m["kv_pos_BS"], probs_BTk=probs))
    np.testing.assert_allclose(kl_p(iq), brute(iq), atol=1e-5)
    np.testing.assert_allclose(grad_of(kl_p)(iq), grad_of(brute)(iq), atol=1e-4)


def _dsa_config(tiny_config, **dsa_fields):
    c = tiny_config("attention=dsa")
    c.model.attention.dsa.update(dict(topk=8, index_heads=2, index_dim=8, index_rope_dim=4, warmup_steps=2,
                                      index_block_q=16, index_block_k=16) | dsa_fields)
    return c


def _grads(c, *, sparse, which):
    model = state_lib.build_model(c)
    graphdef, params = nnx.split(model, nnx.Param)
    batch = next(iter(make_dataset(c.data, split="train", batch_size=2, seed=0)))

    def f(p):
        objective, (_, aux, _) = steps.loss_fn(p, graphdef, batch, stage="sparse" if sparse else "dense")
        return objective if which == "lm" else aux["dsa_kl"][0]

    grads = jax.jit(jax.grad(f))(params)
    labels = state_lib.param_labels(grads, ("indexer",))
    return {lab: [np.abs(np.asarray(g)).max() for g, lab2 in zip(jax.tree.leaves(grads), jax.tree.leaves(labels))
                  if lab2 == lab] for lab in ("main", "indexer")}


@pytest.mark.parametrize("sparse,select", [(False, "xla"), (True, "xla"), (True, "host")])
def test_lm_loss_never_trains_the_indexer_and_kl_only_trains_it(tiny_config, sparse, select):
    c = _dsa_config(tiny_config, select=select)
    lm = _grads(c, sparse=sparse, which="lm")
    assert max(lm["indexer"]) == 0.0 and max(lm["main"]) > 0
    kl = _grads(c, sparse=sparse, which="kl")
    assert max(kl["main"]) == 0.0 and max(kl["indexer"]) > 0


def test_dense_warmup_teaches_the_indexer_where_attention_looks():
    """Train only an indexer on the dense KL against a fixed, peaky (non-local) attention."""
    Bx, Tx, E, Hx, Dx, k = 4, 64, 32, 2, 16, 8
    ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(ks[0], (Bx, Tx, E))
    q = jnp.einsum("bte,ehd->bthd", x, jax.random.normal(ks[1], (E, Hx, Dx)) * E**-0.5 * 2.5)
    kk = jnp.einsum("bte,ehd->bthd", x, jax.random.normal(ks[2], (E, 1, Dx)) * E**-0.5 * 2.5)
    pos = jnp.broadcast_to(jnp.arange(Tx), (Bx, Tx))
    m = dict(q_pos_BT=pos, kv_pos_BS=pos)
    _, lse = reference.attention(q, kk, kk, **m)
    with nnx.use_eager_sharding(False):
        indexer = dsa.Indexer(d_model=E, index_heads=4, index_dim=16, index_rope_dim=0, param_dtype=jnp.float32,
                              rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(indexer, nnx.Param)

    def kl(p):
        iq, w, ik = nnx.merge(graphdef, p)(x, pos)
        return dsa.dense_kl(q, kk, lse, iq, w, ik, **m, block_q=16, block_k=16).mean()

    def recall(p):
        iq, w, ik = nnx.merge(graphdef, p)(x, pos)
        idx, valid = dsa.streaming_topk(iq, w, ik, **m, topk=k, block_q=16, block_k=16)
        d = dsa.mass_diagnostics(q, kk, lse, idx, valid, **m, topk=k, window=k, block_q=16, block_k=16)
        long = d.pop("long")
        return {n: float((v * long).sum() / long.sum()) for n, v in d.items()}

    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(p, opt):
        loss, g = jax.value_and_grad(kl)(p)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    kl0, r0 = float(kl(params)), recall(params)
    for _ in range(150):
        params, opt, _ = step(params, opt)
    kl1, r1 = float(kl(params)), recall(params)
    assert kl1 < 0.3 * kl0
    assert r1["recall"] > r0["recall"] + 0.3
    assert r1["recall"] > r1["recall_window"] + 0.3 and r1["recall"] > r1["recall_random"] + 0.3
    assert r1["recall"] <= r1["recall_oracle"] + 1e-6


def test_frozen_warmup_trains_only_the_indexer_then_both(tiny_config):
    c = _dsa_config(tiny_config, warmup_mode="frozen")
    c.train.warmup_steps = 0
    tx, schedule = state_lib.make_optimizer(c.train, c.model)
    graphdef, params = nnx.split(state_lib.build_model(c), nnx.Param)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "phase_start": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
    batches = iter(make_dataset(c.data, split="train", batch_size=2, seed=0))
    train_steps = {s: steps.make_train_step(graphdef, tx, schedule, stage=s, aux_weights={"dsa_kl": 1.0})
                   for s in ("dense", "sparse")}
    labels = jax.tree.leaves(state_lib.param_labels(params, ("indexer",)))

    def changed(before, after):
        out = {"main": False, "indexer": False}
        for a, b, lab in zip(jax.tree.leaves(before), jax.tree.leaves(after), labels):
            out[lab] |= bool(np.any(np.asarray(a) != np.asarray(b)))
        return out

    for i in range(3):
        before = jax.tree.map(np.asarray, state["params"])
        state, metrics = train_steps["sparse" if i >= 2 else "dense"](state, next(batches))
        assert np.isfinite(float(metrics["dsa_kl"]))
        assert changed(before, state["params"]) == {"main": i >= 2, "indexer": True}


def test_dsa_config_errors(tiny_config):
    c = _dsa_config(tiny_config, warmup_mode="thawed", index_rope_dim=5, select="gpu")
    with pytest.raises(ConfigError) as e:
        validate(c)
    msg = str(e.value)
    assert "model.attention.dsa.select='gpu': allowed values are ['auto', 'xla', 'host', 'threshold']" in msg
    assert "model.attention.dsa.warmup_mode='thawed': allowed values are ['joint', 'frozen']" in msg
    assert "model.attention.dsa.index_rope_dim=5: must be even" in msg
    c = _dsa_config(tiny_config)
    c.mesh.update(data=4, context=2)
    with pytest.raises(ConfigError, match="does not run under context parallelism"):
        validate(c, num_devices=8)
