import argparse
from pathlib import Path

import numpy as np
import pytest

from lc_jax.data import check_config, make_dataset, packing, synthetic, tokenizer

KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask", "answer_mask", "key_position")
LONGEST_FILLER_SENTENCE = max(len(s) + 2 for s in synthetic.PASSKEY_FILLER.split(". "))  # with ". "


@pytest.fixture(scope="module")
def haystack():
    """Real text (a stdlib module's source), with a BOS/EOS pair in it like a packed stream."""
    data = tokenizer.encode(Path(argparse.__file__).read_bytes())
    return np.concatenate([data[:20000], [tokenizer.EOS, tokenizer.BOS], data[20000:]]).astype(np.uint16)


def check_layout(ex: dict, seq_len: int):
    """One document from position 0: BOS ... EOS then PAD, segment 1, packing's loss mask."""
    assert tuple(ex) == KEYS
    for k in KEYS[:-1]:
        assert ex[k].shape == (seq_len,), k
    assert ex["key_position"].shape == (1,) and ex["key_position"].dtype == np.int32
    assert ex["loss_mask"].dtype == ex["answer_mask"].dtype == np.float32
    n = int((ex["segment_ids"] > 0).sum())  # document tokens among the inputs
    assert ex["inputs"][0] == tokenizer.BOS and np.all(ex["segment_ids"][:n] == 1)
    assert np.all(ex["inputs"][n:] == tokenizer.PAD) and np.all(ex["positions"][n:] == 0)
    np.testing.assert_array_equal(ex["positions"][:n], np.arange(n))
    np.testing.assert_array_equal(ex["targets"][:-1], ex["inputs"][1:])
    m = int(ex["loss_mask"].sum())  # targets inside the document: up to EOS
    assert ex["targets"][m - 1] == tokenizer.EOS and n in (m, m + 1)  # m + 1: EOS is an input, PAD follows
    np.testing.assert_array_equal(ex["loss_mask"], (np.arange(seq_len) < m).astype(np.float32))
    assert np.all(ex["loss_mask"][ex["answer_mask"] > 0] == 1)


def answer(ex: dict) -> str:
    return tokenizer.decode(ex["targets"][ex["answer_mask"] > 0])


def text_from_key(ex: dict) -> str:
    return tokenizer.decode(ex["inputs"][int(ex["key_position"][0]):])


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_passkey_depth_length_and_answer(depth):
    seq_len = 1024
    ex = synthetic.passkey(np.random.default_rng(3), seq_len, depth)
    check_layout(ex, seq_len)
    assert ex["segment_ids"].all(), "the passkey document fills seq_len exactly"
    key = answer(ex)
    assert len(key) == 5 and key.isdigit()
    fact = f"The pass key is {key}. Remember it. {key} is the pass key. "
    assert text_from_key(ex).startswith(fact)
    text = tokenizer.decode(ex["inputs"])
    assert text.count(fact) == 1 and text.endswith(synthetic.PASSKEY_QUESTION + key)
    filler = seq_len - 1 - len(fact) - len(synthetic.PASSKEY_QUESTION) - len(key)  # all but BOS and EOS
    assert abs(int(ex["key_position"][0]) - 1 - depth * filler) <= LONGEST_FILLER_SENTENCE


def test_passkey_digits_filler_and_short_seq_len():
    ex = synthetic.passkey(np.random.default_rng(0), 300, 0.5, digits=9, filler="Lorem ipsum dolor. ")
    check_layout(ex, 300)
    assert len(answer(ex)) == 9 and "Lorem ipsum" in tokenizer.decode(ex["inputs"])
    need = 1 - synthetic.passkey_filler_length(1, 5)
    synthetic.passkey(np.random.default_rng(0), need, 0.5)
    with pytest.raises(ValueError, match=f"seq_len={need - 1} is too short.*seq_len >= {need}"):
        synthetic.passkey(np.random.default_rng(0), need - 1, 0.5)
    with pytest.raises(ValueError, match="depth=1.5"):
        synthetic.passkey(np.random.default_rng(0), 300, 1.5)


def test_passkey_phase_and_jitter():
    """The filler may end anywhere in its sentence cycle; jitter draws where, so fact-to-question offsets vary."""
    unit = synthetic.PASSKEY_FILLER
    for phase in (0, 1, 17, len(unit) - 1):
        ex = synthetic.passkey(np.random.default_rng(3), 400, 0.5, phase=phase)
        check_layout(ex, 400)
        text = tokenizer.decode(ex["inputs"])
        before = text[: -len(synthetic.PASSKEY_QUESTION) - 5]  # the document up to the question
        assert (unit * 8).endswith(before[-40:] + unit[len(unit) - phase:]), phase
    assert tokenizer.decode(synthetic.passkey(np.random.default_rng(3), 400, 0.5)["inputs"]).count(
        ". What is the pass key?") == 1
    with pytest.raises(ValueError, match=f"phase={len(unit)} must be an int in"):
        synthetic.passkey(np.random.default_rng(0), 400, 0.5, phase=len(unit))
    gaps = set()
    for seed in range(20):
        ex = synthetic.passkey(np.random.default_rng(seed), 400, 0.3, jitter=True)
        check_layout(ex, 400)
        gaps.add(400 - int(ex["key_position"][0]))
    assert len(gaps) >= 10, "jitter should vary the distance from the fact to the question"


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.6, 1.0])
def test_kv_recall_depth_length_and_answer(haystack, depth):
    seq_len = 2048
    ex = synthetic.kv_recall(np.random.default_rng(7), seq_len, depth, haystack)
    check_layout(ex, seq_len)
    assert ex["segment_ids"].all()
    value = answer(ex)
    assert len(value) == 5 and value.isdigit()
    text = tokenizer.decode(ex["inputs"])
    key = text.rsplit("What is the secret value for key '", 1)[1].split("'", 1)[0]
    fact = f"The secret value for key '{key}' is {value}.\n"
    assert len(key) == 4 and text_from_key(ex).startswith(fact) and text.count(fact) == 1
    assert text.endswith(f"\nWhat is the secret value for key '{key}'? {value}")
    # The text around the fact is one contiguous window of the haystack (specials became newlines).
    kp = int(ex["key_position"][0])
    question = f"\nWhat is the secret value for key '{key}'? "
    filler = seq_len - 1 - len(fact) - len(question) - len(value)
    window = np.concatenate([ex["inputs"][1:kp], ex["inputs"][kp + len(fact): 1 + len(fact) + filler]])
    assert len(window) == filler
    hay = np.where(haystack >= 256, ord("\n"), haystack).astype(np.uint8).tobytes()
    assert hay.find(window.astype(np.uint8).tobytes()) >= 0
    assert abs(kp - 1 - depth * filler) <= len(fact), "snapped to a line start at most one sentence away"


def test_kv_recall_errors(haystack):
    with pytest.raises(ValueError, match="haystack_tokens has 100 tokens"):
        synthetic.kv_recall(np.random.default_rng(0), 1024, 0.5, haystack[:100])
    with pytest.raises(ValueError, match="seq_len=50 is too short"):
        synthetic.kv_recall(np.random.default_rng(0), 50, 0.5, haystack)


