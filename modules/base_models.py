"""Tiny base models for the synthetic world, built offline and saved in Hugging Face format.

Real VLM recipes start from a pretrained vision encoder and a pretrained language model and keep
both frozen while the projector aligns them. To make "frozen" mean the same thing here, both tiny
models are pretrained on their own first:

- the vision tower (a transformers ResNet) classifies shape, colour and size in each cell of the
  3x3 grid, from its feature map pooled to that grid;
- the language model (a transformers Llama) learns the world's captions, half of the time after a
  text "context" that lists the scene's objects, so that it learns to read what comes before the
  prompt. Image tokens later stand where that context stood; a pretrained LLM has this in-context
  ability from its own pretraining.

Each is written with `save_pretrained` and read back by the same `from_pretrained` code that loads
real models (modules/loading.py).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, ResNetConfig, ResNetModel

from datamodules.world import (
    PLACES,
    SHAPES,
    SIZES,
    WorldConfig,
    caption,
    make_scene,
    palette,
    render,
    vocabulary_corpus,
)
from modules.tokenizer import train_world_tokenizer

log = logging.getLogger(__name__)


@dataclass
class TinyBaseConfig:
    """The tiny vision tower and language model that the default curriculum builds for itself."""

    vision_hidden_sizes: tuple[int, ...] = (64, 128)
    """Channels of the ResNet stages; the last one is the feature width the projector sees."""
    vision_steps: int = 400
    """Optimizer steps of the vision tower's per-cell pretraining (batch `batch_size`)."""
    lm_hidden_size: int = 128
    lm_layers: int = 2
    lm_heads: int = 4
    lm_steps: int = 400
    """Optimizer steps of the language model's caption pretraining."""
    lm_context_share: float = 0.8
    """Share of the LM's pretraining examples that put a text listing of the scene before the prompt."""
    batch_size: int = 64
    lr: float = 3e-3
    prompt: str = "describe the image"
    """The captioning prompt; its words must be in the tokenizer's vocabulary."""
    dtype: str = "float32"
    """Dtype the base models are pretrained and saved in: "float32" or "float64". float64 (with
    `--trainer.precision=64-true`) makes a run's losses the same on every CPU to about 5e-6 (transformers takes
    the cross-entropy in float32): the stability test's golden run uses it, as float32 rounding differences
    between CPUs grow to 10% in its curves."""

    def __post_init__(self) -> None:
        for name in ("vision_steps", "lm_steps", "batch_size", "lm_layers", "lm_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"base.{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"base.dtype must be float32 or float64, got {self.dtype!r}")
        if not self.vision_hidden_sizes or min(self.vision_hidden_sizes) < 1:
            raise ValueError(
                f"base.vision_hidden_sizes must be one or more positive widths, got {self.vision_hidden_sizes}"
            )
        if self.lm_hidden_size < 1 or self.lm_hidden_size % self.lm_heads:
            raise ValueError(
                f"base.lm_hidden_size must be a positive multiple of base.lm_heads ({self.lm_heads}), got "
                f"{self.lm_hidden_size}"
            )
        if self.lr <= 0:
            raise ValueError(f"base.lr must be positive, got {self.lr}")
        if not 0 <= self.lm_context_share <= 1:
            raise ValueError(f"base.lm_context_share must be in [0, 1], got {self.lm_context_share}")


def processor_class(name: str) -> type:
    """transformers' image processor class `name` ("CLIPImageProcessor"), or its PIL twin (`name` + "Pil") where
    torchvision is missing. The plain name falls back to that twin by itself, but tells the user to install
    torchvision, which every run printed. Both save the same preprocessor_config.json."""
    import transformers
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available() and hasattr(transformers, f"{name}Pil"):
        return getattr(transformers, f"{name}Pil")
    return getattr(transformers, name)


def image_processor(image_size: int):
    """The tiny tower's CLIP image processor."""
    return processor_class("CLIPImageProcessor")(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def grid_pool(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, grid*grid, C): one feature per grid cell, in reading order."""
    return F.adaptive_avg_pool2d(feature_map, grid).flatten(2).transpose(1, 2)


class CellHeads(nn.Module):
    """Per-cell classifiers used only to pretrain the vision tower; "none" marks an empty cell."""

    def __init__(self, width: int, colours: int) -> None:
        super().__init__()
        self.shape = nn.Linear(width, len(SHAPES) + 1)
        self.colour = nn.Linear(width, colours + 1)
        self.size = nn.Linear(width, len(SIZES) + 1)

    def loss(self, cells: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy of the three heads, and the share of cells with all three right."""
        logits = [self.shape(cells), self.colour(cells), self.size(cells)]
        loss = sum(F.cross_entropy(lg.flatten(0, 1), targets[..., i].flatten()) for i, lg in enumerate(logits))
        right = torch.stack([lg.argmax(-1) == targets[..., i] for i, lg in enumerate(logits)], -1).all(-1)
        return loss, right.float().mean()


def _cell_targets(scene, colours: list[str]) -> list[list[int]]:
    targets = [[len(SHAPES), len(colours), len(SIZES)] for _ in PLACES]
    for obj in scene.objects:
        targets[obj.cell] = [SHAPES.index(obj.shape), colours.index(obj.colour), SIZES.index(obj.size)]
    return targets


def pretrain_vision(config: TinyBaseConfig, world: WorldConfig, seed: int, out_dir: Path) -> float:
    """Builds and pretrains the tiny vision tower; saves it with its image processor. Returns accuracy."""
    torch.manual_seed(seed)
    dtype = getattr(torch, config.dtype)
    tower = ResNetModel(
        ResNetConfig(
            embedding_size=config.vision_hidden_sizes[0],
            hidden_sizes=list(config.vision_hidden_sizes),
            depths=[1] * len(config.vision_hidden_sizes),
            layer_type="basic",
            downsample_in_first_stage=False,
        )
    ).to(dtype)
    colours = palette(world)
    heads = CellHeads(config.vision_hidden_sizes[-1], len(colours)).to(dtype)
    processor = image_processor(world.image_size)
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.vision_steps)
    tower.train()
    for step in range(config.vision_steps):
        scenes = [
            make_scene(world, seed, "pretrain-vision", step * config.batch_size + i) for i in range(config.batch_size)
        ]
        images = [render(s, world.image_size, seed, world) for s in scenes]
        pixels = processor(images, return_tensors="pt")["pixel_values"].to(dtype)
        targets = torch.tensor([_cell_targets(s, colours) for s in scenes])
        loss, accuracy = heads.loss(grid_pool(tower(pixels).last_hidden_state, 3), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.vision_steps - 1:
            log.info("vision pretraining step %d: loss %.3f, cell accuracy %.3f", step, loss.item(), accuracy.item())
    tower.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return accuracy.item()


def _lm_example(scene, prompt: str, rng: random.Random, context_share: float) -> tuple[str, str]:
    """(context, target): with probability `context_share` the context lists the scene, else it is empty."""
    target = caption(scene, rng.choice(("short", "medium", "long")))
    if rng.random() >= context_share:
        return prompt, target
    objects = sorted(scene.objects, key=lambda o: o.cell)
    context = " and ".join(f"{o.size} {o.colour} {o.shape} {o.place}" for o in objects)
    return f"{context} {prompt}", target


def pretrain_lm(config: TinyBaseConfig, world: WorldConfig, seed: int, out_dir: Path) -> float:
    """Trains the tokenizer and the tiny Llama on the world's text; saves both. Returns the last loss."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    texts = [caption(make_scene(world, seed, "pretrain-text", i), "long") for i in range(200)]

    tokenizer = train_world_tokenizer([*vocabulary_corpus(world), config.prompt, *texts], out_dir)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.lm_hidden_size,
            intermediate_size=config.lm_hidden_size * 2,
            num_hidden_layers=config.lm_layers,
            num_attention_heads=config.lm_heads,
            num_key_value_heads=config.lm_heads,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
    ).to(getattr(torch, config.dtype))
    optimizer = torch.optim.AdamW(lm.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.lm_steps)
    lm.train()
    for step in range(config.lm_steps):
        ids, labels = [], []
        for i in range(config.batch_size):
            scene = make_scene(world, seed, "pretrain-text", step * config.batch_size + i)
            context, target = _lm_example(scene, config.prompt, rng, config.lm_context_share)
            prefix = [tokenizer.bos_token_id, *tokenizer(context, add_special_tokens=False)["input_ids"]]
            answer = [*tokenizer(target, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
            ids.append(prefix + answer)
            labels.append([-100] * len(prefix) + answer)
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
        label_ids = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        loss = lm(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id), labels=label_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.lm_steps - 1:
            log.info("language model pretraining step %d: loss %.3f", step, loss.item())
    lm.save_pretrained(out_dir)
    return loss.item()
