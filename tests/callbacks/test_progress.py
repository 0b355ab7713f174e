"""The stage's progress bar names the stage and never writes Lightning's "Epoch 1/-2" when max_steps ends it."""

from __future__ import annotations

import lightning as L
import pytest

from callbacks.progress import RichStageProgressBar, TQDMStageProgressBar
from tests.callbacks.toy import KeyedRegression, ToyRegression, loader


def _description(bar) -> str:
    if isinstance(bar, RichStageProgressBar):
        return bar.progress.tasks[bar.train_progress_bar_id].description.strip()
    return bar.train_progress_bar.desc.rstrip(": ")


def _fit(bar, **limits) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[bar], limit_train_batches=4, limit_val_batches=0, **limits,
    )  # fmt: skip
    trainer.fit(ToyRegression(), train_dataloaders=loader(KeyedRegression()))
    return trainer


@pytest.mark.parametrize("kind", [RichStageProgressBar, TQDMStageProgressBar])
def test_steps_end_the_stage_without_a_negative_epoch_count(kind):
    bar = kind("sft_long")
    trainer = _fit(bar, max_steps=6)  # two epochs of 4 batches, the second cut short by the steps
    assert trainer.max_epochs == -1
    assert _description(bar) == "sft_long epoch 1"  # Lightning's own: "Epoch 1/-2"
    assert bar.get_metrics(trainer, trainer.lightning_module)["step"] == "6/6"


@pytest.mark.parametrize("kind", [RichStageProgressBar, TQDMStageProgressBar])
def test_epochs_end_the_stage_with_the_last_epoch_shown(kind):
    bar = kind("align")
    trainer = _fit(bar, max_epochs=3)
    assert _description(bar) == "align epoch 2/2"
    assert bar.get_metrics(trainer, trainer.lightning_module)["step"] == "12"
