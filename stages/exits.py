"""How a command ends when it is stopped or its disk fails: the exit code and the line that says how to go on.

Input errors are the commands' own (a message naming the file, field or flag, exit 2); this module is for what
stops a command from outside: Ctrl-C (130) and SIGTERM (143, a scheduler's preemption, in or out of a stage's
training), on this rank or on a rank Lightning started beside it, and a full or failing disk (74). Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import signal
import sys

from callbacks.preemption import Terminated
from stages.launch import STOP_SIGNALS, rank_stopped_by_a_signal

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ESTALE, errno.EACCES, errno.EPERM}
# How long a rank whose collective failed waits for the exit codes of the ranks beside it: the collective fails
# as soon as one of them ended, and a signal that ended it says why.
PEER_EXIT_WAIT = 5.0


def interrupted(signum: int = signal.SIGINT, then: str = "to go on", where: str = "") -> int:
    """Prints how to go on after Ctrl-C or SIGTERM and returns the shell's code for the signal (130, 143), never
    0 nor an error's 1."""
    print(f"interrupted by {STOP_SIGNALS[signum]}{where}: rerun the same command {then}", file=sys.stderr)
    return 128 + signum


def exit_code(error: BaseException) -> int | None:
    """The exit code of a command that `error` stopped, once its line is printed; None for an error that is
    not one of these (the caller raises it)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(error, KeyboardInterrupt):
        return interrupted()
    if isinstance(error, Terminated):  # outside a stage's training (in one, Lightning's SIGTERMException below)
        return interrupted(signal.SIGTERM)
    if isinstance(error, SystemExit):
        # Lightning ends a fit that got SIGTERM (a scheduler's preemption) with SIGTERMException, a SystemExit
        # without a code: the run ended with exit code 0, as if it had finished.
        if isinstance(error.__context__, KeyboardInterrupt):  # Lightning turns Ctrl-C in a fit into exit code 1
            return interrupted()
        if isinstance(error, SIGTERMException):
            return interrupted(signal.SIGTERM, then="to resume from the last checkpoint")
        return None
    if not isinstance(error, Exception):
        return None
    if isinstance(error, OSError) and error.errno in DISK_ERRORS:
        # The disk's, not the input's (those are named and exit 2): a full disk, an I/O error. transformers' and
        # PIL's own OSErrors (no errno) are not the disk's, nor a programming error.
        print(f"error: {error}; once the disk is fixed, rerun the same command to go on", file=sys.stderr)
        return 74  # sysexits' EX_IOERR
    # A rank that Lightning started beside this one was stopped by a signal (the others were not signalled):
    # this rank failed in its next collective with the group's error (exit 1), which says nothing of the signal.
    stopped = rank_stopped_by_a_signal(wait=PEER_EXIT_WAIT)
    if stopped is None:
        return None
    rank, signum = stopped
    first_line = (str(error).splitlines() or [""])[0][:200]
    return interrupted(signum, where=f" on rank {rank} (this rank then failed: {type(error).__name__}: {first_line})")
