"""The base config every run starts from.

Usage: `--config configs/base.py:position=alibi,attention=sliding`, then
`--config.model.d_model=1024` style overrides for values. `arg` picks structure
(big_vision convention); plain fields pick values.
"""

from __future__ import annotations

import ml_collections

from lc_jax.config import parse_arg
from lc_jax.positions import rope_scaling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, position="rope", attention="full")
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = dict(
        vocab_size=384,  # 259 byte-level ids, padded to a multiple of 128 for the MXU/tensor cores
        d_model=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        head_dim=0,  # 0: d_model // num_heads
        mlp_dim=1536,
        max_seq_len=8192,
        tie_embeddings=False,
        dtype="bfloat16",
        param_dtype="float32",
        remat="none",  # none | full | dots
        norm_eps=1e-6,
        position=dict(
            name=a.position,
            theta=10000.0,  # rope base
            layout="half",  # rope: half (rotate-half) | interleaved
            fraction=1.0,  # rope: share of each head that rotates
            fraction_mode="rotary_dims",  # rotary_dims (partial RoPE) | p_rope (keep highest frequencies)
            # Context extension (rope only): none | linear | ntk | dynamic_ntk | yarn | yarn_ratio_ramp | llama3
            # (lc_jax/positions/rope_scaling.py; Hugging Face presets: lc_jax.positions.hf.preset).
            # Fields and their meaning: rope_scaling.FIELD_DEFAULTS.
            scaling=dict(rope_scaling.FIELD_DEFAULTS),
        ),
        attention=dict(
            name=a.attention, window=1024, impl="auto", block_q=256, block_k=512,
            # DSA (attention=dsa): a lightning indexer picks each query's top-k keys (lc_jax/attention/dsa.py).
            dsa=dict(
                topk=2048,  # keys per query in the sparse stage (all visible keys when fewer)
                index_heads=4,  # H_I indexer heads
                index_dim=32,  # d_I per indexer head
                index_rope_dim=16,  # leading indexer dims that get RoPE (0: none)
                index_norm="layernorm",  # the indexer key's norm: layernorm (DeepSeek-V3.2) | rmsnorm
                warmup_steps=1000,  # dense warm-up steps (indexer trained by KL); sparse from then on
                warmup_mode="joint",  # joint: LM trains too (from scratch) | frozen: only the indexer trains
                kl_weight=1.0,
                index_block_q=128,  # query block of the blockwise index scores / top-k selection
                # Key block of the index scores. In the streaming top-k (select=xla) each merge runs top_k over
                # k + block_k scores, so long blocks amortise it (32K, k=512, CPU: 1.7x faster than 512).
                index_block_k=4096,
                # Who picks the top-k: auto (host on a single CPU device, else xla) | xla (streaming lax.top_k) |
                # host (numpy introselect in a callback: XLA:CPU's top_k is a serial partial sort; 3x faster).
                select="auto",
                lr=0.0,  # indexer learning rate (0: train.lr)
                weight_decay=0.0,
            ),
        ),
    )
    c.data = dict(
        source="stdlib",  # stdlib | files
        files="",  # glob of .txt/.py/... (one document per file) or .jsonl (one per line)
        jsonl_field="text",
        seq_len=2048,
        batch_size=8,  # global batch
        packing="concat",  # concat | pad
        val_fraction=0.05,
        max_docs=0,  # >0: keep only the first few documents (tests)
        # Length curriculum: 'step:seq_len,...' stages ending at data.seq_len, e.g. '0:512,300:1024,600:2048'.
        curriculum="",
        curriculum_constant_tokens=True,  # shorter stages get proportionally larger batches
        # Synthetic retrieval mixed into the text (lc_jax/data/synthetic.py): task none | passkey | kv_recall |
        # mqar replaces a share `ratio` of examples (validation too, other seed). Depth tasks plant the fact at a
        # depth drawn in [min_depth, max_depth]; min_distance: filler tokens at least between fact and question
        # (mqar: '.' gap before the queries). digits: passkey / kv_recall answer length; mqar_pairs: key-value pairs.
        # jitter: passkey examples end their filler at a random point of its sentence cycle, so that a model
        # cannot solve them by memorising fact-to-question offsets (evaluation uses the standard format).
        synthetic=dict(task="none", ratio=0.0, min_depth=0.0, max_depth=1.0, min_distance=0, digits=5, mqar_pairs=16,
                       jitter=True),
    )
    c.train = dict(
        steps=10_000,
        lr=3e-4,
        min_lr_ratio=0.1,
        warmup_steps=200,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        grad_clip=1.0,
        log_every=10,
        eval_every=500,
        eval_batches=8,
        progress=True,
        # Continued training: start from another run's parameters and step (workdir path); the
        # optimizer and its schedule restart as configured here.
        init_from="",
        init_from_step=0,  # 0: its latest checkpoint
    )
    c.checkpoint = dict(every=500, keep=3)
    # Device mesh; -1: the remaining devices. context > 1 turns attention into ring attention over that
    # axis, with tokens laid out zig-zag (balanced under the causal mask) or contiguous.
    c.mesh = dict(data=-1, fsdp=1, tensor=1, context=1, context_layout="zigzag")
    # Multi-host (jax.distributed): set coordinator_address ('host:port'), num_processes and process_id, or
    # export JAX_COORDINATOR_ADDRESS etc.; auto=True lets JAX detect a TPU pod slice / SLURM / Open MPI.
    # cpu_collectives: 'gloo' for multi-process CPU runs (tests).
    c.distributed = dict(coordinator_address="", num_processes=0, process_id=-1, auto=False, cpu_collectives="")
    c.eval = dict(
        position_buckets=32,
        # How validation text is cut for the loss at each length: 'chunks' (non-overlapping, positions restart
        # at each chunk) or 'sliding' (windows every `stride` tokens, only the new targets scored, so each has at
        # least length - stride tokens of context); stride 0 means half the evaluation length.
        protocol="chunks",
        stride=0,
        # Evaluate with another RoPE scaling than training used ('' keeps the trained one);
        # factor 0 means eval_len / train_len for static methods and 1 for dynamic_ntk.
        position=dict(scaling="", factor=0.0),
        # Extrapolation sweep (python -m lc_jax.evaluate): lengths as multiples of data.seq_len,
        # the RoPE scalings to compare, and a token budget per length.
        length_multipliers=(1, 2, 4, 8),
        scalings=("none", "linear", "ntk", "dynamic_ntk", "yarn"),
        max_tokens=65536,
        # Retrieval (python -m lc_jax.evaluate): tasks from ('passkey', 'kv_recall', 'mqar') on the lengths
        # above x `depths` evenly spaced key depths (MQAR: x `mqar_pairs`), `samples` examples per cell.
        retrieval=dict(tasks=(), depths=5, samples=8, mqar_pairs=(4, 8, 16)),
    )
    return c
