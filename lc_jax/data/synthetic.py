"""Synthetic long-context retrieval tasks, as grain sources that mix into the text stream.

Small models trained on text alone rarely learn to retrieve, so passkey, needle and
MQAR evaluations read as chance. Mixing a fraction of these tasks into training gives
them something to measure, and the same generators build the evaluation sets.

Every generator returns one example in the packing format (`lc_jax.data.packing`),
for one document in segment 1 with positions from 0, plus two fields:

  inputs, targets, positions, segment_ids  int32 [seq_len]
  loss_mask    float32 [seq_len]  1 where the target is in the same document as the input (as in packing)
  answer_mask  float32 [seq_len]  1 where the *target* is an answer token: teacher-forced answer accuracy is
                                  "every target under answer_mask predicted correctly"
  key_position int32 [1]          position (= index in `inputs`) of the first token of the planted fact,
                                  for bucketing by depth; -1 on text examples. Shape [1], not [], so that a
                                  batch of them is [batch, 1] like every other field's [batch, ...].

The document is BOS + text + EOS. Passkey and kv_recall fill it to exactly seq_len + 1 tokens (trimming the
filler), so `inputs` is BOS + text and `targets` is text + EOS with no padding; MQAR documents are as long as
their pairs and queries need and PAD (segment 0, no loss) follows.
"""

from __future__ import annotations

import math

import numpy as np

from lc_jax.data import tokenizer
from lc_jax.data.stages import curriculum

TASKS = ("none", "passkey", "kv_recall", "mqar")
# `data.synthetic`: task none | passkey | kv_recall | mqar replaces a share `ratio` of examples (validation too,
# other seed). Depth tasks plant the fact at a depth drawn in [min_depth, max_depth]; min_distance: filler tokens
# at least between fact and question (mqar: '.' gap before the queries). digits: passkey / kv_recall answer
# length; mqar_pairs: key-value pairs. jitter: passkey examples end their filler at a random point of its sentence
# cycle, so that a model cannot solve them by memorising fact-to-question offsets (evaluation uses the standard
# format).
FIELDS = dict(task="none", ratio=0.0, min_depth=0.0, max_depth=1.0, min_distance=0, digits=5, mqar_pairs=16,
              jitter=True)
DEPTH_TASKS = ("passkey", "kv_recall")  # tasks with a planted fact at a relative depth

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "What is the pass key? The pass key is "
KV_KEY_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
MQAR_KEYS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
MQAR_VALUES = "0123456789"
_MQAR_SEPARATORS = " \n."
_MIX_TAG = 0x6D6978  # "mix": keeps the replace-or-not draw independent of the synthetic example's own draws


# ----------------------------------------------------------------------------- shared pieces


def _depth_str(depth: float) -> str:
    """A depth rounded down for messages, so that the value quoted as allowed is allowed."""
    return f"{math.floor(depth * 1e4) / 1e4:.4f}"


def _bytes(text: str | bytes) -> np.ndarray:
    return tokenizer.encode(text.encode("utf-8") if isinstance(text, str) else bytes(text)).astype(np.int64)


def _random_digits(rng: np.random.Generator, n: int) -> str:
    """`n` decimal digits, the first nonzero, so the answer always has exactly `n` digits."""
    return str(int(rng.integers(1, 10))) + "".join(str(int(x)) for x in rng.integers(0, 10, n - 1))


