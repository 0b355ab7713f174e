"""The epoch-boundary check: real causes trigger it with the cause named; a healthy run does not."""

from __future__ import annotations

import json
import random
import statistics

import lightning as L
import pytest

from callbacks.alerts import AlertSinks
from callbacks.epoch_boundary import BoundaryCheck, BoundaryConfig, boundary_jump, spread
from tests.callbacks.toy import KeyedRegression, ToyRegression, loader, trainer

STEPS_PER_EPOCH = 2048 // 64


def _fit(module, dataset, shuffle=True, epochs=4, config=None) -> BoundaryCheck:
    check = BoundaryCheck(config or BoundaryConfig(), AlertSinks("toy"), "toy")
    data = loader(dataset, batch_size=64, shuffle=shuffle)
    trainer([check], max_steps=-1, max_epochs=epochs).fit(module, data)
    return check


def test_spread_ignores_a_steady_trend():
    assert spread([10 - 0.5 * i for i in range(20)]) == 0.0
    fired, jump, _ = boundary_jump([1.0] * 5, [2.0] * 5, noise=0.01, config=BoundaryConfig())
    assert fired and jump == 1.0


def test_healthy_multi_epoch_run_raises_nothing():
    check = _fit(ToyRegression(lr=0.05), KeyedRegression(size=2048), shuffle=True, epochs=5)
    assert check.alerts == []
    assert len(check.all_losses) == 5 * STEPS_PER_EPOCH


def test_learning_rate_restart_at_every_epoch_is_named():
    # SGD on this regression is stable below lr 1: a restart to 1.7 overshoots for a few steps.
    module = ToyRegression(lr=0.005, lr_restart_every=STEPS_PER_EPOCH, restart_lr=1.7)
    check = _fit(module, KeyedRegression(size=2048), shuffle=True)
    assert [a.epoch for a in check.alerts] == [1, 2, 3], "every restart must show at its boundary"
    assert all(a.kind == "epoch_boundary" for a in check.alerts)
    assert all(any(c.startswith("lr_jump") for c in a.causes) for a in check.alerts)
    assert not any(c.startswith("repeated_order") for a in check.alerts for c in a.causes)


def test_a_disabled_check_raises_nothing_and_still_records_every_loss():
    module = ToyRegression(lr=0.005, lr_restart_every=STEPS_PER_EPOCH, restart_lr=1.7)  # alerts when enabled
    check = _fit(module, KeyedRegression(size=2048), config=BoundaryConfig(enabled=False))
    assert check.alerts == [] and len(check.all_losses) == 4 * STEPS_PER_EPOCH


def test_no_reshuffle_is_named():
    # Same inputs, target +1 in the first half and -1 in the second: unshuffled, every epoch starts
    # on the half the model has just unlearned.
    check = _fit(ToyRegression(lr=0.2), KeyedRegression(size=2048, conflict=True), shuffle=False)
    assert [a.epoch for a in check.alerts] == [1, 2, 3]
    assert all(any(c.startswith("repeated_order") for c in a.causes) for a in check.alerts)
    assert not any(c.startswith("lr_jump") for a in check.alerts for c in a.causes)


class BatchSizeSwitch(L.LightningDataModule):
    """Batch size 32 for the first two epochs, then 128 (the loader is rebuilt every epoch)."""

    def train_dataloader(self):
        return loader(KeyedRegression(size=2048), batch_size=32 if self.trainer.current_epoch < 2 else 128)


def test_batch_size_change_is_named():
    # A loss summed over the batch grows 4x when the batch does.
    check = BoundaryCheck(BoundaryConfig(), AlertSinks("toy"), "toy")
    module = ToyRegression(lr=0.0004, reduction="sum")
    trainer([check], max_steps=-1, max_epochs=4, reload_dataloaders_every_n_epochs=1).fit(module, BatchSizeSwitch())
    assert [a.epoch for a in check.alerts] == [2]
    assert check.alerts[0].causes == ["batch_size_changed (32 -> 128)"]


def test_accumulation_change_is_named():
    # A loss divided by the accumulation by hand (Lightning divides it too) jumps 4x when accumulation goes 4 -> 1.
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    check = BoundaryCheck(BoundaryConfig(), AlertSinks("toy"), "toy")
    schedule = GradientAccumulationScheduler(scheduling={0: 4, 2: 1})
    module = ToyRegression(lr=0.2, divide_by_accumulation=True)
    trainer([schedule, check], max_steps=-1, max_epochs=4).fit(module, loader(KeyedRegression(size=2048), 64))
    assert [a.epoch for a in check.alerts] == [2]
    assert check.alerts[0].causes == ["accumulation_changed (4 -> 1)"]


