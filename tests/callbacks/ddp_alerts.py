"""Run by the callback tests as a script: two CPU ranks (Lightning DDP over gloo), a fault on rank 1 only.

`ddp_alerts.py OUT`: a loss spike at one step (the instability monitor); `ddp_alerts.py OUT divergence`: the
loss of rank 1 climbing 8% a step from step 25 (the monitor's divergence check); `ddp_alerts.py OUT boundary`:
the loss of rank 1 three times higher over the first steps of epoch 1 (the epoch-boundary check)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from callbacks.alerts import AlertSinks
from callbacks.instability import InstabilityConfig, InstabilityMonitor
from tests.callbacks.toy import KeyedRegression, ToyRegression, loader

SPIKE_STEP = 40


class SpikeOnRankOne(ToyRegression):
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.global_step == SPIKE_STEP:
            Path(self.out, f"keys{self.global_rank}.json").write_text(json.dumps(list(batch["keys"])))
            if self.global_rank == 1:
                loss = loss * 10
        return loss


class ClimbOnRankOne(ToyRegression):
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 1.08 ** max(0, self.global_step - 25) if self.global_rank == 1 else loss


class BoundaryJumpOnRankOne(ToyRegression):
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 3 if self.global_rank == 1 and self.current_epoch == 1 and batch_idx < 8 else loss


def boundary(out: Path) -> None:
    from callbacks.epoch_boundary import BoundaryCheck, BoundaryConfig

    check = BoundaryCheck(BoundaryConfig(), AlertSinks("toy", out / "alerts.jsonl"), "toy")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, max_steps=-1, callbacks=[check], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(BoundaryJumpOnRankOne(lr=0.05), loader(KeyedRegression(size=2048), seed=0))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    # Lightning's DistributedSampler shuffles with PL_GLOBAL_SEED, which a parent process that trained
    # in-process has set to its own last seed: fixed here, the batches and the spike do not depend on it.
    L.seed_everything(0, verbose=False)
    if sys.argv[2:] == ["boundary"]:
        boundary(out)
        sys.exit(0)
    config = InstabilityConfig(check_grad_norm=False)
    monitor = InstabilityMonitor(config, AlertSinks("toy", out / "alerts.jsonl"), "toy")
    module = ClimbOnRankOne() if sys.argv[2:] == ["divergence"] else SpikeOnRankOne()
    module.out = out
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=60,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader(KeyedRegression(), seed=0))
