"""`stages.run bench train`: training throughput of a profile, with and without each speed lever.

For the align step (projector only) and the SFT step (projector + LoRA), on one synthetic batch of
the profile's shapes (`batch` images, their image tokens plus `text_tokens` text tokens each), in
one process, one variant after another on a copy of the same base model:

- `plain`: the loop LLaVA-style scripts write: PEFT LoRA on the same VLM, AdamW, forward / backward /
  step under autocast to the profile's half precision (bf16 for `bf16-*`, fp16 for `16-*`; none for
  32 and 64, the model's own dtype); `plain+ckpt` adds transformers' gradient checkpointing;
- `none`: the project's LightningModule under the profile's Trainer settings (strategy, precision,
  DeepSpeed config), as `stages.run curriculum` trains, with every lever off;
- one variant per lever (modules/speed.py): `chunked_ce`, `ckpt`, `ckpt2` (every other layer),
  `compile`, `no_dropout` (LoRA dropout 0; SFT only), and `+`-joined combinations of them;
- `profile`: the levers and LoRA dropout that the profile's config sets.

Printed per variant: tokens/s and samples/s over the steps after `warmup` (one batch per optimizer
step, whatever the profile's accumulation), peak memory (GPU: during the variant; CPU: peak RSS of
the process, which only grows, so it is not comparable between variants), MFU and
tokens/s relative to `plain`. On a GPU two peaks are kept: allocated (tensors alive at once) and
reserved (what PyTorch's caching allocator held from the card, fragmentation included); the targets are
judged on reserved, and the 24 GiB one adds the CUDA context, measured once at the start.

MFU is useful model FLOPs per second over a bf16 matmul peak measured in the same run, with the same
FLOPs per sample for every variant:
- 2 x (tower parameters) x patches, plus 4 x layers x patches^2 x width for its attention scores
  and mixing (forward only: the tower is frozen);
- 4 x (LM layer parameters) x tokens (forward and gradients to the inputs), plus 6 x layers x tokens^2 x
  attention width (scores and mixing, forward and back to the inputs, causal: half the square);
- 4 x (output layer parameters) x labelled tokens (no loss needs logits for image tokens);
- 2 x (trainable parameters) x tokens (their weight gradients).
Recomputation is not counted. A variant that runs out of GPU memory, or that the config refuses
(compile under ZeRO-3), is reported as such and the bench goes on.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import torch
from typing_extensions import override

from callbacks.throughput import peak_rss_gib
from modules.loading import LoraSpec
from modules.speed import SpeedSpec, set_checkpointing
from modules.training_module import AlignModule, LoRASFTModule, OptimSpec
from stages.config import unified_precision

log = logging.getLogger(__name__)


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
    prefix, end = fmt.prefix(), fmt.end_ids
    for _ in range(batch_size):
        words = [vocab[i] for i in torch.randint(0, len(vocab), (text_tokens - len(end),), generator=generator)]
        sequences.append((prefix + words + end, [-100] * len(prefix) + words + end))
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    return collate_captions([f"bench-{i}" for i in range(batch_size)], pixels, sequences, tokenizer.pad_token_id)


class _Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch: dict, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


def _first(items: list):
    """The one ready-made batch of a size-1 loader: Lightning's DeepSpeed strategy reads the loader's
    `batch_sampler.batch_size` and fails on an unbatched loader (batch_size=None), which has none."""
    return items[0]


class _StepTimer(L.Callback):
    """Wall time of the optimizer steps after `warmup` to the last one. CUDA is synchronised at those two
    points only, as the plain loop's timer does: a wait after every step would slow this side alone."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.started, self.timed_steps = warmup, None, 0

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self.warmup and step != trainer.max_steps:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        if step == self.warmup:
            self.started = time.perf_counter()
        else:
            self.timed_steps = step - self.warmup
            self.elapsed = time.perf_counter() - self.started


def _attention(config) -> tuple[int, int]:
    """(layers, heads x head size) of a transformer config; (0, 0) for one without attention (a conv net)."""
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        return 0, 0
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads * head_dim


def tower_forward_flops(tower, image_tokens: int) -> tuple[float, float]:
    """(dense, attention) FLOPs of one image through the vision tower: its parameters on each patch of its
    grid (ViT; else on each image token it gives), and per layer 4 x patches^2 x width for the attention
    scores and the mixing of values."""
    config = tower.config
    size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    patches = (size // patch) ** 2 if isinstance(size, int) and isinstance(patch, int) else image_tokens
    layers, width = _attention(config)
    return 2 * sum(p.numel() for p in tower.parameters()) * patches, 4 * layers * patches**2 * width


def lm_forward_flops(lm, tokens: int, labelled: int, causal: bool = True) -> tuple[float, float, float]:
    """(layers, attention, output layer) FLOPs of one sequence of `tokens` through the LM's forward: its
    decoder layers' parameters on every token, attention's 4 x tokens^2 x width per layer (half of it for
    `causal`: the masked half is no work a causal kernel does), the output layer on `labelled` positions."""
    params = sum(p.numel() for n, p in lm.named_parameters() if "lora_" not in n)
    embedding, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    params -= embedding.numel() + (0 if head is embedding else head.numel())
    layers, width = _attention(lm.config.get_text_config())
    attention = 4 * layers * tokens**2 * width * (0.5 if causal else 1.0)
    return 2 * params * tokens, attention, 2 * head.numel() * labelled


def _flops_per_sample(vlm, trainable: int, tokens: int, image_tokens: int, labelled: int) -> float:
    """Useful model FLOPs per sample, the same for every variant: the frozen tower's forward; the LM forward
    and back to its inputs (dense matmuls twice the forward, attention's three times: both of its
    operands are activations); weight gradients of the trainable parameters (2 x parameters x tokens)."""
    tower_dense, tower_attention = tower_forward_flops(vlm.vision, image_tokens)
    lm_dense, lm_attention, head = lm_forward_flops(vlm.lm, tokens, labelled)
    return tower_dense + tower_attention + 2 * (lm_dense + head) + 3 * lm_attention + 2 * trainable * tokens


def _trainable_count(base, kind: str, lora) -> int:
    """Parameters the step trains: the projector, and for SFT the LoRA matrices (r x (in + out) per target)."""
    count = sum(p.numel() for p in base.projector.parameters())
    if kind == "sft":
        targets = set(lora.target_modules)
        for name, module in base.lm.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                count += lora.r * (module.in_features + module.out_features)
    return count


def _result(batch: dict, seconds_per_step: float, flops_per_sample: float, peak, device, peak_flops) -> dict:
    samples = len(batch["keys"])
    result = {
        "tokens_per_s": round(int(batch["attention_mask"].sum()) / seconds_per_step, 1),
        "samples_per_s": round(samples / seconds_per_step, 2),
        "mfu": float(f"{flops_per_sample * samples / seconds_per_step / peak_flops:.3g}"),  # toy models: 1e-5
    }
    if device.type == "cuda":
        result["peak_gpu_gib"], result["peak_reserved_gib"] = (round(gib, 3) for gib in peak)
    else:
        result["peak_rss_gib"] = round(peak, 3)
    return result


def _start_variant(device: torch.device) -> tuple[float, float]:
    """Frees what earlier variants left (Trainer, engine and compile references form cycles) and starts the
    peak count; returns the memory still allocated and reserved (the base model the variant copies), which
    the variant's peaks do not include."""
    gc.collect()
    torch._dynamo.reset()
    if device.type != "cuda":
        return 0.0, 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**30, torch.cuda.memory_reserved(device) / 2**30


def _compile_counts() -> tuple[int, int]:
    """(graphs dynamo has compiled, functions that hit its recompile limit) in this process so far. Dynamo
    records a hit once per function: after it, every call of that function runs eagerly."""
    from torch._dynamo.utils import counters

    limit_hits = sum(n for reason, n in counters["unimplemented"].items() if "recompile limit" in reason.lower())
    return counters["stats"]["unique_graphs"], limit_hits


def _peak(device: torch.device, start: tuple[float, float]):
    """(allocated, reserved) GiB at the variant's peak on CUDA, less what it started with; the RSS on CPU."""
    if device.type != "cuda":
        return peak_rss_gib()
    allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    return allocated / 2**30 - start[0], reserved / 2**30 - start[1]


def cuda_overhead_gib(device: torch.device) -> float:
    """Card memory in use beyond what PyTorch's allocator holds: the CUDA context and libraries' workspaces
    (cuBLAS, NCCL), which a run on a 24 GiB card must fit beside its tensors."""
    free, total = torch.cuda.mem_get_info(device)
    return (total - free - torch.cuda.memory_reserved(device)) / 2**30


LEVERS: dict[str, dict] = {
    "chunked_ce": {"loss_chunk_tokens": 1024},
    "ckpt": {"checkpoint_every": 1},
    "ckpt2": {"checkpoint_every": 2},
    "compile": {"compile": "inductor"},
    "no_dropout": {"lora_dropout": 0.0},
}
DEFAULT_VARIANTS = ["plain", "plain+ckpt", "none", *LEVERS, "profile"]


def parse_variant(name: str, cfg) -> tuple[str, SpeedSpec, float]:
    """("plain" or "lightning", speed levers, LoRA dropout) of a variant name."""
    if name == "profile":
        return "lightning", cfg.model.speed, cfg.model.lora.dropout
    parts = name.split("+")
    path = "plain" if parts[0] == "plain" else "lightning"
    levers = parts[1:] if path == "plain" or parts[0] == "none" else parts
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown or (path == "plain" and set(levers) - {"ckpt"}):
        raise ValueError(
            f"--variants: {name!r} is not a variant; use plain, plain+ckpt, none, profile or "
            f"'+'-joined levers among {', '.join(LEVERS)}"
        )
    fields = {k: v for lever in levers for k, v in LEVERS[lever].items()}
    dropout = fields.pop("lora_dropout", cfg.model.lora.dropout)
    return path, SpeedSpec(**fields), dropout


def _lightning_step(module, batch: dict, cfg, steps: int, warmup: int) -> float:
    """Seconds per timed step of `module` under the profile's Trainer."""
    timer = _StepTimer(warmup)
    trainer_kwargs = cfg.trainer.kwargs()
    trainer_kwargs.update(max_steps=steps, logger=False, enable_checkpointing=False, callbacks=[timer])
    trainer_kwargs["accumulate_grad_batches"] = 1  # one batch per optimizer step, as the plain loop
    trainer_kwargs.update(enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer_kwargs["limit_val_batches"] = 0
    L.Trainer(**trainer_kwargs).fit(
        module, train_dataloaders=torch.utils.data.DataLoader(_Repeat(batch, steps), batch_size=1, collate_fn=_first)
    )
    return timer.elapsed / timer.timed_steps


def plain_autocast(precision) -> torch.dtype | None:
    """The autocast dtype of the plain loop for the profile's precision: its half precision type, as a LLaVA-style
    script's `--bf16` / `--fp16` trains (float32 weights, half-precision compute); None for 32 and 64. It took bf16
    on CUDA and none on the CPU whatever the profile said, and a bf16 run was timed against a float32 loop."""
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(unified_precision(precision).split("-")[0])


def _plain_step(vlm, kind: str, lora, checkpointing: bool, batch: dict, device, steps: int, warmup: int, half) -> float:
    """Seconds per timed step of the plain PyTorch + PEFT loop, autocast to `half` (None: off)."""
    from modules.handoff import attach_lora
    from modules.training_module import group_parameters

    if kind == "sft":
        attach_lora(vlm, lora)
    if checkpointing:
        set_checkpointing(vlm.lm, 1)
    groups = group_parameters(vlm)
    trainable = groups["projector"] + (groups["lora"] if kind == "sft" else [])
    vlm.requires_grad_(False)
    for param in trainable:
        param.requires_grad_(True)
    vlm.to(device).train()
    vlm.vision.eval()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=half == torch.float16)  # fp16 needs loss scaling
    for step in range(steps):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None):
            inputs = on_device["input_ids"], on_device["attention_mask"], on_device["pixel_values"]
            loss = vlm(*inputs, on_device["labels"]).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / (steps - warmup)


