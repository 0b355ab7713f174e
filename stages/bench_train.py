"""`stages.run bench train`: training throughput of a profile, our Lightning path beside a plain loop.

For the align step (projector only) and the SFT step (projector + LoRA), on one synthetic batch of
the profile's shapes (`batch_size` images, their image tokens plus `text_tokens` text tokens each):

- lightning: the project's LightningModule under the profile's Trainer settings (strategy,
  precision, DeepSpeed config), as `stages.run curriculum` trains;
- plain: the loop LLaVA-style scripts write: PEFT LoRA on the same VLM, AdamW, bf16 autocast on
  CUDA, forward / backward / step.

Printed per path and step kind: tokens/s and samples/s over the steps after `warmup`, peak memory
(GPU: max allocated; CPU: peak RSS of the process, which only grows), and MFU: model FLOPs per
second over a matmul peak measured in the same run. Model FLOPs per sample = 2 x (vision tower
parameters) x image patches (forward only: it is frozen) + 4 x (LM parameters) x tokens (forward
and input gradients) + 2 x (trainable parameters) x tokens (their weight gradients).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from typing_extensions import override

from callbacks.throughput import peak_rss_gib


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of a square matmul of `size`, the best of `repeats` (the MFU denominator)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def synthetic_batch(tokenizer, fmt, processor, batch_size: int, text_tokens: int, image_size: int) -> dict:
    """One batch: random images, the image placeholders and prompt, then `text_tokens` caption tokens."""
    from PIL import Image

    from datamodules.captions import collate_captions

    generator = torch.Generator().manual_seed(0)
    vocab = [i for i in tokenizer.get_vocab().values() if i not in set(tokenizer.all_special_ids)]
    images = [
        Image.fromarray(torch.randint(0, 255, (image_size, image_size, 3), generator=generator).byte().numpy())
        for _ in range(batch_size)
    ]
    sequences = []
    for _ in range(batch_size):
        words = [vocab[i] for i in torch.randint(0, len(vocab), (text_tokens - 1,), generator=generator)]
        prefix = fmt.prefix()
        sequences.append(
            (prefix + words + [tokenizer.eos_token_id], [-100] * len(prefix) + words + [tokenizer.eos_token_id])
        )
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    return collate_captions([f"bench-{i}" for i in range(batch_size)], pixels, sequences, tokenizer.pad_token_id)


class _Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch: dict, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


class _StepTimer(L.Callback):
    """Wall time of the optimizer steps after `warmup` (synchronised on CUDA)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.started, self.timed_steps = warmup, None, 0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        if trainer.global_step == self.warmup:
            self.started = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.timed_steps = trainer.global_step - self.warmup
            self.elapsed = time.perf_counter() - self.started


def _flops_per_sample(vlm, tokens: int, patches: int) -> float:
    vision = sum(p.numel() for p in vlm.vision.parameters())
    lm = sum(p.numel() for n, p in vlm.lm.named_parameters() if "lora_" not in n)
    trainable = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
    return 2 * vision * patches + 4 * lm * tokens + 2 * trainable * tokens


def _result(batch: dict, steps: int, seconds: float, flops_per_sample: float, peak: float, device) -> dict:
    tokens = int(batch["attention_mask"].sum()) * steps
    samples = len(batch["keys"]) * steps
    result = {
        "tokens_per_s": round(tokens / seconds, 1),
        "samples_per_s": round(samples / seconds, 2),
        "model_flops_per_s": flops_per_sample * samples / seconds,
    }
    result["peak_gpu_gib" if device.type == "cuda" else "peak_rss_gib"] = round(peak, 3)
    return result


