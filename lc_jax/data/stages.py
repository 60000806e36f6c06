"""Length curriculum: training stages of increasing sequence length, parsed from `data.curriculum`."""

from __future__ import annotations


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