@dataclass
class Setup:
    """What every variant is measured with: the profile, its model and batch, and the timing."""

    cfg: object
    base: torch.nn.Module
    batch: dict
    device: torch.device
    steps: int
    warmup: int
    optim: OptimSpec
    sft_trainable: list[str]
    peak_flops: float


@dataclass
class Step:
    """One variant of one step kind: align or sft, the plain loop or the Lightning module, its levers."""

    name: str
    kind: str
    path: str
    speed: SpeedSpec
    lora: LoraSpec


def _measure(step: Step, setup: Setup, flops: float) -> dict:
    """The variant's figures on a fresh copy of the model, or the error that stopped it."""
    vlm, device = copy.deepcopy(setup.base), setup.device
    start, graphs = _start_variant(device), _compile_counts()
    try:
        if step.path == "plain":
            checkpointing = bool(step.speed.checkpoint_every)
            seconds = _plain_step(vlm, step.kind, step.lora, checkpointing, setup.batch, device, setup.steps,
                                  setup.warmup, plain_autocast(setup.cfg.trainer.precision))  # fmt: skip
        else:
            module = (
                AlignModule(vlm, setup.optim, step.speed)
                if step.kind == "align"
                else LoRASFTModule(vlm, step.lora, setup.optim, setup.sft_trainable, step.speed)
            )
            seconds = _lightning_step(module, setup.batch, setup.cfg, setup.steps, setup.warmup)
    except torch.cuda.OutOfMemoryError:
        log.warning("bench train: %s %s ran out of GPU memory", step.kind, step.name)
        return {"error": "out of GPU memory"}
    except Exception as error:  # one broken variant (a compiler missing, say) must not lose the rest
        log.exception("bench train: %s %s failed", step.kind, step.name)
        return {"error": f"failed: {type(error).__name__}: {error}"[:500]}
    result = _result(setup.batch, seconds, flops, _peak(device, start), device, setup.peak_flops)
    if step.speed.compile:
        # One graph should serve every decoder layer; more, or layers past dynamo's recompile limit (which then
        # run eagerly), would make the figure something else than it says.
        after = _compile_counts()
        result["compiled_graphs"] = after[0] - graphs[0]
        result["recompile_limit_hits"] = after[1] - graphs[1]
    return result


