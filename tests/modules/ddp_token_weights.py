"""Run by test_loss_weighting.py as a script: two CPU ranks (Lightning DDP over gloo) take one optimizer step
of the align module, batch 2 with accumulation 2. Each rank saves the projector it started from, its
micro-batches and the projector's gradient as the optimizer sees it (after DDP's average over the ranks),
and the losses the stability callbacks recorded.

`ddp_token_weights.py SHARDS VISION LM OUT`
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from callbacks.alerts import AlertSinks
from callbacks.epoch_boundary import BoundaryCheck, BoundaryConfig
from callbacks.instability import InstabilityConfig, InstabilityMonitor
from datamodules.caption_datamodule import CaptionDataModule
from modules.loading import ModelConfig, build_vlm, count_image_tokens
from modules.training_module import AlignModule, LearningRates, OptimSpec

TENSORS = ("input_ids", "attention_mask", "pixel_values", "labels")


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.batches, self.grads, self.start = [], {}, {}

    def on_train_start(self, trainer, pl_module) -> None:  # after DDP made every rank start from rank 0's weights
        self.start = {k: v.detach().clone() for k, v in pl_module.vlm.projector.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({k: batch[k].detach().clone() for k in TENSORS})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {k: p.grad.detach().clone() for k, p in pl_module.vlm.projector.named_parameters()}


if __name__ == "__main__":
    shards, vision, lm, out = sys.argv[1:5]
    vlm, tokenizer, processor = build_vlm(ModelConfig(), vision, lm)
    data = CaptionDataModule(shards, max_words=48, batch_size=2, seed=0)
    data.connect(tokenizer, processor, count_image_tokens(vlm, processor), "describe the image")
    module = AlignModule(vlm, OptimSpec(LearningRates(projector=1e-3), warmup_steps=0))
    sinks = AlertSinks("align")
    recorder, monitor, boundary = (
        Recorder(),
        InstabilityMonitor(InstabilityConfig(), sinks),
        BoundaryCheck(BoundaryConfig(), sinks),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=1,
        accumulate_grad_batches=2,
        callbacks=[recorder, monitor, boundary],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    record = {
        "start": recorder.start,
        "batches": recorder.batches,
        "grads": recorder.grads,
        "monitor_loss": list(monitor.loss_history),
        "boundary_loss": boundary.all_losses,
    }
    torch.save(record, Path(out) / f"rank{trainer.global_rank}.pt")
