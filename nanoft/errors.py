"""Errors meant for people, not stack traces.

Raise `UserError("what went wrong, where, what to do")` for bad input; wrap a command-line main in
`exit_on_user_error` so the user sees one line on stderr and the process exits with status 2.
"""

import functools
import os
import sys
import time

# Under torchrun every rank usually meets the same bad flag or file. Rank 0 reports at once; the others wait
# this long first, so that torchrun, seeing rank 0 fail, stops them before they print the line again. An error
# only one rank meets (its own file, its own device) is still printed, this much later.
OTHER_RANKS_DELAY_S = 3.0


class UserError(Exception):
    """Bad input from the user (a flag, a file, a line of data). The message is one line."""


def exit_on_user_error(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            rank = int(os.environ.get("RANK", "0"))
            if rank != 0:
                time.sleep(OTHER_RANKS_DELAY_S)
            print(f"error: {error}" if rank == 0 else f"error (rank {rank}): {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper
