"""The project's BLIP-2 captioning op on its own: its arguments, its word cap, the checkpoints it accepts."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from datamodules.recaption_ops import Blip2CaptionMapper, _cap_words
from datamodules.text_stats import word_count
from tests.stages.blip2_fixture import build_tiny_blip2


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        ({"max_words": -1}, "max_words"),  # dropped the last word of every caption
        ({"max_words": 0}, "max_words"),  # emptied every caption
        ({"num_beams": 0}, "num_beams"),
        ({"min_new_tokens": 9, "max_new_tokens": 4}, "min_new_tokens"),
        ({"prompts": {}}, "prompts"),  # fell back to the default prompts, unsaid
    ],
)
def test_arguments_no_caption_can_come_of_are_refused_naming_them(args, flag):
    with pytest.raises(ValueError, match=rf"blip2_caption_mapper\.{flag}"):
        Blip2CaptionMapper(model_path="anywhere", **args)


def test_the_word_cap_counts_words_as_the_budgets_do():
    # Split on whitespace alone, an 11-character Chinese caption (11 words for the budgets) passed a cap of 3.
    assert _cap_words("一只猫坐在红色的沙发上", 3) == "一只猫"
    assert _cap_words("a cat 坐在 sofa", 3) == "a cat 坐"
    assert _cap_words("one two three four", 3) == "one two three"
    assert all(word_count(_cap_words("a b 猫狗鸟 c", n)) == min(n, 6) for n in range(1, 8))


def test_a_checkpoint_without_the_language_model_is_refused(tmp_path):
    # An image-text retrieval checkpoint (model_type blip-2, no language model): transformers filled the missing
    # weights at random with a log line, and the build wrote random captions, other ones at every load.
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor

    tiny = build_tiny_blip2(tmp_path / "tiny")
    torch.manual_seed(0)
    Blip2ForImageTextRetrieval(Blip2Config.from_pretrained(tiny)).save_pretrained(tmp_path / "itm")
    Blip2Processor.from_pretrained(tiny).save_pretrained(tmp_path / "itm")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    samples = {"images": [[str(tmp_path / "a.png")]], "text": [""]}
    with pytest.raises(ValueError, match=r"model_path: .*itm holds no weights for \d+ of BLIP-2's tensors"):
        Blip2CaptionMapper(model_path=str(tmp_path / "itm"), max_new_tokens=4).process_batched(samples)
    captions = Blip2CaptionMapper(model_path=str(tiny), max_new_tokens=4).process_batched(samples)["caption_variants"]
    assert len(captions) == 1  # the whole checkpoint loads


def test_workers_beyond_the_gpus_share_them(monkeypatch, tmp_path):
    # Data-Juicer numbers num_proc workers 0..N-1: worker 1 on a one-GPU machine asked for cuda:1.
    op = Blip2CaptionMapper(model_path=str(tmp_path))
    seen = []

    class Stop(Exception):
        """The device is all this test needs."""

    def load(device):
        seen.append(device)
        raise Stop

    monkeypatch.setattr(op, "use_cuda", lambda: True)
    monkeypatch.setattr(op, "_load", load)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for rank in (None, 0, 1, 2, 3):
        with pytest.raises(Stop):
            op.process_batched({"images": [], "text": []}, rank=rank)
    assert seen == ["cuda:0", "cuda:0", "cuda:1", "cuda:0", "cuda:1"]
