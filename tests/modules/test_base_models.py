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
    wide = dataclasses.replace(short, dtype="float64")
    results = {}
    for config in (short, wide):
        out = tmp_path / config.dtype
        accuracy = pretrain_vision(config, MICRO_WORLD, 0, out / "vision")
        loss = pretrain_lm(config, MICRO_WORLD, 0, out / "lm")
        tower, _, _ = load_vision_tower(out / "vision")
        lm, _ = load_language_model(out / "lm")
        dtypes = {p.dtype for p in [*tower.parameters(), *lm.parameters()]}
        assert dtypes == {getattr(torch, config.dtype)}, config.dtype
        results[config.dtype] = (accuracy, loss)
    # The same seed, data and steps: only rounding differs.
    assert results["float64"][0] == pytest.approx(results["float32"][0], abs=0.02)
    assert results["float64"][1] == pytest.approx(results["float32"][1], rel=1e-4)


def test_a_base_dtype_other_than_float32_or_float64_is_refused():
    with pytest.raises(ValueError, match="base.dtype must be float32 or float64, got 'bfloat16'"):
        TinyBaseConfig(dtype="bfloat16")