def test_epochs_shorter_than_k_are_said_to_go_unchecked(caplog):
    # An epoch is checked at its k-th step: epochs of 2 steps were never checked, and nothing said so.
    caplog.set_level("WARNING", logger="callbacks.epoch_boundary")
    _fit(ToyRegression(lr=0.05), KeyedRegression(size=128), epochs=3)
    assert "its epoch boundaries (its epochs have 2 optimizer steps) not checked, fewer than stability." in caplog.text
    caplog.clear()
    _fit(ToyRegression(lr=0.05), KeyedRegression(size=128), epochs=3, config=BoundaryConfig(k=2))
    _fit(ToyRegression(lr=0.05), KeyedRegression(size=128), epochs=1)  # no boundary to check
    assert "not checked" not in caplog.text
    # One epoch after a stage with the same budget: its start, checked at its k-th step, is not checked either.
    check = BoundaryCheck(BoundaryConfig(), AlertSinks("toy"), "toy", previous_tail=[1.0] * 10)
    trainer([check], max_steps=-1, max_epochs=1).fit(ToyRegression(lr=0.05), loader(KeyedRegression(size=128), 64))
    assert "its start (the stage boundary: 2 steps follow it) not checked" in caplog.text


def test_a_short_stage_and_a_cut_last_epoch_are_said_to_go_unchecked(caplog):
    """Epochs of 8 steps (k 5): a stage of 3 steps leaves its start unchecked, and max_steps 10 the boundary
    before its second epoch (2 steps): the warning looked only at the length of a whole epoch."""
    caplog.set_level("WARNING", logger="callbacks.epoch_boundary")
    data = KeyedRegression(size=512)
    check = BoundaryCheck(BoundaryConfig(), AlertSinks("toy"), "toy", previous_tail=[1.0] * 10)
    trainer([check], max_steps=3).fit(ToyRegression(lr=0.05), loader(data, 64))
    assert "its start (the stage boundary: 3 steps follow it) not checked" in caplog.text
    caplog.clear()
    trainer([BoundaryCheck(BoundaryConfig(), AlertSinks("toy"), "toy")], max_steps=10).fit(
        ToyRegression(lr=0.05), loader(data, 64)
    )
    assert "the boundary before its last epoch (max_steps leaves it 2 steps) not checked" in caplog.text
    caplog.clear()
    trainer([BoundaryCheck(BoundaryConfig(), AlertSinks("toy"), "toy")], max_steps=13).fit(
        ToyRegression(lr=0.05), loader(data, 64)
    )
    assert "not checked" not in caplog.text  # 5 steps after the boundary: checked


def test_the_stage_boundary_noise_leaves_out_the_previous_stage_start():
    # As at an epoch boundary, the noise leaves out the first k losses (a stage's start, falling fast): over the
    # whole tail it was twice as large here, and a jump of 0.04 on a loss of 1.0 (min_rel 0) went unseen.
    from types import SimpleNamespace

    from callbacks.epoch_boundary import _EpochTrace

    rng = random.Random(0)
    tail = [8.0, 5.0, 3.0, 2.0, 1.4] + [1.0 + rng.uniform(-0.01, 0.01) for _ in range(10)]
    check = BoundaryCheck(BoundaryConfig(min_rel=0.0), AlertSinks("next"), "next", previous_tail=tail)
    check.epochs = [_EpochTrace([1.04] * 5, [1e-3] * 5, [8] * 5, [], 1, steps=5)]
    alert = check._finding(SimpleNamespace(current_epoch=0, global_step=5))
    assert alert is not None and alert.kind == "stage_boundary"
    assert alert.threshold == pytest.approx(4 * spread(tail[5:]))


def test_stage_boundary_compares_with_the_previous_stage_tail():
    check = BoundaryCheck(BoundaryConfig(), AlertSinks("next"), "next", previous_tail=[0.2] * 20)
    trainer([check], max_steps=8).fit(ToyRegression(lr=0.05), loader(KeyedRegression()))
    assert [a.kind for a in check.alerts] == ["stage_boundary"]  # the toy starts far above 0.2


def test_one_loss_per_optimizer_step_when_accumulation_leaves_a_short_window():
    # 10 batches an epoch, accumulation 3: Lightning steps after batches 3, 6, 9 and (short) 10.
    check = BoundaryCheck(BoundaryConfig(k=2), AlertSinks("toy"), "toy")
    module = ToyRegression(lr=0.05)
    t = trainer([check], max_steps=-1, max_epochs=2, accumulate_grad_batches=3)
    t.fit(module, loader(KeyedRegression(size=320), batch_size=32, shuffle=False))
    assert t.global_step == 8 and len(check.all_losses) == 8 and [len(e.losses) for e in check.epochs] == [4, 4]
    micro = module.step_losses
    assert check.epochs[0].losses[3] == pytest.approx(micro[9]), "the short window is a step of its own"
    assert check.epochs[1].losses[0] == pytest.approx(statistics.fmean(micro[10:13])), "no loss carried over"


