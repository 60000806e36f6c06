"""Long-context evaluation. For now: per-position validation loss (the curve every run ends with).

Protocol: validation sequences are non-overlapping chunks of the packed
validation stream; each target token is bucketed by its *position*, i.e. how
many tokens of its own document precede it inside the chunk. Buckets have equal
width `ceil(seq_len / num_buckets)`; a bucket's loss is the mean over its tokens.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class PerPositionLoss:
    bucket_start: list[int]
    bucket_width: int
    loss: list[float | None]  # None where a bucket saw no token
    tokens: list[int]

    @classmethod
    def from_sums(cls, sums, counts, width: int) -> PerPositionLoss:
        sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
        loss = [float(s / c) if c > 0 else None for s, c in zip(sums, counts)]
        return cls([i * width for i in range(len(sums))], width, loss, [int(c) for c in counts])

    def save(self, path_stem: Path, title: str = "validation loss by position") -> None:
        """Write `<stem>.json` and `<stem>.png`."""
        path_stem = Path(path_stem)
        path_stem.with_suffix(".json").write_text(json.dumps({
            "protocol": "non-overlapping validation chunks; position = tokens of the same document before the "
                        "target within the chunk; equal-width buckets; mean next-token loss (nats) per bucket",
            **dataclasses.asdict(self),
        }, indent=2))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs = [s + self.bucket_width / 2 for s, v in zip(self.bucket_start, self.loss) if v is not None]
        ys = [v for v in self.loss if v is not None]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(xs, ys, marker="o", ms=3)
        ax.set_xlabel("token position (context length)")
        ax.set_ylabel("loss (nats / byte)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path_stem.with_suffix(".png"), dpi=120)
        plt.close(fig)
