"""Loss and gradient instability alerts, checked at every optimizer step.

Per optimizer step the callback sees:
- the loss, in units that do not change with gradient accumulation: Lightning hands
  `on_before_backward` the loss divided by `accumulate_grad_batches` (and, with fp16, multiplied by the
  loss scale, which is divided out), so it is multiplied back and
  averaged over the step's micro-batches (and divided by the module's `rank_factor`, if it has one:
  the weight of this rank's tokens among every rank's, which is not this rank's loss);
- the global L2 norm of the gradients in `on_before_optimizer_step`, which Lightning calls after
  AMP unscaling and before gradient clipping (so the norm is the true one).

Both are judged against robust rolling statistics of the healthy steps before them, in log space
(so a spike is a ratio, whatever the scale): the median of the last few values, and the spread of
step-to-step changes (MAD), which a falling curve does not inflate. A value is a spike when it
exceeds that median by `z` robust standard deviations and by `min_ratio` x; NaN or Inf is
always an alert, except an infinite gradient of an fp16 run whose loss scaler skips that step
itself (an alert only after `overflow_patience` such steps in a row). A rolling median that climbs
`divergence_ratio` x above its lowest point is a divergence. Spikes are not added to the statistics,
so one bad batch does not raise the bar.

Actions: `warn`; `skip` (the step's gradients are dropped, so the optimizer leaves every
parameter and its state untouched); `rewind` (restore the trained parameters and optimizer state of
the last healthy snapshot, then go on with the next batches: the offending batch and those since
the snapshot are not replayed, as PaLM did); `stop` (no update; save `checkpoints/stopped.ckpt` and
end the stage; the CLI exits non-zero; `last.ckpt` is not moved to the stopped step, so a rerun replays
from the checkpoint before and stops again). Decisions are reduced across ranks: if any rank sees a
problem, every rank acts, and rank 0 reports each rank's findings with that rank's batch keys.

`skip` and `rewind` are for bad batches, not for a loss that moved: spikes stay out of the statistics, so a
lasting rise (a warm restart, harder data) would be skipped step after step for ever. After
`max_in_a_row` acted-on steps in a row, the last of them is trained instead, an alert of kind
`level_shift` says so, and the statistics start again (`warmup` steps before spikes are judged). When
those steps were non-finite, no new level exists to accept: the stage stops (as with `stop`). Under `warn`
the same count applies: a lasting rise alerted at every step until the stage ended (a day at one step a
second: 86,000 alerts, one webhook post each) and, its statistics frozen, never as a divergence; it is a
`level_shift` after `max_in_a_row` steps. Non-finite steps under `warn` are reported up to `max_in_a_row`
in a row; then, if the trained weights are no longer finite (one NaN update in float32 or bf16 does that),
the stage stops as with `stop`; else (fp16, whose scaler skips such updates, and DeepSpeed, whose engine
does, also in fp32) the rest of the run of them is not reported, until a finite step.

Under DeepSpeed, gradients live in the engine's partitioned buffers (`p.grad` is None), so the
step is judged right after the engine's `step()`, with the engine's global norm (computed before
clipping). The update is then already applied: only `warn` and `stop` are available there.

Inspired by Lightning's SpikeDetection, which raises out of `fit` and cannot resume; this one acts
and keeps its statistics in `state_dict` for resume.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from typing_extensions import override

from callbacks.alerts import Alert, AlertSinks, gather_findings
from callbacks.epoch_boundary import spread
from stages.launch import every_rank_state, own_rank_state

ACTIONS = ("warn", "skip", "rewind", "stop")


def weights_lost(trainer, pl_module) -> bool:
    """Whether some trained parameter holds a NaN or infinity, on any rank (every rank must call it). Under
    ZeRO-3 each rank checks its own partition of every parameter (`ds_tensor`): outside the forward pass the
    parameter itself is an empty placeholder there."""

    def held(p: torch.Tensor) -> torch.Tensor:
        part = getattr(p, "ds_tensor", None)
        return p if part is None else part

    lost = any(not torch.isfinite(held(p)).all() for p in pl_module.parameters() if p.requires_grad)
    return trainer.strategy.reduce_boolean_decision(bool(lost), all=False)


def loss_scale(trainer) -> float:
    """The fp16 loss scale that the loss handed to `on_before_backward` carries (1.0 without one).

    Lightning's mixed-precision plugins scale the loss by their GradScaler before they call the hook: judged
    as it came, the loss of an fp16 run was thousands of times the true one, and each doubling of the scale
    (every 2000 clean steps) read as a rise of the loss (two of them, a divergence). DeepSpeed scales inside
    its engine's backward, after the hook, so its loss comes unscaled."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


