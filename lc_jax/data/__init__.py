"""Data pipelines (grain): documents -> packed sequences -> shuffled, sharded, batched iterators."""

from __future__ import annotations

import grain

from lc_jax.data import corpus, packing, synthetic, tokenizer  # noqa: F401
from lc_jax.data.synthetic import TASKS, check_config  # noqa: F401


def make_dataset(d, *, split: str, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
    """`d` is `config.data`. Train: shuffled each epoch, repeated forever. Validation: one ordered pass.

    Each process takes a strided shard of the examples before batching, so
    `batch_size` here is the per-process batch. With `data.synthetic.ratio` > 0 that share of
    the examples (both splits, each with its own seed) is replaced by the synthetic task, and
    every example carries `answer_mask` and `key_position` too (see `synthetic`).
    """
    docs = corpus.load_documents(source=d.source, split=split, val_fraction=d.val_fraction, files=d.files,
                                 jsonl_field=d.jsonl_field, max_docs=d.max_docs)
    src = packing.PackedSequences(docs, seq_len=d.seq_len, packing=d.packing, seed=seed)
    syn = d.get("synthetic")  # absent in configs saved by older runs
    if syn is not None and syn.ratio > 0:
        src = synthetic.mix_from_config(src, syn, seq_len=d.seq_len, seed=seed, split=split)
    ds = grain.MapDataset.source(src)
    if split == "train":
        ds = ds.shuffle(seed=seed).repeat()
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds.batch(batch_size, drop_remainder=True)


def curriculum(d) -> list[tuple[int, int, int]]:
    """Stages (start step, seq_len, batch size) from `data.curriculum` ('0:512,200:1024,400:2048').

    Empty: one stage at `data.seq_len`. With `data.curriculum_constant_tokens` the batch
    grows as sequences shrink, so every stage sees `batch_size * seq_len` tokens per step.
    """
    if not d.curriculum:
        return [(0, d.seq_len, d.batch_size)]
    stages = []
    for item in d.curriculum.split(","):
        step, _, length = item.partition(":")
        try:
            step, length = int(step), int(length)
        except ValueError:
            msg = f"data.curriculum={d.curriculum!r}: expected 'step:seq_len,...', e.g. '0:512,200:1024'"
            raise ValueError(msg) from None
        batch = d.batch_size * d.seq_len // length if d.curriculum_constant_tokens else d.batch_size
        stages.append((step, length, batch))
    return stages
