"""Loading base models from local folders with transformers' `from_pretrained`.

The tiny models that the default curriculum builds and real checkpoints (CLIP, SigLIP, Gemma,
Qwen, ...) go through these same functions; nothing is fetched from a hub (`local_files_only`).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

from modules.modeling_vlm_curriculum import SquareImages, prompt_layout
from modules.speed import SpeedSpec
from modules.vlm import VisionLanguageModel, vision_tokens

log = logging.getLogger(__name__)
_WARNED: set[tuple[Path, str]] = set()


class ModelFolderError(ValueError):
    """A model folder that does not fit the configuration (the CLI reports it without a traceback)."""


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
        if self.alpha <= 0:  # the adapter's output is scaled by alpha / r: 0 trains nothing, silently
            raise ValueError(f"model.lora.alpha must be positive, got {self.alpha}")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules must name at least one module, got []")


@dataclass
class ModelConfig:
    """Which base models the VLM is made of, and how image tokens reach the language model."""

    vision_path: str | None = None
    """Folder of a vision tower and its image processor; unset: the tiny tower built under <run_dir>/base."""
    lm_path: str | None = None
    """Folder of a causal language model and its tokenizer; unset: the tiny LM built under <run_dir>/base."""
    grid: int | None = 3
    """Pool the tower's feature map to grid x grid image tokens; null keeps every patch."""
    vision_layer: int = -1
    """The tower's hidden state that gives the image tokens: -1 its output, -2 the layer before (LLaVA-1.5, MGM)."""
    prompt: str = "describe the image"
    """The captioning instruction placed after the image tokens."""
    chat_template: bool = False
    """Frame image tokens, prompt and caption in the LM tokenizer's chat template (an instruct LM's: a user
    turn, then the caption as the assistant's reply, ended as the template ends a turn); false: plain."""
    image_token: str | None = None
    """For a tokenizer that declares no image_token (real LMs' do not): a token of its vocabulary that text
    never produces, to mark the image positions, e.g. '<|image_pad|>' (Qwen2.5) or '<unk>' (Llama-2)."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    random_init: bool = False
    """Random weights from the folders' config.json, or from `vision_arch` / `lm_arch` when no folder is
    given: for throughput and memory runs of a real profile without its weights."""
    # dict[str, Any], not dict: a plain dict kept a dotted flag's value as text (--model.lm_arch.num_hidden_layers 1
    # gave '1', and transformers failed with a traceback); these values are read as YAML, as every flag's is.
    vision_arch: dict[str, Any] | None = None
    """The tower's transformers config (with `model_type`), used with `random_init` when `vision_path` is unset."""
    lm_arch: dict[str, Any] | None = None
    """The language model's transformers config (with `model_type`), as `vision_arch`."""
    image_size: int = 336
    """Input side of the image processor written for a random-init tower."""
    pad_to_square: bool = False
    """Pad each image to a square with the processor's mean colour before it (LLaVA-1.5's `pad` aspect ratio):
    CLIP's processor crops the centre, so a wide image's sides, which its caption may describe, go unseen."""
    dtype: str | None = None
    """Storage dtype of the base models ("bfloat16", "float16"); unset: as saved (random init: float32)."""
    speed: SpeedSpec = field(default_factory=SpeedSpec)
    """Training-speed levers (modules/speed.py): chunked label-only loss, checkpointing, torch.compile."""

    def __post_init__(self) -> None:
        if self.dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"model.dtype must be bfloat16, float16, float32 or null, got {self.dtype!r}")
        if self.grid is not None and self.grid < 1:
            raise ValueError(f"model.grid must be at least 1, or null to keep every patch, got {self.grid}")
        if self.image_size < 1:
            raise ValueError(f"model.image_size must be at least 1, got {self.image_size}")
        if self.vision_layer >= 0:  # counted from the output: 0 would be the patch embeddings, 5 a crash mid-run
            raise ValueError(f"model.vision_layer must be negative (-1: the output, -2: the layer before), got "
                             f"{self.vision_layer}")  # fmt: skip


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def model_folder(path: str | Path, flag: str) -> Path:
    folder = Path(path)
    if not is_model_folder(folder):
        raise FileNotFoundError(
            f"{flag}: {folder} is not a model folder (no config.json there). Give a local folder saved with "
            "save_pretrained; nothing is downloaded at run time."
        )
    return folder