def check_action_under_deepspeed(action: str, where: str = "") -> None:
    """Refuses the actions that undo an update (skip, rewind) under DeepSpeed, whose engine has applied it."""
    if action in ("skip", "rewind"):
        raise ValueError(
            f"stability.instability.action {action!r} is not available under DeepSpeed{where}: the engine "
            "applies the update before its gradient norm is known; use warn or stop"
        )


@dataclass
class InstabilityConfig:
    """Thresholds and the action of the instability alerts (the defaults suit LoRA SFT)."""

    enabled: bool = True
    action: str = "warn"
    """warn | skip | rewind | stop."""
    window: int = 50
    """Healthy steps in the rolling statistics."""
    warmup: int = 20
    """Steps before spikes are judged (NaN/Inf are judged from the first step)."""
    z: float = 6.0
    """Robust standard deviations (of the log value) above the median that make a spike."""
    min_ratio: float = 2.0
    """A loss spike is also at least this many times the rolling median."""
    grad_min_ratio: float = 4.0
    """A gradient-norm spike is at least this many times its rolling median. Gradient norms swing more
    than losses: on 20 clean tiny-curriculum runs, early-SFT swings reached 3.3x (6 runs alerted at 2x)."""
    check_grad_norm: bool = True
    divergence_ratio: float = 3.0
    """Rolling median above this multiple of its lowest value so far is a divergence (0 turns it off)."""
    snapshot_every: int = 25
    """With action rewind: healthy steps between in-memory snapshots of the trained state."""
    max_in_a_row: int = 10
    """Steps in a row with a finding after which a spike is taken as the loss's new level (the step is trained,
    the statistics restart); a non-finite step then stops the stage under skip or rewind, and under warn the
    rest of the run of non-finite steps is not reported. 0: never."""
    overflow_patience: int = 8
    """fp16 with a loss scaler (16-mixed): steps in a row whose gradients overflow before that is an alert.
    The scaler skips such a step and lowers its scale, routinely at the start of a run; overflow after
    overflow means the scale is collapsing."""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"stability.instability.action must be one of {ACTIONS}, got {self.action!r}")
        if self.window < 5 or self.warmup < 5:
            raise ValueError("stability.instability.window and .warmup must be at least 5 steps")
        if self.warmup > self.window:  # the history never holds more than `window` steps: no spike would be judged
            raise ValueError(f"stability.instability.warmup ({self.warmup}) must not exceed .window ({self.window})")
        if self.max_in_a_row < 0:
            raise ValueError(f"stability.instability.max_in_a_row must not be negative, got {self.max_in_a_row}")
        if self.overflow_patience < 1:
            raise ValueError(f"stability.instability.overflow_patience must be positive, got {self.overflow_patience}")
        if self.divergence_ratio != 0 and self.divergence_ratio < 1:  # below 1 a healthy, falling loss "diverges"
            raise ValueError(
                f"stability.instability.divergence_ratio must be 0 (off) or at least 1, got {self.divergence_ratio}"
            )
        if self.z <= 0 or self.min_ratio < 1 or self.grad_min_ratio < 1:
            raise ValueError("stability.instability.z must be positive and .min_ratio, .grad_min_ratio at least 1")


def spike_threshold(history: list[float], z: float, min_ratio: float, recent: int = 5) -> float:
    """The value above which the next one is a spike, from the healthy `history` (all > 0).

    In log space: the centre is the median of the last `recent` values, so a falling or drifting
    curve is followed closely; the noise of one value is the robust spread of step-to-step changes
    (`spread`, which a trend does not inflate) / sqrt 2, as a change holds the noise of two values.
    """
    logs = [math.log(max(v, 1e-12)) for v in history]
    centre = statistics.median(logs[-recent:])
    noise = spread(logs) / math.sqrt(2)
    return math.exp(centre + max(z * noise, math.log(min_ratio)))


