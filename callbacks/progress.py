"""The progress bar of a stage's trainer: it names the stage, and its epoch count makes sense when the steps decide.

Lightning's bars write "Epoch 1/-2" when `max_steps` ends the stage (its `max_epochs` is then -1), and never say
which stage of the curriculum is running. This one writes "sft_long epoch 1" (or "align epoch 0/2" when
`max_epochs` decides) and, next to the epoch's batches, the optimizer steps against `max_steps`.
Lightning's own bar is the base: Rich's when `rich` is installed (Lightning's default then), tqdm's otherwise.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from typing_extensions import override


def stage_description(stage: str, trainer: L.Trainer) -> str:
    """The bar's text: "<stage> epoch <e>", and "/<last epoch>" only when the epochs end the stage."""
    text = f"{stage} epoch {trainer.current_epoch}"
    if trainer.max_steps == -1 and trainer.max_epochs is not None and trainer.max_epochs > 0:
        text += f"/{trainer.max_epochs - 1}"
    return text


def step_metrics(trainer: L.Trainer, metrics: dict) -> dict:
    """The bar's metrics with "step": optimizer steps done, against max_steps when the steps end the stage."""
    step = f"{trainer.global_step}" + (f"/{trainer.max_steps}" if trainer.max_steps > 0 else "")
    return {"step": step, **metrics}


class RichStageProgressBar(RichProgressBar):
    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        text = stage_description(self.stage, self.trainer)
        # Rich pads it to the validation bar's description, as Lightning's own does, so the bars do not flicker.
        return f"{text:{len(self.validation_description)}}"

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        return step_metrics(trainer, super().get_metrics(trainer, pl_module))


class TQDMStageProgressBar(TQDMProgressBar):
    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(stage_description(self.stage, trainer))

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        return step_metrics(trainer, super().get_metrics(trainer, pl_module))


def stage_progress_bar(stage: str) -> RichProgressBar | TQDMProgressBar:
    """The stage's bar on Lightning's default one: Rich when installed, tqdm otherwise."""
    return RichStageProgressBar(stage) if _RICH_AVAILABLE else TQDMStageProgressBar(stage)
