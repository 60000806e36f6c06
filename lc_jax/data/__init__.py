"""Data pipelines (grain): documents -> packed sequences -> shuffled, sharded, batched iterators."""

from __future__ import annotations

import grain

from lc_jax.data import corpus, packing, synthetic, tokenizer  # noqa: F401
from lc_jax.data.stages import curriculum  # noqa: F401
from lc_jax.data.synthetic import TASKS, check_config  # noqa: F401


def documents(d, split: str, max_docs: int = 0) -> list[bytes]:
    """The documents of one split of `d` (`config.data`): its source, files and validation split."""
    return corpus.load_documents(source=d.source, split=split, val_fraction=d.val_fraction, files=d.files,
                                 jsonl_field=d.jsonl_field, max_docs=max_docs, val_files=d.get("val_files", ""))


def check(d, batch_size: int) -> None:
    """Fail early, with a `corpus.DataError`, on data that cannot make a run: no file, no document in a split,
    or a validation split with fewer than `batch_size` sequences."""
    documents(d, "train", d.max_docs)
    if len(make_dataset(d, split="validation", batch_size=batch_size, seed=0)) == 0:
        raise corpus.DataError(
            f"the validation split has fewer than data.batch_size={batch_size} sequences of data.seq_len="
            f"{d.seq_len} tokens; raise data.val_fraction (now {d.val_fraction})"
            + (", name validation files in data.val_files" if d.source == "files" else "")
            + " or lower data.batch_size")


def make_dataset(d, *, split: str, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
    """`d` is `config.data`. Train: shuffled each epoch, repeated forever. Validation: one ordered pass.

    Each process takes a strided shard of the examples before batching, so
    `batch_size` here is the per-process batch. With `data.synthetic.ratio` > 0 that share of
    the examples (both splits, each with its own seed) is replaced by the synthetic task, and
    every example carries `answer_mask` and `key_position` too (see `synthetic`).
    """
    docs = documents(d, split, d.max_docs)
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
