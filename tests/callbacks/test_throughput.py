"""Throughput logging: once per logged optimizer step, whatever the accumulation."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from callbacks.throughput import Throughput
from tests.callbacks.toy import KeyedRegression, ToyRegression, loader


class Recorded(Logger):
    """A Lightning logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, str]] = []
        self.values: dict[tuple[int, str], float] = {}

    name, version = "recorded", 0

    def log_metrics(self, metrics, step=None) -> None:
        self.logged += [(step, key) for key in metrics]
        self.values.update({(step, key): value for key, value in metrics.items()})

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class Masked(ToyRegression):
    """The toy regression with an attention mask in its batches, as the VLM's have."""

    def on_train_batch_start(self, batch, batch_idx) -> None:
        batch["attention_mask"] = torch.ones(len(batch["keys"]), 3, dtype=torch.long)


def test_throughput_is_logged_once_per_logged_step_under_accumulation():
    logger, throughput = Recorded(), Throughput(log_every=5)
    trainer = L.Trainer(
        max_steps=10,
        accumulate_grad_batches=4,
        callbacks=[throughput],
        logger=logger,
        log_every_n_steps=1000,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Masked(), loader(KeyedRegression(size=2048)))
    perf = [entry for entry in logger.logged if entry[1].startswith("perf/")]
    # After 5 and 10 steps, at the index of the step just done (4 and 9), as Lightning logs val/loss.
    assert perf == [(4, "perf/tokens_per_s"), (4, "perf/samples_per_s"), (9, "perf/tokens_per_s"),
                    (9, "perf/samples_per_s")]  # fmt: skip
    assert throughput.samples == 40 * 32 and throughput.tokens == 40 * 32 * 3
    for step in (4, 9):  # 3 mask positions a sample: tokens/s is 3 x samples/s
        tokens, samples = logger.values[(step, "perf/tokens_per_s")], logger.values[(step, "perf/samples_per_s")]
        assert tokens == pytest.approx(3 * samples) and samples > 0


def test_a_resumed_run_does_not_log_the_step_it_resumed_at_again(tmp_path):
    """Resumed after 5 steps (logged at index 4 before the checkpoint), the first micro-batch under accumulation
    still saw global step 5 and logged index 4 a second time, timed on that one micro-batch."""

    def fit(max_steps: int, ckpt_path=None) -> list[tuple[int, str]]:
        logger = Recorded()
        trainer = L.Trainer(
            max_steps=max_steps, accumulate_grad_batches=4, callbacks=[Throughput(log_every=5)], logger=logger,
            log_every_n_steps=1000, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(Masked(), loader(KeyedRegression(size=2048)), ckpt_path=ckpt_path)
        if ckpt_path is None:
            trainer.save_checkpoint(tmp_path / "step5.ckpt")
        return [step for step, key in logger.logged if key == "perf/samples_per_s"]

    assert fit(5) == [4]
    assert fit(10, ckpt_path=tmp_path / "step5.ckpt") == [9]


def test_a_resumed_stage_counts_the_samples_before_its_checkpoint(tmp_path):
    """done.json's figures of a stage resumed after 6 of 10 steps counted only the 4 after the resume (a stage
    killed after its last checkpoint read 0 samples); the checkpoint carries the counts."""

    def fit(max_steps: int, ckpt_path=None) -> Throughput:
        throughput = Throughput()
        trainer = L.Trainer(
            max_steps=max_steps, accumulate_grad_batches=2, callbacks=[throughput], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        )  # fmt: skip
        trainer.fit(Masked(), loader(KeyedRegression(size=2048)), ckpt_path=ckpt_path)
        if ckpt_path is None:
            trainer.save_checkpoint(tmp_path / f"step{max_steps}.ckpt")
        return throughput

    whole = fit(10).summary()
    fit(6)
    resumed = fit(10, ckpt_path=tmp_path / "step6.ckpt").summary()
    assert resumed["train_samples"] == whole["train_samples"] == 10 * 2 * 32
    assert resumed["train_tokens"] == whole["train_tokens"] and resumed["train_s"] > 0
    assert resumed["resumed_at_step"] == 6 and "resumed_at_step" not in whole
    at_end = fit(10, ckpt_path=tmp_path / "step10.ckpt").summary()  # resumed at its last step: no batch trained
    assert at_end["train_samples"] == 10 * 2 * 32 and at_end["tokens_per_s"] is not None
    assert at_end["resumed_at_step"] == 10  # Lightning calls no on_train_start there


def test_a_fit_that_trains_no_batch_still_says_how_many_ranks_it_had():
    # Resumed at its last step, a fit skips its loop and on_train_end: a 2-rank stage's done.json said ranks 1.
    from types import SimpleNamespace

    throughput = Throughput()
    throughput.setup(SimpleNamespace(world_size=2), None, "fit")
    assert throughput.summary()["ranks"] == 2 and throughput.summary()["train_samples"] == 0
