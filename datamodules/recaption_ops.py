"""Data-Juicer operators of the project: caption variants for every image.

Both write `caption_variants` (a JSON object: variant name -> caption) and set the sample's text to
its longest variant, without Data-Juicer's `<__dj__image>` token (which its word counts would
otherwise include), so that the recipe's text filters judge the new caption.

- `oracle_caption_mapper`: the synthetic world's captioner, which reads the scene's ground truth
  (`meta_json`) and writes the world's short / medium / long captions.
- `blip2_caption_mapper`: BLIP-2 from a local folder, once per worker, bf16 on CUDA (fp32 on CPU),
  batched, greedy or beam search, one prompt per variant, a word cap. Data-Juicer's stock
  `image_captioning_mapper` samples with a fixed 128-token budget in the stored dtype and keeps
  the original sample beside the new ones; this op is the fast, deterministic alternative.

Importing this module registers both with Data-Juicer's `OPERATORS`.
"""

from __future__ import annotations

import bisect
import json
import time

import torch
from data_juicer.ops.base_op import OPERATORS, UNFORKABLE, Mapper

from datamodules.images import open_rgb
from datamodules.text_stats import longest_caption, word_count
from datamodules.world import CAPTION_KINDS, caption, scene_from_metadata

VARIANTS_KEY = "caption_variants"


def _cap_words(text: str, max_words: int) -> str:
    """`text` cut to `max_words` words as the word budgets count them (`word_count`: a kana or CJK character is
    one; split on whitespace alone, a Chinese caption of 11 characters passed a cap of 3 whole)."""
    if max_words is None:
        return text
    kept, count = [], 0
    for token in text.split():
        if count + word_count(token) > max_words:  # an unspaced token (CJK): its longest prefix that fits
            # word_count never falls as a prefix grows: bisect finds the first length that counts too many words.
            too_long = bisect.bisect_right(
                range(len(token) + 1), max_words - count, key=lambda n: word_count(token[:n])
            )
            token = token[: too_long - 1]
        if not token:
            break
        kept.append(token)
        count += word_count(token)
    return " ".join(kept)


