"""Loss weighting under gradient accumulation: every caption token of an optimizer step weighs the same.

Without it, each micro-batch's mean loss weighed the same, so a batch of 2 with accumulation 2 trained
differently from a batch of 4 on the same images (HF Trainer's pre-4.46 bug).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from datamodules.captions import IGNORE_INDEX, scored_tokens, tag_step_tokens
from stages.run import main
from tests.conftest import MICRO_ARGS


def _batch(tokens: int) -> dict:
    """A batch of one row whose labels score `tokens` positions (the first label is never scored)."""
    labels = torch.full((1, 12), IGNORE_INDEX)
    labels[0, 2 : 2 + tokens] = 7
    return {"labels": labels}


def test_each_batch_carries_the_scored_tokens_of_its_optimizer_step():
    counts = [3, 5, 2, 4, 6, 1, 2]
    tagged = [int(b["step_tokens"]) for b in tag_step_tokens((_batch(n) for n in counts), accumulate=3)]
    assert tagged == [10, 10, 10, 11, 11, 11, 2]  # the stream ended mid-step: its last batch stands alone
    # Resumed after 2 batches of the epoch: the first step has one batch left (batch 2, closing step 0).
    resumed = [int(b["step_tokens"]) for b in tag_step_tokens((_batch(n) for n in counts[2:]), accumulate=3, start=2)]
    assert resumed == [2, 11, 11, 11, 2]
    assert [int(b["step_tokens"]) for b in tag_step_tokens((_batch(n) for n in counts), accumulate=1)] == counts


def test_the_training_loader_tags_whole_steps_also_after_a_resume(micro_world, micro_base, monkeypatch):
    from tests.datamodules.test_loader import _datamodule

    datamodule = _datamodule(micro_world, micro_base, accumulate=2, batch_size=4)
    batches = list(datamodule.train_dataloader())
    assert len(batches) == 48
    counts = [int(scored_tokens(b["labels"])) for b in batches]
    assert len(set(counts)) > 1  # captions of different lengths: the weighting matters
    tags = [int(b["step_tokens"]) for b in batches]
    assert tags == [sum(counts[i - i % 2 : i - i % 2 + 2]) for i in range(48)]
    monkeypatch.setattr(datamodule, "_batches_done_this_epoch", lambda: 6)
    resumed = list(datamodule.train_dataloader())[:4]
    assert [b["keys"] for b in resumed] == [b["keys"] for b in batches[6:10]]
    assert [int(b["step_tokens"]) for b in resumed] == [int(b["step_tokens"]) for b in batches[6:10]]


def _align_only(tmp_path: Path) -> str:
    stage = {"trainable": ["projector"], "max_words": 48, "init_from": "base", "warmup_steps": 0}
    path = tmp_path / "align_only.yaml"
    path.write_text(yaml.safe_dump({"stages": {"align": {**stage, "trainer": {"max_steps": 3}}}}))
    return str(path)


def _train(tmp_path: Path, name: str, micro_world, micro_base, *flags: str) -> tuple[dict, list[float]]:
    run_dir = tmp_path / name
    args = [
        "curriculum", f"--run_dir={run_dir}", "--config", _align_only(tmp_path),
        *[a for a in MICRO_ARGS if not a.startswith("--stages.")], f"--data.shard_dir={micro_world}",
        f"--model.vision_path={micro_base[0]}", f"--model.lm_path={micro_base[1]}", "--eval.limit=1", *flags,
    ]  # fmt: skip
    assert main(args) == 0
    projector = load_file(str(run_dir / "align" / "export" / "projector.safetensors"))
    return projector, json.loads((run_dir / "align" / "losses.json").read_text())["losses"]


@pytest.mark.slow
def test_accumulated_micro_batches_train_as_one_batch(tmp_path, micro_world, micro_base):
    """Batch 4, and batch 2 with accumulation 2, see the same images in the same steps (one loader worker,
    the same sample order): with token weighting they train the same projector; with micro-batch weighting,
    whose step loss is the mean of two micro-batch means, they do not."""
    one, one_losses = _train(tmp_path, "batch4", micro_world, micro_base, "--data.batch_size=4")
    accumulate = ["--data.batch_size=2", "--trainer.accumulate_grad_batches=2"]
    two, two_losses = _train(tmp_path, "batch2x2", micro_world, micro_base, *accumulate)
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-5, atol=0)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)

    flag = "--stages.align.loss_weighting=micro_batch"
    old, old_losses = _train(tmp_path, "batch2x2_micro", micro_world, micro_base, *accumulate, flag)
    # Measured: the projector off by 1.1e-3 (token weighting: 1.5e-8), step losses by 9e-4 relative (1e-7).
    assert max(abs(a - b) / b for a, b in zip(old_losses, one_losses, strict=True)) > 1e-4
    assert max(float((old[key] - one[key]).abs().max()) for key in one) > 1e-4
