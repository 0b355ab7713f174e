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
    datamodule.trainer = L.Trainer(
        accumulate_grad_batches=accumulate, accelerator="cpu", logger=False, reload_dataloaders_every_n_epochs=1
    )
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


def _train_urls(micro_world) -> list[str]:
    return [str(micro_world / shard["url"]) for shard in CaptionDataModule(micro_world, 48).index["splits"]["train"]]


@pytest.mark.parametrize("skip", [4, 5])
def test_a_resume_with_two_workers_sees_the_uninterrupted_batches(micro_world, skip):
    # The loader takes worker 0's batch first after a resume too: with an odd number of batches done, the
    # resumed batches came in swapped pairs, one from past the epoch's end, one never trained on.
    import webdataset as wds

    from datamodules.caption_datamodule import ShardStream

    def batches(skip_batches: int) -> list[tuple[str, ...]]:
        stream = wds.DataPipeline(
            ShardStream(_train_urls(micro_world), 0, 0, True, lambda _: True, skip_batches, 8, shuffle_buffer=16),
            wds.batched(8, collation_fn=lambda samples: tuple(s["__key__"] for s in samples), partial=False),
        )
        return list(wds.WebLoader(stream, batch_size=None, num_workers=2).with_epoch(16 - skip_batches))

    assert batches(skip) == batches(0)[skip:]


def test_ranks_read_no_shared_sample_in_an_epoch_when_shards_split_unevenly(micro_world, monkeypatch):
    # 3 shards of 64 over 2 ranks: rank 1 reads its one shard, runs out and reads on. It drew a new deal of
    # the shards for that pass and read rank 0's samples, while others went unread that epoch.
    import itertools

    from datamodules.caption_datamodule import ShardStream

    for epoch in range(3):
        seen = []
        for rank in (0, 1):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            stream = ShardStream(_train_urls(micro_world), 0, epoch, True, lambda _: True, shuffle_buffer=16)
            seen.append({sample["__key__"] for sample in itertools.islice(iter(stream), 96)})
        assert not seen[0] & seen[1], epoch


def _key_shards(folder, shards: int, size: int) -> list[str]:
    """`shards` tar files of `size` samples each, holding only keys (a loader test needs no images)."""
    import webdataset as wds

    urls = []
    for shard in range(shards):
        urls.append(str(folder / f"train-{shard:06d}.tar"))
        with wds.TarWriter(urls[-1]) as sink:
            for index in range(size):
                sink.write({"__key__": f"{shard}-{index}", "txt": "x"})
    return urls