def judge(value: float, history: list[float], config: InstabilityConfig, spike_kind: str) -> tuple[str | None, float]:
    """(alert kind or None, threshold) for one value against its healthy history."""
    if not math.isfinite(value):
        return "non_finite", math.inf
    if len(history) < config.warmup:
        return None, math.inf
    min_ratio = config.grad_min_ratio if spike_kind == "grad_spike" else config.min_ratio
    threshold = spike_threshold(history[-config.window :], config.z, min_ratio)
    return (spike_kind if value > threshold else None), threshold


def deepspeed_engine(trainer: L.Trainer):
    """The DeepSpeed engine when the trainer runs Lightning's DeepSpeed strategy, else None."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return trainer.strategy.deepspeed_engine if isinstance(trainer.strategy, DeepSpeedStrategy) else None


def global_grad_norm(pl_module: L.LightningModule) -> float | None:
    """L2 norm over every parameter's gradient; None when no parameter holds one (e.g. DeepSpeed)."""
    norms = [p.grad.detach().float().norm(2) for p in pl_module.parameters() if p.grad is not None]
    if not norms:
        return None
    return torch.linalg.vector_norm(torch.stack(norms), 2).item()


@dataclass(frozen=True)
class Streak:
    """The run of judged steps with findings that ends at the last one."""

    in_a_row: int = 0
    """Steps in a row with a finding (not counted under stop)."""
    muted: bool = False
    """warn: past `max_in_a_row` non-finite steps in a row, the next ones are not reported until a finite step."""


MUTING = (
    "steps in a row with alerts, this one non-finite: the next non-finite ones are not reported until a finite step"
)


@dataclass(frozen=True)
class Decision:
    action: str
    """What to do with the step: the configured action on a finding, else warn (train it)."""
    new_level: bool = False
    """A spike trained as the loss's new level (the statistics start again)."""
    report: bool = True
    """Whether the step's findings are reported (not while muted)."""
    detail: str = ""


def decide(config: InstabilityConfig, streak: Streak, found: bool, non_finite: bool) -> tuple[Decision, Streak]:
    """What to do with a judged step, from its findings on every rank (`found`: any; `non_finite`: any NaN/Inf)
    and the streak before it; the streak after it. At `max_in_a_row` steps in a row with findings, a spike is
    trained as a new level; a non-finite step stops the stage under skip or rewind, and under warn mutes the
    next non-finite ones."""
    in_a_row, muted = streak.in_a_row, streak.muted and non_finite  # a finite step ends a muted run
    if not found:
        return Decision("warn"), Streak()
    if config.action == "stop" or muted:
        return Decision(config.action, report=not muted), Streak(in_a_row, muted)
    in_a_row += 1
    if not config.max_in_a_row or in_a_row < config.max_in_a_row:
        return Decision(config.action), Streak(in_a_row)
    if not non_finite:
        return Decision("warn", new_level=True), Streak()
    if config.action == "warn":
        return Decision("warn", detail=f"{config.max_in_a_row} {MUTING}"), Streak(muted=True)
    return Decision("stop"), Streak()