@pytest.mark.parametrize("task", ["passkey", "kv_recall"])
def test_min_distance(task, haystack):
    seq_len, min_distance = 1024, 600
    kw = {"haystack_tokens": haystack} if task == "kv_recall" else {}
    gen = synthetic.GENERATORS[task]
    for seed in range(20):  # depth=None draws a depth that satisfies min_distance
        ex = gen(np.random.default_rng(seed), seq_len, None, min_distance=min_distance, **kw)
        text = tokenizer.decode(ex["inputs"])
        fact_end = text.index(" is the pass key. " if task == "passkey" else ".\n", int(ex["key_position"][0]))
        fact_end += len(" is the pass key. ") if task == "passkey" else 2
        question = text.rindex("What is the" if task == "passkey" else "\nWhat is the")
        assert question - fact_end >= min_distance
    limit = synthetic.depth_limit(task, seq_len, min_distance=min_distance)
    assert 0.3 < limit < 0.5
    gen(np.random.default_rng(0), seq_len, limit, min_distance=min_distance, **kw)  # the deepest allowed
    allowed = synthetic._depth_str(limit)  # rounded down: the quoted depth itself is allowed
    assert float(allowed) <= limit
    gen(np.random.default_rng(0), seq_len, float(allowed), min_distance=min_distance, **kw)
    with pytest.raises(ValueError, match=rf"fewer than min_distance={min_distance}; allowed depth <= {allowed}"):
        gen(np.random.default_rng(0), seq_len, 0.9, min_distance=min_distance, **kw)
    with pytest.raises(ValueError, match="min_distance=5000 needs 5000 filler tokens"):
        gen(np.random.default_rng(0), seq_len, None, min_distance=5000, **kw)
    with pytest.raises(ValueError, match="min_distance=-1"):
        gen(np.random.default_rng(0), seq_len, None, min_distance=-1, **kw)


def test_mqar_answers_align_with_values():
    for seed in range(5):
        ex = synthetic.mqar(np.random.default_rng(seed), 256, 16, num_queries=10, gap=20)
        check_layout(ex, 256)
        n = int(ex["segment_ids"].sum())
        assert n == synthetic.mqar_length(16, 10, 20) and ex["key_position"][0] == 1  # BOS ... EOS, then PAD
        text = tokenizer.decode(ex["inputs"][1:n - 1])
        pairs, dots, queries = text.split("\n")
        assert dots == "." * 20
        table = dict(pairs.split(" "))  # "A3" -> {"A": "3"}
        assert len(table) == 16
        assert all(k in synthetic.MQAR_KEYS and v in synthetic.MQAR_VALUES for k, v in table.items())
        queried = [q[0] for q in queries.split(" ")]
        assert len(set(queried)) == 10
        t = np.flatnonzero(ex["answer_mask"])
        assert len(t) == 10
        for i, k in zip(t, queried):
            assert chr(ex["inputs"][i]) == k and chr(ex["targets"][i]) == table[k]
    with pytest.raises(ValueError, match="need seq_len >= 97"):
        synthetic.mqar(np.random.default_rng(0), 64, 16)
    with pytest.raises(ValueError, match="num_pairs=60: allowed 1..52"):
        synthetic.mqar(np.random.default_rng(0), 512, 60)
    with pytest.raises(ValueError, match="disjoint"):
        synthetic.mqar(np.random.default_rng(0), 512, 4, value_alphabet="0123A")


def test_synthetic_source_is_deterministic(haystack):
    a = synthetic.SyntheticSource("kv_recall", 512, 5, 100, min_depth=0.2, max_depth=0.4, haystack_tokens=haystack)
    b = synthetic.SyntheticSource("kv_recall", 512, 5, 100, min_depth=0.2, max_depth=0.4, haystack_tokens=haystack)
    c = synthetic.SyntheticSource("kv_recall", 512, 6, 100, min_depth=0.2, max_depth=0.4, haystack_tokens=haystack)
    assert len(a) == 100
    for i in (0, 17, 99):
        for k in KEYS:
            np.testing.assert_array_equal(a[i][k], b[i][k])
    assert not np.array_equal(a[3]["inputs"], c[3]["inputs"])
    assert not np.array_equal(a[3]["inputs"], a[4]["inputs"])
    filler = synthetic.kv_recall_filler_length(512)
    kps = np.array([int(a[i]["key_position"][0]) - 1 for i in range(100)])
    assert kps.min() >= 0.2 * filler - 45 and kps.max() <= 0.4 * filler + 45 and kps.std() > 10
    with pytest.raises(IndexError):
        a[100]
    # min_distance lowers max_depth to what it allows, and says so when nothing is left.
    p = synthetic.SyntheticSource("passkey", 1024, 0, 50, min_distance=600)
    limit = synthetic.depth_limit("passkey", 1024, min_distance=600)
    assert max(int(p[i]["key_position"][0]) - 1 for i in range(50)) <= limit * synthetic.passkey_filler_length(1024)
    with pytest.raises(ValueError, match="allows depths up to .* below min_depth=0.8"):
        synthetic.SyntheticSource("passkey", 1024, 0, 50, min_depth=0.8, min_distance=600)
    with pytest.raises(ValueError, match="task='nope': allowed values are"):
        synthetic.SyntheticSource("nope", 1024, 0, 50)
    m1, m2 = (synthetic.SyntheticSource("mqar", 128, 0, 10, num_pairs=8) for _ in range(2))
    np.testing.assert_array_equal(m1[2]["inputs"], m2[2]["inputs"])