def test_a_stage_resumed_before_its_kth_loss_still_checks_the_boundary(tmp_path):
    """The epochs' loss traces were not checkpointed: resumed after step 4 of k=5, the check counted its
    first 5 losses again, never reached them, and the alert an uninterrupted run raised was lost."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.callbacks.test_evaluation import _fit as fit

    class Killed(BaseException):
        pass

    class KillAt6(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 6:
                raise Killed()

    def callbacks(folder, *extra):
        sinks = AlertSinks("toy", folder / "alerts.jsonl")  # a stage far below the one before: a boundary jump
        check = BoundaryCheck(BoundaryConfig(k=5), sinks, "toy", previous_tail=[1e-6 * i for i in range(6)])
        last = ModelCheckpoint(dirpath=folder / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=4)
        return [check, sinks, *extra, last]

    def alerts(folder) -> list[tuple[str, int]]:
        return [(a["kind"], a["step"]) for a in map(json.loads, (folder / "alerts.jsonl").read_text().splitlines())]

    fit(callbacks(tmp_path / "whole"), max_steps=8)
    # The 5th step, index 4, as the instability monitor counts (it reported the boundary one step later).
    assert alerts(tmp_path / "whole") == [("stage_boundary", 4)]
    with pytest.raises(Killed):
        fit(callbacks(tmp_path / "resumed", KillAt6()), max_steps=8)
    fit(callbacks(tmp_path / "resumed"), tmp_path / "resumed" / "ckpt" / "last.ckpt", max_steps=8)
    assert alerts(tmp_path / "resumed") == [("stage_boundary", 4)]


def test_an_optimizer_reset_and_a_short_last_batch_are_named():
    """The two causes no run above provokes, on the epoch traces the check keeps and a real Adam's state."""
    import torch

    from callbacks.epoch_boundary import _EpochTrace

    check = BoundaryCheck(BoundaryConfig(), AlertSinks("toy"), "toy")
    before = _EpochTrace([1.0] * 10, [0.1] * 10, [64] * 9 + [16], ["k1"], 1, optimizer_steps=100)
    after = _EpochTrace([2.0] * 5, [0.1] * 5, [64] * 5, ["k7"], 1)
    weight = torch.nn.Parameter(torch.ones(2))
    adam = torch.optim.Adam([weight])
    for _ in range(3):  # an optimizer made afresh at the epoch: its step count starts again
        weight.grad = torch.ones(2)
        adam.step()
    t = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    t.optimizers = [adam]
    assert check._causes(t, before, after) == [
        "optimizer_reset (optimizer step count 100 -> 3)",
        "short_last_batch (16 samples)",
    ]
    t.optimizers = []  # an optimizer that keeps no step count (SGD): no verdict on a reset
    assert check._causes(t, before, _EpochTrace([2.0], [0.1], [64], ["k7"], 1)) == ["short_last_batch (16 samples)"]


def test_a_nan_step_neither_hides_a_boundary_jump_nor_breaks_losses_json(tmp_path):
    # The monitor skips the NaN step near epoch 1's end; the boundary check took its NaN into the mean of
    # epoch 1's last k losses, and the real jump into epoch 2 went unreported. losses.json held a bare NaN.
    from callbacks.instability import InstabilityConfig, InstabilityMonitor

    check = BoundaryCheck(BoundaryConfig(), AlertSinks("toy"), "toy")
    monitor = InstabilityMonitor(InstabilityConfig(action="skip"), AlertSinks("toy"), "toy")
    data = loader(KeyedRegression(size=2048, conflict=True), batch_size=64, shuffle=False)
    module = ToyRegression({2 * STEPS_PER_EPOCH - 2: "nan"}, lr=0.2)
    trainer([monitor, check], max_steps=-1, max_epochs=4).fit(module, data)
    assert [a.epoch for a in check.alerts] == [1, 2, 3]
    check.write_losses(tmp_path / "losses.json")
    losses = json.loads((tmp_path / "losses.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert losses["losses"].count(None) == 1 and len(losses["losses"]) == 4 * STEPS_PER_EPOCH


@pytest.mark.slow
def test_a_jump_on_one_rank_is_reported_with_its_rank(tmp_path):
    """Two DDP ranks; only rank 1's loss jumps at epoch 1's start. Only rank 0's losses were judged, so the jump
    (a shard or worker feeding that rank bad data) went unreported."""
    import sys
    from pathlib import Path

    from tests.conftest import run_fresh

    done = run_fresh([sys.executable, str(Path(__file__).with_name("ddp_alerts.py")), str(tmp_path), "boundary"])
    assert done.returncode == 0, done.stderr[-3000:]
    alerts = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [(a["kind"], a["epoch"], a["rank"]) for a in alerts] == [("epoch_boundary", 1, 1)]
