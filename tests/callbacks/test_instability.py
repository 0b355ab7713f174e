"""Fault injection against the instability monitor, on a small real LightningModule (tests/callbacks/toy.py).

Latency: every injected fault must be reported at the optimizer step it happens in (0 steps late).
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from callbacks.alerts import AlertSinks
from callbacks.instability import (
    Decision,
    InstabilityConfig,
    InstabilityMonitor,
    Streak,
    decide,
    judge,
    spike_threshold,
)
from tests.callbacks.toy import KeyedRegression, ToyRegression, loader, trainer


def _run(faults=None, action="warn", steps=60, tmp_path=None, seed=0, **module_kwargs):
    sinks = AlertSinks("toy", tmp_path / "alerts.jsonl" if tmp_path else None)
    monitor = InstabilityMonitor(InstabilityConfig(action=action, snapshot_every=5), sinks, "toy")
    module = ToyRegression(faults, seed=seed, **module_kwargs)
    weights = WeightTrace()
    trainer([monitor, weights], max_steps=steps).fit(module, loader(KeyedRegression(seed=seed), seed=seed))
    return monitor, module, weights


class WeightTrace(L.Callback):
    """The trained weights after every optimizer step."""

    def __init__(self) -> None:
        self.after: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()]))


def _kinds(monitor) -> list[tuple[str, int]]:
    return [(a.kind, a.step) for a in monitor.alerts]


def test_spike_threshold_is_a_ratio_over_a_steady_history():
    assert spike_threshold([1.0] * 30, z=6, min_ratio=2) == pytest.approx(2.0)
    assert judge(float("nan"), [], InstabilityConfig(), "loss_spike")[0] == "non_finite"
    assert judge(100.0, [1.0] * 5, InstabilityConfig(), "loss_spike")[0] is None  # still warming up


def test_gradient_spikes_have_their_own_ratio():
    """Gradient norms swing more than losses: a 3x gradient is no spike at grad_min_ratio 4, a 3x loss is one
    at min_ratio 2 (both against a steady history, where the ratio decides)."""
    config, steady = InstabilityConfig(), [1.0] * 30
    assert judge(3.0, steady, config, "grad_spike")[0] is None and judge(5.0, steady, config, "grad_spike")[0]
    assert judge(3.0, steady, config, "loss_spike")[0] == "loss_spike"
    assert judge(3.0, steady, InstabilityConfig(grad_min_ratio=2.5), "grad_spike")[0] == "grad_spike"


def test_a_spike_stays_out_of_the_statistics_it_is_judged_by():
    """Were spikes added, a run of them would raise the median until the spikes looked normal."""
    monitor, module, _ = _run({30: "spike", 31: "spike", 32: "spike"}, steps=40)
    assert [step for kind, step in _kinds(monitor) if kind == "loss_spike"] == [30, 31, 32]
    spiked = module.step_losses[30:33]
    assert len(monitor.loss_history) == 40 - 3 and not set(spiked) & set(monitor.loss_history)


def test_nan_loss_is_reported_at_its_step_and_skip_leaves_the_weights(tmp_path):
    monitor, _, weights = _run({30: "nan"}, action="skip", tmp_path=tmp_path)
    assert ("non_finite", 30) in _kinds(monitor)
    assert torch.equal(weights.after[30], weights.after[29])  # the NaN step changed nothing
    assert torch.isfinite(weights.after[-1]).all()
    lines = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "non_finite" and lines[0]["stage"] == "toy" and len(lines[0]["keys"]) == 32
    assert lines[0]["detail"] == "Non-finite: the loss."


def test_inf_gradient_is_reported_and_skipped():
    monitor, _, weights = _run({25: "inf_grad"}, action="skip")
    assert [k for k in _kinds(monitor) if k[0] != "loss_spike"] == [("non_finite", 25)]
    assert torch.equal(weights.after[25], weights.after[24])
    # It read "value inf vs threshold inf", not saying whether the loss or the gradient norm.
    assert [a.detail for a in monitor.alerts if a.kind == "non_finite"] == ["Non-finite: the gradient norm."]


def test_ten_x_loss_spike():
    monitor, _, _ = _run({40: "spike"})
    assert ("loss_spike", 40) in _kinds(monitor)
    assert all(step == 40 for _, step in _kinds(monitor))


def test_gradient_explosion_from_a_bad_batch_names_its_samples():
    warned, _, _ = _run({35: "bad_batch"})
    assert warned.alerts[0].step == 35 and warned.alerts[0].kind in ("grad_spike", "loss_spike")
    monitor, _, _ = _run({35: "bad_batch"}, action="skip")  # skipped, the bad batch leaves no aftermath
    grad_alerts = [a for a in monitor.alerts if a.kind == "grad_spike"]
    assert [a.step for a in grad_alerts] == [35]
    assert len(grad_alerts[0].keys) == 32 and all(k.startswith("sample-") for k in grad_alerts[0].keys)
    assert grad_alerts[0].value > grad_alerts[0].threshold


def test_slow_drift_is_no_spike():
    monitor, _, _ = _run(drift=0.02, steps=80)
    assert not [a for a in monitor.alerts if a.kind in ("loss_spike", "grad_spike", "non_finite")]


def test_noisy_but_stable_curve_raises_no_alert():
    for seed in range(3):
        monitor, _, _ = _run(noise=0.3, seed=seed, steps=80)
        assert monitor.alerts == [], seed


def test_rewind_recovers_the_clean_final_loss():
    _, clean, _ = _run(steps=60)
    monitor, rewound, weights = _run({30: "bad_batch"}, action="rewind", steps=60)
    _, warned, _ = _run({30: "bad_batch"}, action="warn", steps=60)
    assert ("grad_spike", 30) in _kinds(monitor)
    # Back to the last healthy snapshot (every 5 steps), not only the bad update dropped as `skip` does.
    assert torch.equal(weights.after[30], weights.after[24]) and not torch.equal(weights.after[30], weights.after[29])
    final = sum(clean.step_losses[-10:]) / 10
    assert abs(sum(rewound.step_losses[-10:]) / 10 - final) <= 0.25 * final  # within 25% of the clean run
    assert sum(warned.step_losses[-10:]) / 10 > 10 * final  # ...whereas applying the bad update wrecks it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_rewind_snapshot_holds_no_gpu_memory():
    # The parameters were copied to the CPU, the optimizer state deep-copied where it was: Adam's two moments
    # of every trained parameter stayed on the GPU for the whole run. A rewind still restores them.
    monitor = InstabilityMonitor(InstabilityConfig(action="rewind", snapshot_every=5), AlertSinks("toy"), "toy")
    weights = WeightTrace()
    t = L.Trainer(
        max_steps=40, callbacks=[monitor, weights], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="gpu", devices=1,
    )  # fmt: skip
    t.fit(ToyRegression({30: "bad_batch"}), loader(KeyedRegression()))
    moments = [v for s in monitor._snapshot["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    assert moments and all(v.device.type == "cpu" for v in moments)
    assert ("grad_spike", 30) in _kinds(monitor) and torch.equal(weights.after[30], weights.after[24])


def test_a_resumed_rewind_goes_back_to_the_snapshot_the_uninterrupted_run_had(tmp_path):
    """The snapshot was not in the checkpoint: a run resumed at step 48 took a new one at its first step there, so
    the rewind at step 50 went back to step 48 instead of 45, and every weight after it differed from the
    uninterrupted run's (and a bad step right after a resume had no snapshot at all to go back to)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(folder, max_steps: int, ckpt=None) -> tuple[InstabilityMonitor, WeightTrace]:
        monitor = InstabilityMonitor(InstabilityConfig(action="rewind", snapshot_every=5), AlertSinks("toy"), "toy")
        saver = ModelCheckpoint(folder, save_last=True, save_top_k=0, every_n_train_steps=16)
        weights = WeightTrace()
        t = L.Trainer(
            max_steps=max_steps, callbacks=[monitor, saver, weights], logger=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", default_root_dir=folder,
        )  # fmt: skip
        t.fit(ToyRegression({50: "bad_batch"}), loader(KeyedRegression(), shuffle=False), ckpt_path=ckpt)
        return monitor, weights

    whole, whole_weights = fit(tmp_path / "whole", 60)
    fit(tmp_path / "cut", 48)  # 3 epochs of 16 batches: the resume starts a new epoch, as the whole run did
    resumed, resumed_weights = fit(tmp_path / "cut", 60, tmp_path / "cut" / "last.ckpt")
    assert ("grad_spike", 50) in _kinds(whole) and ("grad_spike", 50) in _kinds(resumed)
    assert torch.equal(resumed_weights.after[-1], whole_weights.after[-1])


