"""The real TPU compiler, Mosaic included, on this CPU host: kernels, a ring step and train steps for two generations.

With libtpu installed (the `tpu` extra and the dev set-up), `lc_jax.aot` describes a
TPU slice that is not here and compiles for it. Each test compiles for a v5e and a
v5p slice of 4 chips, so that what one generation's compiler rejects (tiling, VMEM,
DMA shapes) fails here, not on the first day on a pod. Shapes are small: a compile
takes seconds, the file about two minutes. Compile-only: nothing runs, so values are
checked elsewhere (interpret mode against the references).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lc_jax import aot
from lc_jax import config as config_lib
from lc_jax.config import ConfigError
from pallas_kernels import ring_attention, sparse_attention_tpu
from pallas_kernels.flash_attention import tpu as flash_tpu
from pallas_kernels.flash_attention.masks import ALIBI, Mask

pytest.importorskip("libtpu", reason="deviceless TPU compilation needs libtpu (pip install -e '.[dev]')")

SLICES = ("v5e:2x2", "v5p:2x2x1")


@functools.cache
def _devices(topology: str):
    return aot.topology_devices(topology)


@pytest.fixture(params=SLICES)
def chip(request):
    """One chip of the slice (a kernel is a per-device program), axis 'x'."""
    return jax.sharding.Mesh(np.asarray(_devices(request.param)[:1]), ("x",))


@pytest.fixture(params=SLICES)
def mesh(request):
    """The slice's 4 chips, axis 'x'."""
    return jax.sharding.Mesh(np.asarray(_devices(request.param)), ("x",))


def _compile(mesh, fn, *shapes, spec=None):
    """Compile `jax.jit(fn)` for the mesh's TPU from abstract inputs sharded by `spec`; returns the compiled text."""
    sharding = NamedSharding(mesh, P() if spec is None else spec)
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).compile()
    return compiled.as_text()


def _pos(T):
    return np.broadcast_to(np.arange(T, dtype=np.int32), (1, T))


def test_flash_kernel_forward_and_backward(chip):
    # 512-wide blocks (the configs' choice), GQA, packed documents, a window, chunks (not a power of two: a real
    # integer division), ALiBi and soft-capping.
    T, H, K, D = 2048, 4, 2, 128
    pos, seg = _pos(T), (np.arange(T, dtype=np.int32) // 700)[None]
    slopes = np.full((H,), 0.05, np.float32)

    def loss(q, k, v):
        out, lse = flash_tpu.attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, q_seg_BT=seg, kv_seg_BS=seg,
                                       mask=Mask(window=1500, chunk=1000), bias=ALIBI,
                                       bias_params_HP=slopes[:, None], logits_soft_cap=30.0,
                                       block_sizes=flash_tpu.BlockSizes(512, 512))
        return out.astype(jnp.float32).sum() + lse.sum()

    text = _compile(chip, jax.grad(loss, argnums=(0, 1, 2)), ((1, T, H, D), jnp.bfloat16),
                    ((1, T, K, D), jnp.bfloat16), ((1, T, K, D), jnp.bfloat16))
    for kernel in ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"):
        assert kernel in text, kernel


def test_sparse_kernel_forward_and_backward(chip):
    # DSA's shapes: MQA with 16 heads of 576 (DeepSeek's latent attention), 256 selected keys per query.
    T, S, H, K, D, k = 16, 512, 16, 1, 576, 256
    q_pos, kv_pos = _pos(T) + (S - T), _pos(S)
    rng = np.random.default_rng(0)
    idx = np.stack([rng.permutation(S - T + t + 1)[:k] for t in range(T)])[None].astype(np.int32)
    valid = np.ones_like(idx, dtype=bool)

    def loss(q, kk, v):
        out, lse = sparse_attention_tpu.sparse_attention(q, kk, v, idx, valid, q_pos_BT=q_pos, kv_pos_BS=kv_pos)
        return out.astype(jnp.float32).sum() + lse.sum()

    text = _compile(chip, jax.grad(loss, argnums=(0, 1, 2)), ((1, T, H, D), jnp.bfloat16),
                    ((1, S, K, D), jnp.bfloat16), ((1, S, K, D), jnp.bfloat16))
    assert "sparse_attention_fwd" in text and "sparse_attention_bwd" in text


def test_ring_step_with_the_pallas_kernel(mesh):
    # Forward and backward of ring attention over the 4 chips, the TPU kernel per ring step; positions are an
    # input (sharded like the tokens), as the training step passes them.
    T, H, K, D = 4 * 1024, 4, 2, 128
    spec = P(None, "x")

    def loss(q, k, v, pos):
        def local(q, k, v, pos):
            out, lse = ring_attention.ring_attention(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, axis_name="x",
                                                     kernel="pallas", block_sizes=flash_tpu.BlockSizes(512, 512))
            return out, lse

        out, lse = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec, spec))(q, k, v, pos)
        return out.astype(jnp.float32).sum() + lse.sum()

    text = _compile(mesh, jax.grad(loss, argnums=(0, 1, 2)), ((1, T, H, D), jnp.bfloat16),
                    ((1, T, K, D), jnp.bfloat16), ((1, T, K, D), jnp.bfloat16), ((1, T), jnp.int32), spec=spec)
    assert "flash_attention_fwd" in text and "collective-permute" in text


@pytest.mark.parametrize("topology", SLICES)
def test_tiny_train_step(topology):
    # The 1B config's structure at toy size: FSDP x 2-chip ring, remat, Pallas kernels, the optimizer update.
    c = config_lib.load("configs/tpu/llama1b_32k.py", "local=1")
    report, compiled = aot.compile_train_step(c, _devices(topology), name="llama1b_32k:local", topology=topology)
    assert report.fits and report.mesh["context"] == 2 and report.mesh["fsdp"] == 2
    text = compiled.as_text()
    assert "flash_attention_fwd" in text and "flash_attention_dkv" in text and "callback" not in text
    # The state is sharded: each chip holds half the parameters and AdamW moments (f32: 4 + 8 bytes each).
    assert report.bytes["arguments"] < 0.6 * 12 * report.params
    assert report.bytes["total"] == sum(report.bytes[t] for t in aot.TERMS)
    # A train step holds activations and gradients beside its state: the fit check must count them.
    assert report.bytes["temporaries"] > 0


def test_gemma3_pattern_train_step_with_sink_tokens():
    # The Gemma-3-shaped config's structure at toy size (five window layers to one global, 2-chip ring),
    # its window layers also keeping 4 sink tokens: Mosaic must lower the mask's sink term, and each layer
    # type runs its own ring.
    c = config_lib.load("configs/tpu/gemma3_1b_128k.py", "local=1")
    c.model.layers.types.local.attention.sink_tokens = 4
    report, compiled = aot.compile_train_step(c, _devices("v5p:2x2x1"), name="gemma3_1b_128k:local")
    assert report.fits and report.mesh["context"] == 2
    text = compiled.as_text()
    assert "flash_attention_fwd" in text and "collective-permute" in text and "callback" not in text


def test_dsa_train_step_runs_its_kernel_per_device():
    # DSA's sparse stage on 4 chips of fsdp: its Pallas kernel must run per device (shard_map); XLA
    # cannot partition a Mosaic kernel.
    c = config_lib.load("configs/tpu/dsa1b_32k.py", "local=1")
    report, compiled = aot.compile_train_step(c, _devices("v5p:2x2x1"), name="dsa1b_32k:local", stage="sparse")
    assert report.stage == "sparse" and report.fits
    assert "sparse_attention_fwd" in compiled.as_text()


def test_blocks_mosaic_rejects_are_config_errors():
    # Mosaic refuses these blocks for lack of VMEM (fwd+bwd at head_dim 128, bf16; libtpu 0.0.42):
    # the estimate must refuse them too, and validation must say so before anything is traced.
    for chip, (bq, bk) in (("v5p:2x2x1", (4096, 2048)), ("v5e:2x2", (4096, 4096))):
        vmem = aot.chip_info(jax.sharding.Mesh(np.asarray(_devices(chip)[:1]), ("x",)))["vmem_bytes"]
        with pytest.raises(ValueError, match=f"block_q={bq}, BlockSizes.block_k={bk}"):
            flash_tpu.check_vmem(bq, bk, 128, 128, 2, vmem)
    c = config_lib.load("configs/tpu/llama1b_32k.py", "local=1")
    c.model.attention.update(block_q=4096, block_k=2048)
    with pytest.raises(ConfigError, match=r"model.attention.block_q=4096, model.attention.block_k=2048: .* VMEM"):
        aot.compile_train_step(c, _devices("v5p:2x2x1"))


def test_vmem_estimate_bounds_mosaic(chip):
    # The largest blocks the estimate allows on this chip compile: the bound is not below Mosaic's need.
    with jax.set_mesh(chip):
        vmem = flash_tpu.chip_vmem()
    allowed = [(q, k) for q in (512, 1024, 2048) for k in (512, 1024, 2048)
               if max(flash_tpu.vmem_estimate(q, k, 128, 128, 2).values()) <= flash_tpu.vmem_limit(vmem)]
    bq, bk = max(allowed, key=lambda qk: qk[0] * qk[1])
    T = 2 * max(bq, bk)

    def loss(q, k, v):
        out, _ = flash_tpu.attention(q, k, v, q_pos_BT=_pos(T), kv_pos_BS=_pos(T),
                                     block_sizes=flash_tpu.BlockSizes(bq, bk))
        return out.astype(jnp.float32).sum()

    _compile(chip, jax.grad(loss, argnums=(0, 1, 2)), *[((1, T, 2, 128), jnp.bfloat16)] * 3)


def test_a_step_over_hbm_is_one_clear_line(capsys):
    # 64 x 16K tokens of a 2048-wide model without remat cannot fit a 16 GiB v5e chip.
    c = config_lib.load("configs/tpu/llama1b_32k.py", "local=1")
    c.model.update(d_model=2048, num_heads=16, num_kv_heads=8, mlp_dim=8192, remat="none", max_seq_len=16384)
    c.data.update(batch_size=64, seq_len=16384)
    code = aot.run(c, name="too_big", topology="v5e:2x2")
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert out[-1].startswith("does not fit:") and "over by" in out[-1] and "GiB" in out[-1]
