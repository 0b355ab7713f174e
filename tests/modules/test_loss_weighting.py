"""Loss weighting under gradient accumulation: every caption token of an optimizer step weighs the same.

Without it, each micro-batch's mean loss weighed the same, so a batch of 2 with accumulation 2 trained
differently from a batch of 4 on the same images (HF Trainer's pre-4.46 bug).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from datamodules.captions import IGNORE_INDEX, scored_tokens, tag_step_tokens
from stages.run import main
from tests.conftest import MICRO_ARGS, run_fresh


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


@pytest.mark.slow
def test_two_ranks_weigh_each_token_the_same(micro_world, micro_base, tmp_path):
    """DDP averages the ranks' gradients: with a rank factor of W x (rank's tokens / all tokens) the
    average is the gradient of the mean over every scored token of the step on both ranks. The stability
    callbacks still see each rank's own token mean."""
    from modules.loading import ModelConfig, build_vlm

    script = Path(__file__).with_name("ddp_token_weights.py")
    done = run_fresh([sys.executable, str(script), str(micro_world), *map(str, micro_base), str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, grad in ranks[0]["grads"].items():
        torch.testing.assert_close(ranks[1]["grads"][key], grad)  # DDP's average: the same on both ranks

    vlm = build_vlm(ModelConfig(), *micro_base)[0]
    vlm.projector.load_state_dict(ranks[0]["start"])
    vlm.vision.eval()

    def gradient_and_losses(batches: list[dict]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Gradient of the token sum of the loss, its token count, and the mean loss per batch."""
        vlm.zero_grad()
        tokens, means = [], []
        for b in batches:
            mean = vlm(b["input_ids"], b["attention_mask"], b["pixel_values"], b["labels"]).loss
            (mean * scored_tokens(b["labels"])).backward()
            tokens.append(scored_tokens(b["labels"]))
            means.append(mean.detach())
        return [p.grad.clone() for p in vlm.projector.parameters()], torch.stack(tokens), torch.stack(means)

    per_rank = [gradient_and_losses(rank["batches"]) for rank in ranks]
    rank_tokens = [int(tokens.sum()) for _, tokens, _ in per_rank]
    assert rank_tokens[0] != rank_tokens[1]  # the ranks' captions differ in length: the weighting matters
    every_token = [(g0 + g1) / sum(rank_tokens) for g0, g1 in zip(per_rank[0][0], per_rank[1][0], strict=True)]
    # Each rank's token mean, averaged: what DDP gave before the rank factor.
    rank_means = [
        (g0 / rank_tokens[0] + g1 / rank_tokens[1]) / 2 for g0, g1 in zip(per_rank[0][0], per_rank[1][0], strict=True)
    ]
    ddp = list(ranks[0]["grads"].values())
    # Measured: 85 and 101 tokens; the rank means' gradient off by 5.5e-2 of its largest entry, DDP's by 3e-7.
    assert max(float((r - e).abs().max() / e.abs().max()) for r, e in zip(rank_means, every_token, strict=True)) > 1e-3
    for got, want in zip(ddp, every_token, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    for rank, (_, tokens, means) in zip(ranks, per_rank, strict=True):
        own_mean = float((means * tokens).sum() / tokens.sum())
        assert rank["monitor_loss"] == pytest.approx([own_mean], rel=1e-5)
        assert rank["boundary_loss"] == pytest.approx([own_mean], rel=1e-5)


def test_val_loss_is_the_mean_over_every_scored_token(micro_world, micro_base):
    # val/loss was a mean of per-batch means weighed by rows: a short caption's tokens weighed more than a long
    # one's, and the value moved with the batch size (and, with several ranks, with their number).
    import lightning as L

    from datamodules.caption_datamodule import CaptionDataModule
    from modules.loading import build_vlm, count_image_tokens
    from stages.stage import make_module
    from tests.test_configs import _parse

    cfg = _parse()
    vlm, tokenizer, processor = build_vlm(cfg.model, *micro_base)
    module = make_module(cfg.stages["align"], vlm, cfg)

    def validated(batch_size: int) -> float:
        datamodule = CaptionDataModule(micro_world, max_words=48, batch_size=batch_size)
        datamodule.connect(tokenizer, processor, count_image_tokens(vlm, processor), cfg.model.prompt)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        return trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]

    datamodule = CaptionDataModule(micro_world, max_words=48, batch_size=1)
    datamodule.connect(tokenizer, processor, count_image_tokens(vlm, processor), cfg.model.prompt)
    module.eval()
    with torch.no_grad():
        per_caption = [(module._loss(b) * scored_tokens(b["labels"]), scored_tokens(b["labels"])) for b in
                       datamodule.val_dataloader()]  # fmt: skip
    assert len(per_caption) == 32 and len({int(n) for _, n in per_caption}) > 1
    expected = float(sum(s for s, _ in per_caption) / sum(n for _, n in per_caption))
    assert validated(5) == pytest.approx(expected, rel=1e-6)
    assert validated(32) == pytest.approx(expected, rel=1e-6)
