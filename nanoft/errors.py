"""Errors meant for people, not stack traces.

Raise `UserError("what went wrong, where, what to do")` for bad input; wrap a command-line main in
`exit_on_user_error` so the user sees one line on stderr and the process exits with status 2.
"""

import functools
import sys


class UserError(Exception):
    """Bad input from the user (a flag, a file, a line of data). The message is one line."""


def exit_on_user_error(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper
