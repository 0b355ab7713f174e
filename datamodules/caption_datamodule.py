"""A LightningDataModule over WebDataset caption shards, with a per-stage caption word budget."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import random
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset

from datamodules.captions import PromptFormat, collate_captions, pad_batches, select_caption, tag_step_tokens
from datamodules.images import SHARD_FORMATS, EncodedImage, open_rgb
from datamodules.shards import ShardError, budget_counts, epoch_batches, read_index, shard_fits, shard_urls

log = logging.getLogger(__name__)


def _image_bytes(sample: dict) -> bytes:
    data = next((sample[ext] for ext in SHARD_FORMATS if ext in sample), None)
    if data is None:
        raise ValueError(f"shard sample {sample['__key__']} has no image ({', '.join(SHARD_FORMATS)})")
    return data


def merged_references(meta: dict, other: dict) -> dict:
    """`meta` of an image's first record with another record's caption variants added as references
    (`<key>/<variant>`), its annotated classes and its questions: an image is evaluated once, against every
    caption written of it (scored once per record against one reference each, BLEU-4 read 0.449 where the same
    captions together gave 0.935, and CHAIR weighed images by their number of records)."""
    captions = {**meta["captions"], **{f"{other.get('key')}/{name}": text for name, text in other["captions"].items()}}
    merged = {**meta, "captions": captions}
    mine, theirs = meta.get("objects"), other.get("objects")
    if isinstance(mine, list) and isinstance(theirs, list) and all(isinstance(c, str) for c in [*mine, *theirs]):
        merged["objects"] = sorted({*mine, *theirs})
    elif not isinstance(mine, list) and isinstance(theirs, list):  # annotated in a later record only
        merged["objects"] = theirs
    asked = {json.dumps(q, sort_keys=True) for q in meta.get("questions", [])}
    new = [q for q in other.get("questions", []) if json.dumps(q, sort_keys=True) not in asked]
    if new:  # every record of an image may carry its questions: each asked once
        merged["questions"] = [*meta.get("questions", []), *new]
    return merged


def _meta(sample: dict) -> dict:
    """The sample's JSON metadata; a ShardError naming its shard and key when it is missing, does not parse,
    or holds no `captions` mapping of variant names to strings."""
    where = f"{sample.get('__url__', 'a shard')}: sample {sample.get('__key__')}"
    if "json" not in sample:
        raise ShardError(f"{where} has no json")
    try:
        meta = json.loads(sample["json"])
    except json.JSONDecodeError as error:
        raise ShardError(f"{where}: its json does not parse ({error})") from None
    captions = meta.get("captions") if isinstance(meta, dict) else None
    if not isinstance(captions, dict) or not all(isinstance(text, str) for text in captions.values()):
        raise ShardError(f"{where}: its json holds no 'captions' mapping of variant names to strings")
    return meta


def _decode(sample: dict) -> tuple[str, Image.Image, dict]:
    return sample["__key__"], open_rgb(_image_bytes(sample)), _meta(sample)


def _turns(ranks: int, rank: int, workers: int, worker: int, run: int = 1) -> Callable[[dict], bool]:
    """A predicate keeping one reader's turns of a stream dealt out `run` samples at a time: the turns go round
    the ranks, and each rank's round its loader workers, so that the ranks' shares differ by a turn at most, and
    so do the shares of a rank's workers."""
    position = itertools.count()

    def mine(_sample: dict) -> bool:
        turn = next(position) // run
        return turn % ranks == rank and turn // ranks % workers == worker

    return mine


def _read(urls: list[str], keep: Callable[[dict], bool], share: Callable[[dict], bool] | None = None) -> Iterator:
    """The samples of `urls` that `keep` fits, in order; with `share`, only those of the reader's share (applied
    after `keep`, so that every reader gets its share of what fits)."""
    if not urls:
        return iter(())
    stages = [wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.select(keep)]
    return iter(wds.DataPipeline(*stages, *([wds.select(share)] if share else [])))


def rank_deal(urls: list, rank: int, world: int, workers: int) -> tuple[list, list]:
    """A rank's training shards, when there are at least as many as readers (ranks x workers): (those its loader
    workers read whole, dealt among them in turn; the few left over, which every worker of the rank reads and
    takes its turns of)."""
    mine = urls[rank::world]
    whole = len(mine) - len(mine) % workers
    return mine[:whole], mine[whole:]


def shard_reads(shards: int, world: int, workers: int) -> int:
    """How many shards an epoch of training reads in all, as ShardStream deals them out: each once when they go
    round every rank's workers evenly, a shard shared by several readers once by each of them."""
    if shards < world * workers:  # every reader reads every shard
        return shards * world * workers
    reads = 0
    for rank in range(world):
        whole, shared = rank_deal(list(range(shards)), rank, world, workers)
        reads += len(whole) + len(shared) * workers
    return reads


class ShardStream(IterableDataset):
    """Samples of some shards, split by node and worker; in `train` mode shuffled and endless.

    The shuffle order is a function of (seed, epoch), so a resumed run sees the same order and
    every epoch a new one. The caller bounds an epoch with `WebLoader.with_epoch`.
    """

    def __init__(
        self,
        urls: list[str],
        seed: int,
        epoch: int,
        train: bool,
        keep: Callable[[dict], bool],
        skip_batches: int = 0,
        batch_size: int = 1,
        shuffle_buffer: int = 2000,
        repeat: bool | None = None,
    ) -> None:
        self.urls, self.seed, self.epoch, self.train, self.keep = urls, seed, epoch, train, keep
        self.repeat = train if repeat is None else repeat  # endless: pass after pass
        self.skip_batches, self.batch_size, self.shuffle_buffer = skip_batches, batch_size, shuffle_buffer

    def _one_pass(self, epoch: int, worker: int, workers: int) -> Iterator[dict]:
        """One pass over this reader's samples. The shards are dealt out by the stream's epoch, the same in
        every pass: a rank that runs out before the others reads its own shards again, not another rank's
        (a new deal per pass gave two ranks the same shard within one epoch and left others unread)."""
        urls = list(self.urls)
        if self.train:
            random.Random(f"{self.seed}/shards/{self.epoch}").shuffle(urls)
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        readers = world * workers
        if self.train and len(urls) >= readers:
            # Every rank gets whole shards of its own. Its loader workers share them evenly: whole shards as far
            # as they go round, and the rank's last few shards a batch's worth at a time (each worker reads them
            # and keeps its turns): the loader takes whole batches from its workers in turn. Dealt as whole
            # shards only, 3 shards over 2 workers gave one worker twice the other's samples, and in an epoch
            # the other read its shard again while a sixth of the images went unseen.
            whole, shared = rank_deal(urls, rank, world, workers)
            samples = itertools.chain(
                _read(whole[worker::workers], self.keep),
                _read(shared, self.keep, _turns(1, 0, workers, worker, self.batch_size)),
            )
        else:
            # Fewer shards than readers, or held-out samples: each reader reads all shards and takes its turns
            # of what fits (dealt before the word budget, a rank of a 2-rank validation got only positions where
            # nothing fitted, and crashed): a training batch's worth at a time, held-out samples one at a time
            # (the ranks' validation batches are counted so, `_batches_per_eval_reader`).
            run = self.batch_size if self.train else 1
            samples = _read(urls, self.keep, _turns(world, rank, workers, worker, run))
        if self.train:
            rng = random.Random(f"{self.seed}/samples/{epoch}/{worker}")
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        return samples

    def _samples(self, worker: int, workers: int) -> Iterator[dict]:
        """This reader's kept samples, pass after pass when the stream repeats."""
        epoch = self.epoch
        while True:
            count = 0
            for sample in self._one_pass(epoch, worker, workers):
                count += 1
                yield sample
            if not self.repeat:
                return
            if count == 0:  # an endless stream of empty passes would spin forever
                raise RuntimeError(
                    f"no sample of {len(self.urls)} shard(s) that fits the word budget reached this reader (a rank "
                    "reads whole shards of its own, shared by its loader workers: the budget left this one none); "
                    "build more, smaller shards (shard_size) or raise the stage's max_words"
                )
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        """Kept samples, less the first `skip_batches` batches of this epoch (trained on before a resume).

        The loader takes batches from its workers in turn, worker 0 first, also after a resume: worker w made
        batches w, w + W, ... of the epoch. Resumed after `skip` batches, loader worker w takes over the
        stream of the worker that made batch skip + w, less that worker's batches already trained on, so the
        resumed run sees the uninterrupted run's batches in its order."""
        info = torch.utils.data.get_worker_info()
        workers, index = (info.num_workers, info.id) if info else (1, 0)
        worker = (index + self.skip_batches) % workers
        done = -(-(self.skip_batches - worker) // workers) if self.skip_batches > worker else 0
        return itertools.islice(self._samples(worker, workers), done * self.batch_size, None)


class CaptionDataModule(L.LightningDataModule):
    """Caption batches from `shard_dir`, each image with the longest caption of at most `max_words` words.

    Call `connect(tokenizer, image_processor, num_image_tokens, prompt[, chat_template])` before use: those are known
    only once the models are loaded.
    """

    def __init__(
        self, shard_dir: str | Path, max_words: int, batch_size: int = 32, num_workers: int = 0, seed: int = 0
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        self.shard_dir, self.max_words = Path(shard_dir), max_words
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self._resumed_epoch: int | None = None  # the epoch a resumed fit started in (`_batches_done_this_epoch`)
        self._warned_readers = False  # fewer training shards than readers: said once, not every epoch
        self.index = read_index(self.shard_dir)
        self.format: PromptFormat | None = None
        self.processor = None

    def connect(
        self, tokenizer, image_processor, num_image_tokens: int, prompt: str, chat_template: bool = False
    ) -> None:
        self.format = PromptFormat(tokenizer, num_image_tokens, prompt, chat_template)
        self.processor = image_processor

    def budget_report(self, split: str = "train") -> dict[str, int]:
        """How many images of `split` this stage's word budget keeps and skips."""
        kept, skipped = budget_counts(self.index, split, self.max_words)
        return {"kept": kept, "skipped": skipped, "max_words": self.max_words}

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images, return_tensors="pt")["pixel_values"]

    def _collate(self, samples: list[dict]) -> dict:
        keys, images, sequences = [], [], []
        for sample in samples:
            key, image, meta = _decode(sample)
            text = select_caption(meta["captions"], self.max_words, meta.get("caption_words"))
            keys.append(key)
            images.append(image)
            sequences.append(self.format.encode(text))
        return collate_captions(keys, self.pixels(images), sequences, self.format.tokenizer.pad_token_id)

    def _fits(self, sample: dict) -> bool:
        meta = _meta(sample)
        return select_caption(meta["captions"], self.max_words, meta.get("caption_words")) is not None

    def _loader(self, split: str, train: bool) -> wds.WebLoader | list:
        if self.format is None:
            raise RuntimeError("CaptionDataModule.connect(...) must be called before its dataloaders are used")
        if train and self.trainer is None:  # built for one epoch of a fit: its epoch, ranks, accumulation, resume
            raise RuntimeError(
                "CaptionDataModule: pass it to trainer.fit(datamodule=...): its training loader is built by the "
                "Trainer each epoch (passed as train_dataloaders, every epoch repeated the first's order, and the "
                "loss ignored the accumulation)"
            )
        urls = shard_urls(self.shard_dir, self.index, split)
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        fits = shard_fits(self.index, split, self.max_words)
        padded = []
        if train:
            urls, batches = self._training_plan(urls, fits, world, accumulate)
        elif world > 1:
            per_reader = self._batches_per_eval_reader(split, sum(fits), world)
            if per_reader is None:
                return []
            batches = per_reader * max(self.num_workers, 1)
            padded = [functools.partial(pad_batches, count=per_reader)]
        skip = self._batches_done_this_epoch() if train else 0
        stream = wds.DataPipeline(
            # repeat: a training rank with fewer samples than the others reads its own again rather than stop early
            ShardStream(urls, self.seed, epoch, train, self._fits, skip, self.batch_size, repeat=train),
            wds.batched(self.batch_size, collation_fn=self._collate, partial=not train),
            *padded,
        )
        # A generator of its own: each new iterator draws its workers' base seed from the loader's generator, by
        # default torch's global one, which LoRA dropout also draws from. Validation and each epoch's new loader
        # then shifted the dropout's stream, and a resume (the global state restored from before the draw)
        # trained on other dropout masks than an unbroken run. The shards' order has its own seed (ShardStream).
        generator = torch.Generator().manual_seed(self.seed)
        loader = wds.WebLoader(stream, batch_size=None, num_workers=self.num_workers, generator=generator)
        if train:  # in this process, after the workers' batches are put in order
            loader = loader.compose(functools.partial(tag_step_tokens, accumulate=accumulate, start=skip))
        if train or world > 1:
            # with_epoch makes every rank stop after the same number of batches (unequal counts hang DDP);
            # with_length gives Lightning the epoch length for its schedulers and progress bar.
            with warnings.catch_warnings():  # "with_length only sets __len__": that is all it is for here
                warnings.simplefilter("ignore", UserWarning)
                loader = loader.with_epoch(batches).with_length(batches)
        return loader

    def _training_plan(self, urls: list[str], fits: list[int], world: int, accumulate: int) -> tuple[list[str], int]:
        """The training shards to read and each rank's batches in an epoch."""
        # Only shards with a caption that fits: a rank or loader worker dealt only shards without one had
        # nothing to train on and stopped while the others waited for it (a data set grouped by source,
        # its long detailed captions in shards of their own, under a short budget).
        urls = [url for url, count in zip(urls, fits, strict=True) if count]
        kept = sum(fits)
        batches = epoch_batches(kept, self.batch_size, world, accumulate)
        if batches == 0:
            raise ShardError(
                f"{self.shard_dir}: only {kept} training images fit max_words={self.max_words}, fewer than one "
                f"optimizer step ({accumulate} batch(es) of {self.batch_size}) per device"
            )
        self._check_reloaded(batches)
        self._check_limit(batches)
        workers = max(self.num_workers, 1)
        readers = world * workers
        reads = shard_reads(len(urls), world, workers)
        if reads >= 1.1 * len(urls) and not self._warned_readers:
            self._warned_readers = True
            log.warning(
                "%s: %d training shards for %d readers (%d rank(s) x %d loader worker(s)): readers that share a "
                "shard each read it whole and keep their turns of its samples, so an epoch reads %d shards; "
                "with a multiple of %d shards (a smaller shard_size) each is read once",
                self.shard_dir, len(urls), readers, world, workers, reads, readers,
            )  # fmt: skip
        return urls, batches

    def _batches_per_eval_reader(self, split: str, kept: int, world: int) -> int | None:
        """Under several ranks, the batches each reader of `split` gives (None: too few samples for its readers).
        Every sample once, and every rank as many batches (under ZeRO-3 each forward pass needs them all): each
        reader pads its share with batches that score nothing up to the largest share's batches."""
        readers = world * max(self.num_workers, 1)
        if kept < readers:  # a reader with no sample that fits would have none to give its batches
            if kept:
                log.warning("%s: %d %s samples fit max_words=%d, fewer than its %d readers: no validation loss",
                            self.shard_dir, kept, split, self.max_words, readers)  # fmt: skip
            return None
        largest_share = -(-kept // readers)
        return -(-largest_share // self.batch_size)

    @staticmethod
    def _limited(trainer, batches: int) -> int:
        """An epoch's batches after Lightning's `limit_train_batches` (a count, or a share)."""
        limit = trainer.limit_train_batches
        return min(batches, limit) if isinstance(limit, int) else max(1, int(batches * limit))

    @staticmethod
    def _steps_per_epoch(trainer, batches: int) -> int:
        """Optimizer steps in an epoch of `batches` (before `limit_train_batches`), as Lightning counts them."""
        batches = CaptionDataModule._limited(trainer, batches)
        return -(-batches // trainer.accumulate_grad_batches)  # Lightning steps on a short last window

    def optimizer_steps(self, trainer) -> int:
        """The optimizer steps of a fit with at most `trainer.max_epochs` epochs (for the learning-rate schedule),
        counted from the index as the loader counts an epoch. Lightning's `estimated_stepping_batches` built the
        train loader to count them, before a checkpoint was restored, and kept that loader for the resumed
        epoch: it started from the epoch's first batch and trained again on those done before the kill."""
        kept, _ = budget_counts(self.index, "train", self.max_words)
        batches = epoch_batches(kept, self.batch_size, trainer.world_size, trainer.accumulate_grad_batches)
        steps = self._steps_per_epoch(trainer, batches) * max(trainer.max_epochs, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps

    def _check_limit(self, batches: int) -> None:
        """Refuses a `limit_train_batches` that cuts an epoch inside an optimizer step: the short step's loss was
        logged into the next epoch's first, and its token weights counted a batch it never trained on."""
        limit, accumulate = self.trainer.limit_train_batches, self.trainer.accumulate_grad_batches
        limited = self._limited(self.trainer, batches)
        if limited < batches and limited % accumulate:
            raise ValueError(
                f"CaptionDataModule: limit_train_batches {limit} leaves {limited} of an epoch's {batches} batches, "
                f"not whole optimizer steps of accumulate_grad_batches={accumulate} batches"
            )

    def _check_reloaded(self, batches: int) -> None:
        """The loader reads the epoch (its shuffle seed) and the resume position when it is built: a Trainer
        that keeps it for more than one epoch would repeat the first epoch's order. Refused, unless the fit
        cannot reach a second epoch (`batches`: this epoch's, before `limit_train_batches`)."""
        trainer = self.trainer
        if trainer is None or trainer.reload_dataloaders_every_n_epochs == 1:
            return
        steps_per_epoch = self._steps_per_epoch(trainer, batches)
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else float("inf")
        if trainer.max_steps not in (None, -1):
            epochs = min(epochs, -(-trainer.max_steps // steps_per_epoch))
        if epochs > 1:
            raise ValueError(
                "CaptionDataModule: build the Trainer with reload_dataloaders_every_n_epochs=1 (stages.run does): "
                f"its loader is built for one epoch, and with {trainer.reload_dataloaders_every_n_epochs} every "
                "later epoch would repeat the first one's order"
            )

    def _batches_done_this_epoch(self) -> int:
        """Batches of the current epoch already trained on, when Lightning resumes from a mid-epoch checkpoint.

        A checkpoint written in `on_train_batch_end` has that batch processed but not yet completed;
        Lightning counts it as completed on restart (`_TrainingEpochLoop.reset`), so `processed` is
        the number to skip. Skipping them makes a resumed run see exactly the batches it would have.
        Only in the epoch the checkpoint was written in: from a checkpoint on an epoch's last batch,
        Lightning asks for the next epoch's loader while still `restarting`, with the finished epoch's
        count, and that epoch must start from its first batch.
        """
        if self.trainer is None or not self.trainer.fit_loop.restarting:
            self._resumed_epoch = None
            return 0
        epoch = self.trainer.current_epoch
        if self._resumed_epoch is None:
            self._resumed_epoch = epoch
        if epoch != self._resumed_epoch:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> wds.WebLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> wds.WebLoader | list:
        if not self.index["splits"]["val"]:  # a small data set may have no val samples: no validation loss
            log.warning("%s has no val samples: no validation loss", self.shard_dir)
            return []
        return self._loader("val", train=False)

    def eval_samples(self, split: str = "test", limit: int | None = None) -> list[tuple[str, EncodedImage, dict]]:
        """(key, image, metadata) of a held-out split, in shard order, for evaluation: one per image (`limit`
        counts images), the captions of every record of it as references (`merged_references`); the images stay
        encoded until a batch is captioned (`as_image`), and each is checked to decode now."""
        if split not in self.index["splits"]:
            raise ValueError(f"split {split!r}: {self.shard_dir} has the splits {', '.join(self.index['splits'])}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1 image, got {limit}")
        urls = shard_urls(self.shard_dir, self.index, split)
        samples: dict = {}  # by image: its first record's (key, image, metadata)
        if not urls:
            return []
        for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
            meta = _meta(sample)
            image = meta.get("image", sample["__key__"])
            if image in samples:  # another record of an image (COCO: 5 captions, 5 records): its references too
                samples[image] = (*samples[image][:2], merged_references(samples[image][2], meta))
                continue
            if limit is not None and len(samples) >= limit:  # the data stage writes an image's records together
                break
            data = _image_bytes(sample)
            open_rgb(data)  # decoded once, so that a bad image fails here, not mid-training
            samples[image] = (sample["__key__"], EncodedImage(data), meta)
        return list(samples.values())