def _weights(
    model_class, folder: Path, config, random_init: bool, dtype: torch.dtype | None, init_device: str = "cpu"
) -> nn.Module:
    """`model_class` from `folder`'s weights, or (random_init) seeded random weights of `config`, without
    disturbing the caller's random state. Random weights are drawn on `init_device` and returned on the
    CPU, as loaded ones are. They depend on the device type, so a run's stages, resume and export draw
    on the CPU; only `bench train`, whose weights never outlive it, draws on the GPU (a 2.5B model takes
    over a minute to initialise on the CPU)."""
    if not random_init:
        return model_class.from_pretrained(folder, local_files_only=True, dtype=dtype)
    device = torch.device(init_device)
    cuda = device.type == "cuda"
    # On the CPU no device context of our own: a caller's (the tests build on "meta") applies.
    with torch.random.fork_rng(devices=[device.index or 0] if cuda else []), device if cuda else nullcontext():
        torch.manual_seed(0)
        model = model_class.from_config(config, dtype=dtype or torch.float32)
    if cuda:
        model.to("cpu")
        torch.cuda.empty_cache()
    return model


def load_vision_tower(
    path: str | Path, random_init: bool = False, dtype: torch.dtype | None = None, init_device: str = "cpu"
) -> tuple[nn.Module, object, int]:
    """(tower, image processor, feature width) from a local folder (weights, or only its config.json)."""
    folder = model_folder(path, "--model.vision_path")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(config, "vision_config"):  # a full CLIP / SigLIP checkpoint: keep only its vision half
        # The vision class loads the vision weights of the whole checkpoint; random weights come from the Auto
        # class (the concrete classes have no from_config). The class is looked up, not built to be seen.
        model_class = AutoModel if random_init else MODEL_MAPPING[type(config.vision_config)]
        tower = _weights(model_class, folder, config.vision_config, random_init, dtype, init_device)
        width = config.vision_config.hidden_size
    else:
        tower = _weights(AutoModel, folder, config, random_init, dtype, init_device)
        width = config.hidden_sizes[-1] if hasattr(config, "hidden_sizes") else config.hidden_size
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return tower, processor, width


def load_language_model(
    path: str | Path,
    random_init: bool = False,
    dtype: torch.dtype | None = None,
    init_device: str = "cpu",
    image_token: str | None = None,
) -> tuple[nn.Module, object]:
    """(causal LM, tokenizer) from a local folder; the tokenizer as `load_tokenizer` prepares it."""
    folder = model_folder(path, "--model.lm_path")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    lm = _weights(AutoModelForCausalLM, folder, config, random_init, dtype, init_device)
    # The folder's generation_config.json (an instruct LM's repetition penalty, sampling defaults) is not
    # applied: evaluation and the exported model, which has no such file, decode with the same plain settings.
    lm.generation_config = GenerationConfig.from_model_config(lm.config)
    return lm, load_tokenizer(folder, image_token)


def _some(names: list[str], most: int = 12) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _tokenizer(folder: Path, **declared):
    """The folder's tokenizer. One saved as a plain `tokenizers` tokenizer (the world's word-level one, which
    `random_init` writes beside any architecture's config) loads as such: AutoTokenizer would go by the
    config's model type, and for qwen2 rebuilds it as a byte-level BPE without merges (every caption a few
    "a" tokens). `declared`: special tokens to declare (image_token=...)."""
    settings = folder / "tokenizer_config.json"
    saved_as = json.loads(settings.read_text()).get("tokenizer_class") if settings.is_file() else None
    if saved_as in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True, **declared)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, **declared)


