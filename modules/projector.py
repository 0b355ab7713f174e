"""The projector: image features into the language model's embedding space."""

from __future__ import annotations

import torch
from torch import nn


class MLPProjector(nn.Module):
    """Two linear layers with a GELU between them, applied to every image token (LLaVA-1.5's projector)."""

    def __init__(self, vision_width: int, lm_width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(vision_width, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, vision_width) -> (B, N, lm_width)."""
        return self.net(features)
