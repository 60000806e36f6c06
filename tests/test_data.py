import json

import numpy as np
import pytest

from lc_jax.data import corpus, make_dataset, packing, tokenizer


def test_stdlib_split_is_deterministic_and_disjoint():
    train = corpus.load_documents(source="stdlib", split="train", val_fraction=0.05)
    val = corpus.load_documents(source="stdlib", split="validation", val_fraction=0.05)
    assert len(train) > 500 and len(val) > 10
    assert not set(train[:200]) & set(val)
    assert corpus.load_documents(source="stdlib", split="validation", val_fraction=0.05) == val


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
