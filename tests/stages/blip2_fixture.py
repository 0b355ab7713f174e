"""A tiny random-weight BLIP-2 for the data-stage tests (built by datamodules/blip2_random.py)."""

from __future__ import annotations

from pathlib import Path

from datamodules.blip2_random import build_random_blip2


def build_tiny_blip2(out: Path, opt_image_token: bool = False) -> Path:
    return build_random_blip2(out, "tiny", opt_image_token=opt_image_token)
