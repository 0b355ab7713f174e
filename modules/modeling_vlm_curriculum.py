"""The VLM's forward logic, and its Hugging Face wrapper for exported models.

This file imports only torch and transformers: `stages.run export` copies it into the exported
folder, so that `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads the merged model
in any environment with transformers, without this project installed. Training uses the same
`vision_tokens`, `MLPProjector` and `ImageTokenMixin` (modules/vlm.py), so the exported model
computes exactly what the trained one did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel


def vision_tokens(tower: nn.Module, pixel_values: torch.Tensor, grid: int | None, layer: int = -1) -> torch.Tensor:
    """The tower's image tokens, (B, N, width).

    `layer` -1 takes the tower's output (`last_hidden_state`); -2 the hidden state of the layer before,
    as LLaVA-1.5 and MGM do with CLIP (`hidden_states[layer]`). Convolutional towers give a
    (B, C, H, W) map: pooled to `grid` x `grid` cells if `grid` is set. ViT towers (CLIP, SigLIP) give
    (B, 1 + N, D) with a class token (CLIP), (B, 1 + R + N, D) with R register tokens too (DINOv2 with
    registers) or (B, N, D) (SigLIP): the class and register tokens are dropped, as LLaVA drops the class
    token, and the patch grid pooled to `grid` if set.
    """
    if layer == -1:
        features = tower(pixel_values=pixel_values).last_hidden_state
    else:
        states = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        if not -len(states) <= layer < 0:
            raise ValueError(f"model.vision_layer {layer}: the tower has hidden states -1 to -{len(states)}")
        features = states[layer]
    if features.dim() == 4:
        return (
            F.adaptive_avg_pool2d(features, grid).flatten(2).transpose(1, 2)
            if grid
            else features.flatten(2).transpose(1, 2)
        )
    side = int((features.shape[1]) ** 0.5)
    if side * side != features.shape[1]:
        # The class token leads, then the register tokens of a ViT that has them (DINOv2 with registers).
        leading = 1 + getattr(tower.config, "num_register_tokens", 0)
        features = features[:, leading:]
        side = int(features.shape[1] ** 0.5)
        if side * side != features.shape[1]:
            raise ValueError(
                f"vision tower {type(tower).__name__}: {features.shape[1] + leading} tokens are not a square patch "
                f"grid after its {leading} leading token(s) (class, registers); give it square images"
            )
    if grid:
        square = features.transpose(1, 2).reshape(features.shape[0], -1, side, side)
        features = F.adaptive_avg_pool2d(square, grid).flatten(2).transpose(1, 2)
    return features


_REPLY = "CAPTION_REPLY_MARK"  # stands for the caption while a chat template is rendered


CHAT_DATE = "26 Jul 2024"  # the date Llama-3's chat template falls back to without strftime_now


def prompt_layout(tokenizer, num_image_tokens: int, prompt: str, chat_template: bool = False):
    """(prefix, end): the token ids every caption follows, and those that end it.

    Plain: `[bos] <image> x num_image_tokens prompt`, then the caption and eos. With `chat_template`, the
    tokenizer's own chat template (an instruct LM's) frames a user turn `<image>\\n<prompt>` and opens the
    assistant's reply; the caption is that reply, ended as the template ends a turn (Qwen's `<|im_end|>`,
    Gemma's `<end_of_turn>`), and the one image token becomes `num_image_tokens` of them.
    """
    image_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if not chat_template:
        if tokenizer.eos_token_id is None:  # every batch failed ("Could not infer dtype of NoneType")
            raise ValueError(
                f"--model.lm_path {tokenizer.name_or_path}: the tokenizer has no eos token to end a caption with; "
                "set eos_token in its tokenizer_config.json, or frame captions with --model.chat_template true"
            )
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + [image_id] * num_image_tokens + ids(prompt), [tokenizer.eos_token_id]
    name = tokenizer.name_or_path
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--model.chat_template: {name}'s tokenizer has no chat template")
    user = [{"role": "user", "content": f"{tokenizer.image_token}\n{prompt}"}]
    # A template that prints today's date (Llama-3's, through strftime_now unless given a date_string) gave a
    # prompt that changed with the day: training, eval and later inference each saw another one.
    fixed = {"date_string": CHAT_DATE}
    head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False, **fixed)
    whole = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": _REPLY}], tokenize=False, **fixed)
    if not whole.startswith(head + _REPLY):
        raise ValueError(
            f"--model.chat_template: {name}'s chat template does not write the reply right after its generation "
            "prompt, so captions cannot be trained as replies; use the plain layout (false)"
        )
    prefix = ids(head)
    if prefix.count(image_id) != 1:
        count = prefix.count(image_id)
        why = (
            f"holds the image token {tokenizer.image_token!r} {count} times (is it one of the template's own tokens? "
            "set --model.image_token to a token of its own)" if count > 1 else "does not keep the image token"
        )  # fmt: skip
        raise ValueError(f"--model.chat_template: {name}'s chat template {why}")
    at = prefix.index(image_id)
    end = ids(whole[len(head) + len(_REPLY) :].rstrip()) or [tokenizer.eos_token_id]
    return prefix[:at] + [image_id] * num_image_tokens + prefix[at + 1 :], end


def pad_to_square(image, fill: tuple[int, ...]):
    """A PIL image padded to a square with `fill`, centred (LLaVA-1.5's `expand2square`): a CLIP processor
    resizes the short side and crops the centre, so a wide image loses its sides, and whatever a caption says
    of them becomes a hallucination to learn."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"pad_to_square takes PIL images, got {type(image).__name__}")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    image = image.convert("RGB")  # the fill is an RGB colour (the processors take RGB in any case)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


class SquareImages:
    """An image processor that pads each image to a square with its mean colour first; every other attribute
    (sizes, `save_pretrained`) is the wrapped processor's."""

    def __init__(self, processor) -> None:
        self.processor = processor
        mean = getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5)
        self.fill = tuple(round(255 * value) for value in mean)

    def __call__(self, images, *args, **kwargs):
        images = [images] if not isinstance(images, list | tuple) else images
        return self.processor([pad_to_square(image, self.fill) for image in images], *args, **kwargs)

    def __getattr__(self, name: str):
        if "processor" not in self.__dict__:  # while unpickling or copying, before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.__dict__["processor"], name)


def stop_ids(end: list[int], eos_token_id: int | None) -> list[int]:
    """The token ids that end generation: the first of `end` (a turn's end), and eos if the tokenizer has one."""
    return list(dict.fromkeys(token for token in (end[0], eos_token_id) if token is not None))


class MLPProjector(nn.Module):
    """Two linear layers with a GELU between them, applied to every image token (LLaVA-1.5's projector)."""

    def __init__(self, vision_width: int, lm_width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(vision_width, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, vision_width) -> (B, N, lm_width)."""
        return self.net(features)


class ImageTokenMixin:
    """Image tokens from `self.vision`, projected by `self.projector`, replace the `<image>` placeholders
    (`self.image_token_id`) in `self.lm`'s token embeddings."""

    vision: nn.Module
    lm: nn.Module
    projector: MLPProjector
    image_token_id: int
    grid: int | None
    vision_layer: int = -1

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(next(self.vision.parameters()).dtype)
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = vision_tokens(self.vision, pixel_values, self.grid, self.vision_layer)
        return self.projector(features.to(self.projector.net[0].weight.dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.lm.get_input_embeddings()(input_ids)
        image = self.image_embeddings(pixel_values).to(embeddings.dtype)
        mask = input_ids == self.image_token_id
        per_row = mask.sum(dim=1)
        if mask.shape[0] != image.shape[0] or bool((per_row != image.shape[1]).any()):
            # Checked per row: a row with 2N placeholders beside one with none matched the batch's total, and
            # the second image's features landed in the first row.
            raise ValueError(
                f"the batch's rows hold {per_row.tolist()} <image> placeholders but the tower gives "
                f"{image.shape[0]} x {image.shape[1]} image tokens: check num_image_tokens against model.grid"
            )
        return embeddings.masked_scatter(mask.unsqueeze(-1), image)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
    ):
        embeds = self.embed(input_ids, pixel_values)
        # No KV cache outside generation: it costs memory, and its per-layer state makes each decoder
        # layer a different graph for torch.compile.
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, **generate_kwargs
    ) -> torch.Tensor:
        """New tokens only, (B, T). `input_ids` are left-padded prompts holding the image placeholders."""
        embeds = self.embed(input_ids, pixel_values)
        return self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)


