import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lc_jax.model import count_params
from lc_jax.state import build_model
from lc_jax.steps import loss_fn


def _batch(B=2, T=32, vocab=259, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (B, T + 1))
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
        "segment_ids": jnp.ones((B, T), jnp.int32),
        "loss_mask": jnp.ones((B, T), jnp.float32),
    }


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_gqa_param_shapes(tiny_config, kv_heads):
    c = tiny_config(**{"model.num_kv_heads": kv_heads})
    model = build_model(c)
    attn = model.blocks[0].attn
    hd = c.model.d_model // c.model.num_heads
    assert attn.wq.shape == (c.model.d_model, c.model.num_heads, hd)
    assert attn.wk.shape == attn.wv.shape == (c.model.d_model, kv_heads, hd)
    out = model(_batch()["inputs"])
    assert out.shape == (2, 32, c.model.vocab_size) and out.dtype == jnp.float32


def test_params_carry_logical_axes(tiny_config):
    model = build_model(tiny_config())
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert tuple(specs["blocks"][0]["mlp"]["w_gate"].get_value()) == ("embed", "mlp")
    assert tuple(specs["embed"].get_value()) == ("vocab", "embed")


def test_bf16_compute_keeps_f32_params(tiny_config):
    model = build_model(tiny_config(**{"model.dtype": "bfloat16"}))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logits = model(_batch()["inputs"])
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_matches_no_remat(tiny_config, remat):
    batch = _batch()

    def grads(policy):
        model = build_model(tiny_config(**{"model.remat": policy}))
        graphdef, params = nnx.split(model, nnx.Param)
        return jax.jit(jax.grad(lambda p: loss_fn(p, graphdef, batch)[0]))(params)  # one program, not op by op

    for a, b in zip(jax.tree.leaves(grads("none")), jax.tree.leaves(grads(remat))):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_tied_embeddings_have_no_head(tiny_config):
    tied = build_model(tiny_config(**{"model.tie_embeddings": True}))
    untied = build_model(tiny_config())
    assert not hasattr(tied, "head")
    assert count_params(untied) - count_params(tied) == 32 * 259


def test_overfits_fixed_batch(tiny_config):
    c = tiny_config()
    model = build_model(c)
    graphdef, params = nnx.split(model, nnx.Param)
    batch = _batch(T=32)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        loss, g = jax.value_and_grad(lambda p: loss_fn(p, graphdef, batch)[0])(params)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), opt, loss

    first = None
    for _ in range(150):
        params, opt, loss = step(params, opt)
        first = float(loss) if first is None else first
    assert first > 5.0 and float(loss) < 0.5, (first, float(loss))


def test_pallas_impl_trains_like_xla(tiny_config):
    """The TPU Pallas kernel (interpret mode on CPU) inside the model: same loss and gradients as XLA."""
    batch = _batch(B=1, T=128)

    def loss_and_grads(impl):
        c = tiny_config(**{"model.attention.impl": impl, "model.attention.block_q": 128,
                           "model.attention.block_k": 128, "model.max_seq_len": 128})
        graphdef, params = nnx.split(build_model(c), nnx.Param)
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, graphdef, batch)[0]))(params)

    (loss_p, g_p), (loss_x, g_x) = loss_and_grads("pallas"), loss_and_grads("xla")
    assert abs(float(loss_p) - float(loss_x)) < 1e-5
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_x)):
        np.testing.assert_allclose(a, b, atol=1e-5)
