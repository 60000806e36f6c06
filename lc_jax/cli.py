"""What every command line shares: a config from `path.py[:arg]` with `--config.a.b=value` overrides, and
user errors as one line.

    sys.exit(cli.run(main))     # main(argv) -> exit code; argv without --verbose

A user's mistake (a bad value, a misspelled key, a missing file, an error raised inside a config file,
a workdir that cannot be resumed: any `UserError`) prints `error: <message>` on stderr and exits with its
code (2); a traceback only for an internal error, or with `--verbose`. Ctrl-C before a run has anything to
save prints `interrupted` and exits 130.
"""

from __future__ import annotations

import ast
import difflib
import sys
from collections.abc import Callable

import ml_collections

from lc_jax import config as config_lib
from lc_jax.errors import UserError

VERBOSE = "--verbose"


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(the other arguments, [(dotted key, value)]) from `--config.a.b=value` or `--config.a.b value`."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            key, eq, value = a[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{a}: needs a value (--config.a.b=value)")
                value, i = argv[i + 1], i + 1
            overrides.append((key, value))
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def _keys(node, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        out.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            out += _keys(v, f"{prefix}{k}.")
    return out


def override(cfg: ml_collections.ConfigDict, key: str, value: str) -> None:
    """Set `--config.key=value`, typed like the field it replaces (bool, int, float, str; literals otherwise)."""
    *parents, leaf = key.split(".")
    node = cfg
    try:
        for p in parents:
            node = node[p]
        old = node[leaf]
    except (KeyError, TypeError, AttributeError):
        near = difflib.get_close_matches(key, _keys(cfg), n=1)
        hint = f"; did you mean --config.{near[0]}?" if near else ""
        raise UserError(f"--config.{key}: no such config field{hint}") from None
    try:
        if isinstance(old, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            new = value.lower() in ("true", "1")
        elif isinstance(old, (int, float, str)):
            new = type(old)(value)
        elif old is None:
            try:
                new = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                new = value
        else:
            new = ast.literal_eval(value)
            if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
                new = type(old)(new)
        node[leaf] = new
    except (ValueError, TypeError, SyntaxError):
        raise UserError(f"--config.{key}={value!r}: expected a {type(old).__name__} (the field holds {old!r})") \
            from None


def load(spec: str, overrides: list[tuple[str, str]] = (), flag: str = "--config") -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file `path.py[:arg]`, with the overrides applied.

    An error raised inside the config file becomes a `UserError` naming the file (the file is the user's).
    """
    path, sep, arg = spec.partition(":")
    if not path.endswith(".py") or not config_lib.find(path).is_file():
        raise UserError(f"{flag}={spec!r}: no config file {path!r}; give path.py[:arg], e.g. configs/quickstart.py "
                        "or configs/base.py:position=alibi")
    try:
        cfg = config_lib.load(path, arg if sep else None)
    except UserError as e:
        raise UserError(f"{flag}={spec!r}: {e}") from e
    except Exception as e:  # noqa: BLE001  (the config file's own code failed)
        raise UserError(f"{flag}={spec!r}: get_config raised {type(e).__name__}: {e} (--verbose for the "
                        "traceback)") from e
    for key, value in overrides:
        override(cfg, key, value)
    return cfg


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Call `main(argv)` and turn a `UserError` into one line on stderr and its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = VERBOSE in argv
    argv = [a for a in argv if a != VERBOSE]
    try:
        return main(argv) or 0
    except UserError as e:
        if verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if verbose:
            raise
        print("interrupted", file=sys.stderr)
        return 130