@pytest.mark.parametrize("action", ["skip", "rewind"])
def test_a_lasting_rise_is_taken_as_the_new_level_after_max_in_a_row_steps(action):
    # From step 30 on every loss is 10x (a warm restart, harder data). Before max_in_a_row, skip and rewind
    # acted on every one of those 30 steps, and the weights never moved again.
    config = InstabilityConfig(action=action, snapshot_every=5, max_in_a_row=5)
    monitor = InstabilityMonitor(config, AlertSinks("toy"), "toy")
    weights = WeightTrace()
    faults = {step: "spike" for step in range(30, 60)}
    trainer([monitor, weights], max_steps=60).fit(ToyRegression(faults), loader(KeyedRegression()))
    kinds = _kinds(monitor)
    assert [step for kind, step in kinds if kind == "loss_spike"] == [30, 31, 32, 33, 34]
    assert ("level_shift", 34) in kinds and kinds.count(("level_shift", 34)) == 1
    shift = next(a for a in monitor.alerts if a.kind == "level_shift")
    assert shift.action == "warn" and "5 steps in a row" in shift.detail
    assert [(a.kind, a.action) for a in monitor.alerts if a.step == 34][0] == ("loss_spike", "warn")
    assert torch.equal(weights.after[33], weights.after[32])  # acted on
    assert not torch.equal(weights.after[34], weights.after[33])  # trained: the new level
    assert all(not torch.equal(a, b) for a, b in zip(weights.after[35:], weights.after[34:], strict=False))
    assert len(monitor.loss_history) == 60 - 34  # the statistics start again at the new level