def bench_train(
    cfg,
    run_dir: Path,
    steps: int,
    warmup: int,
    batch_size: int,
    text_tokens: int,
    variants: list[str] | None = None,
    kinds: tuple[str, ...] = ("align", "sft"),
) -> dict:
    """Runs every variant for both step kinds on the profile `cfg` (a CurriculumConfig); returns the figures."""
    from datamodules.captions import PromptFormat, scored_tokens
    from modules.loading import build_vlm, count_image_tokens
    from stages.config import check_speed
    from stages.curriculum import check_accelerator, prepare_base_models, ranks

    if ranks(cfg.trainer) != 1:  # Lightning's launcher ran the whole bench again on every rank, each timing both
        flag = "--trainer.num_nodes" if (cfg.trainer.num_nodes or 1) > 1 else "--trainer.devices"
        raise ValueError(
            f"--trainer.devices {cfg.trainer.devices} (num_nodes {cfg.trainer.num_nodes}): bench train measures one "
            f"device; set {flag} 1"
        )
    check_accelerator(cfg)  # as a curriculum: 16-mixed on the CPU, which Lightning ran as bf16 beside fp16 plain
    if steps <= warmup or warmup < 1:
        # The timer starts at the end of the last warm-up step: with none, Lightning variants had no start.
        raise ValueError(f"--warmup ({warmup}) must be at least 1 and below --steps ({steps})")
    variants = variants or DEFAULT_VARIANTS
    if not kinds or set(kinds) - {"align", "sft"}:
        raise ValueError(f"--kinds: {list(kinds)} must be a non-empty subset of ['align', 'sft']")
    parsed = {name: parse_variant(name, cfg) for name in variants}
    vision_path, lm_path = prepare_base_models(cfg, run_dir)
    sft_spec = cfg.stages[list(cfg.stages)[-1]]
    cuda = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    peak_flops = matmul_peak(device, torch.bfloat16 if cuda else torch.float32, 8192 if cuda else 1024)
    report: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "matmul_peak_flops": peak_flops,
        "batch": batch_size,
    }
    if cuda:
        report["cuda_overhead_gib"] = round(cuda_overhead_gib(device), 3)
    base, tokenizer, processor = build_vlm(cfg.model, vision_path, lm_path, init_device=device.type)
    fmt = PromptFormat(tokenizer, count_image_tokens(base, processor), cfg.model.prompt, cfg.model.chat_template)
    batch = synthetic_batch(tokenizer, fmt, processor, batch_size, text_tokens, cfg.model.image_size)
    tokens = int(batch["attention_mask"][0].sum())
    labelled = int(scored_tokens(batch["labels"][0]))
    optim = replace(sft_spec.optim(), warmup_steps=0)  # every timed step at the peak rate
    setup = Setup(cfg, base, batch, device, steps, warmup, optim, sft_spec.trainable, peak_flops)

    def save() -> None:
        (run_dir / "bench_train.json").write_text(json.dumps(report, indent=2))

    for kind in kinds:
        flops = _flops_per_sample(
            base, _trainable_count(base, kind, cfg.model.lora), tokens, fmt.num_image_tokens, labelled
        )
        results: dict = {}
        report[kind] = {
            "tokens_per_sample": tokens,
            "image_tokens": fmt.num_image_tokens,
            "labelled_tokens": labelled,
            "variants": results,
        }
        for name, (path, speed, dropout) in parsed.items():
            if kind == "align" and dropout != cfg.model.lora.dropout:
                continue  # LoRA dropout does not exist in the align step
            levers = {**asdict(speed), "lora_dropout": dropout}
            try:
                check_speed(speed, cfg.trainer)
            except ValueError as error:
                results[name] = {"error": f"refused: {error}", "levers": levers}
                continue
            step = Step(name, kind, path, speed, replace(cfg.model.lora, dropout=dropout))
            results[name] = {**_measure(step, setup, flops), "levers": levers}
            log.info("bench train: %s %s: %s", kind, name, results[name])
            save()  # what is measured so far survives a run stopped by a time limit
        reference = results.get("plain", {}).get("tokens_per_s")
        for result in results.values():
            if reference and "tokens_per_s" in result:
                result["vs_plain"] = round(result["tokens_per_s"] / reference, 3)
    save()
    return report


