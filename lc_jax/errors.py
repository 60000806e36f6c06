"""The one exception type for mistakes a user can fix: a config value, a file, a workdir.

Entry points (`lc_jax.cli.run`) print such an error as one line, `error: <message>`, and exit with
`exit_code`; anything else is an internal error and keeps its traceback. Messages name the field or
file, the value, and what is allowed.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one line (plus a hint) without a traceback."""

    exit_code = 2
