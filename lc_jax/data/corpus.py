"""Documents: the Python standard library's own sources (the embedded default), or the user's files.

The stdlib is ~30 MB of long, real documents on every machine that runs Python,
so runs and tests need no download. The train/validation split is by a hash of
each document's name, so it is stable across machines, orderings and file additions.
"""

from __future__ import annotations

import collections
import functools
import glob
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

from lc_jax.errors import UserError

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


class DataError(UserError, ValueError):
    """The data the config names cannot make a run: the message names the field, the files and what to do."""


def _read(path: str, jsonl_field: str, skipped: dict[str, list[str]]) -> list[tuple[str, bytes]]:
    """One file's documents; what cannot be read is counted in `skipped` (reason -> where), never raised."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        skipped["unreadable"].append(f"{path} ({e.strerror or e})")
        return []
    if not raw.strip():
        skipped["empty"].append(path)
        return []
    if not path.endswith(".jsonl"):
        return [(path, raw)]
    docs = []
    for i, line in enumerate(raw.split(b"\n")):
        if not line.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            skipped["non-UTF-8 line"].append(where)
            continue
        except json.JSONDecodeError as e:
            skipped["malformed JSON line"].append(f"{where} ({e.msg})")
            continue
        if not isinstance(record, dict) or jsonl_field not in record:
            skipped[f"line without data.jsonl_field={jsonl_field!r}"].append(where)
            continue
        docs.append((f"{path}:{i}", str(record[jsonl_field]).encode("utf-8")))
    return docs


@functools.lru_cache(maxsize=8)
def _user_docs(pattern: str, jsonl_field: str, field: str = "data.files") -> tuple[tuple[str, bytes], ...]:
    """The documents of every file `pattern` matches: one per file, or one per line of a .jsonl file.

    Unreadable or empty files and bad jsonl lines are skipped and counted in one warning on stderr (the
    first few named by file and line); a run stops only when nothing is left.
    """
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise DataError(f"{field}={pattern!r} matches no file")
    skipped: dict[str, list[str]] = collections.defaultdict(list)
    docs = [doc for path in paths for doc in _read(path, jsonl_field, skipped)]
    detail = "; ".join(f"{len(v)} {k} (e.g. {', '.join(v[:3])})" for k, v in skipped.items())
    if not docs:
        raise DataError(f"{field}={pattern!r}: none of its {len(paths)} files has a document"
                        + (f"; skipped {detail}" if skipped else ""))
    if skipped:
        print(f"warning: {field}={pattern!r}: skipped {detail}", file=sys.stderr)
    return tuple(docs)


def load_documents(*, source: str, split: str, val_fraction: float, files: str = "", jsonl_field: str = "text",
                   max_docs: int = 0, val_files: str = "") -> list[bytes]:
    """Documents of one split, in a stable order. `max_docs` > 0 keeps the first few (tests).

    The validation split is the documents whose name hashes below `val_fraction`, or with `val_files`
    (data.source='files') every document of those files, the train split then taking all of `files`.
    """
    if source not in SOURCES:
        raise DataError(f"data.source={source!r}: allowed values are {list(SOURCES)}")
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r} is not one of ('train', 'validation')")
    want_val = split == "validation"
    if source == "files" and val_files:
        named = _user_docs(val_files, jsonl_field, "data.val_files") if want_val else _user_docs(files, jsonl_field)
        docs = [data for _, data in named if data]
    else:
        named = _stdlib_docs() if source == "stdlib" else _user_docs(files, jsonl_field)
        docs = [data for name, data in named if data and in_validation(name, val_fraction) == want_val]
    if max_docs > 0:
        docs = docs[:max_docs]
    if not docs:
        where = f"data.source={source!r}" + (f", data.files={files!r}" if source == "files" else "")
        hint = (f"; its {len(named)} documents all fall in the other split: raise data.val_fraction (now "
                f"{val_fraction}) or name validation files in data.val_files" if want_val and source == "files"
                else "")
        raise DataError(f"no documents in the {split} split of {where}{hint}")
    return docs
