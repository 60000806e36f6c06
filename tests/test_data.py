import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lc_jax.data import corpus, make_dataset, packing, tokenizer

# The two splits of the stdlib corpus, each as the sha1 of its documents in order, from a fresh interpreter
# (argv[1]: corpus.py, loaded alone: lc_jax.data's imports pull in jax, seconds of start-up).
_SPLIT_DIGESTS = """
import hashlib, importlib.util, sys
spec = importlib.util.spec_from_file_location("corpus", sys.argv[1])
corpus = importlib.util.module_from_spec(spec)
spec.loader.exec_module(corpus)
for split in ("train", "validation"):
    docs = corpus.load_documents(source="stdlib", split=split, val_fraction=0.05)
    print(hashlib.sha1(repr([hashlib.sha1(d).digest() for d in docs]).encode()).hexdigest())
"""


def _digest(docs):
    return hashlib.sha1(repr([hashlib.sha1(d).digest() for d in docs]).encode()).hexdigest()


def test_stdlib_split_is_deterministic_and_disjoint(monkeypatch):
    """The split is by document name (a path under the stdlib): every named document lands in exactly one
    split, and both splits are the same in another process (another PYTHONHASHSEED: no `hash()` of names).
    Contents are not compared: the stdlib holds byte-identical files under different names."""
    train = corpus.load_documents(source="stdlib", split="train", val_fraction=0.05)
    val = corpus.load_documents(source="stdlib", split="validation", val_fraction=0.05)
    assert len(train) > 500 and len(val) > 10
    assert corpus.load_documents(source="stdlib", split="train", val_fraction=0.05) == train
    assert corpus.load_documents(source="stdlib", split="validation", val_fraction=0.05) == val
    seed = str(int(os.environ.get("PYTHONHASHSEED") or 0) + 1)  # not this process's seed
    out = subprocess.run([sys.executable, "-c", _SPLIT_DIGESTS, corpus.__file__], capture_output=True, text=True,
                         check=True, cwd=Path(corpus.__file__).parents[2], env={**os.environ, "PYTHONHASHSEED": seed})
    assert out.stdout.split() == [_digest(train), _digest(val)], "the split differs in another process"
    # Which names went where: the same corpus with each document tagged by its name, so that every document
    # returned says which one it is (empty files stay empty: they are dropped).
    named = corpus._stdlib_docs()
    tagged = tuple((n, d and n.encode() + b"\n" + d) for n, d in named)
    monkeypatch.setattr(corpus, "_stdlib_docs", lambda: tagged)
    names = {split: [d.split(b"\n", 1)[0].decode()
                     for d in corpus.load_documents(source="stdlib", split=split, val_fraction=0.05)]
             for split in ("train", "validation")}
    assert [len(v) for v in names.values()] == [len(train), len(val)]
    for split, got in names.items():
        assert len(set(got)) == len(got), f"a document twice in the {split} split"
    assert not set(names["train"]) & set(names["validation"]), "a document in both splits"
    assert set(names["train"]) | set(names["validation"]) == {n for n, d in named if d}, "a document in neither"


def test_concat_packing_segments_positions_and_mask():
    docs = [b"a" * 5, b"bb" * 4, b"c" * 30]
    ps = packing.PackedSequences(docs, seq_len=16, packing="concat", seed=0)
    flat = np.concatenate([ps[i]["inputs"] for i in range(len(ps))])
    assert (flat == tokenizer.BOS).sum() == 3
    for i in range(len(ps)):
        ex = ps[i]
        seg, pos, inp, tgt, mask = (ex[k] for k in ("segment_ids", "positions", "inputs", "targets", "loss_mask"))
        assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
        starts = np.flatnonzero(np.diff(seg, prepend=0))  # first token of each segment in this sequence
        for s, e in zip(starts, list(starts[1:]) + [len(seg)]):
            assert np.array_equal(pos[s:e], np.arange(e - s)), "positions restart per document"
        # BOS only ever starts a segment, and an input never predicts across a document boundary.
        assert np.all(pos[inp == tokenizer.BOS] == 0)
        assert not np.any(mask.astype(bool) & (tgt == tokenizer.BOS))
        np.testing.assert_array_equal(ps[i]["targets"][:-1], inp[1:])


