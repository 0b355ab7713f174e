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
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    assert size["height"] == config.image_size
    # The random tower's processor is its family's (SigLIP's resizes the whole frame; CLIP's crops the centre).
    family = config.vision_arch["model_type"].split("_")[0]
    inner = getattr(processor, "processor", processor)  # under pad_to_square's SquareImages
    assert type(inner).__name__.lower().startswith(family), type(inner).__name__
    # The world's word-level tokenizer, written beside the LM config, loads as written whatever the model
    # type: for qwen2 AutoTokenizer rebuilt it as a byte-level BPE without merges ("a", "a").
    assert tokenizer.tokenize("a red circle") == ["a", "red", "circle"]


def test_random_init_folders_are_rewritten_only_when_they_change(tmp_path):
    """They were written anew on every run: new file times, a new folder digest, so a rerun of a random-init
    profile started every stage afresh (and deleted the checkpoint an interrupted stage would resume from)."""
    from dataclasses import replace

    from stages.curriculum import folder_digest

    config = _model_config("small_siglip_qwen")
    folders = write_config_folders(config, tmp_path, ["a red circle"])
    digests = [folder_digest(folder) for folder in folders]
    assert write_config_folders(config, tmp_path, ["a red circle"]) == folders
    assert [folder_digest(folder) for folder in folders] == digests
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm", "vision"], "no scratch folder is left behind"
    wider = replace(config, lm_arch={**config.lm_arch, "hidden_size": 64, "num_attention_heads": 2})
    write_config_folders(wider, tmp_path, ["a red circle"])
    assert folder_digest(folders[0]) == digests[0] and folder_digest(folders[1]) != digests[1]


def test_profile_without_its_folders_names_them(tmp_path, capsys):
    assert main(["curriculum", "--config", "configs/curriculum/mgm_2b.yaml", f"--run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "models/clip-vit-large-patch14-336" in err and "models/gemma-2b-it" in err and "random_init" in err
    assert not (tmp_path / "data").exists(), "nothing should run before the folders are checked"


def test_vision_layer_picks_the_towers_hidden_state():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from modules.vlm import vision_tokens

    torch.manual_seed(0)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    tower = CLIPVisionModel(CLIPVisionConfig(num_hidden_layers=2, **shape)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        states = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        torch.testing.assert_close(vision_tokens(tower, pixels, None, -2), states[-2][:, 1:])  # class token dropped
        torch.testing.assert_close(vision_tokens(tower, pixels, None), states[-1][:, 1:])
        assert not torch.allclose(states[-2], states[-1])
        assert vision_tokens(tower, pixels, 2, -2).shape == (2, 4, 32)
        with pytest.raises(ValueError, match="model.vision_layer -4: the tower has hidden states -1 to -3"):
            vision_tokens(tower, pixels, None, -4)


def test_register_tokens_of_a_vit_tower_are_dropped_with_its_class_token():
    # DINOv2 with registers: 1 class + 4 register + 16 patch tokens. Before, only the class token was
    # dropped and the 4 registers were pooled as if they were patches (a reshape error with a grid).
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from modules.vlm import vision_tokens

    torch.manual_seed(0)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    tower = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_hidden_layers=2, num_register_tokens=4, **shape))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        states = tower.eval()(pixel_values=pixels).last_hidden_state
        assert states.shape[1] == 21
        torch.testing.assert_close(vision_tokens(tower, pixels, None), states[:, 5:])
        assert vision_tokens(tower, pixels, 2).shape == (2, 4, 32)
        with pytest.raises(ValueError, match="not a square patch grid"):
            vision_tokens(tower, torch.randn(1, 3, 32, 48), None)  # 4 x 6 patches


def test_vision_layer_of_a_convolutional_tower_sizes_the_projector(micro_base):
    # The tiny ResNet's stage before its last is narrower (16 channels, not 32): the projector must fit it.
    from PIL import Image

    vlm, _, processor = build_vlm(ModelConfig(vision_layer=-2), *micro_base)
    assert vlm.projector.net[0].in_features == 16
    pixels = processor([Image.new("RGB", (64, 64))], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert vlm.image_embeddings(pixels).shape == (1, 9, vlm.lm.config.hidden_size)


@pytest.mark.slow
def test_random_init_profile_trains_exports_and_evaluates(tmp_path, micro_world):
    # A small profile's code path (CLIP-style ViT tower, Qwen2 LM, all patches kept, the penultimate
    # layer's features as LLaVA takes them) at toy sizes.
    args = ["curriculum", f"--run_dir={tmp_path / 'run'}", *MICRO_ARGS, f"--data.shard_dir={micro_world}"]
    args += [*TOY_PROFILE_ARGS, "--model.vision_layer=-2"]
    assert main(args) == 0
    from transformers import AutoModel

    from stages.export import evaluate_model, export_model, find_stage, load_stage_model

    source = find_stage(tmp_path / "run")
    assert source.config["inputs"]["lm_path"].endswith("random_init/lm")
    out = export_model(source, tmp_path / "exported")
    result = evaluate_model(out, limit=4, max_new_tokens=6)
    assert result["data"]["images"] == 4 and "chair_i" in result["metrics"]
    # The exported model takes its image tokens from the same hidden state as the trained one.
    vlm = load_stage_model(source)[0].eval()
    exported = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert (vlm.vision_layer, exported.config.vision_layer) == (-2, -2)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported.image_embeddings(pixels), vlm.image_embeddings(pixels))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_a_gpu_profile_on_a_machine_without_one_names_the_accelerator_before_the_data(tmp_path, capsys):
    """Lightning's "No supported gpu backend found!" came once the first stage built its Trainer, after the
    data stage, and named no key."""
    args = ["curriculum", "--config", "configs/curriculum/small_siglip_qwen.yaml", f"--run_dir={tmp_path}"]
    assert main([*args, *TOY_PROFILE_ARGS]) == 2
    err = capsys.readouterr().err
    assert "trainer.accelerator asks for a GPU" in err and "--trainer.accelerator cpu" in err
    assert not (tmp_path / "data").exists(), "nothing should run before the machine is checked"


def test_random_init_says_when_a_model_folder_beats_its_arch(tmp_path, micro_base, caplog):
    # A smaller lm_arch for a memory run built the full model from the profile's folder, silently.
    from stages.curriculum import prepare_base_models
    from stages.run import build_parser, curriculum_config

    parser = build_parser()
    args = parser.parse_args(["curriculum", *TOY_PROFILE_ARGS, f"--model.lm_path={micro_base[1]}"])
    args.curriculum.pop("config", None)
    vision, lm = prepare_base_models(curriculum_config(parser.instantiate(args).curriculum), tmp_path)
    assert lm == micro_base[1] and vision == tmp_path / "base" / "random_init" / "vision"
    said = [record.getMessage() for record in caplog.records if "_arch" in record.getMessage()]
    assert said == [f"model.lm_arch is not used: model.lm_path {micro_base[1]} exists, and its config.json is"]


def test_a_dotted_flag_into_an_architecture_keeps_its_type(capsys):
    # --model.lm_arch.num_hidden_layers 1 was kept as the text '1', and transformers failed with a traceback.
    with pytest.raises(SystemExit):
        main(["curriculum", *TOY_PROFILE_ARGS, "--model.lm_arch.num_hidden_layers=2", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["lm_arch"]["num_hidden_layers"] == 2 and printed["model"]["lm_arch"]["vocab_size"] == 128
