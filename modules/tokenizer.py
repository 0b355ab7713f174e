"""A word-level tokenizer trained on the synthetic world's vocabulary, saved in Hugging Face format."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<bos>", "<eos>", "<image>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE]


def train_world_tokenizer(corpus: list[str], out_dir: Path, image_token: bool = True) -> PreTrainedTokenizerFast:
    """Trains a whitespace word-level tokenizer on `corpus` and saves it to `out_dir`.

    `<image>` is the placeholder that the vision-language model replaces with image features; with
    `image_token=False` it stays in the vocabulary but is not declared (BLIP-2's processor declares
    its own).
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE} if image_token else None,
    )
    fast.save_pretrained(out_dir)
    return fast
