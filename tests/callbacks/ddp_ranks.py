"""Run by the tests as a script: two CPU ranks, each with state of its own.

`ddp_ranks.py OUT sigterm`: Lightning DDP over gloo; rank 0 alone gets SIGTERM at step 20, and both ranks must
stop after the same batch (each writes the step it stopped at to OUT/stopped<rank>.json). `sigterm_early`: rank 1
alone gets it before the first batch.

`ddp_ranks.py OUT states VISION LM`: two processes in a gloo group, without Lightning: the checkpoint state of
the training module's random generators, the instability monitor and the epoch-boundary check, saved as rank 0
writes it and loaded on both ranks, gives each rank its own back (OUT/states<rank>.json says what each got).

`ddp_ranks.py OUT throughput`: Lightning DDP over gloo, the throughput counts of a fit of 4 steps, of one resumed
at its last step (nothing left to train), and of one resumed to 5 steps, in OUT/throughput.json; its last.ckpt
is left in OUT/checkpoints for a resume on one rank.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.preemption import StopOnSigterm
from tests.callbacks.toy import KeyedRegression, ToyRegression, loader

SIGNAL_STEP = 20


class SignalledOnRankZero(ToyRegression):
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.global_step == SIGNAL_STEP and self.global_rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(batch, batch_idx)


class SignalRankOneBeforeTraining(L.Callback):
    """Before the first batch, ahead of StopOnSigterm's own hooks: Lightning's handler hung the ranks there."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def sigterm(out: Path, early: bool) -> None:
    callbacks = [SignalRankOneBeforeTraining()] if early else []
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=60, callbacks=[*callbacks, StopOnSigterm()],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    try:
        trainer.fit(ToyRegression() if early else SignalledOnRankZero(), loader(KeyedRegression(), seed=0))
    except SIGTERMException:
        (out / f"stopped{trainer.global_rank}.json").write_text(json.dumps(trainer.global_step))
        sys.exit(143)


def states(rank: int, out: Path, vision: str, lm: str) -> None:
    from callbacks.alerts import AlertSinks
    from callbacks.epoch_boundary import BoundaryCheck, BoundaryConfig
    from callbacks.instability import InstabilityConfig, InstabilityMonitor
    from modules.loading import ModelConfig, build_vlm
    from modules.training_module import AlignModule, LearningRates, OptimSpec

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29631", rank=rank, world_size=2)
    module = AlignModule(build_vlm(ModelConfig(), vision, lm)[0], OptimSpec(LearningRates(projector=1e-2)))
    monitor = InstabilityMonitor(InstabilityConfig(), AlertSinks("toy"), "toy")
    boundary = BoundaryCheck(BoundaryConfig(), AlertSinks("toy"), "toy")
    torch.manual_seed(100 + rank)  # each rank's own stream, as Lightning seeds ranks apart
    monitor.loss_history.extend([float(rank)] * 3)
    boundary.all_losses = [10.0 + rank]
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    saved = {"module": checkpoint, "monitor": monitor.state_dict(), "boundary": boundary.state_dict()}
    expected = torch.rand(3).tolist()  # what this rank draws next, unbroken
    saved = [saved]
    dist.broadcast_object_list(saved, src=0)  # the file rank 0 writes is the one every rank loads
    saved = saved[0]

    torch.manual_seed(0)  # a fresh process
    resumed = InstabilityMonitor(InstabilityConfig(), AlertSinks("toy"), "toy")
    resumed.load_state_dict(saved["monitor"])
    resumed_boundary = BoundaryCheck(BoundaryConfig(), AlertSinks("toy"), "toy")
    resumed_boundary.load_state_dict(saved["boundary"])
    module.on_load_checkpoint(saved["module"])
    module.on_train_batch_start(None, 0)
    got = {
        "draws": torch.rand(3).tolist(),
        "expected": expected,
        "loss_history": list(resumed.loss_history),
        "all_losses": resumed_boundary.all_losses,
    }
    (out / f"states{rank}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


def throughput(out: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.throughput import Throughput
    from tests.callbacks.test_throughput import Masked

    def fit(max_steps: int, resume: bool) -> dict:
        counter = Throughput()
        saver = ModelCheckpoint(out / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=2)
        trainer = L.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, callbacks=[counter, saver],
            logger=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        last = out / "checkpoints" / "last.ckpt"
        trainer.fit(Masked(), loader(KeyedRegression(size=2048)), ckpt_path=last if resume else None)
        return {k: v for k, v in counter.summary().items() if k in ("train_samples", "resumed_at_step")}

    counts = {"fresh": fit(4, False), "at_end": fit(4, True), "on": fit(5, True)}
    if dist.get_rank() == 0:
        (out / "throughput.json").write_text(json.dumps(counts))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    if sys.argv[2] in ("sigterm", "sigterm_early"):
        sigterm(out, early=sys.argv[2] == "sigterm_early")
    elif sys.argv[2] == "throughput":
        throughput(out)
    else:
        torch.multiprocessing.spawn(states, args=(out, sys.argv[3], sys.argv[4]), nprocs=2)
