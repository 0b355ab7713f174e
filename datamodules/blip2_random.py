"""Random-weight BLIP-2 models built offline from transformers configs, saved like real checkpoints.

For tests (`tiny`) and for the captioning benchmark (`opt-2.7b`: the shapes of Salesforce's
blip2-opt-2.7b: a 39-layer ViT-g at 224 px, a 12-layer Q-Former with 32 queries, OPT-2.7B), so that
throughput is measured on the real architecture without downloading its weights. The tokenizer is
the synthetic world's word-level one; `opt_image_token` puts its `<image>` token at OPT-2.7B's id
50265, which Data-Juicer's stock `image_captioning_mapper` pins on every model it loads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    OPTConfig,
)

from datamodules.world import vocabulary_corpus
from modules.base_models import processor_class
from modules.tokenizer import train_world_tokenizer

OPT_IMAGE_TOKEN_ID, OPT_VOCAB = 50265, 50272
SHAPES = {
    "tiny": {
        "vision": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                   "num_hidden_layers": 1, "num_attention_heads": 2},
        "qformer": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                    "encoder_hidden_size": 32},
        "text": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "ffn_dim": 64,
                 "word_embed_proj_dim": 32, "max_position_embeddings": 160},
        "num_query_tokens": 4,
    },
    "opt-2.7b": {
        "vision": {"image_size": 224, "patch_size": 14, "hidden_size": 1408, "intermediate_size": 6144,
                   "num_hidden_layers": 39, "num_attention_heads": 16},
        "qformer": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072, "encoder_hidden_size": 1408},
        "text": {"hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32, "ffn_dim": 10240,
                 "word_embed_proj_dim": 2560, "max_position_embeddings": 2048},
        "num_query_tokens": 32,
    },
}  # fmt: skip


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


def build_random_blip2(
    out: Path, shape: str = "tiny", opt_image_token: bool = False, device: str = "cpu", dtype=torch.float32
) -> Path:
    """Builds, seeds and saves a BLIP-2 of `shape` with its processor into `out`; returns `out`."""
    if shape not in SHAPES:
        raise ValueError(f"blip2 shape {shape!r}: expected one of {sorted(SHAPES)}")
    dims = SHAPES[shape]
    tokenizer = train_world_tokenizer(vocabulary_corpus(), out, image_token=False)
    vocab = len(tokenizer)
    if opt_image_token:
        tokenizer, vocab = _move_image_token(tokenizer, out, OPT_IMAGE_TOKEN_ID), OPT_VOCAB
    text = OPTConfig(
        vocab_size=vocab,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **dims["text"],
    )
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**dims["vision"]).to_dict(),
        qformer_config=Blip2QFormerConfig(**dims["qformer"]).to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=dims["num_query_tokens"],
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config).to(dtype)
    if opt_image_token:
        # The stock op samples from all 50272 logits: make the word-level vocabulary's rows dominate the
        # (tied) output layer, so that its captions decode to words rather than to unused ids.
        with torch.no_grad():
            rows = model.get_input_embeddings().weight
            special = torch.tensor(sorted(set(tokenizer.all_special_ids) | {OPT_IMAGE_TOKEN_ID}), device=rows.device)
            ids = torch.arange(len(rows), device=rows.device)
            words = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
            words[[i for i in tokenizer.get_vocab().values() if i not in special.tolist()]] = True
            rows[~words & ~torch.isin(ids, special)] = 0
            rows[words] *= 50
    model.save_pretrained(out)
    side = dims["vision"]["image_size"]
    processor = Blip2Processor(
        image_processor=processor_class("BlipImageProcessor")(size={"height": side, "width": side}),
        tokenizer=tokenizer,
        num_query_tokens=dims["num_query_tokens"],
    )
    processor.save_pretrained(out)
    return out
