"""Data pipelines (grain): documents -> packed sequences -> shuffled, sharded, batched iterators."""

from __future__ import annotations

import grain

from lc_jax.data import corpus, packing, tokenizer  # noqa: F401


def make_dataset(d, *, split: str, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
    """`d` is `config.data`. Train: shuffled each epoch, repeated forever. Validation: one ordered pass.

    Each process takes a strided shard of the examples before batching, so
    `batch_size` here is the per-process batch.
    """
    docs = corpus.load_documents(source=d.source, split=split, val_fraction=d.val_fraction, files=d.files,
                                 jsonl_field=d.jsonl_field, max_docs=d.max_docs)
    src = packing.PackedSequences(docs, seq_len=d.seq_len, packing=d.packing, seed=seed)
    ds = grain.MapDataset.source(src)
    if split == "train":
        ds = ds.shuffle(seed=seed).repeat()
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds.batch(batch_size, drop_remainder=True)
