"""LightningModules that train a VisionLanguageModel: projector alignment and LoRA SFT.

Which parameters train is part of a stage's spec (`trainable`): groups among "projector", "lora",
"vision" and "lm". Everything else is frozen, and frozen towers stay in eval mode so that their
normalisation statistics do not drift either.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from typing_extensions import override

from datamodules.captions import scored_tokens
from modules.handoff import attach_lora, has_lora
from modules.loading import LoraSpec
from modules.speed import SpeedSpec, apply_speed, caption_loss
from modules.vlm import VisionLanguageModel
from stages.launch import every_rank_state, own_rank_state

log = logging.getLogger(__name__)

GROUPS = ("projector", "lora", "vision", "lm")
LOSS_WEIGHTINGS = ("token", "micro_batch")


@dataclass
class LearningRates:
    """Peak learning rate per parameter group; only the groups a stage trains are used."""

    projector: float = 1e-3
    lora: float = 2e-3
    vision: float = 1e-5
    lm: float = 1e-5


@dataclass
class OptimSpec:
    lr: LearningRates = field(default_factory=LearningRates)
    warmup_steps: int = 20
    """Linear warm-up (over at most half of the stage's optimizer steps), then cosine decay to `min_lr_ratio` x
    peak over the rest."""
    min_lr_ratio: float = 0.1
    loss_weighting: str = "token"
    """"token": every scored caption token of an optimizer step weighs the same, across its accumulated
    micro-batches and across ranks; "micro_batch": each micro-batch's mean weighs the same (HF Trainer
    before 4.46)."""


def rng_states() -> dict:
    """Random generator states in types that `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, keys.tolist(), pos, has_gauss, gauss]
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def group_parameters(vlm: VisionLanguageModel) -> dict[str, list[torch.nn.Parameter]]:
    """Every parameter of the VLM in exactly one group."""
    groups: dict[str, list[torch.nn.Parameter]] = {name: [] for name in GROUPS}
    for name, param in vlm.named_parameters():
        if name.startswith("projector."):
            groups["projector"].append(param)
        elif name.startswith("vision."):
            groups["vision"].append(param)
        elif "lora_" in name:
            groups["lora"].append(param)
        else:
            groups["lm"].append(param)
    return groups


def match_norm_statistics(module: torch.nn.Module) -> None:
    """Casts each BatchNorm-style layer's running statistics to its own parameters' dtype."""
    for norm in module.modules():
        if isinstance(norm, torch.nn.modules.batchnorm._NormBase) and norm.weight is not None:
            for name in ("running_mean", "running_var"):
                stats = getattr(norm, name)
                if stats is not None and stats.dtype != norm.weight.dtype:
                    setattr(norm, name, stats.to(norm.weight.dtype))


class VLMModule(L.LightningModule):
    """Next-token loss on the caption tokens, for whichever parameter groups are `trainable`."""

    # Checkpoints hold only the trained parameters; the frozen rest comes from the base folders.
    strict_loading = False

    def __init__(
        self, vlm: VisionLanguageModel, trainable: list[str], optim: OptimSpec, speed: SpeedSpec | None = None
    ) -> None:
        super().__init__()
        unknown = set(trainable) - set(GROUPS)
        if unknown or not trainable:
            raise ValueError(f"trainable must be a non-empty subset of {GROUPS}, got {trainable}")
        self.vlm, self.trainable, self.optim = vlm, list(trainable), optim
        self.speed = speed or SpeedSpec()
        self._step_loss: torch.Tensor | float = 0.0  # the optimizer step's loss, summed over its micro-batches
        self.rank_factor: torch.Tensor | float = 1.0
        """How much more the last micro-batch's returned loss weighs than its share of this rank's step loss:
        the gradient weighs ranks by their tokens (`_step_share`); the stability callbacks divide it out, so
        that they judge each rank's own token mean."""
        self._step_rank_factor: torch.Tensor | None = None  # this optimizer step's, summed once at its start
        apply_speed(vlm.lm, self.speed)
        groups = group_parameters(vlm)
        if "lora" in trainable and not groups["lora"]:
            raise ValueError("trainable names 'lora' but the language model has no LoRA adapter")
        for name, params in groups.items():
            for param in params:
                param.requires_grad_(name in trainable)
        vlm.full_groups |= {group for group in ("vision", "lm") if group in trainable}

    @override
    def on_fit_start(self) -> None:
        # DeepSpeed's bf16 / fp16 casts parameters and keeps buffers in fp32, so a BatchNorm layer (the
        # ResNet tower's) would meet bf16 weights with fp32 running statistics: no kernel takes that mix.
        match_norm_statistics(self.vlm)
        # Models load in eval mode (from_pretrained) and Lightning leaves modes as it finds them: without this
        # the LM, LoRA dropout and a trained tower ran in eval mode until the first evaluation, and
        # checkpointing and compile (train mode only) did nothing in a stage without one.
        self.train()

    @override
    def train(self, mode: bool = True) -> VLMModule:
        """A frozen vision tower runs in eval mode (its BatchNorm statistics stay as pretrained). A frozen
        language model stays in train mode: gradients still flow through it to the projector, and Hugging
        Face checkpoints activations only in train mode; its attention dropout is its config's (0 by default
        in Llama, Qwen2 and Gemma). A LoRA adapter carried in but frozen here drops nothing: its dropout
        layers run in eval mode, as a frozen adapter's output is part of the fixed model."""
        super().train(mode)
        if "vision" not in self.trainable:
            self.vlm.vision.eval()
        if "lora" not in self.trainable:
            for name, module in self.vlm.lm.named_modules():
                if "lora_dropout" in name.split("."):  # PEFT's dropouts, one per adapter
                    module.eval()
        return self

    def _loss(self, batch: dict) -> torch.Tensor:
        if self.speed.loss_chunk_tokens is None:
            return self.vlm(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]).loss
        embeds = self.vlm.embed(batch["input_ids"], batch["pixel_values"])
        return caption_loss(self.vlm.lm, embeds, batch["attention_mask"], batch["labels"], self.speed.loss_chunk_tokens)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        share, self.rank_factor = self._step_share(batch, batch_idx)
        accumulate = self.trainer.accumulate_grad_batches
        self._step_loss = self._step_loss + loss.detach() * share / accumulate
        if (batch_idx + 1) % accumulate == 0:  # the step's last micro-batch (an epoch holds whole steps)
            # The step's loss, as losses.json and the stability callbacks have it: logged per micro-batch,
            # TensorBoard showed the last micro-batch's mean, with MGM-2B's batch 1 a single caption's loss.
            self.log("train/loss", self._step_loss, prog_bar=True, batch_size=len(batch["keys"]) * accumulate)
            self._step_loss = 0.0
        return loss * share * self.rank_factor

    def _step_share(self, batch: dict, batch_idx: int) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(share, rank factor): the factors that turn this micro-batch's mean loss into its share of the
        optimizer step's loss on this rank, and that share into its weight in the gradient of every rank.

        Lightning divides each of the step's N micro-batch losses by N, so a mean per micro-batch gives each
        micro-batch the same weight: with batch 1 and accumulation 16, a 5-token caption's tokens weighed 10x
        a 50-token caption's. With "token" weighting the loss is scaled by N x (its tokens / the step's
        tokens), so the step's gradient is that of the mean over all its tokens, as one batch of N x B would
        give. The loader counts the step's tokens (`step_tokens`, read ahead); 1 exactly without accumulation.

        DDP and DeepSpeed average the ranks' gradients, which would weigh ranks the same whatever their
        tokens: the rank factor, W x (this rank's step tokens / every rank's), makes the average the mean over
        every token of the step on all W ranks (one sum over the ranks per optimizer step, at its first
        micro-batch, which every rank reaches at the same batch_idx; 1 on one device).
        """
        step_tokens = batch.get("step_tokens")
        if self.optim.loss_weighting == "micro_batch" or step_tokens is None:
            return 1.0, 1.0
        accumulate, world = self.trainer.accumulate_grad_batches, self.trainer.world_size
        share = scored_tokens(batch["labels"]) * accumulate / step_tokens
        if world == 1:
            return share, 1.0
        if batch_idx % accumulate == 0 or self._step_rank_factor is None:  # the same for the step's micro-batches
            # A float copy: the sum is taken in place, and the ranks' counts need not fit the tokens' dtype.
            every_rank = self.trainer.strategy.reduce(step_tokens.to(torch.float64, copy=True), reduce_op="sum")
            self._step_rank_factor = (world * step_tokens / every_rank).float()
        return share, self._step_rank_factor

    @override
    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum = torch.zeros((), device=self.device)
        self._val_tokens = torch.zeros((), device=self.device)

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        tokens = scored_tokens(batch["labels"])
        loss = self._loss(batch).detach()  # every rank runs it, padding batches too (ZeRO-3 gathers per pass)
        self._val_loss_sum += torch.where(tokens > 0, loss.float() * tokens, 0.0)  # a padding batch's mean: nan
        self._val_tokens += tokens

    @override
    def on_validation_epoch_end(self) -> None:
        """val/loss: the mean over every scored token of every rank, each held-out sample counted once (the
        padding batches that even out the ranks' batch counts score none). A mean of per-batch means weighed
        a short caption's tokens above a long one's, and shifted with the batch size and the number of ranks."""
        totals = self.trainer.strategy.reduce(torch.stack([self._val_loss_sum, self._val_tokens]), reduce_op="sum")
        if totals[1] > 0:
            self.log("val/loss", totals[0] / totals[1], prog_bar=True)

    def _optimizer_steps(self) -> float:
        """The fit's optimizer steps, from the DataModule when it counts them without building a loader (the
        project's does: see CaptionDataModule.optimizer_steps), else Lightning's estimate."""
        trainer = self.trainer
        count = getattr(trainer.datamodule, "optimizer_steps", None)
        if count is None or trainer.max_epochs in (None, -1):  # no epoch bound: Lightning returns max_steps
            return trainer.estimated_stepping_batches
        return count(trainer)

    @override
    def configure_optimizers(self):
        groups = group_parameters(self.vlm)
        param_groups = [
            {"params": groups[name], "lr": getattr(self.optim.lr, name), "name": name} for name in self.trainable
        ]
        optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)  # as LLaVA trains; AdamW's default is 0.01
        total = max(1, int(self._optimizer_steps()))
        warmup, floor = min(self.optim.warmup_steps, total // 2), self.optim.min_lr_ratio
        if warmup < self.optim.warmup_steps:
            log.warning("warmup_steps %d is more than half of the stage's %d optimizer steps: warming up over %d",
                        self.optim.warmup_steps, total, warmup)  # fmt: skip

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        # A part trained in full keeps its buffers too (the tower's BatchNorm statistics).
        whole = tuple(f"vlm.{group}." for group in ("vision", "lm") if group in self.trainable)
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k in trained or (whole and k.startswith(whole))
        }
        # LoRA dropout draws from these: a resumed run must continue the same random stream, each rank its own.
        checkpoint["rng_states"] = every_rank_state(rng_states())
        checkpoint["vlm_module"] = self._identity()

    def _identity(self) -> dict:
        """What a checkpoint of this module must match to load into another: its class, trained groups and
        LoRA shape (plain types, for `torch.load(weights_only=True)`)."""
        identity = {"class": type(self).__name__, "trainable": sorted(self.trainable)}
        config = getattr(self.vlm.lm, "peft_config", {}).get("default")
        if config is not None:
            targets = config.target_modules  # names, or one regular expression
            targets = targets if isinstance(targets, str) else sorted(targets)
            identity["lora"] = {"r": config.r, "alpha": config.lora_alpha, "targets": targets}
        return identity

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Loading is not strict (the frozen rest is not in the checkpoint), so a checkpoint of another module, or
        # with another LoRA scale, would load partly or scale differently without a word.
        saved, mine = checkpoint.get("vlm_module"), self._identity()
        if saved is not None and saved != mine:
            raise ValueError(f"this checkpoint is of {saved}, not of this {mine}")
        if "state_dict" in checkpoint:  # not under DeepSpeed, whose engine loads and checks its own files
            trained = {name for name, p in self.named_parameters() if p.requires_grad}
            missing, unknown = (
                trained - checkpoint["state_dict"].keys(),
                checkpoint["state_dict"].keys() - set(self.state_dict()),
            )
            if missing or unknown:
                raise ValueError(
                    f"this checkpoint lacks {len(missing)} trained parameters (e.g. {sorted(missing)[:3]}) and "
                    f"holds {len(unknown)} this module has not (e.g. {sorted(unknown)[:3]})"
                )
        # Restored at the first batch, not now: creating the dataloader iterator draws from the torch
        # generator, which the original run had done before the checkpoint was written.
        self._resume_rng = checkpoint.get("rng_states")

    @override
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if getattr(self, "_resume_rng", None) is not None:
            set_rng_states(own_rank_state(self._resume_rng))
            self._resume_rng = None


class AlignModule(VLMModule):
    """Projector pretraining: the vision tower and the language model stay frozen."""

    def __init__(self, vlm: VisionLanguageModel, optim: OptimSpec, speed: SpeedSpec | None = None) -> None:
        super().__init__(vlm, ["projector"], optim, speed)


class LoRASFTModule(VLMModule):
    """LoRA SFT of the language model: the adapter carried in (by `load_handoff`) or a fresh one of `lora`;
    `trainable` holds "lora" and usually "projector" (the default curriculum's SFT stages train both)."""

    def __init__(
        self,
        vlm: VisionLanguageModel,
        lora: LoraSpec,
        optim: OptimSpec,
        trainable: list[str],
        speed: SpeedSpec | None = None,
    ) -> None:
        if "lora" not in trainable:
            raise ValueError(f"LoRASFTModule trains the LoRA adapter: trainable must name 'lora', got {trainable}")
        if not has_lora(vlm):
            attach_lora(vlm, lora)
        super().__init__(vlm, trainable, optim, speed)
