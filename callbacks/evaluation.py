"""Evaluation at the end of a stage: greedy captions on a held-out split, scored against ground truth."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from typing_extensions import override

from datamodules.captions import PromptFormat
from stages.metrics import caption_metrics

log = logging.getLogger(__name__)


def generate_captions(
    vlm, samples: list, fmt: PromptFormat, processor, batch_size: int, **generate_kwargs
) -> list[str]:
    """Captions for (key, image, metadata) samples. Every prompt has the same length, so no padding."""
    device = next(vlm.parameters()).device
    prefix = torch.tensor(fmt.prefix(), device=device)
    tokenizer = fmt.tokenizer
    captions: list[str] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        pixels = processor([image for _, image, _ in chunk], return_tensors="pt")["pixel_values"].to(device)
        input_ids = prefix.expand(len(chunk), -1)
        tokens = vlm.generate(
            input_ids,
            torch.ones_like(input_ids),
            pixels,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **generate_kwargs,
        )
        captions += [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
    return captions


def _gather(items: list) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return items
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def markdown_table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| key | ground truth | generated |", "|---|---|---|"]
    lines += [f"| {key} | {truth} | {generated} |" for key, truth, generated in rows]
    return "\n".join(lines)


class CaptionEvaluation(L.Callback):
    """At the end of training, captions `samples` greedily, writes `metrics.json`, and logs to TensorBoard.

    Each rank captions its share of the samples (under DeepSpeed ZeRO-3 every rank must take part
    in a forward pass); rank 0 scores the gathered results.
    """

    def __init__(
        self,
        stage: str,
        samples: list,
        fmt: PromptFormat,
        processor,
        out_path: Path,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        batch_size: int = 128,
        table_rows: int = 8,
        extra: dict | None = None,
    ) -> None:
        if not samples:
            raise ValueError("CaptionEvaluation needs at least one held-out sample")
        if max_new_tokens < 1 or num_beams < 1 or batch_size < 1:
            raise ValueError("eval.max_new_tokens, eval.num_beams and eval.batch_size must be positive")
        self.stage, self.samples, self.fmt, self.processor = stage, samples, fmt, processor
        self.out_path, self.table_rows, self.batch_size = Path(out_path), table_rows, batch_size
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
        self.extra = extra or {}
        self.metrics: dict[str, float] | None = None

    def evaluate(self, vlm, rank: int = 0, world_size: int = 1) -> tuple[dict[str, float], list[tuple[str, str, str]]]:
        mine = self.samples[rank::world_size]
        was_training = vlm.training
        vlm.eval()
        captions = generate_captions(vlm, mine, self.fmt, self.processor, self.batch_size, **self.generate_kwargs)
        vlm.train(was_training)
        results = _gather([(key, meta, text) for (key, _, meta), text in zip(mine, captions, strict=True)])
        results.sort(key=lambda r: r[0])
        metrics = caption_metrics(
            [text for _, _, text in results],
            [meta["objects"] for _, meta, _ in results],
            [list(meta["captions"].values()) for _, meta, _ in results],
        )
        rows = [(key, meta["captions"]["long"], text) for key, meta, text in results[: self.table_rows]]
        return metrics, rows

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics, rows = self.evaluate(pl_module.vlm, trainer.global_rank, trainer.world_size)
        self.metrics = metrics
        if not trainer.is_global_zero:
            return
        record = {"stage": self.stage, "global_step": trainer.global_step, "generation": self.generate_kwargs}
        record.update(metrics, **self.extra)
        self.out_path.write_text(json.dumps(record, indent=2))
        log.info("%s evaluation: %s", self.stage, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        logger = trainer.logger
        if logger is not None:
            logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
            step = getattr(logger, "global_step", lambda s: s)(trainer.global_step)
            logger.experiment.add_text(f"eval/{self.stage}/captions", markdown_table(rows), global_step=step)
