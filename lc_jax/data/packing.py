"""Turn documents into fixed-length training sequences with segment ids and per-document positions.

`concat`: documents (each wrapped in BOS ... EOS) are concatenated in a seeded
order and cut every `seq_len` tokens; a sequence may hold several documents and
their segment ids keep attention inside each. `pad`: each document is cut into
its own chunks and the last is padded, so no sequence mixes documents.

Positions restart at every document start and at every sequence start, so a
position is exactly the amount of context the token has. A target counts in the
loss only if it belongs to the same document as its input.

`stride` (concat only, for evaluation) turns the chunks into sliding windows:
window i starts at i * stride, and only its last `stride` targets count (all of
the first window's), so every target is scored once, with at least
seq_len - stride tokens of context unless its document started later.
"""

from __future__ import annotations

import numpy as np

from lc_jax.data import tokenizer
from lc_jax.data.corpus import DataError

PACKINGS = ("concat", "pad")


class PackedSequences:
    """Random-access source of examples (grain MapDataset-compatible: __len__ and __getitem__)."""

    def __init__(self, docs: list[bytes], *, seq_len: int, packing: str = "concat", seed: int = 0,
                 stride: int | None = None):
        if packing not in PACKINGS:
            raise ValueError(f"data.packing={packing!r} is not one of {PACKINGS}")
        if stride is not None and (packing != "concat" or not 1 <= stride <= seq_len):
            raise ValueError(f"stride={stride!r}: sliding windows need packing='concat' and 1 <= stride <= "
                             f"seq_len={seq_len}")
        self.seq_len, self.packing = seq_len, packing
        self.stride = stride or seq_len
        order = np.random.default_rng(seed).permutation(len(docs))
        pieces = [np.concatenate([[tokenizer.BOS], tokenizer.encode(docs[i]), [tokenizer.EOS]]) for i in order]
        lengths = np.array([len(p) for p in pieces])
        self.tokens = np.concatenate(pieces).astype(np.uint16)
        self.doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        if packing == "concat":
            self._num = (len(self.tokens) - 1 - seq_len) // self.stride + 1 if len(self.tokens) > seq_len else 0
        else:  # chunk starts (stride seq_len) inside each document, with at least one target each
            starts = [s + off for s, n in zip(self.doc_starts, lengths) for off in range(0, n - 1, seq_len)]
            self.chunk_starts = np.asarray(starts, np.int64)
            self._num = len(starts)
        if self._num == 0:
            raise DataError(f"the documents hold {len(self.tokens)} tokens, too few for one sequence of "
                            f"data.seq_len={seq_len}")

    def __len__(self) -> int:
        return self._num

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        L = self.seq_len
        start = int(i) * self.stride if self.packing == "concat" else int(self.chunk_starts[i])
        idx = np.arange(start, start + L + 1)
        doc = np.searchsorted(self.doc_starts, np.minimum(idx, len(self.tokens) - 1), side="right") - 1
        valid = idx < len(self.tokens)
        if self.packing == "pad":
            valid &= doc == doc[0]
        tok = np.where(valid, self.tokens[np.minimum(idx, len(self.tokens) - 1)], tokenizer.PAD)
        seg = np.where(valid, doc - doc[0] + 1, 0).astype(np.int32)
        pos = idx - np.maximum(self.doc_starts[doc], start)
        pos = np.where(valid, pos, 0).astype(np.int32)
        loss_mask = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)
        if i > 0 and self.stride < L:  # earlier windows scored the first L - stride targets
            loss_mask[: L - self.stride] = False
        return {
            "inputs": tok[:-1].astype(np.int32),
            "targets": tok[1:].astype(np.int32),
            "positions": pos[:-1],
            "segment_ids": seg[:-1],
            "loss_mask": loss_mask.astype(np.float32),
        }