def failed_variants(report: dict) -> list[str]:
    """ "kind variant" of every variant that broke (not those out of memory or refused by the config)."""
    return [
        f"{kind} {name}"
        for kind in ("align", "sft")
        for name, r in report.get(kind, {}).get("variants", {}).items()
        if r.get("error", "").startswith("failed")
    ]


def print_train_report(report: dict) -> None:
    print(
        f"training throughput on {report['device']} (matmul peak {report['matmul_peak_flops'] / 1e12:.2f} TFLOP/s), "
        f"batch {report['batch']}"
    )
    for kind in [k for k in ("align", "sft") if k in report]:
        row = report[kind]
        print(f"{kind}: {row['tokens_per_sample']} tokens per sample ({row['image_tokens']} image tokens)")
        memory = "alloc/reserved GiB" if report["device"] != "cpu" else "peak RSS GiB"
        print(f"  {'variant':<28} {'tokens/s':>10} {'samples/s':>10} {'MFU':>7} {memory:>19} {'vs plain':>9}")
        for name, r in row["variants"].items():
            if "error" in r:
                print(f"  {name:<28} {r['error']}")
                continue
            gib = f"{r['peak_gpu_gib']}/{r['peak_reserved_gib']}" if "peak_gpu_gib" in r else r["peak_rss_gib"]
            ratio = f"{r['vs_plain']}x" if "vs_plain" in r else "-"
            print(f"  {name:<28} {r['tokens_per_s']:>10} {r['samples_per_s']:>10} {r['mfu']:>7} {gib:>19} {ratio:>9}")
            if "compiled_graphs" in r:
                hits = r["recompile_limit_hits"]
                hits = f", recompile limit hit by {hits} function(s), which then ran eagerly" if hits else ""
                print(f"  {'':<28} compiled graphs: {r['compiled_graphs']}{hits}")
    if report["device"] == "cpu":
        print("peak GiB on CPU is the process's peak RSS so far: it only grows, so it does not compare variants")
    else:
        print(f"CUDA context and workspaces outside the allocator: {report.get('cuda_overhead_gib', 0)} GiB")
    for line in sft_targets(report):
        print(line)