def _sub_config(value) -> PretrainedConfig:
    return AutoConfig.for_model(**value) if isinstance(value, dict) else value


class VLMCurriculumConfig(PretrainedConfig):
    """A merged vlm-curriculum model: the tower's and the LM's own configs, the projector's widths, the
    tower's hidden state that gives the image tokens (`vision_layer`), and the prompt layout
    (`num_image_tokens` placeholders after bos, then `prompt`; or in the tokenizer's chat template, see
    `prompt_layout`)."""

    model_type = "vlm_curriculum"

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        vision_width: int = 0,
        image_token_id: int = 0,
        grid: int | None = None,
        num_image_tokens: int = 0,
        prompt: str = "",
        vision_layer: int = -1,
        chat_template: bool = False,
        pad_to_square: bool = False,
        **kwargs,
    ) -> None:
        self.vision_config = _sub_config(vision_config) if vision_config is not None else None
        self.text_config = _sub_config(text_config) if text_config is not None else None
        self.vision_width, self.image_token_id, self.grid = vision_width, image_token_id, grid
        self.vision_layer = vision_layer
        self.num_image_tokens, self.prompt, self.chat_template = num_image_tokens, prompt, chat_template
        self.pad_to_square = pad_to_square
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        output = super().to_dict()
        for name in ("vision_config", "text_config"):
            value = getattr(self, name)
            output[name] = value.to_dict() if isinstance(value, PretrainedConfig) else value
        return output


class VLMCurriculumForCaptioning(ImageTokenMixin, PreTrainedModel):
    """Vision tower -> projector -> language model, with LoRA already merged into the LM.

    `generate(input_ids, attention_mask, pixel_values, **kwargs)` returns the new tokens; the
    folder's README shows how to build `input_ids` with its tokenizer.
    """

    config_class = VLMCurriculumConfig
    base_model_prefix = "vlm"

    def __init__(self, config: VLMCurriculumConfig) -> None:
        super().__init__(config)
        # In the dtype from_pretrained asked for (it sets the default dtype meanwhile): from_config alone builds
        # in each part's saved dtype, so `dtype=torch.bfloat16` gave a bf16 projector beside a float32 tower and LM.
        self.vision = AutoModel.from_config(config.vision_config, dtype=torch.get_default_dtype())
        self.lm = AutoModelForCausalLM.from_config(config.text_config, dtype=torch.get_default_dtype())
        self.projector = MLPProjector(config.vision_width, config.text_config.hidden_size)
        self.image_token_id, self.grid, self.vision_layer = config.image_token_id, config.grid, config.vision_layer
        self.post_init()

    def prompt_ids(self, tokenizer) -> list[int]:
        """The image placeholders and the captioning prompt, laid out as in training: what every caption is
        generated after."""
        return self._layout(tokenizer)[0]

    def image_processor(self, processor):
        """`processor` as training used it: padding each image to a square first if the model trained so."""
        return SquareImages(processor) if getattr(self.config, "pad_to_square", False) else processor

    def stop_ids(self, tokenizer) -> list[int]:
        """The token ids that end a caption (generate's `eos_token_id`)."""
        return stop_ids(self._layout(tokenizer)[1], tokenizer.eos_token_id)

    def _layout(self, tokenizer) -> tuple[list[int], list[int]]:
        config = self.config
        return prompt_layout(tokenizer, config.num_image_tokens, config.prompt, config.chat_template)