def test_under_warn_a_lasting_rise_is_a_level_shift_not_an_alert_a_step():
    # With the default action, a loss 10x from step 30 on alerted at every step to the end (300 alerts in a
    # 400-step probe; a day at one step a second, 86,000 alerts and webhook posts), its statistics frozen.
    monitor = InstabilityMonitor(InstabilityConfig(action="warn", max_in_a_row=5), AlertSinks("toy"), "toy")
    trainer([monitor], max_steps=80).fit(ToyRegression({s: "spike" for s in range(30, 80)}), loader(KeyedRegression()))
    kinds = _kinds(monitor)
    assert [step for kind, step in kinds if kind == "loss_spike"] == [30, 31, 32, 33, 34]
    assert max(step for kind, step in kinds if kind.endswith("_spike")) == 34
    assert ("level_shift", 34) in kinds
    assert len(monitor.loss_history) == 80 - 34  # judged again at the new level
    assert [kind for kind, step in kinds if step > 34] == ["divergence"]  # its median, now kept, 10x the lowest


def test_under_warn_non_finite_steps_that_left_the_weights_non_finite_stop_the_stage(tmp_path):
    # A NaN update under warn leaves NaN weights: every later step is non-finite, and the run trained on to its
    # end (and exited 0, every later stage NaN too).
    monitor = InstabilityMonitor(InstabilityConfig(action="warn", max_in_a_row=4), AlertSinks("toy"), "toy")
    t = trainer([monitor], max_steps=60, default_root_dir=tmp_path)
    t.fit(ToyRegression({30: "nan"}), loader(KeyedRegression()))
    assert [(a.kind, a.step, a.action) for a in monitor.alerts] == [
        ("non_finite", 30, "warn"), ("non_finite", 31, "warn"), ("non_finite", 32, "warn"), ("non_finite", 33, "stop"),
    ]  # fmt: skip
    assert "the trained weights are no longer finite" in monitor.alerts[3].detail
    assert monitor.stopped and t.global_step <= 34 and (tmp_path / "checkpoints" / "stopped.ckpt").is_file()


@pytest.mark.parametrize(
    ("max_in_a_row", "faults"), [(1, {30: "nan"}), (4, {27: "spike", 28: "spike", 29: "spike", 30: "nan"})]
)
def test_under_warn_the_weights_are_checked_at_every_muted_step(tmp_path, max_in_a_row, faults):
    # Checked only at the step that muted, judged before its own update: a NaN that was the max_in_a_row-th
    # alerted step in a row (the first one, or after spikes) found the weights still finite, and the run went on.
    monitor = InstabilityMonitor(InstabilityConfig(action="warn", max_in_a_row=max_in_a_row), AlertSinks("t"), "t")
    t = trainer([monitor], max_steps=60, default_root_dir=tmp_path)
    t.fit(ToyRegression(faults), loader(KeyedRegression()))
    assert monitor.stopped and t.global_step <= 32
    assert monitor.alerts[-1].action == "stop" and "no longer finite" in monitor.alerts[-1].detail