def test_mixing_ratio_keys_and_batching():
    docs = [bytes(f"document {i}: ", "ascii") + b"some text " * (20 + 7 * i) for i in range(60)]
    text = packing.PackedSequences(docs, seq_len=128, packing="concat", seed=0)
    assert len(text) >= 300
    syn = synthetic.SyntheticSource("mqar", 128, 1, len(text), num_pairs=8)
    mixed = synthetic.MixedSource(text, syn, ratio=0.3, seed=1)
    flags = np.array([mixed.is_synthetic(i) for i in range(len(mixed))])
    assert abs(flags.mean() - 0.3) < 0.07
    again = synthetic.MixedSource(text, syn, ratio=0.3, seed=1)
    assert [again.is_synthetic(i) for i in range(len(mixed))] == flags.tolist()
    other = synthetic.MixedSource(text, syn, ratio=0.3, seed=2)
    assert [other.is_synthetic(i) for i in range(len(mixed))] != flags.tolist()
    t, s = int(np.flatnonzero(~flags)[0]), int(np.flatnonzero(flags)[0])
    ex_t, ex_s = mixed[t], mixed[s]
    assert tuple(ex_t) == tuple(ex_s) == KEYS
    for k in KEYS:
        assert ex_t[k].shape == ex_s[k].shape and ex_t[k].dtype == ex_s[k].dtype, k
    np.testing.assert_array_equal(ex_t["inputs"], text[t]["inputs"])
    assert ex_t["key_position"][0] == -1 and not ex_t["answer_mask"].any() and ex_s["answer_mask"].sum() == 8
    np.testing.assert_array_equal(ex_s["inputs"], syn[s]["inputs"])
    assert {synthetic.MixedSource(text, syn, r, 0).is_synthetic(i) for r in (0.0,) for i in range(50)} == {False}
    with pytest.raises(ValueError, match="seq_len=128 and synthetic seq_len=256 differ"):
        synthetic.MixedSource(text, synthetic.SyntheticSource("mqar", 256, 1, 10, num_pairs=8), 0.5, 0)


def test_make_dataset_mixes_synthetic(tiny_config):
    c = tiny_config(**{"data.seq_len": 256, "data.synthetic.task": "passkey", "data.synthetic.ratio": 0.5,
                       "data.synthetic.min_distance": 64})
    assert check_config(c.data) == []
    batch = make_dataset(c.data, split="train", batch_size=8, seed=0)[0]
    assert set(batch) == set(KEYS)
    assert batch["inputs"].shape == batch["answer_mask"].shape == (8, 256) and batch["key_position"].shape == (8, 1)
    rows = batch["key_position"][:, 0] >= 0
    assert rows.any() and (~rows).any()
    assert np.all(batch["answer_mask"][rows].sum(axis=1) == 5) and not batch["answer_mask"][~rows].any()
    train_src = make_dataset(c.data, split="train", batch_size=8, seed=0)
    np.testing.assert_array_equal(train_src[0]["inputs"], batch["inputs"])
    val = make_dataset(c.data, split="validation", batch_size=1, seed=0)
    kp = np.array([val[i]["key_position"][0, 0] for i in range(len(val))])
    assert (kp >= 0).any() and (kp == -1).any()
    c.data.synthetic.task = "kv_recall"  # the needle's haystack is the split's own text
    batch = make_dataset(c.data, split="train", batch_size=8, seed=0)[0]
    rows = batch["key_position"][:, 0] >= 0
    assert rows.any() and np.all(batch["answer_mask"][rows].sum(axis=1) == 5)
    assert all("What is the secret value for key" in tokenizer.decode(r) for r in batch["inputs"][rows])
    c.data.synthetic.ratio = 0.0  # off: the text stream exactly as before, without the extra keys
    assert set(make_dataset(c.data, split="train", batch_size=8, seed=0)[0]) == set(KEYS[:5])