@OPERATORS.register_module("oracle_caption_mapper")
class OracleCaptionMapper(Mapper):
    """Writes the synthetic world's caption variants from each sample's ground truth (`meta_json`)."""

    _batched_op = True

    def __init__(self, variants: list[str] | None = None, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.variants = list(variants or CAPTION_KINDS)
        unknown = sorted(set(self.variants) - set(CAPTION_KINDS))
        if unknown:
            raise ValueError(f"oracle_caption_mapper.variants: unknown {unknown}; expected some of {CAPTION_KINDS}")

    def process_batched(self, samples: dict) -> dict:
        variants, texts = [], []
        for meta_json in samples["meta_json"]:
            scene = scene_from_metadata(json.loads(meta_json))
            captions = {kind: caption(scene, kind) for kind in self.variants}
            variants.append(json.dumps(captions))
            texts.append(longest_caption(captions.values()))
        samples[VARIANTS_KEY] = variants
        samples[self.text_key] = texts
        return samples


# Unforkable: a worker forked after this process ran torch can hang in its OpenMP pool, so workers
# (num_proc > 1) are started fresh (forkserver or spawn), as Data-Juicer does for its own model ops.
@OPERATORS.register_module("blip2_caption_mapper")
@UNFORKABLE.register_module("blip2_caption_mapper")
class Blip2CaptionMapper(Mapper):
    """Caption variants from a BLIP-2 checkpoint in a local folder."""

    _batched_op = True
    _accelerator = "cuda"

    def __init__(
        self,
        model_path: str = "",
        prompts: dict[str, str] | None = None,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        max_words: int = 60,
        min_new_tokens: int = 0,
        *args,
        **kwargs,
    ) -> None:
        """
        :param model_path: a folder saved with `save_pretrained` (model and processor).
        :param prompts: variant name -> text prompt ("" for BLIP-2's plain captioning).
        :param max_new_tokens: generation budget per caption.
        :param num_beams: 1 is greedy decoding.
        :param max_words: captions are cut to this many words.
        :param min_new_tokens: no end of sequence before this many tokens (benchmarks on random
            weights set it to max_new_tokens, so that every caption costs the full budget).
        """
        super().__init__(*args, **kwargs)
        if not model_path:
            raise ValueError("blip2_caption_mapper.model_path: give a local folder with a BLIP-2 model")
        for name, value, least in (("max_new_tokens", max_new_tokens, 1), ("num_beams", num_beams, 1),
                                   ("max_words", max_words, 1), ("min_new_tokens", min_new_tokens, 0)):  # fmt: skip
            if name == "max_words" and value is None:  # no cap
                continue
            if not isinstance(value, int) or value < least:  # -1 dropped a word of every caption, 0 all of them
                raise ValueError(f"blip2_caption_mapper.{name} must be an integer of at least {least}, got {value!r}")
        if min_new_tokens > max_new_tokens:
            raise ValueError(
                f"blip2_caption_mapper.min_new_tokens ({min_new_tokens}) exceeds max_new_tokens ({max_new_tokens})"
            )
        if prompts is not None and (
            not isinstance(prompts, dict) or not prompts or not all(isinstance(t, str) for t in prompts.values())
        ):
            raise ValueError("blip2_caption_mapper.prompts: a mapping of variant names to prompt strings, one at least")
        self.model_path, self.max_new_tokens, self.num_beams, self.max_words = (
            model_path,
            max_new_tokens,
            num_beams,
            max_words,
        )
        self.min_new_tokens = min_new_tokens
        self.prompts = dict(prompts or {"short": "", "detailed": "a detailed description of the image:"})
        self._model = None
        # Seconds spent per phase, summed over batches: where the op's time goes (read by the benchmark).
        self.seconds = {"load_model": 0.0, "read_images": 0.0, "preprocess": 0.0, "generate": 0.0, "decode": 0.0}

    def _load(self, device: str):
        if self._model is None:
            started = time.perf_counter()
            from transformers import Blip2ForConditionalGeneration, Blip2Processor

            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
            self._processor = Blip2Processor.from_pretrained(self.model_path, local_files_only=True)
            model, info = Blip2ForConditionalGeneration.from_pretrained(
                self.model_path, local_files_only=True, dtype=dtype, output_loading_info=True
            )
            if info["missing_keys"]:  # transformers fills them with random weights, with a log line: random captions
                missing = sorted(info["missing_keys"])
                raise ValueError(
                    f"blip2_caption_mapper.model_path: {self.model_path} holds no weights for {len(missing)} of "
                    f"BLIP-2's tensors ({', '.join(missing[:3])}, ...): not a captioning checkpoint "
                    "(Blip2ForConditionalGeneration; an image-text retrieval one has no language model)"
                )
            self._model = model.to(device).eval()
            self.seconds["load_model"] += time.perf_counter() - started
        return self._model, self._processor

    def _tick(self, phase: str, started: float, device: str) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.seconds[phase] += now - started
        return now

    @torch.no_grad()
    def process_batched(self, samples: dict, rank: int | None = None) -> dict:
        # Data-Juicer numbers its workers 0 to num_proc - 1, which may be more than the GPUs (as its get_model does).
        device = f"cuda:{(rank or 0) % torch.cuda.device_count()}" if self.use_cuda() else "cpu"
        model, processor = self._load(device)
        clock = time.perf_counter()
        images = [open_rgb(paths[0]) for paths in samples[self.image_key]]
        clock = self._tick("read_images", clock, device)
        results: list[dict[str, str]] = [{} for _ in images]
        for name, prompt in self.prompts.items():
            inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
            inputs = inputs.to(device, model.dtype)
            clock = self._tick("preprocess", clock, device)
            tokens = model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                min_new_tokens=self.min_new_tokens or None,
                num_beams=self.num_beams,
                do_sample=False,
            )
            clock = self._tick("generate", clock, device)
            new = tokens[:, inputs["input_ids"].shape[1] :] if model.config.use_decoder_only_language_model else tokens
            for row, text in enumerate(processor.batch_decode(new, skip_special_tokens=True)):
                results[row][name] = _cap_words(text.strip(), self.max_words)
            clock = self._tick("decode", clock, device)
        samples[VARIANTS_KEY] = [json.dumps(r) for r in results]
        samples[self.text_key] = [longest_caption(r.values()) for r in results]
        return samples