def test_under_warn_a_run_of_non_finite_steps_the_weights_survive_is_reported_up_to_max_in_a_row():
    class SkipsNonFinite(ToyRegression):  # as fp16's loss scaler does: a non-finite update is not applied
        def on_before_optimizer_step(self, optimizer) -> None:
            for p in self.parameters():
                p.grad = torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0)

    monitor = InstabilityMonitor(InstabilityConfig(action="warn", max_in_a_row=4), AlertSinks("toy"), "toy")
    trainer([monitor], max_steps=60).fit(SkipsNonFinite(dict.fromkeys(range(30, 40), "nan")), loader(KeyedRegression()))
    assert [(a.kind, a.step) for a in monitor.alerts] == [("non_finite", step) for step in (30, 31, 32, 33)]
    assert "the next non-finite ones are not reported until a finite step" in monitor.alerts[3].detail
    assert monitor.alerts[2].detail == "Non-finite: the loss." and not monitor.stopped
    assert monitor._streak == Streak()  # the finite steps after ended the run of them
    resumed = InstabilityMonitor(InstabilityConfig(action="warn"), AlertSinks("toy"), "toy")
    monitor._streak = Streak(muted=True)
    resumed.load_state_dict(monitor.state_dict())
    assert resumed._streak.muted


def test_a_finite_step_ends_the_muted_run_of_non_finite_ones():
    # Muted, a finite spike was neither reported nor counted: a loss that settled higher after a run of NaN
    # steps (fp16, whose scaler skips them) went silent with frozen statistics for the rest of the stage.
    config, streak, decisions = InstabilityConfig(action="warn", max_in_a_row=3), Streak(), []
    for non_finite in [True] * 4 + [False] * 3:
        decision, streak = decide(config, streak, found=True, non_finite=non_finite)
        decisions.append((decision.action, decision.new_level, decision.report, streak.muted))
    assert decisions == [
        ("warn", False, True, False), ("warn", False, True, False), ("warn", False, True, True),  # the 3rd mutes
        ("warn", False, False, True),  # not reported
        ("warn", False, True, False), ("warn", False, True, False), ("warn", True, True, False),  # a new level
    ]  # fmt: skip


@pytest.mark.parametrize("action", ["skip", "rewind"])
def test_non_finite_steps_past_max_in_a_row_stop_an_undoing_action_and_a_finding_free_step_resets(action):
    config = InstabilityConfig(action=action, max_in_a_row=2)
    decision, streak = decide(config, Streak(), found=True, non_finite=True)
    assert (decision.action, streak) == (action, Streak(1))
    assert decide(config, streak, found=False, non_finite=False) == (Decision("warn"), Streak())
    decision, streak = decide(config, streak, found=True, non_finite=True)
    assert (decision.action, streak) == ("stop", Streak())


def test_a_rewind_leaves_its_snapshot_as_it_was():
    # The optimizer kept the snapshot's tensors it was given (Adam's step; on the CPU the moments too) and
    # updated them in place: a second rewind to the same snapshot restored a later state.
    class AdamRegression(ToyRegression):  # an optimizer with state (the toy's SGD has none)
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    monitor = InstabilityMonitor(InstabilityConfig(action="rewind", snapshot_every=20), AlertSinks("toy"), "toy")
    trainer([monitor], max_steps=38).fit(AdamRegression({30: "bad_batch"}), loader(KeyedRegression()))
    assert ("grad_spike", 30) in _kinds(monitor)
    steps = {float(state["step"]) for state in monitor._snapshot["optimizer"]["state"].values()}
    assert len(steps) == 1 and 15 <= steps.pop() <= 22  # taken near step 20; trained on since: 7 more


def test_non_finite_steps_in_a_row_stop_a_skipping_stage(tmp_path):
    # Skipping cannot get past a NaN that comes back every step: after max_in_a_row of them the stage stops.
    config = InstabilityConfig(action="skip", max_in_a_row=4)
    monitor = InstabilityMonitor(config, AlertSinks("toy"), "toy")
    t = trainer([monitor], max_steps=60, default_root_dir=tmp_path)
    t.fit(ToyRegression({step: "nan" for step in range(30, 60)}), loader(KeyedRegression()))
    assert monitor.stopped and t.global_step <= 34
    assert [(a.step, a.action) for a in monitor.alerts] == [(30, "skip"), (31, "skip"), (32, "skip"), (33, "stop")]
    assert (tmp_path / "checkpoints" / "stopped.ckpt").is_file()


