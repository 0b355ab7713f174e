"""Epoch- and stage-boundary loss checks, with the likely causes the check can observe.

A loss that jumps at every epoch boundary is a classic symptom with a handful of causes. After the
first `k` optimizer steps of epoch e+1, the mean of those losses is compared with the mean of the
last `k` of epoch e, relative to the spread of epoch e's losses (a robust standard deviation of
their step-to-step changes, so that the normal downward trend is not counted as noise). A jump of
more than `z` spreads and `min_rel` of the loss is an alert naming what it saw at the boundary:

- lr_jump: the learning rate of the first step differs from the last by more than `lr_ratio`x;
- repeated_order: the first batch of the epoch has the same samples as the previous epoch's first
  batch (the data was not reshuffled);
- batch_size_changed / accumulation_changed: the batch size or `accumulate_grad_batches` differs;
- optimizer_reset: the optimizer's step count went back (its state was rebuilt);
- short_last_batch: the previous epoch ended with a smaller batch.

The same comparison runs at a stage boundary of the curriculum: the stage's first `k` losses against
the previous stage's last `k` (passed in as `previous_tail`). The curriculum passes the tail only
when both stages train on the same caption budget: longer captions raise the loss by construction,
whereas a jump on the same data means the handoff lost something (the adapter, the projector).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

import lightning as L
from typing_extensions import override

from callbacks.alerts import Alert, AlertSinks, gather_findings
from stages.launch import every_rank_state, own_rank_state
from stages.paths import write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class BoundaryConfig:
    """The epoch- and stage-boundary loss check: the first `k` losses against the last `k` before."""

    enabled: bool = True
    k: int = 5
    """Steps compared on each side of the boundary."""
    z: float = 4.0
    """Jump, in robust standard deviations of step-to-step loss changes, that makes an alert."""
    min_rel: float = 0.1
    """The jump must also be at least this share of the previous loss."""
    lr_ratio: float = 1.5

    def __post_init__(self) -> None:
        if self.k < 1 or self.z <= 0 or self.min_rel < 0 or self.lr_ratio <= 1:
            raise ValueError("stability.boundary: k >= 1, z > 0, min_rel >= 0 and lr_ratio > 1 are required")


def spread(losses: list[float]) -> float:
    """Robust standard deviation of step-to-step changes (1.4826 x MAD), trend-free by construction. The
    boundary check's `z` counts these (the noise of a change, not of one loss: sqrt 2 x larger)."""
    diffs = [b - a for a, b in pairwise(losses)]
    if len(diffs) < 2:
        return 0.0
    median = statistics.median(diffs)
    return 1.4826 * statistics.median(abs(d - median) for d in diffs)


def boundary_jump(
    before: list[float], after: list[float], noise: float, config: BoundaryConfig
) -> tuple[bool, float, float]:
    """(alert?, jump, threshold): the rise of the mean loss across a boundary against the noise."""
    jump = statistics.fmean(after) - statistics.fmean(before)
    threshold = max(config.z * noise, config.min_rel * abs(statistics.fmean(before)))
    return jump > threshold, jump, threshold


@dataclass
class _EpochTrace:
    losses: list[float]
    lrs: list[float]
    batch_sizes: list[int]
    first_keys: list[str]
    accumulation: int
    optimizer_steps: int | None = None  # the optimizer's own step count after the epoch's last step
    steps: int = 0  # optimizer steps recorded, finite loss or not: the same count on every rank


def _optimizer_step_count(trainer) -> int | None:
    """The step count the optimizer keeps in its state (Adam's "step"), or None if it keeps none."""
    counts = [int(state["step"]) for opt in trainer.optimizers for state in opt.state.values() if "step" in state]
    return max(counts) if counts else None