@pytest.mark.parametrize(
    ("shards", "workers", "ranks"), [(3, 2, 1), (4, 3, 1), (5, 3, 1), (2, 3, 1), (3, 5, 1), (5, 3, 2)]
)
def test_a_ranks_loader_workers_share_its_shards_evenly(tmp_path, monkeypatch, shards, workers, ranks):
    # 3 shards of 64 over 2 loader workers were dealt whole: one worker got 128 samples, the other 64, and as the
    # loader takes batches from its workers in turn, an epoch of 192 saw 32 images twice and 32 not at all. Shared
    # a sample at a time, 4 shards over 3 workers still left 5 of 256 unseen: each worker must hold its batches.
    import webdataset as wds

    from datamodules.caption_datamodule import ShardStream

    urls = _key_shards(tmp_path, shards, 64)
    monkeypatch.setenv("WORLD_SIZE", str(ranks))
    for epoch in range(2):
        keys = []
        for rank in range(ranks):
            monkeypatch.setenv("RANK", str(rank))
            stream = wds.DataPipeline(
                ShardStream(urls, 0, epoch, True, lambda _: True, batch_size=8, shuffle_buffer=16),
                wds.batched(8, collation_fn=lambda samples: [s["__key__"] for s in samples], partial=False),
            )
            loader = wds.WebLoader(stream, batch_size=None, num_workers=workers).with_epoch(shards * 8 // ranks)
            keys += [key for batch in loader for key in batch]
        assert len(keys) == len(set(keys)) == shards * 64, epoch


def test_how_often_an_epoch_reads_its_shards():
    from datamodules.caption_datamodule import shard_reads

    assert shard_reads(6, 1, 3) == 6 and shard_reads(8, 2, 2) == 8, "dealt evenly: each once"
    assert shard_reads(3, 1, 2) == 4, "2 whole, the third read by both workers"
    assert shard_reads(20, 1, 8) == 48 and shard_reads(7, 2, 2) == 8
    assert shard_reads(3, 2, 2) == 12, "fewer shards than readers: every reader reads every shard"


@pytest.mark.parametrize(
    ("json_bytes", "message"),
    [
        (b'{"captions": {"short": "a red', "its json does not parse"),
        (b'{"key": "k"}', "no 'captions' mapping"),
        (b'{"captions": {"short": null}}', "no 'captions' mapping"),
        (None, "has no json"),
    ],
)
def test_broken_sample_metadata_names_its_shard_and_key(json_bytes, message):
    # These failed as a bare JSONDecodeError, KeyError or AttributeError from inside the loader.
    from datamodules.caption_datamodule import _meta

    sample = {"__key__": "train-0000042", "__url__": "shards/train-000003.tar"}
    if json_bytes is not None:
        sample["json"] = json_bytes
    with pytest.raises(ShardError, match=f"shards/train-000003.tar: sample train-0000042.*{message}"):
        _meta(sample)


def test_special_token_text_in_a_caption_is_removed_not_tokenized(micro_base):
    # "<image>" in a caption's text became one more image placeholder (the batch then failed with a misleading
    # "check num_image_tokens against model.grid") and "<eos>" an end of sequence mid-caption in the labels.
    from datamodules.captions import PromptFormat
    from modules.loading import load_tokenizer

    tokenizer = load_tokenizer(micro_base[1])
    fmt = PromptFormat(tokenizer, 4, "describe the image")
    ids, labels = fmt.encode("a red <image> circle <eos> and")
    assert ids == fmt.encode("a red circle and")[0]
    assert ids.count(fmt.image_token_id) == 4 and labels.count(tokenizer.eos_token_id) == 1
    # A question too (LLaVA's records start theirs with "<image>\n"): one placeholder too many failed the VQA batch.
    assert fmt.asking("<image>\nwhat colour <eos> is it").prefix() == fmt.asking("what colour is it").prefix()
    assert fmt.asking("<image>\nwhat colour is it ?\nA. red\nB. blue").prompt == "what colour is it ?\nA. red\nB. blue"
    assert fmt.asking(" <image>\n").prompt == ""  # not asked (answer_questions): a caption scored as its answer


def test_an_index_naming_a_command_or_another_folder_is_refused(micro_world, tmp_path, monkeypatch):
    # WebDataset opens "pipe:<command>" by running it in a shell: an index whose shard was named so ran it when
    # the shard folder was given as "." (eval --data .).
    import json
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(micro_world, shards)
    index = json.loads((shards / "index.json").read_text())
    marker = tmp_path / "ran"
    index["splits"]["test"][0]["url"] = f"pipe:touch {marker}; cat test-000000.tar"
    (shards / "index.json").write_text(json.dumps(index))
    monkeypatch.chdir(shards)
    with pytest.raises(ShardError, match=r"index.json: split test lists the shard 'pipe:touch"):
        CaptionDataModule(".", max_words=8)
    index["splits"]["test"][0]["url"] = "../elsewhere/test-000000.tar"
    (shards / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match="they are test-NNNNNN.tar"):
        CaptionDataModule(".", max_words=8)
    assert not marker.exists()


def test_fewer_training_shards_than_readers_is_said(micro_world, micro_base, caplog):
    # Each reader then reads every shard and keeps 1 sample in (ranks x workers): with 8 GPUs x 8 workers and the
    # default shard_size, a data set under 320k samples was read 64 times an epoch, and nothing said so.
    datamodule = _datamodule(micro_world, micro_base, 1)
    datamodule.train_dataloader()
    assert "readers" not in caplog.text, "3 shards, 1 reader"
    datamodule.num_workers = 4
    datamodule.train_dataloader()
    datamodule.train_dataloader()
    said = [r.getMessage() for r in caplog.records if "readers" in r.getMessage()]
    assert len(said) == 1 and "3 training shards for 4 readers (1 rank(s) x 4 loader worker(s))" in said[0]
    assert "an epoch reads 12 shards; with a multiple of 4 shards" in said[0]


def test_the_loader_keeps_what_the_index_counted(micro_world):
    # Shards built before CJK counted by character hold a Chinese sentence as 1 word in index.json and in each
    # sample's caption_words: recounted at load time it was 8, the loader kept no sample that the index said
    # fitted, and the training stream never ended.
    import webdataset as wds

    from datamodules.caption_datamodule import ShardStream
    from datamodules.captions import select_caption

    sentence = "一只猫坐在沙发上"
    assert select_caption({"caption": sentence}, 5, {"caption": 1}) == sentence, "the stored count"
    assert select_caption({"caption": sentence}, 5) is None, "counted now: 8 words"
    never = ShardStream(_train_urls(micro_world), 0, 0, True, lambda _: False, batch_size=8, repeat=True)
    with pytest.raises(RuntimeError, match="that fits the word budget reached this reader"):
        next(iter(wds.DataPipeline(never)))


def test_each_rank_validates_on_its_share_of_what_fits_the_budget(micro_world, monkeypatch):
    # The held-out samples were dealt to the ranks before the word budget: with 2 ranks, rank 1 got positions
    # where nothing fitted, and a 2-rank validation crashed (before that: hung, reading on for ever).
    import itertools

    from datamodules.caption_datamodule import ShardStream

    urls = [str(micro_world / s["url"]) for s in CaptionDataModule(micro_world, 48).index["splits"]["val"]]
    position = itertools.count()
    fits = {}  # every 4th sample of the stream fits: none at odd positions

    def keep(sample):
        if sample["__key__"] not in fits:
            fits[sample["__key__"]] = next(position) % 4 == 0
        return fits[sample["__key__"]]

    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stream = ShardStream(urls, 0, 0, False, keep, batch_size=2, repeat=True)
        shares.append([sample["__key__"] for sample in itertools.islice(iter(stream), 4)])
    assert all(fits[key] for share in shares for key in share) and not set(shares[0]) & set(shares[1])


@pytest.mark.parametrize("batch_size", [3, 12])
def test_two_ranks_validate_every_sample_once_in_as_many_batches(micro_world, micro_base, monkeypatch, batch_size):
    # Each rank validated max(kept // (batch x ranks), 1) full batches, read again to fill them: 7 samples in
    # batches of 12 over 2 ranks were 24 rows (17 counted twice), and 32 in batches of 12 left 8 unvalidated.
    # Now every rank reads its share once and pads to the largest share's batch count with rows that score
    # nothing. 7 samples (max_words 6): shares of 4 and 3.
    import types

    from datamodules.captions import scored_tokens

    validated = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))  # as webdataset reads the rank of a process group
        monkeypatch.setenv("WORLD_SIZE", "2")
        datamodule = CaptionDataModule(micro_world, max_words=6, batch_size=batch_size)
        tokenizer = AutoTokenizer.from_pretrained(micro_base[1])
        datamodule.connect(tokenizer, AutoImageProcessor.from_pretrained(micro_base[0]), 9, "describe the image")
        datamodule.trainer = types.SimpleNamespace(world_size=2, current_epoch=0, accumulate_grad_batches=1)
        validated.append(list(datamodule.val_dataloader()))
    assert len(validated[0]) == len(validated[1]) == (2 if batch_size == 3 else 1)
    keys = [key for batches in validated for batch in batches for key in batch["keys"] if key]
    assert len(keys) == len(set(keys)) == 7
    for batches in validated:
        for batch in batches:
            padding = [i for i, key in enumerate(batch["keys"]) if not key]
            assert all(scored_tokens(batch["labels"][i]) == 0 for i in padding)
    assert sum(not key for batches in validated for batch in batches for key in batch["keys"]) == (
        1 if batch_size == 3 else 0
    )