def _peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else peak_rss_gib()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_train(cfg, run_dir: Path, steps: int, warmup: int, batch_size: int, text_tokens: int) -> dict:
    """Runs both paths for both step kinds on the profile `cfg` (a CurriculumConfig); returns the figures."""
    from datamodules.captions import PromptFormat
    from modules.handoff import attach_lora
    from modules.loading import build_vlm
    from modules.training_module import AlignModule, LoRASFTModule, OptimSpec
    from stages.curriculum import prepare_base_models
    from stages.stage import count_image_tokens

    if steps <= warmup:
        raise ValueError(f"--steps ({steps}) must be larger than --warmup ({warmup})")
    vision_path, lm_path = prepare_base_models(cfg, run_dir)
    names = list(cfg.stages)
    sft_spec = cfg.stages[names[-1]]
    cuda = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    peak_flops = matmul_peak(device, dtype, 8192 if cuda else 1024)
    report: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "matmul_peak_flops": peak_flops}
    for kind in ("align", "sft"):
        # Our path: the LightningModule under the profile's trainer.
        vlm, tokenizer, processor = build_vlm(cfg.model, vision_path, lm_path)
        fmt = PromptFormat(tokenizer, count_image_tokens(vlm, processor), cfg.model.prompt)
        side = cfg.model.image_size
        batch = synthetic_batch(tokenizer, fmt, processor, batch_size, text_tokens, side)
        patches = fmt.num_image_tokens
        optim = OptimSpec(lr=sft_spec.lr, warmup_steps=0)
        module = (
            AlignModule(vlm, optim)
            if kind == "align"
            else LoRASFTModule(vlm, cfg.model.lora, optim, sft_spec.trainable)
        )
        flops = _flops_per_sample(vlm, int(batch["attention_mask"][0].sum()), patches)
        timer = _StepTimer(warmup)
        trainer_kwargs = cfg.trainer.kwargs()
        trainer_kwargs.update(max_steps=steps, logger=False, enable_checkpointing=False, callbacks=[timer])
        trainer_kwargs.update(enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer_kwargs["limit_val_batches"] = 0
        _reset_peak(device)
        L.Trainer(**trainer_kwargs).fit(
            module, train_dataloaders=torch.utils.data.DataLoader(_Repeat(batch, steps), batch_size=None)
        )
        lightning = _result(batch, timer.timed_steps, timer.elapsed, flops, _peak(device), device)
        del module, vlm

        # The plain loop on the same model, batch and trainable parameters.
        vlm, tokenizer, processor = build_vlm(cfg.model, vision_path, lm_path)
        if kind == "sft":
            attach_lora(vlm, cfg.model.lora)
        trainable = ["projector"] if kind == "align" else ["projector", "lora"]
        for name, param in vlm.named_parameters():
            param.requires_grad = any(
                (group == "projector" and name.startswith("projector.")) or (group == "lora" and "lora_" in name)
                for group in trainable
            )
        vlm.to(device).train()
        vlm.vision.eval()
        optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-4)
        on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        _reset_peak(device)
        for step in range(steps):
            if step == warmup:
                if cuda:
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = vlm(
                    on_device["input_ids"], on_device["attention_mask"], on_device["pixel_values"], on_device["labels"]
                ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        plain = _result(batch, steps - warmup, time.perf_counter() - started, flops, _peak(device), device)
        del vlm, optimizer
        for result in (lightning, plain):
            result["mfu"] = round(result.pop("model_flops_per_s") / peak_flops, 4)
        report[kind] = {
            "tokens_per_sample": int(batch["attention_mask"][0].sum()),
            "image_tokens": patches,
            "lightning": lightning,
            "plain": plain,
            "speedup": round(lightning["tokens_per_s"] / plain["tokens_per_s"], 3),
        }
    (run_dir / "bench_train.json").write_text(json.dumps(report, indent=2))
    return report


def print_train_report(report: dict) -> None:
    print(f"training throughput on {report['device']} (matmul peak {report['matmul_peak_flops'] / 1e12:.2f} TFLOP/s)")
    for kind in ("align", "sft"):
        row = report[kind]
        print(f"{kind}: {row['tokens_per_sample']} tokens per sample ({row['image_tokens']} image tokens)")
        for path in ("lightning", "plain"):
            r = row[path]
            memory = f"peak GPU {r['peak_gpu_gib']} GiB" if "peak_gpu_gib" in r else f"peak RSS {r['peak_rss_gib']} GiB"
            print(
                f"  {path:>9}: {r['tokens_per_s']} tokens/s, {r['samples_per_s']} samples/s, MFU {r['mfu']}, {memory}"
            )
        print(f"  lightning / plain tokens/s: {row['speedup']}x")
