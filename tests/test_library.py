"""The project's modules, DataModule and callbacks in a plain Lightning script, without stages.run."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from callbacks.alerts import AlertSinks
from callbacks.epoch_boundary import BoundaryCheck
from callbacks.evaluation import CaptionEvaluation
from callbacks.fault_injection import FaultInjection
from callbacks.instability import InstabilityConfig, InstabilityMonitor
from datamodules.caption_datamodule import CaptionDataModule
from modules.loading import LoraSpec, ModelConfig, build_vlm, count_image_tokens
from modules.training_module import AlignModule, LearningRates, LoRASFTModule, OptimSpec
from tests.tensorboard import RunEvents

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_script() -> str:
    section = README.read_text().split("## Use as a library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _rows(csv_dir: Path) -> list[dict]:
    (path,) = csv_dir.glob("version_*/metrics.csv")
    return list(csv.DictReader(path.open()))


def test_the_readmes_library_script_trains_align_then_lora_sft(micro_world, micro_base, tmp_path, monkeypatch):
    base = tmp_path / "runs" / "tiny" / "base"
    base.mkdir(parents=True)
    (base / "vision").symlink_to(micro_base[0])
    (base / "lm").symlink_to(micro_base[1])
    (tmp_path / "runs" / "tiny" / "data").symlink_to(micro_world)
    script = _readme_script()
    assert "STEPS = 100" in script
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(script.replace("STEPS = 100", "STEPS = 3"), "README.md", "exec"), namespace)  # noqa: S102

    for stage in ("align", "sft"):
        assert (tmp_path / "mine" / stage / "metrics.json").is_file()
        assert any("eval/chair_i" in row and row["eval/chair_i"] for row in _rows(tmp_path / "mine" / stage))
        assert (
            f"eval/{stage}/captions/text_summary"
            in RunEvents(next((tmp_path / "mine" / stage).glob("version_*"))).Tags()["tensors"]
        )
    lora_b = [p for n, p in namespace["vlm"].named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "PEFT starts lora_B at zero: SFT trained the adapter"


def _parts(micro_world, micro_base, max_words: int = 20):
    vlm, tokenizer, processor = build_vlm(ModelConfig(), *micro_base)
    data = CaptionDataModule(micro_world, max_words=max_words, batch_size=16)
    data.connect(tokenizer, processor, count_image_tokens(vlm, processor), "describe the image")
    return vlm, processor, data


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    kwargs = {"max_steps": 2, "logger": False, "enable_progress_bar": False, "enable_model_summary": False, **kwargs}
    return L.Trainer(accelerator="cpu", callbacks=callbacks, default_root_dir=tmp_path, **kwargs)


def test_alerts_evaluations_and_a_stop_work_with_a_csv_logger_and_paths_of_ones_own(micro_world, micro_base, tmp_path):
    # With any logger but TensorBoard's, the first alert and the evaluation crashed (`experiment.add_text`); the
    # evaluation crashed again when its metrics.json folder did not exist (the runner had made it); the stop
    # checkpoint went to <default_root_dir>/checkpoints, not beside the trainer's own checkpoints.
    vlm, processor, data = _parts(micro_world, micro_base)
    sinks = AlertSinks("sft", tmp_path / "alerts" / "alerts.jsonl")
    evaluation = CaptionEvaluation(
        "sft", data.eval_samples("test", 4), data.format, processor, tmp_path / "new" / "metrics.json", max_new_tokens=4
    )
    callbacks = [
        FaultInjection({1: "nan"}),
        InstabilityMonitor(InstabilityConfig(action="stop"), sinks, "sft"),
        sinks,
        evaluation,
        ModelCheckpoint(tmp_path / "mine", save_last=True, save_top_k=0),
    ]
    module = LoRASFTModule(vlm, LoraSpec(r=4, alpha=8), OptimSpec(LearningRates()), ["lora", "projector"])
    _trainer(tmp_path / "root", callbacks, max_steps=4, logger=CSVLogger(tmp_path / "csv")).fit(module, datamodule=data)

    assert (tmp_path / "mine" / "stopped.ckpt").is_file() and not (tmp_path / "root" / "checkpoints").exists()
    assert (tmp_path / "new" / "metrics.json").is_file()
    rows = _rows(tmp_path / "csv" / "lightning_logs")
    assert any(row.get("alerts/non_finite") for row in rows), [k for k in rows[0] if k.startswith("alerts")]
    assert any(row.get("eval/chair_i") for row in rows)


def test_the_callbacks_and_the_optimizer_spec_have_defaults(micro_world, micro_base, tmp_path):
    # A library user had to build an AlertSinks and every config, and OptimSpec asked for learning rates that
    # LearningRates has defaults for.
    vlm, _, data = _parts(micro_world, micro_base)
    monitor, boundary = InstabilityMonitor(stage="sft"), BoundaryCheck()
    module = LoRASFTModule(vlm, LoraSpec(r=4), OptimSpec(), ["lora", "projector"])
    _trainer(tmp_path, [FaultInjection({1: "nan"}), monitor, boundary], max_steps=3).fit(module, datamodule=data)
    assert [(a.kind, a.step) for a in monitor.alerts][0] == ("non_finite", 1)  # warn: the NaN stays, alerted again
    assert len(boundary.all_losses) == 3


def test_a_trainer_that_keeps_the_loader_for_a_second_epoch_is_refused(micro_world, micro_base, tmp_path):
    # The loader reads its shuffle seed (the epoch) when it is built: without reloading, every epoch repeated the
    # first one's order, silently.
    vlm, _, data = _parts(micro_world, micro_base)
    module = AlignModule(vlm, OptimSpec(LearningRates()))
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        _trainer(tmp_path, [], max_steps=-1, max_epochs=2).fit(module, datamodule=data)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        _trainer(tmp_path, [], max_steps=40, enable_checkpointing=False).fit(module, datamodule=data)  # 12 a epoch
    _trainer(tmp_path, [], max_steps=3, enable_checkpointing=False).fit(module, datamodule=data)  # within one epoch
    # A limit of whole optimizer steps trains within one epoch. 5 batches with accumulation 2 (Lightning steps on
    # the short last window) are refused: that step's loss was logged into the next step's, 6.11 for 4.08, and
    # its tokens' weights counted a batch it never trained on.
    one_epoch = {"max_steps": 2, "limit_train_batches": 4, "accumulate_grad_batches": 2, "enable_checkpointing": False}
    _trainer(tmp_path, [], **one_epoch).fit(module, datamodule=data)
    with pytest.raises(ValueError, match="limit_train_batches 5 leaves 5 of an epoch's 12 batches, not whole"):
        _trainer(tmp_path, [], **{**one_epoch, "limit_train_batches": 5}).fit(module, datamodule=data)


def test_a_checkpoint_loads_only_into_a_module_like_the_one_that_wrote_it(micro_world, micro_base, tmp_path):
    # Checkpoints load non-strictly (they hold only the trained parameters): an SFT checkpoint loaded into an
    # AlignModule without a word, its adapter dropped, and one trained with another LoRA alpha scaled differently.
    def sft(alpha: int) -> LoRASFTModule:
        vlm, _, _ = _parts(micro_world, micro_base)
        return LoRASFTModule(vlm, LoraSpec(r=4, alpha=alpha), OptimSpec(LearningRates()), ["lora", "projector"])

    vlm, _, data = _parts(micro_world, micro_base)
    saver = ModelCheckpoint(tmp_path / "ckpt", save_last=True, save_top_k=0)
    _trainer(tmp_path, [saver], max_steps=1).fit(sft(8), datamodule=data)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["vlm_module"]["lora"]["alpha"] == 8

    resumed = _trainer(tmp_path, [ModelCheckpoint(tmp_path / "ckpt2", save_last=True)], max_steps=2)
    resumed.fit(sft(8), datamodule=data, ckpt_path=last)
    assert resumed.global_step == 2
    for module in (AlignModule(vlm, OptimSpec(LearningRates())), sft(16)):
        with pytest.raises(ValueError, match="this checkpoint is of"):
            _trainer(tmp_path, [], max_steps=2).fit(module, datamodule=data, ckpt_path=last)
    with pytest.raises(ValueError, match="trainable must name 'lora'"):
        LoRASFTModule(vlm, LoraSpec(), OptimSpec(LearningRates()), ["projector"])


def test_the_training_loader_is_built_by_the_trainer_it_trains_for(micro_world, micro_base, tmp_path):
    """Passed as train_dataloaders, the loader was built without the Trainer: every epoch repeated the first one's
    order, and the loss ignored the accumulation (train/loss 16.3 for 4.08 with accumulation 4)."""
    _, _, data = _parts(micro_world, micro_base)
    with pytest.raises(RuntimeError, match=r"pass it to trainer.fit\(datamodule=...\)"):
        data.train_dataloader()


def test_callbacks_used_out_of_order_or_too_early_are_refused(micro_world, micro_base, tmp_path):
    from callbacks.throughput import Throughput

    vlm, processor, data = _parts(micro_world, micro_base)
    samples = data.eval_samples("test", 2)
    # Built before data.connect(): it failed at the first evaluation, after the whole fit.
    with pytest.raises(ValueError, match=r"fmt is None; call data.connect\(...\) before passing data.format"):
        CaptionEvaluation("sft", samples, None, processor, tmp_path / "metrics.json")
    # After the evaluation, the throughput timed its evaluations as training: 957 tokens/s for 33,688.
    evaluation = CaptionEvaluation("sft", samples, data.format, processor, tmp_path / "metrics.json", max_new_tokens=2)
    module = AlignModule(vlm, OptimSpec(LearningRates()))
    with pytest.raises(ValueError, match="Throughput must come before CaptionEvaluation"):
        _trainer(tmp_path, [evaluation, Throughput()], max_steps=1).fit(module, datamodule=data)


def test_a_fit_resumed_at_its_end_scores_its_last_step_once(micro_world, micro_base, tmp_path):
    """Resumed from the checkpoint of its last step, a fit that ended by its epochs evaluated that step again: its
    history (and metrics.json) held it twice."""
    vlm, processor, data = _parts(micro_world, micro_base)
    samples = data.eval_samples("test", 2)

    def fit(ckpt_path=None) -> CaptionEvaluation:
        evaluation = CaptionEvaluation(
            "align", samples, data.format, processor, tmp_path / "metrics.json", max_new_tokens=2, every_n_steps=2
        )
        saver = ModelCheckpoint(tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=2)
        epoch = {"max_steps": -1, "max_epochs": 1, "limit_train_batches": 4, "reload_dataloaders_every_n_epochs": 1}
        _trainer(tmp_path, [evaluation, saver], **epoch).fit(AlignModule(vlm, OptimSpec()), data, ckpt_path=ckpt_path)
        return evaluation

    assert [h["global_step"] for h in fit().history] == [2, 4]
    assert [h["global_step"] for h in fit(tmp_path / "ckpt" / "last.ckpt").history] == [2, 4]


def test_a_fresh_fit_starts_a_fresh_alerts_file(micro_world, micro_base, tmp_path):
    """A script run again appended to the last run's alerts.jsonl, while its counts restarted at 0."""
    vlm, _, data = _parts(micro_world, micro_base)
    for _ in range(2):  # the same script twice
        sinks = AlertSinks("sft", tmp_path / "alerts.jsonl")
        monitor = InstabilityMonitor(InstabilityConfig(), sinks, "sft")
        _trainer(tmp_path, [FaultInjection({1: "nan"}), monitor, sinks], max_steps=2).fit(
            AlignModule(vlm, OptimSpec()), datamodule=data
        )
        lines = (tmp_path / "alerts.jsonl").read_text().splitlines()
        assert len(lines) == sum(sinks.counts.values()) == len(monitor.alerts)
