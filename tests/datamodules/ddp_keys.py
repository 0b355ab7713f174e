"""Run by test_ranks.py as a script: two CPU ranks (Lightning DDP over gloo) record the keys of their batches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from transformers import AutoImageProcessor, AutoTokenizer

from datamodules.caption_datamodule import CaptionDataModule


class KeyRecorder(L.LightningModule):
    """Trains one scalar; what matters is which samples each rank is given, epoch by epoch."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.out, self.seen, self.validated = out, [], []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append([self.current_epoch, list(batch["keys"])])
        return ((self.weight - batch["pixel_values"].float().mean()) ** 2).sum()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.validated.append([self.current_epoch, list(batch["keys"])])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self) -> None:
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))
        Path(self.out, f"val{self.global_rank}.json").write_text(json.dumps(self.validated))


if __name__ == "__main__":
    shards, vision, lm, out = sys.argv[1:5]
    datamodule = CaptionDataModule(shards, max_words=48, batch_size=8, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(lm)
    datamodule.connect(tokenizer, AutoImageProcessor.from_pretrained(vision), 9, "describe the image")
    # Validate on the 3 training shards (192 samples): each rank takes every other sample that fits, once.
    datamodule.index["splits"]["val"] = datamodule.index["splits"]["train"]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        reload_dataloaders_every_n_epochs=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(KeyRecorder(out), datamodule=datamodule)