def test_mixed_batch_shards_with_context_parallelism(tiny_config):
    """key_position has no sequence axis: it must not be reordered or split over the ring."""
    import jax

    from lc_jax import sharding

    if jax.device_count() < 4:
        pytest.skip("needs 4 (fake CPU) devices")
    c = tiny_config(**{"data.seq_len": 128, "data.synthetic.task": "mqar", "data.synthetic.ratio": 0.5})
    batch = make_dataset(c.data, split="train", batch_size=2, seed=0)[0]
    c.mesh.update(data=2, fsdp=1, tensor=1, context=2)
    mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:4])
    placed = sharding.shard_batch(batch, mesh, global_batch=2)
    np.testing.assert_array_equal(np.asarray(placed["key_position"]), batch["key_position"])
    order = sharding.context_order(mesh, 128, "zigzag")
    np.testing.assert_array_equal(np.asarray(placed["answer_mask"]), batch["answer_mask"][:, order])


def test_check_config_names_fields_and_allowed_values(tiny_config):
    c = tiny_config()
    assert check_config(c.data) == []
    s = c.data.synthetic
    s.update(task="x", ratio=1.5, min_depth=0.9, max_depth=0.1, min_distance=-3, digits=0, mqar_pairs=99)
    p = "\n".join(check_config(c.data))
    for want in ["data.synthetic.task='x': allowed values are ['none', 'passkey', 'kv_recall', 'mqar']",
                 "data.synthetic.ratio=1.5: must be a number in [0, 1]",
                 "data.synthetic.min_depth=0.9 > data.synthetic.max_depth=0.1",
                 "data.synthetic.min_distance=-3", "data.synthetic.digits=0", "data.synthetic.mqar_pairs=99"]:
        assert want in p
    s.update(task="none", ratio=0.5, min_depth=0.0, max_depth=2.0, min_distance=0, digits=5, mqar_pairs=16)
    p = "\n".join(check_config(c.data))
    assert "data.synthetic.ratio=0.5 with data.synthetic.task='none'" in p and "data.synthetic.max_depth=2.0" in p
    s.update(task="passkey", max_depth=1.0)  # tiny seq_len=64 is too short for a passkey
    assert check_config(c.data) == ["data.synthetic.task='passkey' needs seq_len >= 103 (with "
                                    "data.synthetic.min_distance=0), but data seq_len 64 is shorter"]
    c.data.update(seq_len=512, curriculum="0:256,10:512")  # every curriculum stage must fit too
    s.update(min_distance=100, min_depth=0.5)
    limit = synthetic.depth_limit("passkey", 256, min_distance=100)
    assert check_config(c.data) == [f"data.synthetic.min_distance=100 allows depths up to "
                                    f"{synthetic._depth_str(limit)} at seq_len 256, below data.synthetic.min_depth=0.5"]
    s.update(task="mqar", min_distance=0, mqar_pairs=52)
    assert check_config(c.data) == ["data.synthetic.task='mqar' needs seq_len >= 313 (with "
                                    "data.synthetic.min_distance=0), but data seq_len 256 is shorter"]
