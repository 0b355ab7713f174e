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
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import lightning as L
from typing_extensions import override

log = logging.getLogger(__name__)


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

    def _note(self, signum, frame) -> None:
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