def load_tokenizer(path: str | Path, image_token: str | None = None):
    """The LM folder's tokenizer with an image token declared and a pad token set.

    The tokenizer's own `image_token` is used when it declares one (the tiny LM's does). Otherwise
    `image_token` (--model.image_token) names one of its added tokens (atomic: text maps to it only
    where it is written out): the VLM replaces the embeddings at its positions with image features, so
    no row is added and the LM keeps its shapes. The declaration is saved with the tokenizer, so an
    exported model loads with it. Padding never uses the image token: a tokenizer without a pad token
    (Llama's), or whose pad token is the image token (Vicuna's pads with unk), pads with unk or else eos;
    padded positions are masked and carry no loss.
    """
    folder = model_folder(path, "--model.lm_path")
    tokenizer = _tokenizer(folder)
    declared = getattr(tokenizer, "image_token", None)
    if declared is not None:
        if image_token is not None and image_token != declared and (folder, image_token) not in _WARNED:
            _WARNED.add((folder, image_token))  # once a run, not at every stage's build
            log.warning("--model.image_token %r is not used: %s's tokenizer declares %r", image_token, folder, declared)
    elif image_token is None:
        raise ModelFolderError(
            f"--model.lm_path {folder}: the tokenizer declares no image_token. Set --model.image_token to one of "
            "its added tokens that text never contains (Qwen2.5: '<|image_pad|>'; Gemma: '<unused0>'; Llama-2: "
            "'<unk>'), or save the tokenizer with extra_special_tokens={'image_token': ...}"
        )
    elif image_token not in tokenizer.added_tokens_encoder:
        raise ModelFolderError(
            f"--model.image_token {image_token!r} is not an added token of {folder}'s tokenizer: name one of "
            f"{_some(sorted(tokenizer.added_tokens_encoder))} (a word of the vocabulary would also stand for "
            "itself in text; a new token would change the LM's embedding shapes)"
        )
    else:  # declared through the loader, which keeps the tokenizer's other special tokens
        tokenizer = _tokenizer(folder, image_token=image_token)
    if tokenizer.image_token in {tokenizer.bos_token, tokenizer.eos_token}:
        raise ModelFolderError(
            f"--model.image_token {tokenizer.image_token!r} is also {folder}'s bos or eos token: name another"
        )
    if tokenizer.pad_token in (None, tokenizer.image_token):
        pads = [t for t in (tokenizer.unk_token, tokenizer.eos_token) if t is not None and t != tokenizer.image_token]
        if not pads:
            raise ModelFolderError(f"--model.lm_path {folder}: the tokenizer has no pad, unk or eos token to pad with")
        tokenizer.pad_token = pads[0]
    return tokenizer


def check_token_rows(lm_path: str | Path, tokenizer) -> None:
    """Fails naming the folder when the id of a token the project feeds the LM (image, pad, bos, eos) is past
    its embedding rows (`vocab_size` in its config.json), as a pad token added to a Llama tokenizer without
    resizing the model is: the first step failed with an IndexError. Checked before the data is built, which
    with a captioner can take hours; `build_vlm` checks the image token in the loaded embeddings again."""
    config = json.loads((Path(lm_path) / "config.json").read_text())
    rows = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    for role in ("image", "pad", "bos", "eos"):
        token = getattr(tokenizer, f"{role}_token", None)
        token_id = None if token is None else tokenizer.convert_tokens_to_ids(token)
        if rows is not None and token_id is not None and token_id >= rows:
            raise ModelFolderError(
                f"--model.lm_path {lm_path}: the {role} token {token!r} has id {token_id}, past the LM's {rows} "
                "embedding rows (vocab_size in its config.json): a token added to the tokenizer but not to the model"
            )


def check_prompt(tokenizer, config: ModelConfig) -> None:
    """Fails before any work, naming the flag, when the tokenizer cannot lay out the prompt as configured
    (`--model.chat_template` with a tokenizer that has no chat template, or an unusable one; a plain layout
    whose prompt and caption the tokenizer cannot keep apart)."""
    from datamodules.captions import caption_lead

    image_token = getattr(tokenizer, "image_token", None)
    if image_token and image_token in config.prompt:  # one placeholder too many: the first batch failed
        raise ModelFolderError(
            f"--model.prompt {config.prompt!r} holds the image token {image_token!r}: the image's tokens are placed "
            "before the prompt by the model itself; leave it out of the prompt"
        )
    unk = tokenizer.unk_token_id
    if unk is not None:  # a word-level tokenizer (the tiny base's) read words it lacks as <unk>, unsaid
        unknown = [w for w in config.prompt.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]
        if unknown:
            raise ModelFolderError(
                f"--model.prompt {config.prompt!r}: {unknown} are unknown to the language model's tokenizer (each "
                f"would be {tokenizer.unk_token}); the tiny base's tokenizer knows the synthetic world's words and "
                "base.prompt, which the tiny LM is pretrained with: set base.prompt too, or use its words"
            )
    try:
        prompt_layout(tokenizer, 1, config.prompt, config.chat_template)
        if config.prompt and not config.chat_template:
            caption_lead(tokenizer)  # the plain layout: can prompt and caption be told apart?
    except ValueError as error:
        raise ModelFolderError(str(error)) from error


def tied_embedding_targets(lm: nn.Module, target_modules: list[str]) -> list[str]:
    """The LoRA targets among an LM's input and output embeddings when the two share one weight (Qwen2.5-0.5B,
    Gemma): merged for the export, an `lm_head` adapter's update changed the input embeddings too, and the export
    generated other captions than the model trained (8 of 8 on a tied toy Qwen2)."""
    inputs, outputs = lm.get_input_embeddings(), lm.get_output_embeddings()
    if inputs is None or outputs is None or inputs.weight is not outputs.weight:
        return []
    names = {name.rsplit(".", 1)[-1] for name, module in lm.named_modules() if module is inputs or module is outputs}
    return sorted(names & set(target_modules))


def check_lora_targets(lm_path: str | Path, spec: LoraSpec) -> None:
    """Fails before any work when `model.lora.target_modules` names modules the LM lacks (found when the first
    LoRA stage attached its adapter, after the data, the base models and the align stage), or a tied embedding.
    The LM is built on the meta device from its config: names only, no memory."""
    config = AutoConfig.from_pretrained(model_folder(lm_path, "--model.lm_path"), local_files_only=True)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    names = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
    missing = sorted(set(spec.target_modules) - names)
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in lm.named_modules() if isinstance(m, nn.Linear)})
        raise ModelFolderError(
            f"--model.lora.target_modules: {missing} are not modules of {lm_path} (its linear layers: {_some(linear)})"
        )
    tied = tied_embedding_targets(lm, spec.target_modules)
    if tied:
        raise ModelFolderError(f"--model.lora.target_modules: {tied} of {lm_path}: {TIED}")


TIED = (
    "its input and output embeddings share one weight (tie_word_embeddings), so the merged export would add the "
    "adapter's update to both and generate other captions than the model trained; leave them out, or train the "
    "LM in full (trainable: [lm])"
)


def check_vision_layer(vision_path: str | Path, layer: int) -> None:
    """Fails before any work when `model.vision_layer` is deeper than the tower: found in the first stage, after
    the data and the base models. The tower runs on the meta device: shapes only, no memory."""
    if layer == -1:
        return
    with torch.device("meta"):
        tower, processor, _ = load_vision_tower(vision_path, random_init=True)
    try:
        probe_image_tokens(tower, processor, None, layer)
    except ValueError as error:
        raise ModelFolderError(f"--{error} (the tower in {vision_path})") from error


def random_init_parts(config: ModelConfig) -> dict[str, dict]:
    """{part: architecture} of the parts ("vision", "lm") that `random_init` builds from their architecture:
    those without a model folder. Fails naming the architecture a part lacks."""
    parts = (("vision", config.vision_path, config.vision_arch), ("lm", config.lm_path, config.lm_arch))
    wanted = {part: (arch, path) for part, path, arch in parts if not (path and is_model_folder(path))}
    for part, (arch, path) in wanted.items():
        if not arch or "model_type" not in arch:
            raise ModelFolderError(
                f"--model.{part}_arch: random_init without a model folder in --model.{part}_path ({path}) needs a "
                "config dict with a model_type"
            )
    return {part: arch for part, (arch, _) in wanted.items()}


def write_config_folders(config: ModelConfig, out: Path, corpus: list[str]) -> tuple[Path | None, Path | None]:
    """Folders holding only configs (the tower's with an image processor, the LM's with the synthetic
    world's tokenizer) from `vision_arch` / `lm_arch`: what `random_init` builds models from. A part whose
    `vision_path` / `lm_path` is a model folder is not written (None): its config.json is used."""
    from modules.base_models import processor_class
    from modules.tokenizer import train_world_tokenizer

    wanted = random_init_parts(config)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        if "vision" in wanted:
            vision = Path(scratch) / "vision"
            AutoConfig.for_model(**config.vision_arch).save_pretrained(vision)
            side = config.image_size
            if config.vision_arch["model_type"].startswith("siglip"):  # SigLIP's: the whole frame resized, mean 0.5
                processor = processor_class("SiglipImageProcessor")(size={"height": side, "width": side})
            else:  # CLIP's: the short side resized, the centre cropped, CLIP's mean
                crop = {"height": side, "width": side}
                processor = processor_class("CLIPImageProcessor")(size={"shortest_edge": side}, crop_size=crop)
            processor.save_pretrained(vision)
            written["vision"] = _replace_if_changed(vision, out / "vision")
        if "lm" in wanted:
            lm = Path(scratch) / "lm"
            AutoConfig.for_model(**config.lm_arch).save_pretrained(lm)
            train_world_tokenizer([*corpus, config.prompt], lm)
            written["lm"] = _replace_if_changed(lm, out / "lm")
    return written.get("vision"), written.get("lm")


def _files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}


def _replace_if_changed(new: Path, dest: Path) -> Path:
    """`dest`, replaced by `new` only if their files differ: rewriting the same files would change their
    modification times, and with them the folder's digest, so that every stage of a rerun would start afresh."""
    if _files_of(new) != _files_of(dest):
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(new, dest)
    return dest


def build_vlm(
    config: ModelConfig, vision_path: str | Path, lm_path: str | Path, init_device: str = "cpu"
) -> tuple[VisionLanguageModel, object, object]:
    """(VLM with a freshly initialised projector, tokenizer, image processor); `init_device`: see _weights."""
    dtype = getattr(torch, config.dtype) if config.dtype else None
    tower, processor, width = load_vision_tower(vision_path, config.random_init, dtype, init_device)
    lm, tokenizer = load_language_model(lm_path, config.random_init, dtype, init_device, config.image_token)
    image_token_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    rows = lm.get_input_embeddings().num_embeddings
    if image_token_id >= rows:
        raise ModelFolderError(
            f"{lm_path}: the image token {tokenizer.image_token!r} has id {image_token_id}, past the LM's {rows} "
            "embedding rows"
        )
    if config.vision_layer != -1:  # an earlier stage of a convolutional tower is narrower than its output
        width = probe_image_tokens(tower, processor, None, config.vision_layer)[1]
    vlm = VisionLanguageModel(tower, lm, width, image_token_id, config.grid, config.vision_layer)
    return vlm, tokenizer, SquareImages(processor) if config.pad_to_square else processor


def probe_image_tokens(tower: nn.Module, processor, grid: int | None, layer: int = -1) -> tuple[int, int]:
    """(image tokens per image, their width): the tower run once on a blank image, in eval mode so that
    BatchNorm statistics stay as loaded (shapes only when the tower is on "meta")."""
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    side = size.get("height") or size.get("shortest_edge")
    weight = next(tower.parameters())
    pixels = processor([Image.new("RGB", (side, side))], return_tensors="pt")["pixel_values"]
    training = tower.training
    tower.eval()
    with torch.no_grad():
        shape = vision_tokens(tower, pixels.to(weight.device, weight.dtype), grid, layer).shape
    tower.train(training)
    return shape[1], shape[2]


def count_image_tokens(vlm: VisionLanguageModel, processor) -> int:
    """Image tokens per image (what `CaptionDataModule.connect` needs), found by running the tower on one blank
    image."""
    return probe_image_tokens(vlm.vision, processor, vlm.grid, vlm.vision_layer)[0]
