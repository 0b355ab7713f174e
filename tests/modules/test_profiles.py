"""The real-model profiles: their shapes, random-weight builds, and the error when folders are missing."""

from __future__ import annotations

import pytest
import torch
import yaml

from modules.loading import LoraSpec, ModelConfig, build_vlm, write_config_folders
from stages.run import main
from tests.conftest import MICRO_ARGS, TOY_PROFILE_ARGS

PROFILES = {  # profile: (vision tower parameters, LM parameters), in millions, from the published models
    "mgm_2b": (303, 2506),  # CLIP ViT-L/14-336, Gemma-2B
    "llava15_7b": (303, 6738),  # CLIP ViT-L/14-336, Vicuna-7B
    "small_siglip_qwen": (93, 494),  # SigLIP base/16 (its pooling head included), Qwen2.5-0.5B
}


def _model_config(profile: str) -> ModelConfig:
    from stages.run import CONFIG_DIR

    model = yaml.safe_load((CONFIG_DIR / "curriculum" / f"{profile}.yaml").read_text())["model"]
    return ModelConfig(**{**model, "lora": LoraSpec(**model["lora"]), "random_init": True})


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_architectures_have_the_published_sizes(profile, tmp_path):
    config = _model_config(profile)
    vision, lm = write_config_folders(config, tmp_path, ["a red circle"])
    with torch.device("meta"):  # shapes only: no memory for billions of weights
        vlm, tokenizer, processor = build_vlm(config, vision, lm)
    assert all(p.is_meta for p in vlm.parameters()), "random init must build under the caller's device"
    millions = [sum(p.numel() for p in part.parameters()) / 1e6 for part in (vlm.vision, vlm.lm)]
    expected = PROFILES[profile]
    assert millions == pytest.approx(expected, rel=0.02), millions
    assert processor.crop_size["height"] == config.image_size


def test_profile_without_its_folders_names_them(tmp_path, capsys):
    assert main(["curriculum", "--config", "configs/curriculum/mgm_2b.yaml", f"--run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "models/clip-vit-large-patch14-336" in err and "models/gemma-2b-it" in err and "random_init" in err
    assert not (tmp_path / "data").exists(), "nothing should run before the folders are checked"


@pytest.mark.slow
def test_random_init_profile_trains_exports_and_evaluates(tmp_path, micro_world):
    # A small profile's code path (CLIP-style ViT tower, Qwen2 LM, all patches kept) at toy sizes.
    args = ["curriculum", f"--run_dir={tmp_path / 'run'}", *MICRO_ARGS, f"--data.shard_dir={micro_world}"]
    args += TOY_PROFILE_ARGS
    assert main(args) == 0
    from stages.export import evaluate_model, export_model, find_stage

    source = find_stage(tmp_path / "run")
    assert source.config["inputs"]["lm_path"].endswith("random_init/lm")
    out = export_model(source, tmp_path / "exported")
    result = evaluate_model(out, limit=4, max_new_tokens=6)
    assert result["data"]["images"] == 4 and "chair_i" in result["metrics"]