@pytest.mark.parametrize("stride", [1, 5, 16])
def test_sliding_windows_score_every_target_once(stride):
    """Evaluation windows every `stride` tokens: the scored targets tile the stream, each with >= L - S context."""
    L, docs = 16, [b"a" * 5, b"bb" * 20, b"c" * 60, b"d" * 9]
    ps = packing.PackedSequences(docs, seq_len=L, packing="concat", seed=0, stride=stride)
    chunks = packing.PackedSequences(docs, seq_len=L, packing="concat", seed=0)
    scored = []
    for i in range(len(ps)):
        ex = ps[i]
        np.testing.assert_array_equal(ex["inputs"], ps.tokens[i * stride: i * stride + L])
        for t in np.flatnonzero(ex["loss_mask"]):
            scored.append(i * stride + t)  # stream index of the input whose next token is scored
            doc_start = ps.doc_starts[np.searchsorted(ps.doc_starts, i * stride + t, side="right") - 1]
            assert ex["positions"][t] >= min(L - stride, i * stride + t - doc_start) if i else True
    assert len(scored) == len(set(scored)), "a target was scored twice"
    # The same targets as the non-overlapping chunks over the covered stream: nothing skipped.
    end = (len(ps) - 1) * stride + L
    want = [i * L + t for i in range(len(chunks)) for t in np.flatnonzero(chunks[i]["loss_mask"]) if i * L + t < end]
    assert sorted(scored)[: len(want)] == want and all(s < end for s in scored)
    with pytest.raises(ValueError, match="stride"):
        packing.PackedSequences(docs, seq_len=L, packing="concat", stride=L + 1)


def test_pad_packing_keeps_documents_apart():
    docs = [b"x" * 20, b"y" * 3]
    ps = packing.PackedSequences(docs, seq_len=16, packing="pad", seed=0)
    for i in range(len(ps)):
        ex = ps[i]
        real = ex["segment_ids"] > 0
        assert set(np.unique(ex["segment_ids"][real])) == {1}
        assert np.all(ex["inputs"][~real] == tokenizer.PAD) and np.all(ex["loss_mask"][~real] == 0)


def test_iterator_state_round_trip(tiny_config):
    c = tiny_config()
    ds = make_dataset(c.data, split="train", batch_size=2, seed=0)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["inputs"] for _ in range(2)]
    it2 = iter(ds)
    it2.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(it2)["inputs"], e)


def test_process_shards_are_disjoint(tiny_config):
    # Two processes split one stream of sequence windows: process i's j-th example is the one-process
    # stream's example i + 2j (train: after the shared shuffle), so no window, and no token of any
    # document, is read by both, and together they read all of it. Compared by index, not by content:
    # the stdlib holds byte-identical files (Python 3.12), whose windows are equal but distinct.
    c = tiny_config()
    for split in ("validation", "train"):
        whole = make_dataset(c.data, split=split, batch_size=1, seed=0)
        shards = [make_dataset(c.data, split=split, batch_size=1, seed=0, process_index=i, process_count=2)
                  for i in range(2)]
        n = len(whole) // 2 if split == "validation" else 20
        if split == "validation":
            assert len(shards[0]) + len(shards[1]) == len(whole) and n > 0
        for i, shard in enumerate(shards):
            for j in range(n):
                for key, value in shard[j].items():
                    np.testing.assert_array_equal(value, whole[i + 2 * j][key], err_msg=f"{split} {key}")


def test_user_text_and_jsonl_files(tmp_path, tiny_config):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"body": f"document {i} " * 20}) + "\n")
    docs = [d for split in ("train", "validation") for d in corpus.load_documents(
        source="files", files=str(tmp_path / "*"), jsonl_field="body", split=split, val_fraction=0.2)]
    assert len(docs) == 41
    assert any(d.startswith(b"document") for d in docs) and any(d.startswith(b"hello") for d in docs)
    with pytest.raises(corpus.DataError, match="line without data.jsonl_field='text'"):
        corpus._user_docs.cache_clear()
        corpus.load_documents(source="files", files=str(tmp_path / "*.jsonl"), split="train", val_fraction=0.2)
    with pytest.raises(corpus.DataError, match="matches no file"):
        corpus.load_documents(source="files", files=str(tmp_path / "*.nope"), split="train", val_fraction=0.2)
