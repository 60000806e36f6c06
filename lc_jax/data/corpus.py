"""Documents: the Python standard library's own sources (the embedded default), or the user's files.

The stdlib is ~30 MB of long, real documents on every machine that runs Python,
so runs and tests need no download. The train/validation split is by a hash of
each document's name, so it is stable across machines, orderings and file additions.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import sysconfig
from pathlib import Path

SOURCES = ("stdlib", "files")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def in_validation(name: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "little")
    return h / 2**64 < val_fraction


@functools.lru_cache(maxsize=8)
def _stdlib_docs() -> tuple[tuple[str, bytes], ...]:
    root = stdlib_root()
    paths = sorted(p for p in root.rglob("*.py") if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts))
    return tuple((str(p.relative_to(root)), p.read_bytes()) for p in paths)


@functools.lru_cache(maxsize=8)
def _user_docs(pattern: str, jsonl_field: str) -> tuple[tuple[str, bytes], ...]:
    paths = sorted(glob.glob(pattern, recursive=True))
    if not paths:
        raise FileNotFoundError(f"data.files={pattern!r} matches no file")
    docs = []
    for path in paths:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if line.strip():
                        record = json.loads(line)
                        if jsonl_field not in record:
                            raise KeyError(f"{path}:{i + 1} has no field data.jsonl_field={jsonl_field!r}")
                        docs.append((f"{path}:{i}", str(record[jsonl_field]).encode("utf-8")))
        else:
            docs.append((path, Path(path).read_bytes()))
    return tuple(docs)


def load_documents(*, source: str, split: str, val_fraction: float, files: str = "", jsonl_field: str = "text",
                   max_docs: int = 0) -> list[bytes]:
    """Documents of one split, in a stable order. `max_docs` > 0 keeps the first few (tests)."""
    if source == "stdlib":
        named = _stdlib_docs()
    elif source == "files":
        named = _user_docs(files, jsonl_field)
    else:
        raise ValueError(f"data.source={source!r} is not one of {SOURCES}")
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r} is not one of ('train', 'validation')")
    want_val = split == "validation"
    docs = [data for name, data in named if data and in_validation(name, val_fraction) == want_val]
    if max_docs > 0:
        docs = docs[:max_docs]
    if not docs:
        raise ValueError(f"no documents in the {split} split of data.source={source!r}")
    return docs
