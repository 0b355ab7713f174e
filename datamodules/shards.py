"""Writing and indexing WebDataset shards.

A shard folder holds `<split>-NNNNNN.tar` files and `index.json`, which lists every shard with its
sample count and, per sample, the word counts of its caption variants. The index is what lets a
stage know how many batches an epoch has (WebDataset streams cannot tell) and how many images its
caption word budget skips, without opening a tar file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
INDEX_NAME = "index.json"


def write_shards(samples: Iterable[dict], out_dir: Path, split: str, shard_size: int) -> list[dict]:
    """Writes samples ({"__key__", "png", "json"}) as shards of `split`; returns their index entries.

    Tar members carry mtime 0 so that the same samples always give byte-identical shards.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    # No byte limit (WebDataset's default: 3 GB): a shard cut by its bytes went on in a file the index did not
    # list, and the samples in it were never trained on (5000 images of 600 KB make 3 GB).
    pattern = str(out_dir / f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, maxsize=float("inf"), verbose=0, mtime=0) as sink:
        for sample in samples:
            if not entries or entries[-1]["count"] >= shard_size:
                entries.append({"url": f"{split}-{len(entries):06d}.tar", "count": 0, "caption_words": []})
            sink.write(sample)
            entries[-1]["count"] += 1
            entries[-1]["caption_words"].append(json.loads(sample["json"])["caption_words"])
    if not entries:  # the writer opens its first file before any sample: an empty split left a tar no index lists
        Path(pattern % 0).unlink(missing_ok=True)
    return entries


class ShardError(ValueError):
    """Shards that cannot serve the configured run (the CLI reports it without a traceback)."""


def check_shards_serve(
    index: dict, shard_dir: Path, budgets: dict[str, tuple[int, int, int]], batch_size: int, eval_split: str
) -> None:
    """Fails before any training when a stage's word budget leaves less than one optimizer step of training
    images per rank (`budgets`: stage -> (max_words, ranks, accumulated batches per step)), or when the
    evaluated split is empty, naming the stage or split and the captions' lengths."""
    if not sum(shard["count"] for shard in index["splits"].get(eval_split, [])):
        raise ShardError(
            f"{shard_dir}: no {eval_split!r} samples to evaluate on (eval.split); give the recipe a larger "
            "val_share / test_share, or the input records their own split"
        )
    for stage, (max_words, ranks, accumulate) in budgets.items():
        kept, _ = budget_counts(index, "train", max_words)
        if kept < batch_size * ranks * accumulate:
            shortest = sorted(
                shortest_caption(words) or 0 for shard in index["splits"]["train"] for words in shard["caption_words"]
            )
            middle = shortest[len(shortest) // 2] if shortest else 0
            raise ShardError(
                f"stage {stage}: {kept} training images of {shard_dir} have a caption of at most max_words="
                f"{max_words} words, fewer than one optimizer step ({accumulate} batch(es) of {batch_size}) for "
                f"each of {ranks} rank(s) (their shortest captions: median {middle} words); raise "
                f"stages.{stage}.max_words, caption shorter variants, or lower data.batch_size"
            )


def read_index(shard_dir: Path) -> dict:
    """The shard folder's index, its shard names checked: each is a file of the folder as the data stage names
    them. WebDataset opens "pipe:<command>" by running the command in a shell, and a name such as that, or
    "../x.tar", in an index made elsewhere would run it, or read outside the folder."""
    path = Path(shard_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no shard index at {path}: build the shards first (the data step of the curriculum)")
    index = json.loads(path.read_text())
    for split, shards in index["splits"].items():
        for shard in shards:
            if not re.fullmatch(rf"{re.escape(split)}-[0-9]{{6}}\.tar", str(shard["url"])):
                raise ShardError(f"{path}: split {split} lists the shard {shard['url']!r}; they are {split}-NNNNNN.tar")
    return index


def shard_urls(shard_dir: Path, index: dict, split: str) -> list[str]:
    """The paths of a split's shards as WebDataset takes them: absolute, so that no folder name is read as a
    "pipe:" or URL scheme."""
    folder = Path(shard_dir).resolve()
    return [str(folder / shard["url"]) for shard in index["splits"][split]]


def index_digest(shard_dir: Path) -> str:
    """A content hash of the index: its shards, sample counts and caption word counts (not the captions or
    images themselves; `stages.curriculum.shards_digest` adds the files)."""
    return hashlib.sha256((Path(shard_dir) / INDEX_NAME).read_bytes()).hexdigest()[:16]


def shortest_caption(words: dict[str, int]) -> int | None:
    """Words of a sample's shortest non-empty caption variant (None: it has none), from the index's word
    counts: a sample fits a word budget when this does, as `captions.select_caption` picks at training time."""
    return min((w for w in words.values() if w > 0), default=None)


def budget_counts(index: dict, split: str, max_words: int) -> tuple[int, int]:
    """(samples with a caption of at most `max_words` words, samples with none) in `split`."""
    fits = sum(shard_fits(index, split, max_words))
    return fits, sum(len(shard["caption_words"]) for shard in index["splits"][split]) - fits


def epoch_batches(kept: int, batch_size: int, ranks: int, accumulate: int) -> int:
    """Training batches of an epoch on each rank, as the loader deals them: whole optimizer steps only.
    Lightning steps on an epoch's short last window, DeepSpeed's engine does not (it counts micro-batches across
    epochs): the two paths would update differently."""
    batches = kept // (batch_size * ranks)
    return batches - batches % accumulate


def shard_fits(index: dict, split: str, max_words: int) -> list[int]:
    """How many samples of each shard of `split` have a caption of at most `max_words` words."""
    counts = []
    for shard in index["splits"][split]:
        shortest = (shortest_caption(words) for words in shard["caption_words"])
        counts.append(sum(1 for n in shortest if n is not None and n <= max_words))
    return counts
