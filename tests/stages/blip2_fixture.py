"""A tiny random-weight BLIP-2, built offline from transformers configs and saved like a real one."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessor,
    OPTConfig,
)

from datamodules.world import vocabulary_corpus
from modules.tokenizer import train_world_tokenizer

# Data-Juicer's stock image_captioning_mapper sets `image_token_index = 50265` (BLIP-2 OPT-2.7B's) on
# whatever model it loads, so a model for that op must keep its <image> token at that id.
OPT_IMAGE_TOKEN_ID, OPT_VOCAB = 50265, 50272


def _move_image_token(tokenizer, out: Path, image_id: int):
    """The same word-level tokenizer with <image> at `image_id` (WordLevel ids need not be contiguous)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(tokenizer.get_vocab())
    vocab["<image>"] = image_id
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<pad>", "<unk>", "<bos>", "<eos>", "<image>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    fast.save_pretrained(out)
    return fast


def build_tiny_blip2(out: Path, opt_image_token: bool = False) -> Path:
    """A tiny BLIP-2; `opt_image_token` lays its vocabulary out like OPT-2.7B's for the stock op."""
    tokenizer = train_world_tokenizer(vocabulary_corpus(), out, image_token=False)
    vocab = len(tokenizer)
    if opt_image_token:
        tokenizer, vocab = _move_image_token(tokenizer, out, OPT_IMAGE_TOKEN_ID), OPT_VOCAB
    vision = Blip2VisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    qformer = Blip2QFormerConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32
    )
    text = OPTConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=160,  # the stock op generates 128 new tokens
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    if opt_image_token:
        # The stock op samples from all 50272 logits: make the word-level vocabulary's rows dominate the
        # (tied) output layer, so that its captions decode to words rather than to unused ids.
        with torch.no_grad():
            rows = model.get_input_embeddings().weight
            special = set(tokenizer.all_special_ids) | {OPT_IMAGE_TOKEN_ID}
            words = torch.zeros(len(rows), dtype=torch.bool)
            words[[i for i in tokenizer.get_vocab().values() if i not in special]] = True
            rows[~words & ~torch.isin(torch.arange(len(rows)), torch.tensor(sorted(special)))] = 0
            rows[words] *= 50
    model.save_pretrained(out)
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer, num_query_tokens=4
    )
    processor.save_pretrained(out)
    return out
