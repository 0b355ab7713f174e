"""The progress bar of a stage's trainer: it names the stage, and its counts make sense when the steps decide.

Lightning's bars write "Epoch 1/-2" when `max_steps` ends the stage (its `max_epochs` is then -1), and never say
which stage of the curriculum is running. This one writes "sft_long epoch 1" (or "align epoch 0/2" when
`max_epochs` decides) and, next to the epoch's batches, the optimizer steps against the stage's total.

Lightning's bar also counted an epoch's batches wrong when `max_steps` ends it early: it compared the optimizer
steps left with batches (under `accumulate_grad_batches` 16 the bar was full at a sixteenth of the stage), and
after a resume in the middle of an epoch it drew no bar for that epoch (tqdm) or a too short one (Rich). Here the
total is the batches the epoch will end at, counted from its first as the bar's position is.
Lightning's own bar is the base: Rich's when `rich` is installed (Lightning's default then), tqdm's otherwise.
"""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from typing_extensions import override


def stage_steps(trainer: L.Trainer) -> int | None:
    """The optimizer steps the stage will run: `max_steps`, or fewer when `max_epochs` ends it first (None: no
    bound known, an epoch of unknown length)."""
    steps = trainer.max_steps if trainer.max_steps > 0 else math.inf
    if trainer.max_epochs not in (None, -1) and trainer.num_training_batches != math.inf:
        # Lightning steps on an epoch's short last window: an epoch's steps round up.
        per_epoch = -(-int(trainer.num_training_batches) // trainer.accumulate_grad_batches)
        steps = min(steps, per_epoch * trainer.max_epochs)
    return None if steps == math.inf else int(steps)


def epoch_batches_to_run(trainer: L.Trainer) -> int | float:
    """The batch count the current epoch ends at, counted from its first batch (a resumed epoch's included): the
    loader's epoch, or less when the stage's last optimizer step comes first."""
    batches = trainer.num_training_batches
    if trainer.max_steps < 0:
        return batches
    accumulate = trainer.accumulate_grad_batches
    # Within an epoch resumed mid-way, the batches already trained on: whole steps (a checkpoint is written after
    # one), and a window cut by the kill is trained again in full by Lightning's count. Else the epoch is new.
    done = trainer.fit_loop.epoch_loop.batch_progress.current.ready if trainer.fit_loop.restarted_mid_epoch else 0
    return min(batches, accumulate * (done // accumulate + trainer.max_steps - trainer.global_step))


def stage_description(stage: str, trainer: L.Trainer) -> str:
    """The bar's text: "<stage> epoch <e>", and "/<last epoch>" only when the epochs end the stage."""
    text = f"{stage} epoch {trainer.current_epoch}"
    epochs_decide = trainer.max_epochs not in (None, -1) and (
        trainer.max_steps < 0 or (stage_steps(trainer) or math.inf) < trainer.max_steps
    )
    if epochs_decide:
        text += f"/{trainer.max_epochs - 1}"
    return text


def step_metrics(trainer: L.Trainer, metrics: dict) -> dict:
    """The bar's metrics with "step": optimizer steps done, against the stage's total when one is known."""
    total = stage_steps(trainer)
    return {"step": f"{trainer.global_step}" + (f"/{total}" if total is not None else ""), **metrics}


class _StageBar:
    """What both bars add to Lightning's: the stage's name, the epoch's total in batches, a resumed epoch's bar,
    the optimizer steps beside the metrics. Before the Lightning bar in the bases: its hooks come first."""

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    @property
    def total_train_batches(self) -> int | float:
        return epoch_batches_to_run(self.trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.fit_loop.restarted_mid_epoch:  # Lightning calls no on_train_epoch_start for a resumed epoch
            self.on_train_epoch_start(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        return step_metrics(trainer, super().get_metrics(trainer, pl_module))


class RichStageProgressBar(_StageBar, RichProgressBar):
    @override
    def _get_train_description(self, current_epoch: int) -> str:
        text = stage_description(self.stage, self.trainer)
        # Rich pads it to the validation bar's description, as Lightning's own does, so the bars do not flicker.
        return f"{text:{len(self.validation_description)}}"


class TQDMStageProgressBar(_StageBar, TQDMProgressBar):
    @override
    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(stage_description(self.stage, trainer))


def stage_progress_bar(stage: str) -> RichProgressBar | TQDMProgressBar:
    """The stage's bar on Lightning's default one: Rich when installed, tqdm otherwise."""
    return RichStageProgressBar(stage) if _RICH_AVAILABLE else TQDMStageProgressBar(stage)
