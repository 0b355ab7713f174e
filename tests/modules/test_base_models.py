"""The tiny base models' dtype: float64 is the stability run's (tests/stability/golden.py)."""

from __future__ import annotations

import dataclasses

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
