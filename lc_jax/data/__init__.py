"""Data pipelines (grain): documents -> packed sequences -> shuffled, sharded, batched iterators."""

from __future__ import annotations

import grain

from lc_jax.data import corpus, packing, synthetic, tokenizer  # noqa: F401
from lc_jax.data.stages import curriculum  # noqa: F401
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
