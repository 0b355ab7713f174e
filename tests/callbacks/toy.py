"""A small, real LightningModule for testing the stability callbacks quickly.

A linear regression on a fixed synthetic data set whose batches are dicts with sample keys, like
the VLM's. Faults are injected by step through the module's own hooks, so the callbacks see exactly
what they would see in a real run: a NaN or scaled loss from `training_step`, an Inf gradient after
backward, or a bad batch whose inputs are 100x too large.
"""

from __future__ import annotations

import math
import random
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset


class KeyedRegression(Dataset):
    """y = x . w + unit noise (so the loss settles near 1, not at 0).

    With `conflict`, the first half has target +1 and the second -1, from inputs of one distribution.
    """

    def __init__(self, size: int = 512, dim: int = 4, seed: int = 0, conflict: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, dim, generator=g)
        if conflict:
            self.y = torch.where(torch.arange(size) < size // 2, 1.0, -1.0)
        else:
            self.y = self.x @ torch.linspace(-1, 1, dim) + torch.randn(size, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"keys": f"sample-{i:05d}", "x": self.x[i], "y": self.y[i]}


class ToyRegression(L.LightningModule):
    def __init__(
        self,
        faults: dict[int, str] | None = None,
        lr: float = 0.05,
        drift: float = 0.0,
        noise: float = 0.0,
        lr_restart_every: int = 0,
        restart_lr: float = 0.95,
        seed: int = 0,
        reduction: str = "mean",
        divide_by_accumulation: bool = False,
    ) -> None:
        super().__init__()
        with torch.random.fork_rng():  # its own start, whatever tests ran before in this process
            torch.manual_seed(seed)
            self.net = torch.nn.Linear(4, 1)
        self.faults = faults or {}
        self.lr, self.drift, self.noise, self.seed = lr, drift, noise, seed
        self.lr_restart_every, self.restart_lr = lr_restart_every, restart_lr
        self.rng = random.Random(seed)
        # Two classic bugs: a loss summed over the batch (its scale follows the batch size), and a loss
        # divided by the accumulation steps by hand although Lightning divides it already.
        self.reduction, self.divide_by_accumulation = reduction, divide_by_accumulation
        self.step_losses: list[float] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        fault = self.faults.get(self.global_step)
        x = batch["x"] * (100.0 if fault == "bad_batch" else 1.0)
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), batch["y"], reduction=self.reduction)
        if self.divide_by_accumulation:
            loss = loss / self.trainer.accumulate_grad_batches
        loss = loss * (1 + self.drift * self.global_step) * (1 + self.noise * self.rng.uniform(-1, 1))
        if fault == "nan":
            loss = loss * float("nan")
        elif fault == "spike":
            loss = loss * 10
        self.step_losses.append(loss.item())
        return loss

    def on_after_backward(self) -> None:
        if self.faults.get(self.global_step) == "inf_grad":
            self.net.weight.grad[0, 0] = math.inf

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        if not self.lr_restart_every:
            return optimizer
        every, high, low = self.lr_restart_every, self.restart_lr, self.lr

        def factor(step: int) -> float:  # restart to `high` at every epoch, decay to `low` inside it
            progress = (step % every) / every
            return (low + (high - low) * (1 - progress) ** 4) / low

        return [optimizer], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}]


def loader(dataset: Dataset, batch_size: int = 32, shuffle: bool = True, seed: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def trainer(callbacks: list, max_steps: int = 60, max_epochs: int = -1, **kwargs) -> L.Trainer:
    """A quiet CPU Trainer; what it saves (a stop alert's stopped.ckpt) goes to the temporary folder, not to the
    working folder (the repository), unless `default_root_dir` is given."""
    kwargs.setdefault("default_root_dir", Path(tempfile.gettempdir()) / "vlm-curriculum-toy-trainer")
    return L.Trainer(
        max_steps=max_steps,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),  # only the test's own
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **kwargs,
    )
