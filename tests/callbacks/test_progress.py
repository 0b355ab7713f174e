"""The stage's progress bar names the stage and never writes Lightning's "Epoch 1/-2" when max_steps ends it."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.progress import RichStageProgressBar, TQDMStageProgressBar
from tests.callbacks.toy import KeyedRegression, ToyRegression, loader


def _description(bar) -> str:
    if isinstance(bar, RichStageProgressBar):
        return bar.progress.tasks[bar.train_progress_bar_id].description.strip()
    return bar.train_progress_bar.desc.rstrip(": ")


def _position(bar) -> tuple[int, int]:
    """(batches done, total) of the bar's training epoch."""
    if isinstance(bar, RichStageProgressBar):
        task = bar.progress.tasks[bar.train_progress_bar_id]
        return int(task.completed), int(task.total)
    return bar.train_progress_bar.n, bar.train_progress_bar.total


class EpochEnds(L.Callback):
    """The bar's (done, total) at the end of each training epoch."""

    def __init__(self, bar) -> None:
        self.bar, self.ends = bar, []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.ends.append(_position(self.bar))


def _fit(bar, callbacks=(), ckpt_path=None, **limits) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_model_summary=False,
        callbacks=[bar, *callbacks], limit_train_batches=4, limit_val_batches=0, **limits,
    )  # fmt: skip
    trainer.fit(ToyRegression(), train_dataloaders=loader(KeyedRegression()), ckpt_path=ckpt_path)
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
    assert bar.get_metrics(trainer, trainer.lightning_module)["step"] == "12/12"


@pytest.mark.parametrize("kind", [RichStageProgressBar, TQDMStageProgressBar])
def test_the_bar_counts_batches_not_steps_under_accumulation(kind):
    """Lightning's total was min(batches, steps left): under accumulation 2 the first epoch's bar read 4/3 and
    the last one's 2/1 (full halfway)."""
    bar = kind("sft_long")
    ends = EpochEnds(bar)
    trainer = _fit(bar, callbacks=[ends], max_steps=3, accumulate_grad_batches=2)
    assert ends.ends == [(4, 4), (2, 2)]  # 2 steps of 2 batches, then the third step's 2 batches
    assert bar.get_metrics(trainer, trainer.lightning_module)["step"] == "3/3"


@pytest.mark.parametrize("kind", [RichStageProgressBar, TQDMStageProgressBar])
def test_a_resumed_epoch_ends_its_bar_full(kind, tmp_path):
    """A fit resumed in the middle of an epoch: Lightning calls no on_train_epoch_start for it, so tqdm's bar had
    no total and Rich's counted the steps left as its batches (7/2)."""
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    _fit(kind("sft"), callbacks=[saver], max_steps=1, accumulate_grad_batches=2)  # stopped after batch 2 of 4
    bar = kind("sft")
    ends = EpochEnds(bar)
    checkpoint = next(tmp_path.glob("*.ckpt"))
    trainer = _fit(bar, callbacks=[ends], ckpt_path=checkpoint, max_steps=3, accumulate_grad_batches=2)
    assert ends.ends == [(4, 4), (2, 2)]  # epoch 0's last 2 batches, counted on from the 2 done
    assert _description(bar) == "sft epoch 1"
    assert bar.get_metrics(trainer, trainer.lightning_module)["step"] == "3/3"


@pytest.mark.parametrize("kind", [RichStageProgressBar, TQDMStageProgressBar])
def test_epochs_that_end_the_stage_before_max_steps_give_the_steps_total(kind):
    """max_steps 100 with max_epochs 2 of 2 steps each: the stage stops at step 4, which the bar said of 100."""
    bar = kind("align")
    trainer = _fit(bar, max_steps=100, max_epochs=2, accumulate_grad_batches=2)
    assert _description(bar) == "align epoch 1/1"
    assert bar.get_metrics(trainer, trainer.lightning_module)["step"] == "4/4"
