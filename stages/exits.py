"""How a command ends when it is stopped or its disk fails: the exit code and the line that says how to go on.

Input errors are the commands' own (a message naming the file, field or flag, exit 2); this module is for what
stops a command from outside: Ctrl-C (130), SIGTERM (143, a scheduler's preemption, in or out of a stage's
training, on this rank or on a rank Lightning started beside it), and a full or failing disk (74). Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import signal
import sys

from callbacks.preemption import Terminated
from stages.launch import rank_ended_by_sigterm

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ESTALE, errno.EACCES, errno.EPERM}
SIGTERM_CODE = 128 + signal.SIGTERM
# A rank's collective fails as soon as the rank beside it has ended: the wait for that rank's exit code.
PEER_EXIT_WAIT = 5.0


def interrupted() -> int:
    """Ctrl-C, wherever it comes: the shell's code for SIGINT (130), never 0 nor an error's 1."""
    print("interrupted (Ctrl-C): rerun the same command to go on", file=sys.stderr)
    return 128 + signal.SIGINT


def terminated(why: str = "SIGTERM", then: str = "to go on") -> int:
    print(f"interrupted by {why}: rerun the same command {then}", file=sys.stderr)
    return SIGTERM_CODE


def exit_code(error: BaseException) -> int | None:
    """The exit code of a command that `error` stopped, once its line is printed; None for an error that is
    not one of these (the caller raises it)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(error, KeyboardInterrupt):
        return interrupted()
    if isinstance(error, Terminated):  # outside a stage's training (in one, Lightning's SIGTERMException below)
        return terminated()
    if isinstance(error, SystemExit):
        # Lightning ends a fit that got SIGTERM (a scheduler's preemption) with SIGTERMException, a SystemExit
        # without a code: the run ended with exit code 0, as if it had finished.
        if isinstance(error.__context__, KeyboardInterrupt):  # Lightning turns Ctrl-C in a fit into exit code 1
            return interrupted()
        if isinstance(error, SIGTERMException):
            return terminated(then="to resume from the last checkpoint")
        return None
    if not isinstance(error, Exception):
        return None
    # A rank that Lightning started beside this one ended by SIGTERM (the others were not signalled): this rank
    # failed in its next collective with the group's error (exit 1), which says nothing of the signal.
    ended = rank_ended_by_sigterm(wait=PEER_EXIT_WAIT)
    if ended:
        return terminated(f"SIGTERM on {ended} (here: {type(error).__name__})")
    if isinstance(error, OSError) and error.errno in DISK_ERRORS:
        # The disk's, not the input's (those are named and exit 2): a full disk, an I/O error. transformers' and
        # PIL's own OSErrors (no errno) are not the disk's, nor a programming error.
        print(f"error: {error}; once the disk is fixed, rerun the same command to go on", file=sys.stderr)
        return 74  # sysexits' EX_IOERR
    return None
