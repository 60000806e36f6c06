"""What every `configs/tpu/*` run shares: bf16 compute, full remat, Pallas kernels, FSDP over the rest of the slice.

`local=True` shrinks the model and the lengths to something that compiles in
seconds while keeping every structural choice (mesh axes, attention variant,
kernels), so tests and a laptop can check a TPU config's plumbing end to end.
"""

from __future__ import annotations

import ml_collections

from configs import base


def tpu_config(*, topology: str, attention: str = "full", local: bool = False) -> ml_collections.ConfigDict:
    c = base.get_config(f"attention={attention}")
    c.model.update(dtype="bfloat16", param_dtype="float32", remat="full")
    # 512 x 512 blocks: one 128-wide head's q/k/v blocks and its f32 score tile use ~2 MiB of VMEM, double-buffered.
    c.model.attention.update(impl="pallas", block_q=512, block_k=512)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.train.update(steps=20_000, warmup_steps=1000, log_every=50, eval_every=1000, eval_batches=4, progress=False)
    c.checkpoint.update(every=1000, keep=3)
    # The slice this config is planned for (python -m lc_jax.aot uses it unless --topology says otherwise).
    c.aot = dict(topology=topology)
    if local:
        c.aot.topology = "v5e:2x2"
    return c


def shrink(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The local variant on 4 devices: 2 small layers, 1K tokens per context shard, 128-wide heads kept.

    A config with context parallelism keeps a 2-device ring (fsdp 2); others shard only over fsdp (4).
    """
    ctx = 2 if c.mesh.context > 1 else 1
    c.mesh.update(data=1, fsdp=-1, tensor=1, context=ctx)
    c.model.update(d_model=256, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=128, mlp_dim=512, vocab_size=384)
    c.model.attention.update(block_q=128, block_k=128, window=min(c.model.attention.window, 512))
    c.model.attention.dsa.update(topk=256, index_block_k=512)
    c.data.update(seq_len=1024 * ctx, batch_size=4 // ctx)
    c.model.max_seq_len = c.data.seq_len
    c.model.position.scaling.original_max_len = min(c.model.position.scaling.original_max_len, c.data.seq_len)
    return c