class InstabilityMonitor(L.Callback):
    """Alerts on loss and gradient-norm spikes, NaN/Inf and divergence; acts as configured."""

    def __init__(
        self, config: InstabilityConfig | None = None, sinks: AlertSinks | None = None, stage: str = ""
    ) -> None:
        """`sinks`: where alerts go (default: the log and the trainer's loggers; give an `AlertSinks` with a
        file, and add it to the callbacks too, for `alerts.jsonl`)."""
        config = config or InstabilityConfig()
        self.config, self.sinks, self.stage = config, sinks or AlertSinks(stage), stage
        self.loss_history: deque[float] = deque(maxlen=config.window)
        self.grad_history: deque[float] = deque(maxlen=config.window)
        self.lowest_median = math.inf
        self.diverged = False
        self.alerts: list[Alert] = []
        self.stopped = False
        self._stop_checkpoint_due = False
        self._micro_losses: list[torch.Tensor] = []
        self._keys: list[str] = []
        self._snapshot: dict | None = None
        self._buffers: dict[str, torch.Tensor] = {}  # `skip`, `rewind`: the buffers before the step being judged
        self._healthy_since_snapshot = 0
        self._judged_step = 0
        self._overflows = 0  # fp16 steps in a row whose gradients overflowed
        self._streak = Streak()
        self._step = 0  # the optimizer step being judged (alerts carry it)

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if isinstance(batch, dict) and "keys" in batch:
            self._keys += list(batch["keys"])
        undo_buffers = self.config.action == "skip" or (self.config.action == "rewind" and self._snapshot is None)
        if undo_buffers and not self._micro_losses:  # a step's first micro-batch
            # Buffers as they were before this step's forward passes: a skipped step's batch must not leave
            # its trace in BatchNorm statistics either (a NaN batch makes them NaN); nor a rewound one's before
            # the first snapshot, which then took the NaN statistics in and every later rewind restored them.
            self._buffers = {name: b.detach().clone() for name, b in pl_module.named_buffers()}

    @override
    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        # This rank's own loss: a module that weighs ranks by their tokens scales the loss it returns.
        rank_factor = getattr(pl_module, "rank_factor", 1.0)
        unscaled = loss.detach().float() / loss_scale(trainer)
        self._micro_losses.append(unscaled * trainer.accumulate_grad_batches / rank_factor)

    def _findings(self, loss: float, grad: float | None) -> list[tuple[str, float, float, str]]:
        """(kind, value, threshold, what the value is) of each alert the step raises."""
        found = []
        kind, threshold = judge(loss, list(self.loss_history), self.config, "loss_spike")
        if kind:
            found.append((kind, loss, threshold, "the loss"))
        if grad is not None and self.config.check_grad_norm:
            kind, threshold = judge(grad, list(self.grad_history), self.config, "grad_spike")
            if kind and kind not in {k for k, *_ in found}:  # a NaN loss gives NaN gradients: one alert
                found.append((kind, grad, threshold, "the gradient norm"))
        return found

    def _divergence(self, loss: float) -> tuple[float, float] | None:
        """(rolling median, threshold) once the median has climbed far above its lowest point."""
        if self.config.divergence_ratio <= 0 or len(self.loss_history) < self.config.warmup:
            return None
        median = statistics.median(list(self.loss_history)[-self.config.warmup :])
        self.lowest_median = min(self.lowest_median, median)
        threshold = self.lowest_median * self.config.divergence_ratio
        if median > threshold and not self.diverged:
            self.diverged = True
            return median, threshold
        if median <= threshold:
            self.diverged = False
        return None

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) > 1:
            # Each optimizer's step was judged as a training step of its own: the losses of all of them went into
            # one history, whose spread hid a 40x spike of one (a user module with two optimizers).
            raise ValueError(
                f"InstabilityMonitor judges one optimizer step per training step; this module has "
                f"{len(trainer.optimizers)} optimizers (use one, with parameter groups)"
            )
        self._judged_step = trainer.global_step  # a resumed run's first step is not a finished one

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        if deepspeed_engine(trainer) is not None:
            check_action_under_deepspeed(self.config.action)

    @override
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._micro_losses or deepspeed_engine(trainer) is not None:
            return  # under DeepSpeed the step is judged after it, with the engine's gradient norm
        self._judge_step(trainer, pl_module, optimizer, global_grad_norm(pl_module))

    def _judge_step(self, trainer, pl_module, optimizer, grad: float | None) -> None:
        loss = torch.stack(self._micro_losses).mean().item()
        # The step being judged: under DeepSpeed it is judged after the engine's step, which counted it already.
        self._step = trainer.global_step - (deepspeed_engine(trainer) is not None)
        # On the steps Lightning logs train/loss and the learning rates at: (step + 1) % log_every_n_steps == 0.
        logged = (self._step + 1) % trainer.log_every_n_steps == 0
        for logger in trainer.loggers if grad is not None and logged else ():
            logger.log_metrics({"train/grad_norm": grad}, step=self._step)
        keys, self._micro_losses, self._keys = self._keys, [], []
        findings = self._findings(loss, self._unless_overflow(trainer, loss, grad))
        every_rank = [(r, f, k) for r, (f, k) in gather_findings(trainer, bool(findings), (findings, keys))]
        non_finite = any(kind == "non_finite" for _, found, _ in every_rank for kind, *_ in found)
        decision, self._streak = decide(self.config, self._streak, bool(every_rank), non_finite)
        if self._streak.muted and weights_lost(trainer, pl_module):  # muted: every rank knows this step non-finite
            # One NaN update in float32 or bf16 makes every later step NaN: training on for the rest of the run,
            # to exit 0 at its end, helped nobody. (fp16's scaler skips such updates: there a run of them can end.)
            # Checked at every muted step: the step that mutes is judged before its own update is applied.
            self._streak = Streak()
            decision = Decision("stop", detail=(
                f"{self.config.max_in_a_row} steps in a row non-finite and the trained weights are no longer "
                "finite: nothing after can train, the stage stops"
            ))  # fmt: skip
        for rank, rank_findings, rank_keys in every_rank if decision.report else []:
            for kind, value, threshold, what in rank_findings:
                # A non-finite value says which (an infinite gradient norm read "value inf vs threshold inf").
                detail = " ".join([f"Non-finite: {what}."] * (kind == "non_finite") + [decision.detail]).strip()
                self._report(trainer, kind, value, threshold, rank_keys, decision.action, rank, detail=detail)
        if every_rank:
            if decision.action != "warn":
                self._act(trainer, pl_module, optimizer, decision.action)
                return
            if not decision.new_level:
                return  # spikes stay out of the statistics
            kind, value, threshold, _ = every_rank[0][1][0]
            self._restart_statistics(trainer, kind, value, threshold, keys)  # a new level: trained
        self.loss_history.append(loss)
        if grad is not None and math.isfinite(grad):
            self.grad_history.append(grad)
        # A trend, not a batch: reported, never acted on. Judged on each rank's own losses, so gathered as the
        # spikes are: rank 0 alone reported, and a divergence on another rank never was.
        diverging = self._divergence(loss)
        every_rank = gather_findings(trainer, diverging is not None, (diverging, keys))
        for rank, ((median, threshold), rank_keys) in every_rank:
            self._report(trainer, "divergence", median, threshold, rank_keys, "warn", rank)
        self._maybe_snapshot(pl_module, optimizer)

    def _restart_statistics(self, trainer, kind: str, value: float, threshold: float, keys: list[str]) -> None:
        """Spikes for `max_in_a_row` steps in a row: their level is accepted as the new one."""
        n = self.config.max_in_a_row
        self.loss_history.clear()
        self.grad_history.clear()
        detail = (
            f"{n} steps in a row above a spike threshold (this one a {kind}): it is trained as the new level, the "
            f"statistics start again ({self.config.warmup} steps before spikes are judged)"
        )
        self._report(trainer, "level_shift", value, threshold, keys, "warn", detail=detail)

    def _unless_overflow(self, trainer, loss: float, grad: float | None) -> float | None:
        """The gradient norm to judge: None for an fp16 overflow that the loss scaler handles (a finite loss,
        an infinite norm), until `overflow_patience` of them in a row."""
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        if grad is None or math.isfinite(grad) or not scaled or not math.isfinite(loss):
            self._overflows = 0
            return grad
        self._overflows += 1
        return grad if self._overflows == self.config.overflow_patience else None

    def _report(
        self,
        trainer,
        kind: str,
        value: float,
        threshold: float,
        keys: list[str],
        action: str,
        rank: int = 0,
        detail: str = "",
    ) -> None:
        step, epoch = self._step, trainer.current_epoch
        alert = Alert(self.stage, step, epoch, kind, value, threshold, action, keys, rank=rank, detail=detail)
        self.alerts.append(alert)
        if trainer.is_global_zero:
            self.sinks.emit(alert, trainer.loggers)

    def _act(self, trainer, pl_module, optimizer, action: str) -> None:
        # No gradient: torch optimizers skip the parameter entirely (under DeepSpeed, optimizer is None).
        for group in [] if optimizer is None else optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        if (action == "skip" or (action == "rewind" and self._snapshot is None)) and self._buffers:
            pl_module.load_state_dict(self._buffers, strict=False)  # a rewind with no snapshot yet skips the step
        if action == "rewind" and self._snapshot is not None:
            pl_module.load_state_dict(self._snapshot["model"], strict=False)
            # A copy: the optimizer keeps tensors it is given on their device (Adam's step count, and on the CPU
            # the moments too) and updated the snapshot's own in place, so a second rewind to it went elsewhere.
            optimizer.load_state_dict(copy.deepcopy(self._snapshot["optimizer"]))
        if action == "stop":
            self.stopped = self._stop_checkpoint_due = True
            trainer.should_stop = True
            # No last.ckpt at the stopped step (a periodic save now, or Lightning's save at the end of a fit that
            # saved none): a rerun would resume there and train on past the alert. It resumes from the last
            # periodic checkpoint before, or from the start, replays the steps and stops again.
            for callback in trainer.checkpoint_callbacks:
                callback.save_last = False

    def _maybe_snapshot(self, pl_module, optimizer) -> None:
        if self.config.action != "rewind":
            return
        self._healthy_since_snapshot += 1
        if self._snapshot is None or self._healthy_since_snapshot >= self.config.snapshot_every:
            trained = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
            trained |= {n: b.detach().cpu().clone() for n, b in pl_module.named_buffers()}  # BatchNorm statistics
            # The optimizer state on the CPU too (load_state_dict moves it back to each parameter's device): a
            # deepcopy kept Adam's two moments on the GPU, twice the trained parameters' size held for the run.
            state = optimizer.state_dict()
            state["state"] = {
                index: {k: v.detach().cpu().clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in s.items()}
                for index, s in state["state"].items()
            }
            self._snapshot = {
                "model": trained,
                "optimizer": {**state, "param_groups": copy.deepcopy(state["param_groups"])},
            }
            self._healthy_since_snapshot = 0

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        engine = deepspeed_engine(trainer)
        if engine is not None and self._micro_losses and trainer.global_step != self._judged_step:
            self._judged_step = trainer.global_step  # the engine stepped: its norm is this step's
            norm = engine.get_global_grad_norm()
            self._judge_step(trainer, pl_module, None, None if norm is None else float(norm))
        if self._stop_checkpoint_due:  # after the step, so the checkpoint is a consistent state
            self._stop_checkpoint_due = False
            # Beside the trainer's checkpoints (the runner's <stage>/checkpoints), not in a folder of their own.
            saver = trainer.checkpoint_callback
            folder = (
                saver.dirpath if saver is not None and saver.dirpath else Path(trainer.default_root_dir) / "checkpoints"
            )
            trainer.save_checkpoint(Path(folder) / "stopped.ckpt")

    @override
    def state_dict(self) -> dict:
        # Each rank judges its own losses: every rank's statistics go into the checkpoint (rank 0 writes it).
        history = {
            "loss_history": list(self.loss_history),
            "grad_history": list(self.grad_history),
            "lowest_median": self.lowest_median,
            "diverged": self.diverged,
            "in_a_row": self._streak.in_a_row,
            "muted": self._streak.muted,
            "overflows": self._overflows,  # a resumed run counted a collapsing fp16 scale's overflows from 0 again
        }
        return {
            **every_rank_state(history),
            "config": asdict(self.config),
            # With rewind, the snapshot a later rewind goes back to (the trained parameters, buffers and optimizer
            # state, once more in the checkpoint): without it a resumed run rewound to its own first step.
            "snapshot": self._snapshot,
            "healthy_since_snapshot": self._healthy_since_snapshot,
        }

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        mine = own_rank_state(state_dict)
        self.loss_history.extend(mine["loss_history"])
        self.grad_history.extend(mine["grad_history"])
        self.lowest_median = mine["lowest_median"]
        self.diverged = mine.get("diverged", False)  # reported once, not again after a resume
        self._streak = Streak(mine.get("in_a_row", 0), mine.get("muted", False))
        self._overflows = mine.get("overflows", 0)
        if self.config.action == "rewind":
            self._snapshot = state_dict.get("snapshot")
            self._healthy_since_snapshot = state_dict.get("healthy_since_snapshot", 0)