def sft_targets(report: dict, speedup: float = 2.0, budget_gib: float = 24.0) -> list[str]:
    """The SFT targets (on one H100, MGM-2B shape: at least 2x the plain PyTorch + PEFT loop's tokens/s at no
    more peak memory, and a batch-8 configuration within 24 GiB, the card the original recipe ran on), judged
    on a GPU report: the fastest Lightning variant within the plain loop's peak memory against `speedup` x its
    tokens/s, and the lowest peak with the CUDA context against `budget_gib`. Peaks are the allocator's
    reserved memory: what the card must hold, not only live tensors."""
    rows = report.get("sft", {}).get("variants", {})
    gib = {n: r["peak_reserved_gib"] for n, r in rows.items() if "peak_reserved_gib" in r}
    ours = [n for n in gib if not n.startswith("plain")]
    if not ours:
        return []
    lines, plain = [], rows.get("plain", {})
    if "plain" not in gib:  # failed or out of memory: the memory target is still judged
        why = plain.get("error", "not measured")
        lines.append(f"target {speedup}x plain tokens/s at no more memory: not judged (plain: {why})")
    elif within := [n for n in ours if gib[n] <= gib["plain"]]:
        best = max(within, key=lambda n: rows[n]["tokens_per_s"])
        verdict = "met" if rows[best]["tokens_per_s"] >= speedup * plain["tokens_per_s"] else "not met"
        lines.append(
            f"target {speedup}x plain tokens/s at no more memory: {verdict} (best {best}: {rows[best]['vs_plain']}x, "
            f"{gib[best]} GiB vs plain {gib['plain']} GiB reserved)"
        )
    else:
        lines.append(f"target {speedup}x plain tokens/s at no more memory: not met (every variant needs more memory)")
    lowest = min(ours, key=gib.__getitem__)
    overhead = report.get("cuda_overhead_gib", 0.0)
    card = round(gib[lowest] + overhead, 3)
    verdict = "met" if card <= budget_gib else "not met"
    lines.append(
        f"target batch {report['batch']} within {budget_gib} GiB: {verdict} (lowest {lowest}: {card} GiB = "
        f"{gib[lowest]} reserved + {overhead} CUDA context, {rows[lowest]['tokens_per_s']} tokens/s)"
    )
    return lines
