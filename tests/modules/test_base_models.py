"""The tiny base models' dtype: float64 is the stability run's (tests/stability/golden.py)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from modules.base_models import TinyBaseConfig, pretrain_lm, pretrain_vision
from modules.loading import load_language_model, load_vision_tower
from tests.conftest import MICRO_BASE, MICRO_WORLD


def test_float64_base_models_train_the_same_models_and_load_back_in_float64(tmp_path):
    short = dataclasses.replace(MICRO_BASE, vision_steps=2, lm_steps=2)
    weights = {}
    for config in (short, dataclasses.replace(short, dtype="float64")):
        out = tmp_path / config.dtype
        pretrain_vision(config, MICRO_WORLD, 0, out / "vision")
        pretrain_lm(config, MICRO_WORLD, 0, out / "lm")
        tower, _, _ = load_vision_tower(out / "vision")
        lm, _ = load_language_model(out / "lm")
        weights[config.dtype] = {**tower.state_dict(), **{f"lm.{k}": v for k, v in lm.state_dict().items()}}
        dtypes = {p.dtype for p in [*tower.parameters(), *lm.parameters()]}
        assert dtypes == {getattr(torch, config.dtype)}, config.dtype
    # The same seed, data and steps: only rounding differs (a third LM step fails this check).
    for name, value in weights["float32"].items():
        wide = weights["float64"][name]
        if value.is_floating_point():
            torch.testing.assert_close(wide.float(), value, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(wide, value), name


def test_a_base_dtype_other_than_float32_or_float64_is_refused():
    with pytest.raises(ValueError, match="base.dtype must be float32 or float64, got 'bfloat16'"):
        TinyBaseConfig(dtype="bfloat16")


def test_image_processors_take_the_pil_backend_without_telling_the_user_to_install_torchvision(tmp_path):
    """Without torchvision, transformers' `CLIPImageProcessor` falls back to `CLIPImageProcessorPil` and warns
    "Install torchvision" on every run; `processor_class` takes the twin itself. What the processors save and
    compute stays the plain class's (whose first use, last here, warns)."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        pytest.skip("torchvision is installed: no fallback")
    script = f"""
import sys
from pathlib import Path

import numpy as np
import transformers
from PIL import Image
from transformers import AutoImageProcessor

from datamodules.blip2_random import build_random_blip2
from modules.base_models import image_processor, processor_class
from modules.loading import ModelConfig, write_config_folders

tmp = Path({str(tmp_path)!r})
for name in ("CLIPImageProcessor", "SiglipImageProcessor", "BlipImageProcessor"):
    assert processor_class(name).__name__ == name + "Pil", name
ours = image_processor(32)
ours.save_pretrained(tmp / "clip")
tower = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, image_size=28, patch_size=14)
lm = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
          num_key_value_heads=1, vocab_size=64)
write_config_folders(ModelConfig(random_init=True, image_size=28, vision_arch=tower, lm_arch=lm), tmp, ["a cat"])
build_random_blip2(tmp / "blip2")
loaded = AutoImageProcessor.from_pretrained(tmp / "clip", local_files_only=True)
image = Image.fromarray(np.arange(48 * 40 * 3, dtype=np.uint8).reshape(48, 40, 3))
print("SUMS", ours(image)["pixel_values"][0].sum(), loaded(image)["pixel_values"][0].sum())
print("PLAIN", file=sys.stderr, flush=True)
print("SUMS", transformers.CLIPImageProcessor.from_pretrained(tmp / "clip")(image)["pixel_values"][0].sum())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ours, plain = done.stderr.split("PLAIN")
    assert "requires torchvision" not in ours, ours
    assert "requires torchvision" in plain  # the check above would see the warning
    sums = [word for line in done.stdout.splitlines() if line.startswith("SUMS") for word in line.split()[1:]]
    assert len(sums) == 3 and len(set(sums)) == 1, done.stdout
