"""Turning a shard sample into model inputs: caption selection by word budget, tokens, pixels."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from datamodules.text_stats import word_count
from modules.modeling_vlm_curriculum import prompt_layout, stop_ids

IGNORE_INDEX = -100
log = logging.getLogger(__name__)
_REMOVED: set[str] = set()  # special-token strings already warned about


def select_caption(captions: dict[str, str], max_words: int, words: dict[str, int] | None = None) -> str | None:
    """The longest caption variant with at most `max_words` words, or None if every one is longer. A stage of
    the curriculum trains each image on the longest description its word budget allows. `words`: the counts
    the data stage stored with the sample, as its index holds them (else `word_count`): the loader must keep
    what the index counted, or an epoch's length and the budget check disagree with what it reads (shards
    built before CJK counted by character would have kept no sample, and the stream never ended)."""
    counts = {name: words[name] if words and name in words else word_count(text) for name, text in captions.items()}
    fitting = [name for name, text in captions.items() if text.strip() and 0 < counts[name] <= max_words]
    return captions[max(fitting, key=counts.__getitem__)] if fitting else None


def caption_lead(tokenizer) -> str:
    """What a caption tokenized apart from the prompt starts with so that the two decode as separate words: ""
    when the tokenizer marks a word's start itself, " " when two texts tokenized apart decode as one word
    ("x" + "y" -> "xy"). Fails when even the space does not keep them apart (a normalizer that strips it)."""

    def decoded(first: str, second: str) -> str:
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (first, second)]
        return tokenizer.decode(ids[0] + ids[1], skip_special_tokens=True).strip()

    if decoded("x", "y") != "xy":
        return ""
    if decoded("x", " y") == "x y":
        return " "
    raise ValueError(
        f"--model.prompt: {tokenizer.name_or_path}'s tokenizer joins the prompt's last word and the caption's first "
        "even with a space between them; use --model.chat_template true, or an empty prompt"
    )


@dataclass
class PromptFormat:
    """How a caption sample becomes a token sequence:

    `[bos] <image> x num_image_tokens  prompt  caption  [eos]`, with the loss on caption and eos only;
    with `chat_template`, the LM's chat template frames them (`prompt_layout`) and the loss is on the
    caption and the template's end of turn.
    """

    tokenizer: object
    num_image_tokens: int
    prompt: str
    chat_template: bool = False

    def __post_init__(self) -> None:
        image_token = getattr(self.tokenizer, "image_token", None)
        if image_token is None:
            raise ValueError("the tokenizer has no image_token: load it with modules.loading.load_tokenizer")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        self._prefix, self.end_ids = prompt_layout(
            self.tokenizer, self.num_image_tokens, self.prompt, self.chat_template
        )
        self.stop_ids = stop_ids(self.end_ids, self.tokenizer.eos_token_id)
        # Prompt and caption are tokenized apart. Llama's SentencePiece marks a word's start itself ("▁a"), but
        # byte-level BPE (Qwen) and Gemma's do not: "describe the image" + "a red circle" read "...imagea red
        # circle". In the plain layout, a caption after a prompt then starts with a space.
        self._lead = caption_lead(self.tokenizer) if not self.chat_template and self.prompt else ""
        added = getattr(self.tokenizer, "added_tokens_decoder", {}).values()
        special = {*self.tokenizer.all_special_tokens, image_token, *(t.content for t in added if t.special)}
        longest_first = sorted((t for t in special if t), key=len, reverse=True)  # "<image>" before "<i"...
        self._special = re.compile("|".join(map(re.escape, longest_first)))

    def asking(self, prompt: str) -> PromptFormat:
        """The same layout with another prompt (a question in place of the captioning instruction), without the
        tokenizer's special-token strings: a LLaVA record's "<image>\nWhat color is it?" failed the batch (one
        image placeholder too many), "<|im_end|>" ended the chat template's user turn mid-question."""
        return replace(self, prompt=self.plain(prompt, keep_lines=True))

    def prefix(self) -> list[int]:
        """What every caption follows: the image placeholders and the prompt."""
        return list(self._prefix)

    def plain(self, caption: str, keep_lines: bool = False) -> str:
        """`caption` (or a question) without the tokenizer's special-token strings ("<image>", "<eos>",
        "<|im_end|>", ...): as text they became those tokens, an extra image placeholder (failing the batch) or an
        end mid-caption.
        A removal is logged once per token string."""
        found = set(self._special.findall(caption))
        if not found:
            return caption
        for token in found - _REMOVED:
            _REMOVED.add(token)
            log.warning("a caption or question holds the tokenizer's special token %r as text: removed", token)
        if keep_lines:  # a question's lines (LLaVA's multiple-choice options) stay lines
            lines = (" ".join(line.split()) for line in self._special.sub(" ", caption).splitlines())
            return "\n".join(line for line in lines if line)
        return " ".join(self._special.sub(" ", caption).split())

    def encode(self, caption: str) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for one caption."""
        prefix = self.prefix()
        text = self._lead + self.plain(caption)
        target = self.tokenizer(text, add_special_tokens=False)["input_ids"] + self.end_ids
        return prefix + target, [IGNORE_INDEX] * len(prefix) + target


def collate_captions(
    keys: list[str], pixel_values: torch.Tensor, sequences: list[tuple[list[int], list[int]]], pad_token_id: int
) -> dict[str, torch.Tensor | list[str]]:
    """Right-pads (input_ids, labels) pairs into a batch beside their keys and pixel values."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, target) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(target)] = torch.tensor(target)
        attention_mask[row, : len(ids)] = 1
    return {
        "keys": keys,
        "pixel_values": pixel_values,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }


def scored_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many positions of a batch the next-token loss scores: the labelled ones after the first (the
    model predicts position t from the positions before it, so the labels are shifted by one)."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def pad_batches(batches: Iterator[dict], count: int) -> Iterator[dict]:
    """The batches, then as many one-row padding batches as bring them to `count`: a copy of the first row
    whose labels are all ignored, so that it scores no token. Ranks that validate on different numbers of
    samples make the same number of forward passes (under ZeRO-3 each pass needs every rank) and still
    score every sample once."""
    first = None
    given = 0
    for batch in batches:
        first = batch if first is None else first
        given += 1
        yield batch
    if given < count and first is None:
        raise RuntimeError("pad_batches: no batch to pad after (a reader without samples)")
    for _ in range(count - given):
        row = {key: value[:1] for key, value in first.items() if key != "labels"}
        yield row | {"keys": [""], "labels": torch.full_like(first["labels"][:1], IGNORE_INDEX)}


def tag_step_tokens(batches: Iterator[dict], accumulate: int, start: int = 0) -> Iterator[dict]:
    """The batches, each with `step_tokens`: the scored tokens of every micro-batch of its optimizer step.

    An optimizer step takes `accumulate` micro-batches, closed as Lightning closes them: after batch i of
    the epoch when (i + 1) is a multiple of `accumulate`. `start` is the epoch's index of the first batch
    (batches trained on before a resume are not in the stream). The batches of a step are read before the
    first is handed on, so that each can weigh its share of the step's loss (`VLMModule.training_step`).
    """
    window: list[dict] = []
    for position, batch in enumerate(batches, start):
        window.append(batch)
        if (position + 1) % accumulate == 0:
            yield from _tagged(window)
            window = []
    yield from _tagged(window)  # a stream that ended mid-step: its last batches weigh among themselves


def _tagged(window: list[dict]) -> Iterator[dict]:
    total = sum(scored_tokens(batch["labels"]) for batch in window)
    for batch in window:
        batch["step_tokens"] = total
        yield batch