class BoundaryCheck(L.Callback):
    """Compares losses across epoch boundaries (and the stage boundary, given `previous_tail`), and records the
    loss of every optimizer step (`write_losses`: the stage's losses.json), with its alerts enabled or not."""

    def __init__(
        self,
        config: BoundaryConfig | None = None,
        sinks: AlertSinks | None = None,
        stage: str = "",
        previous_tail: list[float] | None = None,
    ) -> None:
        """`sinks` as InstabilityMonitor's."""
        self.config, self.sinks, self.stage = config or BoundaryConfig(), sinks or AlertSinks(stage), stage
        self.previous_tail = [v for v in previous_tail or [] if v is not None and math.isfinite(v)]
        self.epochs: list[_EpochTrace] = []
        self.alerts: list[Alert] = []
        self.all_losses: list[float] = []
        self._micro: list[float] = []
        self._checked: set[int] = set()
        self._step = 0  # the trainer's global step when the last optimizer step was recorded

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self._step = trainer.global_step  # resumed: steps before it are in all_losses already
        batches = trainer.num_training_batches
        if not self.config.enabled or not math.isfinite(batches):
            return
        steps = math.ceil(batches / trainer.accumulate_grad_batches)
        total = steps * trainer.max_epochs if trainer.max_epochs not in (None, -1) else math.inf
        if trainer.max_steps not in (None, -1):
            total = min(total, trainer.max_steps)
        # A boundary is checked at the k-th step after it: one with fewer steps after it goes unchecked, unsaid.
        k, unchecked = self.config.k, []
        if len(self.previous_tail) >= k and min(steps, total) < k:  # the stage's start, checked as an epoch's
            unchecked.append(f"its start (the stage boundary: {min(steps, total)} steps follow it)")
        if total > steps and steps < k:
            unchecked.append(f"its epoch boundaries (its epochs have {steps} optimizer steps)")
        elif total > steps and 0 < total % steps < k:  # max_steps cuts the last epoch short
            unchecked.append(f"the boundary before its last epoch (max_steps leaves it {total % steps} steps)")
        if unchecked and trainer.is_global_zero:
            log.warning(
                "stage %s: %s not checked, fewer than stability.boundary.k=%d optimizer steps; lower "
                "stability.boundary.k to check them",
                self.stage,
                " and ".join(unchecked),
                k,
            )

    def _trace(self, trainer) -> _EpochTrace:
        while len(self.epochs) <= trainer.current_epoch:
            self.epochs.append(_EpochTrace([], [], [], [], trainer.accumulate_grad_batches))
        return self.epochs[trainer.current_epoch]

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        trace = self._trace(trainer)
        if isinstance(batch, dict) and "keys" in batch:
            if not trace.first_keys:
                trace.first_keys = list(batch["keys"])
            trace.batch_sizes.append(len(batch["keys"]))
        if trainer.optimizers and batch_idx % trainer.accumulate_grad_batches == 0:  # the rate this step uses
            trace.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        self._micro.append(
            float(loss) * trainer.accumulate_grad_batches / float(getattr(pl_module, "rank_factor", 1.0))
        )
        # One loss per optimizer step, closed when the optimizer stepped: with accumulation, Lightning also
        # steps on an epoch's last, partial window, so counting micro-batches would mix epochs.
        if trainer.global_step == self._step:
            return
        self._step = trainer.global_step
        trace = self._trace(trainer)
        value, self._micro = statistics.fmean(self._micro), []
        self.all_losses.append(value)
        trace.optimizer_steps = _optimizer_step_count(trainer)
        trace.steps += 1
        if math.isfinite(value):  # a NaN/inf step (the monitor's to report) would poison every mean
            trace.losses.append(value)
        # At the epoch's k-th step, on every rank at once (the check gathers the ranks' findings): counting
        # finite losses instead would check a rank that had a NaN step later than the others.
        if self.config.enabled and trace.steps == self.config.k and trainer.current_epoch not in self._checked:
            self._checked.add(trainer.current_epoch)
            finding = self._finding(trainer)
            for rank, record in gather_findings(trainer, finding is not None, finding):
                record.rank = rank
                self.alerts.append(record)
                if trainer.is_global_zero:  # rank 0 delivers every rank's alerts
                    self.sinks.emit(record, trainer.loggers)

    def _finding(self, trainer) -> Alert | None:
        """This rank's boundary alert for the current epoch, or None: the finite losses of its first k steps
        against the last k of the epoch (or stage) before."""
        epoch, k = trainer.current_epoch, self.config.k
        current = self.epochs[epoch]
        if not current.losses:  # the first k steps all NaN/Inf: no mean to compare (the monitor reports them)
            return None
        if epoch == 0:
            if len(self.previous_tail) < k:
                return None
            before, noise = self.previous_tail[-k:], spread(self._settled(self.previous_tail))
            return self._judge(trainer, "stage_boundary", before, current.losses, noise, [])
        previous = self.epochs[epoch - 1]
        if len(previous.losses) < k:
            return None
        causes = self._causes(trainer, previous, current)
        noise = spread(self._settled(previous.losses))
        return self._judge(trainer, "epoch_boundary", previous.losses[-k:], current.losses, noise, causes)

    def _settled(self, losses: list[float]) -> list[float]:
        """The losses the noise is measured on: without the first k (themselves right after a boundary, or a
        stage's start, falling fast) when enough are left."""
        k = self.config.k
        return losses[k:] if len(losses) >= 3 * k else losses

    def _causes(self, trainer, previous: _EpochTrace, current: _EpochTrace) -> list[str]:
        causes = []
        last_lr, first_lr = previous.lrs[-1], current.lrs[0]
        if min(last_lr, first_lr) > 0 and max(last_lr, first_lr) / min(last_lr, first_lr) > self.config.lr_ratio:
            causes.append(f"lr_jump ({last_lr:.3g} -> {first_lr:.3g})")
        if previous.first_keys and previous.first_keys == current.first_keys:
            causes.append("repeated_order (same first batch as the previous epoch: no reshuffle)")
        full_before = previous.batch_sizes[:-1] or previous.batch_sizes
        if full_before and current.batch_sizes and max(full_before) != current.batch_sizes[0]:
            causes.append(f"batch_size_changed ({max(full_before)} -> {current.batch_sizes[0]})")
        if previous.accumulation != current.accumulation:
            causes.append(f"accumulation_changed ({previous.accumulation} -> {current.accumulation})")
        before_steps = previous.optimizer_steps
        now_steps = _optimizer_step_count(trainer)
        if before_steps is not None and now_steps is not None and now_steps < before_steps:
            causes.append(f"optimizer_reset (optimizer step count {before_steps} -> {now_steps})")
        if len(previous.batch_sizes) > 1 and previous.batch_sizes[-1] < max(previous.batch_sizes[:-1]):
            causes.append(f"short_last_batch ({previous.batch_sizes[-1]} samples)")
        return causes

    def _judge(self, trainer, kind: str, before, after, noise: float, causes: list[str]) -> Alert | None:
        alert, jump, threshold = boundary_jump(before, after, noise, self.config)
        if not alert:
            return None
        detail = f"mean loss {statistics.fmean(before):.4g} -> {statistics.fmean(after):.4g} over {self.config.k} steps"
        step = trainer.global_step - 1  # checked after the k-th step: global_step counts it done already
        return Alert(self.stage, step, trainer.current_epoch, kind, jump, threshold, "warn", [], causes, detail)

    def write_losses(self, path: Path) -> None:
        """Per-optimizer-step losses of the stage, for the next stage's boundary check and for tests; a
        non-finite loss is written as null (standard JSON has no NaN)."""
        losses = [value if math.isfinite(value) else None for value in self.all_losses]
        write_text_atomic(path, json.dumps({"stage": self.stage, "losses": losses}, allow_nan=False))  # whole or none

    @override
    def state_dict(self) -> dict:
        # The epochs' traces too: a stage resumed before an epoch's k-th loss checks that epoch as if never stopped.
        # Every rank's (rank 0 writes the checkpoint): each checks its own losses.
        epochs = [asdict(trace) for trace in self.epochs]
        return every_rank_state({"all_losses": self.all_losses, "checked": sorted(self._checked), "epochs": epochs})

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        mine = own_rank_state(state_dict)
        self.all_losses = list(mine["all_losses"])
        self._checked = set(mine["checked"])
        self.epochs = [_EpochTrace(**trace) for trace in mine.get("epochs", [])]
