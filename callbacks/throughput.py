"""Throughput and memory of a stage: tokens/s and samples/s of training steps, peak memory.

Counts the non-padding tokens (attention mask) and samples of every training batch, and the wall
time spent inside training batches (evaluation and checkpointing excluded). Logs `perf/*` to
TensorBoard every `log_every` optimizer steps (the logging rank's own rates: per device); `summary()`, with
every rank's tokens and samples summed at the end of training, goes into the stage's done.json and the run's
report.md.
"""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch
import torch.distributed as dist
from typing_extensions import override

from stages.launch import every_rank_state, several_ranks


def peak_rss_gib() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


class Throughput(L.Callback):
    def __init__(self, log_every: int = 50) -> None:
        self.log_every = log_every
        self.tokens = self.samples = 0  # this rank's, with those of a checkpoint it resumed from
        self.train_s = 0.0
        self.totals: tuple[int, int, float] | None = None  # every rank's (tokens, samples, slowest time), at the end
        self.ranks = 1  # the processes whose counts summary() adds up
        self._started: float | None = None
        self._logged_step: int | None = None
        self._step = 0  # the optimizer step of the last batch counted
        self._loaded: list[dict] | None = None  # every rank's counts in the checkpoint resumed from
        self._trained = False  # a batch was counted in this fit
        self.resumed_at: int | None = None  # the optimizer step a resumed fit started from
        self.device = torch.device("cpu")

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from callbacks.evaluation import CaptionEvaluation

        # Callbacks run in list order: an evaluation before this one, in on_train_batch_end, was timed as training
        # (957 tokens/s against 33,688 on a micro run evaluating every 2 steps).
        mine = trainer.callbacks.index(self)
        if any(isinstance(c, CaptionEvaluation) for c in trainer.callbacks[:mine]):
            raise ValueError("Throughput must come before CaptionEvaluation in the Trainer's callbacks, or the "
                             "evaluations are timed as training")  # fmt: skip

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.ranks = trainer.world_size  # also where no batch is trained (a fit resumed at its last step)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Kept for summary(): after fit, Lightning's teardown has moved the module back to the CPU.
        self.device = pl_module.device
        # Resumed at a logged step: its figures were logged before its checkpoint. Unset, the resumed first
        # micro-batch (no optimizer step yet under accumulation) logged them again, timed on itself alone.
        self._logged_step = trainer.global_step
        if self.resumed_at is None:  # a checkpoint without this callback's state (written before it had one)
            self.resumed_at = trainer.global_step or None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._started = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._started is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.train_s += time.perf_counter() - self._started
        self.tokens += int(batch["attention_mask"].sum())
        self.samples += len(batch["keys"])
        self._trained, self._step = True, trainer.global_step
        step = trainer.global_step
        if step == self._logged_step:  # with accumulation, the micro-batches after a step share its number
            return
        if trainer.loggers and step and step % self.log_every == 0 and self.train_s:
            self._logged_step = step
            rates = {"perf/tokens_per_s": self.tokens / self.train_s, "perf/samples_per_s": self.samples / self.train_s}
            for logger in trainer.loggers:
                logger.log_metrics(rates, step=step - 1)  # the index of the step just done

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1:
            return
        # Every rank's tokens and samples over the slowest rank's time: the run's rate. Rank 0's alone, labelled
        # as the stage's, showed half the samples a 2-rank stage trained.
        # Kept apart from this rank's own counts, which the last checkpoint (saved after this hook) holds.
        counts = torch.tensor([self.tokens, self.samples], dtype=torch.float64, device=pl_module.device)
        tokens, samples = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        seconds = torch.tensor(self.train_s, dtype=torch.float64, device=pl_module.device)
        self.totals = int(tokens), int(samples), float(trainer.strategy.reduce(seconds, reduce_op="max"))

    @override
    def state_dict(self) -> dict:
        # The counts up to the checkpoint, every rank's: a resumed stage's figures counted from the resume (a stage
        # killed at its last step read 0 samples), the batches that made its weights before it left out.
        mine = {"tokens": self.tokens, "samples": self.samples, "train_s": self.train_s, "step": self._step}
        return every_rank_state(mine)

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        ranks = state_dict.get("ranks") or [state_dict]
        # Lightning calls no on_train_start when the checkpoint is at the fit's last step: marked here.
        self._loaded, self.resumed_at = ranks, state_dict.get("step") or None
        world = dist.get_world_size() if several_ranks() else 1
        if len(ranks) == world:
            mine = ranks[dist.get_rank() if world > 1 else 0]
        else:  # another number of ranks: the totals go to rank 0 (`on_train_end` adds the ranks' counts up)
            first = not several_ranks() or dist.get_rank() == 0
            mine = {
                "tokens": sum(r["tokens"] for r in ranks) if first else 0,
                "samples": sum(r["samples"] for r in ranks) if first else 0,
                "train_s": max(r["train_s"] for r in ranks),
            }
        self.tokens, self.samples, self.train_s = int(mine["tokens"]), int(mine["samples"]), float(mine["train_s"])

    def summary(self) -> dict:
        """Totals of the training batches of every rank over the slowest rank's time in them (a resumed stage's
        include those up to its checkpoint), and this process's peak memory: its resident set, and on a GPU the
        most allocated there since training started (since the resume, `resumed_at_step`, for a resumed stage)."""
        if self.totals is not None:  # added up over the ranks at the end of training
            tokens, samples, seconds = self.totals
        elif self._loaded is not None and not self._trained:  # resumed at its last step: the checkpoint's
            tokens, samples = (sum(int(r[key]) for r in self._loaded) for key in ("tokens", "samples"))
            seconds = max(float(r["train_s"]) for r in self._loaded)
        else:
            tokens, samples, seconds = self.tokens, self.samples, self.train_s
        result = {
            "ranks": self.ranks,
            "train_tokens": tokens,
            "train_samples": samples,
            "train_s": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "samples_per_s": round(samples / seconds, 2) if seconds else None,
            "peak_rss_gib": round(peak_rss_gib(), 3),
        }
        if self.resumed_at is not None:
            result["resumed_at_step"] = self.resumed_at
        if self.device.type == "cuda":
            result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return result