def _passkey_fact(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def _kv_fact(key: str, value: str) -> str:
    return f"The secret value for key '{key}' is {value}.\n"


def _kv_question(key: str) -> str:
    return f"\nWhat is the secret value for key '{key}'? "


def _example(doc: np.ndarray, answer: np.ndarray, seq_len: int, key_position: int) -> dict[str, np.ndarray]:
    """Lay one BOS ... EOS document (at most seq_len + 1 tokens) out as a packing-format example.

    `answer` flags document tokens that are answer tokens; they become `answer_mask` on the
    targets (the target at index t is document token t + 1).
    """
    n = len(doc)
    if n > seq_len + 1:
        raise ValueError(f"document of {n} tokens does not fit seq_len={seq_len} (at most seq_len + 1 with EOS)")
    tok = np.full(seq_len + 1, tokenizer.PAD, np.int32)
    tok[:n] = doc
    idx = np.arange(seq_len + 1)
    seg = (idx < n).astype(np.int32)
    pos = np.where(seg > 0, idx, 0).astype(np.int32)
    ans = np.zeros(seq_len + 1, np.float32)
    ans[:n] = answer
    return {
        "inputs": tok[:-1],
        "targets": tok[1:],
        "positions": pos[:-1],
        "segment_ids": seg[:-1],
        "loss_mask": ((seg[1:] == seg[:-1]) & (seg[:-1] > 0)).astype(np.float32),
        "answer_mask": ans[1:],
        "key_position": np.array([key_position], np.int32),
    }


def _check_common(seq_len: int, min_distance: int) -> None:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}: must be a positive int")
    if not isinstance(min_distance, (int, np.integer)) or min_distance < 0:
        raise ValueError(f"min_distance={min_distance!r}: must be a non-negative int")


def _fact_start(rng: np.random.Generator, filler: np.ndarray, depth: float | None, min_distance: int,
                boundary: np.ndarray, max_snap: int, task: str) -> int:
    """Where in the filler the fact goes: at relative `depth`, snapped to the nearest sentence/line start.

    The snap moves by at most `max_snap` tokens (else the exact position is kept) and never puts
    fewer than `min_distance` filler tokens between the fact and the question. `depth=None`
    draws a depth uniformly from those that leave `min_distance`.
    """
    F = len(filler)
    hi = F - min_distance  # the latest start that keeps min_distance filler tokens after the fact
    if hi < 0:
        raise ValueError(f"{task}: min_distance={min_distance} needs {min_distance} filler tokens after the fact, "
                         f"but seq_len leaves only {F}; raise seq_len or lower min_distance")
    if depth is None:
        depth = float(rng.uniform(0.0, hi / F)) if F else 0.0
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"{task}: depth={depth!r} must be in [0, 1]")
    target = int(round(depth * F))
    if target > hi:
        raise ValueError(f"{task}: depth={depth} leaves {F - target} filler tokens between the fact and the "
                         f"question, fewer than min_distance={min_distance}; "
                         f"allowed depth <= {_depth_str(hi / max(F, 1))}")
    starts = np.flatnonzero(boundary[: hi + 1])
    if len(starts):
        nearest = int(starts[np.argmin(np.abs(starts - target))])
        if abs(nearest - target) <= max_snap:
            return nearest
    return target


def _sentence_starts(filler: np.ndarray) -> np.ndarray:
    """Boolean [F + 1]: True where a sentence starts (after '. ') and at both ends."""
    b = np.zeros(len(filler) + 1, bool)
    b[0] = b[-1] = True
    if len(filler) >= 2:
        b[2:-1] = (filler[:-2] == ord(".")) & (filler[1:-1] == ord(" "))
    return b


def _line_starts(filler: np.ndarray) -> np.ndarray:
    """Boolean [F + 1]: True where a line starts (after a newline) and at both ends."""
    b = np.zeros(len(filler) + 1, bool)
    b[0] = b[-1] = True
    b[1:-1] = filler[:-1] == ord("\n")
    return b


# ----------------------------------------------------------------------------- generators


def passkey_filler_length(seq_len: int, digits: int = 5) -> int:
    """Filler tokens in a passkey example of `seq_len` (negative: seq_len is too short)."""
    fixed = len(_passkey_fact("0" * digits)) + len(PASSKEY_QUESTION) + digits + 2  # + BOS, EOS
    return seq_len + 1 - fixed


