"""Loading base models from local folders with transformers' `from_pretrained`.

The tiny models that the default curriculum builds and real checkpoints (CLIP, SigLIP, Gemma,
Qwen, ...) go through these same functions; nothing is fetched from a hub (`local_files_only`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

from modules.vlm import VisionLanguageModel

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSpec:
    """LoRA adapter on the language model (PEFT `LoraConfig` fields)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"model.lora.r must be positive, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class ModelConfig:
    """Which base models the VLM is made of, and how image tokens reach the language model."""

    vision_path: str | None = None
    """Folder of a vision tower and its image processor; unset: the tiny tower built under <run_dir>/base."""
    lm_path: str | None = None
    """Folder of a causal language model and its tokenizer; unset: the tiny LM built under <run_dir>/base."""
    grid: int | None = 3
    """Pool the tower's feature map to grid x grid image tokens; null keeps every patch."""
    prompt: str = "describe the image"
    """The captioning instruction placed after the image tokens."""
    lora: LoraSpec = field(default_factory=LoraSpec)


def model_folder(path: str | Path, flag: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{flag}: {folder} is not a model folder (no config.json there). Give a local folder saved with "
            "save_pretrained; nothing is downloaded at run time."
        )
    return folder


def load_vision_tower(path: str | Path) -> tuple[nn.Module, object, int]:
    """(tower, image processor, feature width) from a local folder."""
    folder = model_folder(path, "--model.vision_path")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(config, "vision_config"):  # a full CLIP / SigLIP checkpoint: keep only its vision half
        model_class = type(AutoModel.from_config(config.vision_config))
        tower = model_class.from_pretrained(folder, local_files_only=True)
        width = config.vision_config.hidden_size
    else:
        tower = AutoModel.from_pretrained(folder, local_files_only=True)
        width = config.hidden_sizes[-1] if hasattr(config, "hidden_sizes") else config.hidden_size
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return tower, processor, width


def load_language_model(path: str | Path) -> tuple[nn.Module, object]:
    """(causal LM, tokenizer) from a local folder. The tokenizer must define an image placeholder token."""
    folder = model_folder(path, "--model.lm_path")
    lm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return lm, tokenizer


def build_vlm(
    config: ModelConfig, vision_path: str | Path, lm_path: str | Path
) -> tuple[VisionLanguageModel, object, object]:
    """(VLM with a freshly initialised projector, tokenizer, image processor)."""
    tower, processor, width = load_vision_tower(vision_path)
    lm, tokenizer = load_language_model(lm_path)
    image_token = getattr(tokenizer, "image_token", None)
    if image_token is None:
        raise ValueError(
            f"{lm_path}: the tokenizer defines no image_token (extra_special_tokens={{'image_token': ...}})"
        )
    vlm = VisionLanguageModel(tower, lm, width, tokenizer.convert_tokens_to_ids(image_token), config.grid)
    return vlm, tokenizer, processor