def test_max_in_a_row_is_checked_and_kept_across_a_resume():
    with pytest.raises(ValueError, match="max_in_a_row"):
        InstabilityConfig(max_in_a_row=-1)
    monitor = InstabilityMonitor(InstabilityConfig(action="skip"), AlertSinks("toy"), "toy")
    monitor._streak = Streak(3)
    resumed = InstabilityMonitor(InstabilityConfig(action="skip"), AlertSinks("toy"), "toy")
    resumed.load_state_dict(monitor.state_dict())
    assert resumed._streak == Streak(3)


def test_stop_ends_training_at_the_alert(tmp_path):
    sinks = AlertSinks("toy")
    monitor = InstabilityMonitor(InstabilityConfig(action="stop"), sinks, "toy")
    t = trainer([monitor], max_steps=60, default_root_dir=tmp_path)
    t.fit(ToyRegression({30: "nan"}), loader(KeyedRegression()))
    assert monitor.stopped and t.global_step <= 31
    assert (tmp_path / "checkpoints" / "stopped.ckpt").is_file()


@pytest.mark.parametrize("every", [20, 50])
def test_a_rerun_of_a_stopped_stage_stops_again(tmp_path, every):
    # Stopped at step 31 with no periodic checkpoint before it (every 50), Lightning saved last.ckpt at the end
    # of the fit, at the stopped step: the rerun resumed there and trained on past the alert to step 60. With a
    # checkpoint at step 20 it replayed and stopped again: the outcome hung on the checkpoint interval.
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(resume: bool) -> tuple[InstabilityMonitor, L.Trainer]:
        monitor = InstabilityMonitor(InstabilityConfig(action="stop"), AlertSinks("toy"), "toy")
        saver = ModelCheckpoint(tmp_path / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=every)
        t = L.Trainer(
            max_steps=60, callbacks=[monitor, saver], logger=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
        )  # fmt: skip
        last = tmp_path / "checkpoints" / "last.ckpt"
        resume_from = last if resume and last.exists() else None
        t.fit(ToyRegression({30: "nan"}), loader(KeyedRegression()), ckpt_path=resume_from)
        return monitor, t

    first, _ = fit(resume=False)
    again, rerun = fit(resume=True)
    assert first.stopped and again.stopped and rerun.global_step <= 31


def test_statistics_survive_a_state_dict_round_trip():
    monitor, _, _ = _run(steps=40)
    monitor.diverged = True
    restored = InstabilityMonitor(InstabilityConfig(), AlertSinks("toy"), "toy")
    restored.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert list(restored.loss_history) == list(monitor.loss_history)
    assert list(restored.grad_history) == list(monitor.grad_history)
    assert restored.diverged, "a divergence already reported is not reported again after a resume"