def passkey(rng: np.random.Generator, seq_len: int, depth: float | None, digits: int = 5,
            filler: str | bytes | None = None, min_distance: int = 0, phase: int = 0,
            jitter: bool = False) -> dict[str, np.ndarray]:
    """Passkey retrieval in the landmark-attention format (Mohtashami & Jaggi, 2023).

    BOS, filler ("The grass is green. ..." repeated and trimmed), with "The pass key is N. Remember it.
    N is the pass key. " inserted at relative `depth` of the filler (snapped to a sentence start),
    then "What is the pass key? The pass key is " N EOS. N has `digits` digits and is the answer.
    `min_distance`: at least this many filler tokens between the fact and the question (to plant
    the key beyond a sliding window); `depth=None` draws a depth that satisfies it. `phase`: the
    filler ends that many tokens before the end of its sentence cycle (0: the question follows
    a full stop, the standard format). `jitter=True` draws the phase at random, for training:
    with phase 0 the distance from the fact to the question is a multiple of the filler's cycle
    plus one of a few offsets, and a small model memorises those offsets instead of learning to
    read the key (a 1M-parameter model reached 100% on some depths and 0% on others, and about
    5% at any other phase).
    """
    _check_common(seq_len, min_distance)
    if not isinstance(digits, (int, np.integer)) or digits < 1:
        raise ValueError(f"passkey: digits={digits!r} must be an int >= 1")
    F = passkey_filler_length(seq_len, digits)
    if F < 0:
        raise ValueError(f"passkey: seq_len={seq_len} is too short for the fact, question and {digits}-digit "
                         f"answer; it needs seq_len >= {seq_len - F}")
    key = _random_digits(rng, digits)
    unit = _bytes(PASSKEY_FILLER if filler is None else filler)
    if len(unit) == 0:
        raise ValueError("passkey: filler is empty")
    if jitter:
        phase = int(rng.integers(len(unit)))
    if not isinstance(phase, (int, np.integer)) or not 0 <= phase < len(unit):
        raise ValueError(f"passkey: phase={phase!r} must be an int in [0, {len(unit)}) (the filler's cycle)")
    reps = -(-(F + phase) // len(unit))
    end = reps * len(unit) - phase  # trimmed at the start; phase 0: the question follows a full stop
    fill = np.tile(unit, reps)[end - F: end]
    fact = _bytes(_passkey_fact(key))
    start = _fact_start(rng, fill, depth, min_distance, _sentence_starts(fill), max_snap=len(fact), task="passkey")
    question, answer = _bytes(PASSKEY_QUESTION), _bytes(key)
    doc = np.concatenate([[tokenizer.BOS], fill[:start], fact, fill[start:], question, answer, [tokenizer.EOS]])
    is_answer = np.zeros(len(doc), np.float32)
    is_answer[len(doc) - 1 - len(answer): len(doc) - 1] = 1.0
    return _example(doc, is_answer, seq_len, key_position=1 + start)


def kv_recall_filler_length(seq_len: int, key_len: int = 4, value_digits: int = 5) -> int:
    """Haystack tokens in a kv_recall example of `seq_len` (negative: seq_len is too short)."""
    key, value = "K" * key_len, "0" * value_digits
    fixed = len(_kv_fact(key, value)) + len(_kv_question(key)) + value_digits + 2  # + BOS, EOS
    return seq_len + 1 - fixed


def kv_recall(rng: np.random.Generator, seq_len: int, depth: float | None, haystack_tokens: np.ndarray,
              key_len: int = 4, value_digits: int = 5, min_distance: int = 0) -> dict[str, np.ndarray]:
    """Needle in a haystack of real text: recall a planted key's value.

    BOS, a window of `haystack_tokens` (byte tokens, cut at a random offset; tokens >= 256 such as
    BOS/EOS of a packed stream become newlines) with "The secret value for key 'KKKK' is NNNNN.\\n"
    inserted at relative `depth` (snapped to a line start when one is within a sentence), then
    "\\nWhat is the secret value for key 'KKKK'? " NNNNN EOS. The key is `key_len` characters of
    A-Z0-9, the value (the answer) `value_digits` digits. `min_distance` as in `passkey`.
    """
    _check_common(seq_len, min_distance)
    if not isinstance(key_len, (int, np.integer)) or key_len < 1:
        raise ValueError(f"kv_recall: key_len={key_len!r} must be an int >= 1")
    if not isinstance(value_digits, (int, np.integer)) or value_digits < 1:
        raise ValueError(f"kv_recall: value_digits={value_digits!r} must be an int >= 1")
    F = kv_recall_filler_length(seq_len, key_len, value_digits)
    if F < 0:
        raise ValueError(f"kv_recall: seq_len={seq_len} is too short for the fact, question and answer; "
                         f"it needs seq_len >= {seq_len - F}")
    hay = np.asarray(haystack_tokens)
    if hay.ndim != 1 or len(hay) < F:
        raise ValueError(f"kv_recall: haystack_tokens has {hay.size} tokens, fewer than the {F} that seq_len="
                         f"{seq_len} needs; pass more text")
    key = "".join(KV_KEY_CHARS[i] for i in rng.integers(0, len(KV_KEY_CHARS), key_len))
    value = _random_digits(rng, value_digits)
    offset = int(rng.integers(0, len(hay) - F + 1))
    fill = hay[offset: offset + F].astype(np.int64)
    fill = np.where(fill >= 256, ord("\n"), fill)
    fact = _bytes(_kv_fact(key, value))
    start = _fact_start(rng, fill, depth, min_distance, _line_starts(fill), max_snap=len(fact), task="kv_recall")
    question, answer = _bytes(_kv_question(key)), _bytes(value)
    doc = np.concatenate([[tokenizer.BOS], fill[:start], fact, fill[start:], question, answer, [tokenizer.EOS]])
    is_answer = np.zeros(len(doc), np.float32)
    is_answer[len(doc) - 1 - len(answer): len(doc) - 1] = 1.0
    return _example(doc, is_answer, seq_len, key_position=1 + start)


def mqar_length(num_pairs: int, num_queries: int | None = None, gap: int = 0) -> int:
    """Document tokens (BOS ... EOS) of an MQAR example; it fits seq_len when this is <= seq_len + 1."""
    num_queries = num_pairs if num_queries is None else num_queries
    return 2 + (3 * num_pairs - 1) + 2 + gap + (3 * num_queries - 1)


def mqar(rng: np.random.Generator, seq_len: int, num_pairs: int, num_queries: int | None = None, gap: int = 0,
         key_alphabet: str = MQAR_KEYS, value_alphabet: str = MQAR_VALUES) -> dict[str, np.ndarray]:
    """Multi-query associative recall (Zoology, Arora et al. 2023) in bytes.

    Document: BOS, `num_pairs` key-value pairs as two bytes each, separated by spaces
    ("A3 q7 Z0"), a newline, `gap` '.' bytes, a newline, then `num_queries` (default all)
    distinct keys in random order, each followed by its value ("q7 A3"), EOS. Keys are distinct,
    drawn from `key_alphabet` (letters); values are drawn with replacement from `value_alphabet`
    (digits), disjoint from the keys and from the separators " \\n.". The answers are the values
    after each query key: `answer_mask` is 1 at the target index whose input is a query key.
    `key_position` is 1, the first pair. PAD fills the rest of seq_len.
    """
    num_queries = num_pairs if num_queries is None else num_queries
    keys, values = _bytes(key_alphabet), _bytes(value_alphabet)
    if len(set(keys.tolist())) != len(keys) or len(set(values.tolist())) != len(values):
        raise ValueError("mqar: key_alphabet and value_alphabet must not repeat a byte")
    if set(keys.tolist()) & set(values.tolist()) or set(_MQAR_SEPARATORS.encode()) & set(keys.tolist() +
                                                                                       values.tolist()):
        raise ValueError(f"mqar: key_alphabet, value_alphabet and the separators {_MQAR_SEPARATORS!r} must be "
                         "disjoint byte sets")
    if not isinstance(num_pairs, (int, np.integer)) or not 1 <= num_pairs <= len(keys):
        raise ValueError(f"mqar: num_pairs={num_pairs!r}: allowed 1..{len(keys)} (distinct keys in key_alphabet)")
    if not isinstance(num_queries, (int, np.integer)) or not 1 <= num_queries <= num_pairs:
        raise ValueError(f"mqar: num_queries={num_queries!r}: allowed 1..num_pairs={num_pairs}")
    if not isinstance(gap, (int, np.integer)) or gap < 0:
        raise ValueError(f"mqar: gap={gap!r} must be a non-negative int")
    n = mqar_length(num_pairs, num_queries, gap)
    if n > seq_len + 1:
        raise ValueError(f"mqar: {num_pairs} pairs, {num_queries} queries and gap={gap} need seq_len >= {n - 1}, "
                         f"got seq_len={seq_len}")
    pair_keys = rng.choice(keys, num_pairs, replace=False)
    pair_values = rng.choice(values, num_pairs, replace=True)
    queried = rng.permutation(num_pairs)[:num_queries]
    space, newline = ord(" "), ord("\n")

    def section(idx: np.ndarray) -> np.ndarray:
        out = np.full(3 * len(idx) - 1, space, np.int64)
        out[0::3], out[1::3] = pair_keys[idx], pair_values[idx]
        return out

    head = np.concatenate([[tokenizer.BOS], section(np.arange(num_pairs)), [newline], np.full(gap, ord(".")),
                           [newline]])
    doc = np.concatenate([head, section(queried), [tokenizer.EOS]])
    is_answer = np.zeros(len(doc), np.float32)
    is_answer[len(head) + 1: len(doc) - 1: 3] = 1.0  # the value byte of each query
    return _example(doc, is_answer, seq_len, key_position=1)


# ----------------------------------------------------------------------------- grain sources


def depth_limit(task: str, seq_len: int, min_distance: int = 0, **task_kwargs) -> float:
    """The largest depth that leaves `min_distance` filler tokens before the question (1.0 without one)."""
    if task == "passkey":
        F = passkey_filler_length(seq_len, task_kwargs.get("digits", 5))
    elif task == "kv_recall":
        F = kv_recall_filler_length(seq_len, task_kwargs.get("key_len", 4), task_kwargs.get("value_digits", 5))
    else:
        raise ValueError(f"task={task!r} has no depth; depth tasks are {DEPTH_TASKS}")
    if F < max(min_distance, 0):
        raise ValueError(f"{task}: seq_len={seq_len} leaves {max(F, 0)} filler tokens, fewer than "
                         f"min_distance={min_distance}")
    return (F - min_distance) / F if F else 0.0


class SyntheticSource:
    """Random-access source (grain MapDataset-compatible) of one task's examples.

    Example i is a pure function of (seed, i). For depth tasks the depth is drawn uniformly
    in [min_depth, max_depth], with max_depth lowered to `depth_limit` when `min_distance`
    would otherwise be violated (an error if that leaves nothing above min_depth).
    """

    def __init__(self, task: str, seq_len: int, seed: int, num_examples: int, *, min_depth: float = 0.0,
                 max_depth: float = 1.0, **task_kwargs):
        if task not in GENERATORS:
            raise ValueError(f"task={task!r}: allowed values are {list(GENERATORS)}")
        if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
            raise ValueError(f"num_examples={num_examples!r} must be a positive int")
        if not 0.0 <= min_depth <= max_depth <= 1.0:
            raise ValueError(f"min_depth={min_depth}, max_depth={max_depth}: need 0 <= min_depth <= max_depth <= 1")
        self.task, self.seq_len, self.num_examples = task, seq_len, int(num_examples)
        self.seed = int(seed) % 2**63
        self.task_kwargs = task_kwargs
        self.depth_range = (min_depth, max_depth)
        if task in DEPTH_TASKS:
            hi = min(max_depth, depth_limit(task, seq_len, **{k: v for k, v in task_kwargs.items()
                                                              if k != "haystack_tokens"}))
            if hi < min_depth:
                raise ValueError(f"{task}: min_distance={task_kwargs.get('min_distance', 0)} allows depths up to "
                                 f"{_depth_str(hi)} at seq_len={seq_len}, below min_depth={min_depth}")
            self.depth_range = (min_depth, hi)
        self[0]  # fail here, not in a worker, if the task's arguments do not fit seq_len

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        if not 0 <= i < self.num_examples:
            raise IndexError(f"index {i} out of range for {self.num_examples} examples")
        rng = np.random.default_rng([self.seed, i])
        if self.task in DEPTH_TASKS:
            depth = float(rng.uniform(*self.depth_range))
            return GENERATORS[self.task](rng, self.seq_len, depth, **self.task_kwargs)
        return GENERATORS[self.task](rng, self.seq_len, **self.task_kwargs)


class MixedSource:
    """Text examples, a fraction `ratio` of them replaced by synthetic ones (by index and seed).

    Text examples gain `answer_mask` (zeros) and `key_position` ([-1]) so that every example
    has the same keys, shapes and dtypes and mixed batches stack. Example i is synthetic iff a
    draw from (seed, i) falls below `ratio`; it is then `synthetic[i % len(synthetic)]`.
    """

    def __init__(self, text, synthetic, ratio: float, seed: int):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio={ratio!r} must be in [0, 1]")
        text_len = getattr(text, "seq_len", None)
        if text_len is not None and text_len != synthetic.seq_len:
            raise ValueError(f"text seq_len={text_len} and synthetic seq_len={synthetic.seq_len} differ")
        self.text, self.synthetic, self.ratio, self.seed = text, synthetic, float(ratio), int(seed) % 2**63

    def __len__(self) -> int:
        return len(self.text)

    def is_synthetic(self, i: int) -> bool:
        return bool(np.random.default_rng([self.seed, int(i), _MIX_TAG]).random() < self.ratio)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples")
        if self.is_synthetic(i):
            return self.synthetic[i % len(self.synthetic)]
        ex = dict(self.text[i])
        ex["answer_mask"] = np.zeros_like(ex["loss_mask"], dtype=np.float32)
        ex["key_position"] = np.array([-1], np.int32)
        return ex


GENERATORS = {"passkey": passkey, "kv_recall": kv_recall, "mqar": mqar}


# ----------------------------------------------------------------------------- config


def _task_kwargs(s, text_tokens: np.ndarray | None = None) -> dict:
    """The generator arguments that `data.synthetic` (a ConfigDict or dict) implies for its task."""
    if s["task"] == "passkey":
        return dict(digits=s["digits"], min_distance=s["min_distance"], jitter=bool(s.get("jitter", False)))
    if s["task"] == "kv_recall":
        kw = dict(value_digits=s["digits"], min_distance=s["min_distance"])
        return kw if text_tokens is None else {**kw, "haystack_tokens": text_tokens}
    if s["task"] == "mqar":
        return dict(num_pairs=s["mqar_pairs"], gap=s["min_distance"])
    raise ValueError(f"data.synthetic.task={s['task']!r}: allowed values are {list(TASKS)}")


def split_seed(seed: int, split: str) -> int:
    """Validation mixes with another seed than training, so it never repeats training's synthetic examples."""
    return int(seed) if split == "train" else int(seed) + 1_000_003


def mix_from_config(text, s, *, seq_len: int, seed: int, split: str) -> MixedSource:
    """`text` (a PackedSequences) mixed with `data.synthetic`'s task at its ratio. kv_recall's haystack is
    the same split's text (`text.tokens`), so validation needles sit in validation text."""
    seed = split_seed(seed, split)
    tokens = getattr(text, "tokens", None) if s["task"] == "kv_recall" else None
    syn = SyntheticSource(s["task"], seq_len, seed, len(text), min_depth=s["min_depth"], max_depth=s["max_depth"],
                          **_task_kwargs(s, tokens))
    return MixedSource(text, syn, s["ratio"], seed)


def _min_seq_len(s) -> int:
    """Shortest seq_len that `data.synthetic` fits (min_distance included)."""
    if s["task"] == "passkey":
        return -passkey_filler_length(0, s["digits"]) + s["min_distance"]
    if s["task"] == "kv_recall":
        return -kv_recall_filler_length(0, 4, s["digits"]) + s["min_distance"]
    if s["task"] == "mqar":
        return mqar_length(s["mqar_pairs"], None, s["min_distance"]) - 1
    return 0


def check_config(d) -> list[str]:
    """Problems with `config.data.synthetic` (empty: fine), one string per bad field with what it allows.

    Also checks that the task fits data.seq_len and every curriculum stage. A config without
    `data.synthetic` (older runs) has none.
    """
    s = d.get("synthetic") if hasattr(d, "get") else None
    if s is None:
        return []
    p: list[str] = []
    f = "data.synthetic"

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if s["task"] not in TASKS:
        p.append(f"{f}.task={s['task']!r}: allowed values are {list(TASKS)}")
    if not (number(s["ratio"]) and 0 <= s["ratio"] <= 1):
        p.append(f"{f}.ratio={s['ratio']!r}: must be a number in [0, 1] (share of training examples replaced)")
    elif s["ratio"] > 0 and s["task"] == "none":
        p.append(f"{f}.ratio={s['ratio']} with {f}.task='none': choose a task from {list(TASKS[1:])} or ratio 0")
    depths_ok = True
    for k in ("min_depth", "max_depth"):
        if not (number(s[k]) and 0 <= s[k] <= 1):
            p.append(f"{f}.{k}={s[k]!r}: must be a number in [0, 1]")
            depths_ok = False
    if depths_ok and s["min_depth"] > s["max_depth"]:
        p.append(f"{f}.min_depth={s['min_depth']} > {f}.max_depth={s['max_depth']}: need min_depth <= max_depth")
        depths_ok = False
    if not (integer(s["min_distance"]) and s["min_distance"] >= 0):
        p.append(f"{f}.min_distance={s['min_distance']!r}: must be a non-negative int")
    if not isinstance(s.get("jitter", False), bool):
        p.append(f"{f}.jitter={s['jitter']!r}: must be True or False")
    if not (integer(s["digits"]) and s["digits"] >= 1):
        p.append(f"{f}.digits={s['digits']!r}: must be an int >= 1")
    if not (integer(s["mqar_pairs"]) and 1 <= s["mqar_pairs"] <= len(MQAR_KEYS)):
        p.append(f"{f}.mqar_pairs={s['mqar_pairs']!r}: allowed 1..{len(MQAR_KEYS)} (distinct single-byte keys)")
    if p or s["task"] == "none":
        return p

    lengths = {d.seq_len} if integer(d.get("seq_len")) else set()
    if d.get("curriculum"):
        try:
            lengths |= {length for _, length, _ in curriculum(d)}
        except ValueError:
            pass  # reported by the curriculum's own check
    need = _min_seq_len(s)
    for length in sorted(lengths):
        if length < need:
            p.append(f"{f}.task={s['task']!r} needs seq_len >= {need} (with {f}.min_distance={s['min_distance']}), "
                     f"but data seq_len {length} is shorter")
        elif s["task"] in DEPTH_TASKS and depths_ok:
            limit = depth_limit(s["task"], length, **_task_kwargs(s))
            if limit < s["min_depth"]:
                p.append(f"{f}.min_distance={s['min_distance']} allows depths up to {_depth_str(limit)} at seq_len "
                         f"{length}, below {f}.min_depth={s['min_depth']}")
    return p
