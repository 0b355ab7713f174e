"""The VLM's forward logic, and its Hugging Face wrapper for exported models.

This file imports only torch and transformers: `stages.run export` copies it into the exported
folder, so that `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads the merged model
in any environment with transformers, without this project installed. Training uses the same
`vision_tokens`, `MLPProjector` and `ImageTokenMixin` (modules/vlm.py), so the exported model
computes exactly what the trained one did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel


def vision_tokens(tower: nn.Module, pixel_values: torch.Tensor, grid: int | None, layer: int = -1) -> torch.Tensor:
    """The tower's image tokens, (B, N, width).

    `layer` -1 takes the tower's output (`last_hidden_state`); -2 the hidden state of the layer before,
    as LLaVA-1.5 and MGM do with CLIP (`hidden_states[layer]`). Convolutional towers give a
    (B, C, H, W) map: pooled to `grid` x `grid` cells if `grid` is set. ViT towers (CLIP, SigLIP) give
    (B, 1 + N, D) with a class token (CLIP) or (B, N, D) (SigLIP): the class token is dropped, as LLaVA
    does, and the patch grid pooled to `grid` if set.
    """
    if layer == -1:
        features = tower(pixel_values=pixel_values).last_hidden_state
    else:
        states = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        if not -len(states) <= layer < 0:
            raise ValueError(f"model.vision_layer {layer}: the tower has hidden states -1 to -{len(states)}")
        features = states[layer]
    if features.dim() == 4:
        return (
            F.adaptive_avg_pool2d(features, grid).flatten(2).transpose(1, 2)
            if grid
            else features.flatten(2).transpose(1, 2)
        )
    side = int((features.shape[1]) ** 0.5)
    if side * side != features.shape[1]:
        features = features[:, 1:]
        side = int(features.shape[1] ** 0.5)
    if grid:
        square = features.transpose(1, 2).reshape(features.shape[0], -1, side, side)
        features = F.adaptive_avg_pool2d(square, grid).flatten(2).transpose(1, 2)
    return features


class MLPProjector(nn.Module):
    """Two linear layers with a GELU between them, applied to every image token (LLaVA-1.5's projector)."""

    def __init__(self, vision_width: int, lm_width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(vision_width, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, vision_width) -> (B, N, lm_width)."""
        return self.net(features)


class ImageTokenMixin:
    """Image tokens from `self.vision`, projected by `self.projector`, replace the `<image>` placeholders
    (`self.image_token_id`) in `self.lm`'s token embeddings."""

    vision: nn.Module
    lm: nn.Module
    projector: MLPProjector
    image_token_id: int
    grid: int | None
    vision_layer: int = -1

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(next(self.vision.parameters()).dtype)
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = vision_tokens(self.vision, pixel_values, self.grid, self.vision_layer)
        return self.projector(features.to(self.projector.net[0].weight.dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.lm.get_input_embeddings()(input_ids)
        image = self.image_embeddings(pixel_values).to(embeddings.dtype)
        mask = input_ids == self.image_token_id
        if mask.sum() != image.shape[0] * image.shape[1]:
            raise ValueError(
                f"the batch has {int(mask.sum())} <image> placeholders but the tower gives "
                f"{image.shape[0]} x {image.shape[1]} image tokens: check num_image_tokens against model.grid"
            )
        return embeddings.masked_scatter(mask.unsqueeze(-1), image)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
    ):
        embeds = self.embed(input_ids, pixel_values)
        # No KV cache outside generation: it costs memory, and its per-layer state makes each decoder
        # layer a different graph for torch.compile.
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, **generate_kwargs
    ) -> torch.Tensor:
        """New tokens only, (B, T). `input_ids` are left-padded prompts holding the image placeholders."""
        embeds = self.embed(input_ids, pixel_values)
        return self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)


def _sub_config(value) -> PretrainedConfig:
    return AutoConfig.for_model(**value) if isinstance(value, dict) else value


class VLMCurriculumConfig(PretrainedConfig):
    """A merged vlm-curriculum model: the tower's and the LM's own configs, the projector's widths, the
    tower's hidden state that gives the image tokens (`vision_layer`), and the prompt layout
    (`num_image_tokens` placeholders after bos, then `prompt`)."""

    model_type = "vlm_curriculum"

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        vision_width: int = 0,
        image_token_id: int = 0,
        grid: int | None = None,
        num_image_tokens: int = 0,
        prompt: str = "",
        vision_layer: int = -1,
        **kwargs,
    ) -> None:
        self.vision_config = _sub_config(vision_config) if vision_config is not None else None
        self.text_config = _sub_config(text_config) if text_config is not None else None
        self.vision_width, self.image_token_id, self.grid = vision_width, image_token_id, grid
        self.vision_layer = vision_layer
        self.num_image_tokens, self.prompt = num_image_tokens, prompt
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        output = super().to_dict()
        for name in ("vision_config", "text_config"):
            value = getattr(self, name)
            output[name] = value.to_dict() if isinstance(value, PretrainedConfig) else value
        return output


class VLMCurriculumForCaptioning(ImageTokenMixin, PreTrainedModel):
    """Vision tower -> projector -> language model, with LoRA already merged into the LM.

    `generate(input_ids, attention_mask, pixel_values, **kwargs)` returns the new tokens; the
    folder's README shows how to build `input_ids` with its tokenizer.
    """

    config_class = VLMCurriculumConfig
    base_model_prefix = "vlm"

    def __init__(self, config: VLMCurriculumConfig) -> None:
        super().__init__(config)
        self.vision = AutoModel.from_config(config.vision_config)
        self.lm = AutoModelForCausalLM.from_config(config.text_config)
        self.projector = MLPProjector(config.vision_width, config.text_config.hidden_size)
        self.image_token_id, self.grid, self.vision_layer = config.image_token_id, config.grid, config.vision_layer
        self.post_init()

    def prompt_ids(self, tokenizer) -> list[int]:
        """bos, the image placeholders and the captioning prompt: what every caption is generated after."""
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        prompt = tokenizer(self.config.prompt, add_special_tokens=False)["input_ids"]
        return bos + [self.config.image_token_id] * self.config.num_image_tokens + prompt
