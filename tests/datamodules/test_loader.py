"""The training loader's epoch: whole optimizer steps only."""

from __future__ import annotations

import lightning as L
import pytest
from transformers import AutoImageProcessor, AutoTokenizer

from datamodules.caption_datamodule import CaptionDataModule
from datamodules.shards import ShardError


def _datamodule(micro_world, micro_base, accumulate: int, batch_size: int = 8) -> CaptionDataModule:
    datamodule = CaptionDataModule(micro_world, max_words=48, batch_size=batch_size)
    tokenizer = AutoTokenizer.from_pretrained(micro_base[1])
    datamodule.connect(tokenizer, AutoImageProcessor.from_pretrained(micro_base[0]), 9, "describe the image")
    datamodule.trainer = L.Trainer(accumulate_grad_batches=accumulate, accelerator="cpu", logger=False)
    return datamodule


def test_an_epoch_holds_whole_optimizer_steps(micro_world, micro_base):
    # 192 training images in batches of 8: 24 batches; with accumulation 5, 20 (4 steps), not a short 5th
    # step that Lightning would take and DeepSpeed's engine would not.
    assert len(_datamodule(micro_world, micro_base, 1).train_dataloader()) == 24
    assert len(_datamodule(micro_world, micro_base, 5).train_dataloader()) == 20
    with pytest.raises(ShardError, match=r"fewer than one optimizer step \(5 batch\(es\) of 64\)"):
        _datamodule(micro_world, micro_base, 5, batch_size=64).train_dataloader()


def test_evaluated_images_stay_encoded_until_captioned(micro_world, micro_base):
    import numpy as np

    from datamodules.images import EncodedImage, as_image

    samples = _datamodule(micro_world, micro_base, 1).eval_samples("test", limit=3)
    assert len(samples) == 3 and all(isinstance(image, EncodedImage) for _, image, _ in samples)
    for _, image, _ in samples:
        decoded = as_image(image)
        assert decoded.mode == "RGB" and len(image.data) < np.asarray(decoded).nbytes
        assert np.array_equal(np.asarray(decoded), np.asarray(image.decode()))


def test_each_epoch_reads_the_shards_in_a_new_order_that_a_resume_repeats(micro_world):
    """The shard and sample shuffles take the epoch into their seeds: a new order every epoch (the same
    order again would train on identical batches), and the same order for the same (seed, epoch)."""
    from datamodules.caption_datamodule import ShardStream

    urls = [str(micro_world / shard["url"]) for shard in CaptionDataModule(micro_world, 48).index["splits"]["train"]]

    def keys(epoch: int, seed: int = 0) -> list[str]:
        stream = ShardStream(urls, seed, epoch, train=True, keep=lambda sample: True, repeat=False)
        return [sample["__key__"] for sample in stream]

    first, second = keys(0), keys(1)
    assert len(first) == 192 and sorted(first) == sorted(second) and first != second
    assert keys(1) == second and keys(1, seed=1) != second