def test_a_divergence_is_reported_once_across_a_resume(tmp_path):
    """A climbing loss is one divergence alert, not one per step, and a resumed run that is still diverged
    does not raise it again (the flag is in the checkpoint)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps: int, ckpt=None) -> list[tuple[str, int]]:
        monitor = InstabilityMonitor(InstabilityConfig(), AlertSinks("toy"), "toy")
        last = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=5)
        t = L.Trainer(
            callbacks=[monitor, last], max_steps=max_steps, logger=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu",
        )  # fmt: skip
        t.fit(ToyRegression(drift=0.15), loader(KeyedRegression()), ckpt_path=ckpt)
        return _kinds(monitor)

    assert run(80) == [("divergence", 72)]
    assert run(95, tmp_path / "last.ckpt") == []  # resumed at step 80, the loss still climbing


def test_bad_action_names_the_flag():
    with pytest.raises(ValueError, match="stability.instability.action"):
        InstabilityConfig(action="panic")


def test_a_warmup_longer_than_the_window_is_refused():
    # The history holds at most `window` steps: with warmup > window no spike would ever be judged.
    with pytest.raises(ValueError, match=r"warmup \(60\) must not exceed .window \(50\)"):
        InstabilityConfig(warmup=60)


def _fp16_run(faults: dict, action: str = "warn", steps: int = 40, callbacks=(), ckpt_path=None):
    from lightning.pytorch.plugins import MixedPrecision

    monitor = InstabilityMonitor(InstabilityConfig(action=action), AlertSinks("toy"), "toy")
    # 6 overflows in a row at first while the scale comes down (at Lightning's default 2**16: one).
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    t = trainer([monitor, *callbacks], max_steps=steps, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    t.fit(ToyRegression(faults), loader(KeyedRegression()), ckpt_path=ckpt_path)
    return monitor, t


def test_fp16_overflows_are_left_to_the_loss_scaler_until_they_persist():
    monitor, t = _fp16_run({}, action="stop")
    assert monitor.alerts == [] and t.global_step == 40, "the scaler's routine overflows are no alert, nor a stop"
    # Gradients that overflow step after step: the scale is collapsing. One alert, at the 8th in a row.
    monitor, _ = _fp16_run({step: "inf_grad" for step in range(20, 32)})
    assert _kinds(monitor) == [("non_finite", 27)]
    monitor, _ = _fp16_run({20: "nan"})  # a NaN loss is never the scaler's business
    assert ("non_finite", 20) in _kinds(monitor)


def test_an_fp16_overflow_streak_survives_a_resume(tmp_path):
    """Stopped after 5 overflows in a row (steps 20-24) and resumed, the run counted them from 0 again: the
    alert the uninterrupted run gave at the 8th (step 27) never came."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    faults = {step: "inf_grad" for step in range(20, 32)}
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=25)
    _fp16_run(faults, steps=25, callbacks=[saver])
    (checkpoint,) = tmp_path.glob("*step=25.ckpt")
    resumed, t = _fp16_run(faults, ckpt_path=checkpoint)
    assert t.global_step == 40 and _kinds(resumed) == [("non_finite", 27)]


