"""The vision-language model: vision tower -> projector -> language model (LLaVA style).

The forward logic lives in modules/modeling_vlm_curriculum.py, which the export copies next to the
merged weights; this class is the training-time container, whose `lm` may be a PEFT model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from modules.modeling_vlm_curriculum import ImageTokenMixin, MLPProjector, vision_tokens

__all__ = ["VisionLanguageModel", "vision_tokens"]


class VisionLanguageModel(ImageTokenMixin, nn.Module):
    """Image tokens from the tower, projected, replace the `<image>` placeholders in the token embeddings.

    `lm` is a Hugging Face causal LM (or a PEFT model wrapping one); `image_token_id` marks the
    placeholders, of which every sequence holds exactly `num_image_tokens`.
    """

    def __init__(
        self,
        vision: nn.Module,
        lm: nn.Module,
        vision_width: int,
        image_token_id: int,
        grid: int | None,
        vision_layer: int = -1,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.lm = lm
        self.projector = MLPProjector(vision_width, lm.get_input_embeddings().embedding_dim)
        if lm.get_input_embeddings().weight.dtype == torch.float64:
            # float32 otherwise (a trained part's master weights under mixed precision). In a float64 run a float32
            # projector rounded every checkpoint and handoff loaded into it, before Lightning cast it to float64.
            self.projector.double()
        self.vision_width = vision_width
        self.image_token_id = image_token_id
        self.grid = grid
        self.vision_layer = vision_layer
        self.full_groups: set[str] = set()  # "vision" / "lm" once trained in full: handed to later stages
        # "projector" / "vision" / "lm" / "adapter": the handoff file (adapter: folder) each came from
        self.handed_from: dict[str, Path] = {}
