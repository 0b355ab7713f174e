"""The vision-language model: vision tower -> projector -> language model (LLaVA style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.projector import MLPProjector


def vision_tokens(tower: nn.Module, pixel_values: torch.Tensor, grid: int | None) -> torch.Tensor:
    """The tower's image tokens, (B, N, width).

    Convolutional towers give a (B, C, H, W) map: pooled to `grid` x `grid` cells if `grid` is set.
    ViT towers (CLIP, SigLIP) give (B, 1 + N, D) with a class token (CLIP) or (B, N, D) (SigLIP): the
    class token is dropped, as LLaVA does, and the patch grid pooled to `grid` if set.
    """
    output = tower(pixel_values=pixel_values)
    features = output.last_hidden_state
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


class VisionLanguageModel(nn.Module):
    """Image tokens from the tower, projected, replace the `<image>` placeholders in the token embeddings.

    `lm` is a Hugging Face causal LM (or a PEFT model wrapping one); `image_token_id` marks the
    placeholders, of which every sequence holds exactly `num_image_tokens`.
    """

    def __init__(
        self, vision: nn.Module, lm: nn.Module, vision_width: int, image_token_id: int, grid: int | None
    ) -> None:
        super().__init__()
        self.vision = vision
        self.lm = lm
        self.projector = MLPProjector(vision_width, lm.get_input_embeddings().embedding_dim)
        self.image_token_id = image_token_id
        self.grid = grid

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(next(self.vision.parameters()).dtype)
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = vision_tokens(self.vision, pixel_values, self.grid)
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
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, **generate_kwargs
    ) -> torch.Tensor:
        """New tokens only, (B, T). `input_ids` are left-padded prompts holding the image placeholders."""
        embeds = self.embed(input_ids, pixel_values)
        return self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