def test_fp16_losses_are_judged_without_the_loss_scale():
    # Lightning scales the loss before on_before_backward: judged as it came, a flat loss of ~1 read as ~10^4,
    # and the scale's doublings (here every 25 clean steps, from 4 to 256) as a divergence at step 69.
    from lightning.pytorch.plugins import MixedPrecision

    monitor = InstabilityMonitor(InstabilityConfig(action="warn"), AlertSinks("toy"), "toy")
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=25)
    module = ToyRegression()
    t = trainer([monitor], max_steps=160, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    t.fit(module, loader(KeyedRegression()))
    assert scaler.get_scale() == 256.0, "the scale grew as the test means it to"
    assert list(monitor.loss_history)[-5:] == pytest.approx(module.step_losses[-5:], rel=1e-3)
    assert monitor.alerts == []


def test_a_resumed_deepspeed_step_is_judged_once_it_is_whole(monkeypatch, tmp_path):
    # Under DeepSpeed the step is judged when the engine has stepped (global_step moved). Resumed at step 8
    # with accumulation 2, the first micro-batch must not be taken for a finished step.
    from lightning.pytorch.callbacks import ModelCheckpoint

    import callbacks.instability as instability

    class Engine:  # what the monitor reads of DeepSpeed's engine: its global gradient norm
        def get_global_grad_norm(self):
            return 1.0

    monkeypatch.setattr(instability, "deepspeed_engine", lambda trainer: Engine())
    judged = []

    class Recording(InstabilityMonitor):
        def _judge_step(self, trainer, pl_module, optimizer, grad):
            judged.append((trainer.global_step, len(self._micro_losses)))
            super()._judge_step(trainer, pl_module, optimizer, grad)

    def fit(steps: int, ckpt=None) -> None:
        every = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=4)
        monitor = Recording(InstabilityConfig(), AlertSinks("toy"), "toy")
        t = L.Trainer(
            max_steps=steps,
            callbacks=[monitor, every],
            accumulate_grad_batches=2,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        t.fit(ToyRegression(), loader(KeyedRegression(size=2048)), ckpt_path=ckpt)

    fit(10)
    judged.clear()
    fit(12, tmp_path / "last.ckpt")
    assert judged == [(9, 2), (10, 2), (11, 2), (12, 2)]


def test_an_alert_under_deepspeed_carries_the_step_it_judged(monkeypatch):
    # Judged after the engine's step, the alert took the global step that step had already moved to: a NaN at
    # step 30 was reported at 31 under DeepSpeed, at 30 under DDP.
    import callbacks.instability as instability

    class Engine:
        def get_global_grad_norm(self):
            return 1.0

    monkeypatch.setattr(instability, "deepspeed_engine", lambda trainer: Engine())
    monitor = InstabilityMonitor(InstabilityConfig(), AlertSinks("toy"), "toy")
    trainer([monitor], max_steps=40).fit(ToyRegression({30: "nan"}), loader(KeyedRegression()))
    assert _kinds(monitor)[0] == ("non_finite", 30)


@pytest.mark.slow
def test_each_rank_s_finding_is_reported_with_its_own_kind_value_and_keys(tmp_path):
    # Two DDP ranks; only rank 1's batch spikes. Every rank acts, and rank 0 reports rank 1's alert as it is.
    import sys
    from pathlib import Path

    from tests.conftest import run_fresh

    done = run_fresh([sys.executable, str(Path(__file__).with_name("ddp_alerts.py")), str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    alerts = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [(a["kind"], a["step"], a["rank"]) for a in alerts] == [("loss_spike", 40, 1)]
    assert alerts[0]["value"] > alerts[0]["threshold"]
    keys = {rank: json.loads((tmp_path / f"keys{rank}.json").read_text()) for rank in (0, 1)}
    assert alerts[0]["keys"] == keys[1] != keys[0]


@pytest.mark.slow
def test_a_divergence_on_one_rank_is_reported(tmp_path):
    # A divergence, judged on each rank's own losses, was reported by rank 0 alone: one on rank 1 never was.
    import sys
    from pathlib import Path

    from tests.conftest import run_fresh

    done = run_fresh([sys.executable, str(Path(__file__).with_name("ddp_alerts.py")), str(tmp_path), "divergence"])
    assert done.returncode == 0, done.stderr[-3000:]
    alerts = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [a["rank"] for a in alerts if a["kind"] == "divergence"] == [1], alerts


class _BatchNormToy(L.LightningModule):
    """A trained layer with BatchNorm (as a ResNet tower with trainable: [vision]); NaN inputs at `nan_step`."""

    def __init__(self, nan_step: int = 30) -> None:
        super().__init__()
        self.nan_step = nan_step
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x = batch["x"].clone()
        if self.global_step == self.nan_step:
            x.fill_(float("nan"))
        return torch.nn.functional.mse_loss(self.net(x).squeeze(-1), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize(("action", "nan_step"), [("skip", 30), ("rewind", 30), ("skip", 0), ("rewind", 0)])
def test_skip_and_rewind_undo_a_bad_batchs_batchnorm_statistics(action, nan_step):
    # The forward pass had already folded the NaN batch into the running statistics: the parameters were
    # restored, and the model still gave NaN in eval mode. A rewind before the first snapshot (step 0) restored
    # nothing, and the first snapshot then took the NaN statistics in.
    monitor = InstabilityMonitor(InstabilityConfig(action=action), AlertSinks("toy"), "toy")
    module = _BatchNormToy(nan_step)
    trainer([monitor], max_steps=60).fit(module, loader(KeyedRegression()))
    assert ("non_finite", nan_step) in _kinds(monitor)
    norm = module.net[1]
    assert torch.isfinite(norm.running_mean).all() and torch.isfinite(norm.running_var).all()
    with torch.no_grad():
        assert torch.isfinite(module.eval().net(KeyedRegression().x[:8])).all()


def test_a_module_with_two_optimizers_is_refused():
    # Each optimizer's step was judged as a training step: their losses (0.3 and 100) went into one history, and a
    # 40x spike of the first raised no loss_spike.
    class TwoOptimizers(ToyRegression):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            for optimizer in self.optimizers():
                optimizer.zero_grad()
                self.manual_backward(super().training_step(batch, batch_idx))
                optimizer.step()

        def configure_optimizers(self):
            return [torch.optim.SGD(self.parameters(), lr=self.lr), torch.optim.SGD(self.parameters(), lr=self.lr)]

    monitor = InstabilityMonitor(InstabilityConfig(), AlertSinks("toy"), "toy")
    t = L.Trainer(
        max_steps=4, callbacks=[monitor], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    with pytest.raises(ValueError, match="InstabilityMonitor judges one optimizer step per training step; this"):
        t.fit(TwoOptimizers(), loader(KeyedRegression()))
