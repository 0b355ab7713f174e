"""Stopping on SIGTERM (a scheduler's preemption) after the same training batch on every rank.

Lightning 2.6's SIGTERM handler broadcasts a tensor from inside the signal handler: with several ranks, that
broadcast pairs with whatever collective another rank is in at that moment (DDP's buffer broadcast, a
gradient all-reduce), and a two-rank CPU run hung, or died of a gloo size mismatch, instead of stopping (5 of
5 tries). Lightning's own check after each batch is also each rank's alone, so a rank that got the signal a
moment later stopped a batch later, in a collective the others had left.

`StopOnSigterm` puts its own note-taking handler in the place of Lightning's (at `setup`, before Lightning
registers it for the fit, and puts back the handler from before when the fit ends). After each training batch
the ranks agree, in one all-reduce, whether any of them was signalled; if so, every rank raises Lightning's
flag at that same batch, and Lightning stops them all after it with `SIGTERMException` (`stages.run` exits
143; nothing is saved at the signal, and a rerun resumes from the last checkpoint). A signal during the
sanity check or validation is acted on after the next training batch; one after the last (`signalled`) is
for the caller to act on. `stop_on_sigusr1` makes SLURM's warning signal stop a run as SIGTERM does.

Outside a stage's training (the data stage, the base models, an evaluation, between stages) SIGTERM killed the
process at once without a word; `sigterm_raises` makes it raise `Terminated` where the program is, so that what
cleans up on the way out runs and `stages.run` says how to go on (exit 143). Within a fit it is `StopOnSigterm`'s.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
from typing_extensions import override

log = logging.getLogger(__name__)


class Terminated(BaseException):
    """SIGTERM outside a stage's training. A BaseException, as KeyboardInterrupt is: no `except Exception` keeps
    the program going."""


_fitting: list[StopOnSigterm] = []  # the callback of the fit under way, if any
_held: list[bool] = []  # inside `signals_held`: a SIGTERM that came meanwhile


class StopOnSigterm(L.Callback):
    """Stops every rank after the same training batch once any rank got SIGTERM (see the module's docstring)."""

    def __init__(self) -> None:
        self.signalled = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.signalled = False
        # Lightning registers the connector's notifier as the fit's SIGTERM handler after `setup`, from this
        # attribute (a private one: checked against lightning 2.6).
        connector = trainer._signal_connector
        if not hasattr(connector, "_sigterm_notifier_fn"):
            log.warning("this Lightning has no _sigterm_notifier_fn: its own SIGTERM handler, which hangs ranks, stays")
        connector._sigterm_notifier_fn = self._note
        self._trainer = weakref.ref(trainer)  # not the trainer itself: it would keep the stage's model alive
        _fitting.append(self)  # until Lightning's own handler takes over, `sigterm_raises`' sends SIGTERM here

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self in _fitting:
            _fitting.remove(self)

    def fitting(self) -> bool:
        """Whether its fit is under way (a fit that raised calls no `teardown`)."""
        from lightning.pytorch.trainer.states import TrainerStatus

        trainer = self._trainer()
        return trainer is not None and trainer.state.status == TrainerStatus.RUNNING

    def _note(self, signum, frame) -> None:
        if not self.signalled:
            log.info("SIGTERM: stopping after the next training batch")
        self.signalled = True

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.strategy.reduce_boolean_decision(self.signalled or trainer.received_sigterm, all=False):
            trainer._signal_connector.received_sigterm = True  # read after the batch's last hook, on every rank


def stop_on_sigusr1() -> None:
    """SLURM's warning before a job's time runs out (sbatch --signal=USR1@90) stops the run as SIGTERM does:
    after the batch it is in, exit 143, and a rerun goes on from the last checkpoint. It killed a run outside
    a stage (exit 138), and in a stage Lightning saved an "hpc" checkpoint mid-step, which resumed the run to
    other losses. A handler the program already has is kept."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
        signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))


def _on_sigterm(signum, frame) -> None:
    _fitting[:] = [callback for callback in _fitting if callback.fitting()]
    if _fitting:  # Lightning calls it too, after its own handler: the fit stops after the batch
        _fitting[-1]._note(signum, frame)
    elif _held:
        _held[-1] = True
    elif _stopping():
        # The program is on its way out, cleaning up (a scheduler may signal again, or each process of a group):
        # raised there, a second SIGTERM cut the cleanup short (a data build's copies of images stayed, for two
        # signals 5-40 ms apart). Judged by the exception in flight, not by a flag: a Terminated that a
        # finalizer swallowed ("Exception ignored") left the program running, and a flag would ignore the rest.
        log.info("SIGTERM again: already stopping")
    else:
        raise Terminated


def _stopping() -> bool:
    """Whether a `Terminated` is being handled (in an `except`, a `finally` or an `__exit__` on its way up)."""
    error = sys.exc_info()[1]
    while error is not None and not isinstance(error, Terminated):
        error = error.__context__
    return error is not None


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` while the block runs (see the module's docstring); the handler from before
    is put back after it. Only in the main thread, and only where SIGTERM has its default action."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def signals_held() -> Iterator[None]:
    """Holds Ctrl-C and SIGTERM back until the block ends, then raises them: raised inside a finalizer, which the
    garbage collector runs (a profiler's, a DataLoader's), an exception is printed as "Exception ignored" and
    dropped, and the run went on to its end (2 of 8 Ctrl-C presses timed at a stage's end). Ctrl-C only where
    Python's own handler is set (a job started with `&` from a script ignores it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []
    own_sigint = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if own_sigint:
        signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    _held.append(False)
    try:
        yield
    finally:
        if own_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        terminated = _held.pop()
    if terminated:
        raise Terminated
    if pressed:
        raise KeyboardInterrupt