def test_a_rank_dealt_only_shards_without_a_fitting_caption_still_trains(tmp_path, micro_base, monkeypatch):
    # A data set grouped by source: its short captions in one shard, its long ones in three. Under a short budget,
    # a rank dealt only long-caption shards had nothing to train on and stopped ("no sample ... reached this
    # reader") while the other ranks waited for it. Shards without a caption that fits are no longer dealt.
    import json
    import types

    from PIL import Image

    from stages.data import InputSpec, RecipeConfig, run_data_stage

    short, long = "a red circle on the left side", "a large red circle on the left side next to a small blue square"
    records = []
    for i in range(32):
        Image.new("RGB", (48, 48), (8 * i, 0, 0)).save(tmp_path / f"{i}.png")
        records.append({"id": f"r{i:02d}", "images": [f"{i}.png"], "text": short if i < 8 else long})
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    recipe = RecipeConfig(
        input=InputSpec(format="dj_jsonl", path=str(tmp_path / "in.jsonl")), process=[], val_share=0.0,
        test_share=0.0, shard_size=8,
    )  # fmt: skip
    run_data_stage(recipe, tmp_path / "shards")
    keys = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        datamodule = CaptionDataModule(tmp_path / "shards", max_words=8, batch_size=2)
        assert [len(shard["caption_words"]) for shard in datamodule.index["splits"]["train"]] == [8, 8, 8, 8]
        tokenizer = AutoTokenizer.from_pretrained(micro_base[1])
        datamodule.connect(tokenizer, AutoImageProcessor.from_pretrained(micro_base[0]), 9, "describe the image")
        datamodule.trainer = types.SimpleNamespace(
            world_size=2, current_epoch=0, accumulate_grad_batches=1, reload_dataloaders_every_n_epochs=1,
            limit_train_batches=1.0, fit_loop=types.SimpleNamespace(restarting=False),
        )  # fmt: skip
        keys.append({key for batch in datamodule.train_dataloader() for key in batch["keys"]})
    assert all(keys) and keys[0] | keys[1] <= {f"r{i:02d}" for i in range(8)}


def test_starting_the_loaders_leaves_torchs_random_state_alone(micro_world, micro_base):
    """A DataLoader draws its workers' base seed from torch's global generator at each new iterator, the one LoRA
    dropout draws from: validation, and each epoch's new loader, shifted the dropout's stream, and a resume (the
    state restored from before the draw) trained on other dropout masks than an unbroken run."""
    import torch

    datamodule = _datamodule(micro_world, micro_base, 1)
    state = torch.get_rng_state()
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader()):
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), state)
