"""The data stage: a Data-Juicer recipe from raw samples to WebDataset shards, with a data report.

    raw samples (synthetic | llava | dj_jsonl)  ->  Data-Juicer ops, one at a time (recaption, filters)
      ->  shards (train/val/test: the split a record names, else a stable hash of the sample's image, so
          that every caption of one image lands in one split) + index.json  ->  report.json / report.md

`image_files.json` lists every image file the input named, with its size and modification time when the stage
read it, so that a curriculum can tell when one changed.

Ops run one at a time (`stages/recipe_ops.py`) so that the report can say how many samples each one took in and
let out; filters write the stats of every sample they judged to `stats/<op>.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datamodules.data_inputs import (
    SkipLog,
    read_dj_jsonl,
    read_llava_json,
    read_synthetic,
    strip_dj_tokens,
    unique_keys,
)
from datamodules.images import shard_image
from datamodules.shards import INDEX_NAME, SPLITS, write_shards
from datamodules.text_stats import caption_words, corpus_stats, longest_caption, tokens, word_count
from datamodules.world import WorldConfig
from stages.paths import check_own_folder, folder_lock, make_folder, sync_tree, write_text_atomic
from stages.recipe_ops import check_process, run_ops, setup_ops

log = logging.getLogger(__name__)
FORMATS = ("synthetic", "llava", "dj_jsonl")
IMAGE_FILES_NAME = "image_files.json"
# Marks a shard folder as this stage's while a build is under way (a killed build leaves it): with index.json,
# what `check_own_folder` looks for before a build deletes an earlier one's files.
BUILDING_NAME = ".building"
# What a build writes in its folder besides the shards (and what `clear_build` removes of an earlier one).
BUILD_FILES = ("stats", "work", "report.json", "report.md", IMAGE_FILES_NAME)


@dataclass
class InputSpec:
    format: str = "synthetic"
    """synthetic | llava | dj_jsonl."""
    path: str | None = None
    """The input file (not used by synthetic)."""
    image_root: str | None = None
    """Folder that relative image paths resolve against; default: the input file's folder."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"input.format must be one of {FORMATS}, got {self.format!r}")
        if self.format != "synthetic" and not self.path:
            raise ValueError(f"input.path: the {self.format} format needs an input file")


@dataclass
class RecipeConfig:
    """A data recipe: where raw samples come from, the Data-Juicer ops, and how shards are cut."""

    input: InputSpec = field(default_factory=InputSpec)
    process: list[dict] = field(default_factory=list)
    """Data-Juicer ops in order, as in a Data-Juicer recipe: [{op_name: {arg: value}}, ...]."""
    val_share: float = 0.0125
    test_share: float = 0.0125
    """Samples without a split of their own go to val / test by a stable hash of their image (`split_key`)."""
    shard_size: int = 5000
    max_skip_share: float = 0.05
    """Fail when more than this share of the input samples is unusable (missing image, ...)."""
    report_examples: int = 5

    def __post_init__(self) -> None:
        if self.val_share < 0 or self.test_share < 0 or self.val_share + self.test_share >= 1:
            raise ValueError(
                f"val_share and test_share must not be negative, and their sum below 1; got {self.val_share}, "
                f"{self.test_share}"
            )
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1 sample, got {self.shard_size}")
        if not 0 <= self.max_skip_share <= 1 or self.report_examples < 0:
            raise ValueError(
                f"max_skip_share must be in [0, 1] and report_examples not negative; got {self.max_skip_share}, "
                f"{self.report_examples}"
            )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """A recipe from YAML (and dotted overrides), checked against RecipeConfig: unknown keys fail."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(RecipeConfig, fail_untyped=True, sub_configs=True)
    namespace = parser.parse_args(["--config", str(path), *(overrides or [])])
    values = parser.instantiate(namespace)
    return RecipeConfig(**{k: v for k, v in vars(values).items() if k != "config" and not k.startswith("__")})


def split_of(key: str, val_share: float, test_share: float) -> str:
    """A stable split from the key alone: the same key lands in the same split on every run."""
    position = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 16**8
    return "test" if position < test_share else "val" if position < test_share + val_share else "train"


def named_splits(rows: list[dict], skips: SkipLog) -> tuple[list[dict], dict[str, str]]:
    """The split each image's records name ({split key: split}), from every record before any op runs: a
    record whose caption a filter drops still puts its image's other records in its split (else an image
    named `test` could train through a record that names none). The records of an image named in two
    splits are skipped and counted (`split_conflict`): whichever won, one split would hold the other's image."""
    named: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row.get("split"):
            named[row["split_key"]].add(row["split"])
    conflicts = {key for key, splits in named.items() if len(splits) > 1}
    kept = []
    for row in rows:
        if row["split_key"] in conflicts:
            skips.skip("split_conflict", row["__key__"])
        else:
            kept.append(row)
    return kept, {key: next(iter(splits)) for key, splits in named.items() if key not in conflicts}


def _raw_rows(recipe: RecipeConfig, world: WorldConfig, seed: int, work_dir: Path, skips: SkipLog) -> list[dict]:
    spec = recipe.input
    root = Path(spec.image_root) if spec.image_root else None
    if spec.format == "synthetic":
        return list(read_synthetic(world, seed, work_dir / "images"))
    path = Path(spec.path)  # checked by `_build`
    reader = read_llava_json if spec.format == "llava" else read_dj_jsonl
    return unique_keys(list(reader(path, skips, root)), skips)


def check_captions(rows: list[dict]) -> None:
    """Fails when an op after a caption op changed `text`: the shards take their captions from
    `caption_variants`, which it did not change, while the filters and the report saw the changed text."""
    for row in rows:
        if row.get("caption_variants"):
            variants = json.loads(row["caption_variants"]).values()
            if strip_dj_tokens(row["text"]) not in {strip_dj_tokens(text) for text in variants}:
                raise ValueError(
                    f"recipe process: an op after the caption op changed the text of sample {row['__key__']} "
                    f"({row['text'][:60]!r}), and the shards would keep the unchanged caption variants; run text "
                    "mappers before the caption op"
                )


def distinct_keys(rows: list[dict]) -> int:
    """Gives every sample a key of its own; returns how many were renamed. An op may turn one sample into
    several that share its key (Data-Juicer's image_captioning_mapper keeps the original beside its
    `caption_num` new ones), and a shard cannot hold a key twice: the later ones become key_1, key_2, ..."""
    taken = {row["__key__"] for row in rows}
    seen, renamed = set(), 0
    for row in rows:
        key = row["__key__"]
        if key in seen:
            number = 1
            while f"{key}_{number}" in taken:
                number += 1
            row["__key__"] = f"{key}_{number}"
            taken.add(row["__key__"])
            renamed += 1
        seen.add(row["__key__"])
    if renamed:
        log.info("data: %d samples made by ops from another sample got a key of their own (key_1, ...)", renamed)
    return renamed


def caption_variants(row: dict) -> dict[str, str]:
    """The sample's captions by name: the project's ops write `caption_variants`; any other op (Data-Juicer's
    stock image_captioning_mapper, or none) leaves its caption in `text`, between Data-Juicer's special tokens.
    A variant without a word (a generation that produced nothing, or emoji or punctuation alone) is left out:
    an empty one would fit every word budget and train the model to stop at once, and one of symbols alone counts
    a word for the budgets, so a stage trained on it, and is no reference a text metric can score."""
    if row.get("caption_variants"):
        variants = json.loads(row["caption_variants"]).items()
    else:
        variants = [("caption", strip_dj_tokens(row["text"]))]
    return {name: text for name, text in variants if caption_words(text)}


def _shard_sample(row: dict) -> dict:
    """A shard sample: the original image bytes and the caption variants with their word counts."""
    extension, image_bytes = shard_image(Path(row["images"][0]))
    variants = caption_variants(row)
    meta = json.loads(row["meta_json"])
    record = {
        "key": row["__key__"],
        "captions": variants,
        "caption_words": {name: word_count(text) for name, text in variants.items()},
        "raw_caption": row["raw_caption"],
        **{k: meta[k] for k in ("objects", "background", "questions", "id") if k in meta},
    }
    if row.get("split_key", row["__key__"]) != row["__key__"]:  # the image, which other records may share
        record["image"] = row["split_key"]
    return {"__key__": row["__key__"], extension: image_bytes, "json": json.dumps(record, sort_keys=True)}


def _shard_files(out_dir: Path) -> list[Path]:
    """The `<split>-NNNNNN.tar` files in `out_dir`, the shards a build writes (and `clear_build` removes)."""
    return [path for split in SPLITS for path in out_dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")]


def clear_build(out_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """Removes what an earlier build wrote to `out_dir`, its index first.

    The index is what marks a shard folder as built: a rebuild killed half-way left the old index over
    new shards, which trained as if whole (the index's counts and word counts no longer matching the
    tars), and a smaller build left the old build's extra shards beside its own (read by a `train-*.tar`
    pattern). Only this stage's own files go: `<split>-NNNNNN.tar`, stats/, work/ and the reports (not those in
    `keep`)."""
    (out_dir / INDEX_NAME).unlink(missing_ok=True)
    for shard in _shard_files(out_dir):
        shard.unlink()
    for name in BUILD_FILES:
        if name in keep:
            continue
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name, ignore_errors=True)
        else:
            (out_dir / name).unlink(missing_ok=True)


def run_data_stage(
    recipe: RecipeConfig,
    out_dir: Path,
    world: WorldConfig | None = None,
    seed: int = 0,
    in_run: bool = False,
    captionless_ok: bool = False,
) -> dict:
    """Runs the recipe into `out_dir` (shards, report.json, report.md, and index.json last, when the build is
    whole); returns the report. `in_run`: `out_dir` is a curriculum's own data/, whose lock the caller holds,
    in a run folder it has checked (where a build killed by an older version left work/ without a mark).
    `captionless_ok`: a build whose captions all lack a word is written, not refused (the BLIP-2 bench times a
    random-weight stock op, whose captions are "? ? ?")."""
    check_process(recipe.process)  # before the earlier build is removed: a bad recipe leaves it as it was
    make_folder(out_dir, "--run_dir" if in_run else "--out_dir")
    # No other build or reader meanwhile (in a run, the caller holds the lock).
    with nullcontext() if in_run else folder_lock(out_dir, "the shard folder", purpose="a data build"):
        if not in_run:
            shards = [path.name for path in _shard_files(out_dir)]
            check_own_folder(out_dir, "--out_dir", (INDEX_NAME, BUILDING_NAME), [*BUILD_FILES, *shards])
        try:
            return _build(recipe, out_dir, world, seed, captionless_ok)
        except BaseException:
            _drop_work(out_dir / "work")
            raise


def _drop_work(work: Path) -> None:
    """After a failed build: its copies of images go (1.6 MB for 384 images of 64 px), its ops' stats stay to
    read (work/stats)."""
    if work.is_dir():
        for child in work.iterdir():
            if child.name == "stats":
                continue
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        if not any(work.iterdir()):
            work.rmdir()


def _build(recipe: RecipeConfig, out_dir: Path, world: WorldConfig | None, seed: int, captionless_ok: bool) -> dict:
    if recipe.input.format != "synthetic" and not Path(recipe.input.path or "").is_file():
        # before the earlier build goes: a mistyped path left the folder without its shards
        raise FileNotFoundError(f"input.path: {recipe.input.path} does not exist")
    ops = setup_ops(recipe.process)  # before the earlier build goes too: an op that cannot set up leaves it
    (out_dir / BUILDING_NAME).touch()  # the folder is a build's; gone when index.json marks the build whole
    work = out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)  # a killed build's
    skips = SkipLog()
    rows = _raw_rows(recipe, world or WorldConfig(), seed, work, skips)
    rows, named = named_splits(rows, skips)
    total = len(rows) + skips.total
    if total == 0:
        raise ValueError(f"input {recipe.input.path or recipe.input.format}: no samples")
    if skips.total / total > recipe.max_skip_share:
        raise ValueError(
            f"input {recipe.input.path}: {skips.total} of {total} samples are unusable ({dict(skips.counts)}; "
            f"first keys {skips.examples}), more than max_skip_share={recipe.max_skip_share}"
        )
    for row in rows:
        row["raw_caption"] = strip_dj_tokens(row["text"])
    kept, accounting = run_ops(rows, ops, work / "stats", work / "produced", seed)
    if not kept:  # an index of empty splits failed later, blaming the evaluated split's share
        drops = ", ".join(f"{op['op']} dropped {op['dropped']}" for op in accounting if op["dropped"])
        raise ValueError(f"recipe process: its ops kept none of {len(rows)} samples ({drops}; stats in {work})")
    check_captions(kept)
    renamed = distinct_keys(kept)
    kept, empty, wordless = _with_words(kept)
    if not kept and not captionless_ok:  # an empty index, which failed later naming a split's share
        raise ValueError(
            f"recipe process: its ops kept {empty.total} of {len(rows)} samples, and none has a word in a caption "
            f"(empty_caption; first keys {empty.examples.get('empty_caption')})"
        )
    # Only now, the ops done, the earlier build goes: an op that failed at its first use (a package it imports
    # then), or ops that kept nothing, left the folder without its shards.
    clear_build(out_dir, keep=("work",))
    (work / "stats").rename(out_dir / "stats")
    index = _write_shards(recipe, kept, named, out_dir)
    (out_dir / IMAGE_FILES_NAME).write_text(json.dumps(dict(sorted(skips.image_files.items()))))
    shutil.rmtree(work, ignore_errors=True)  # the images now live in the shards
    report = build_report(recipe, rows, kept, accounting, skips, total, empty, renamed, wordless)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(report_markdown(report), encoding="utf-8")
    for split in SPLITS:  # on the disk before the index vouches for them
        for shard in index["splits"][split]:
            sync_tree(out_dir / shard["url"])
    write_text_atomic(out_dir / INDEX_NAME, json.dumps(index))  # last: the build is whole
    (out_dir / BUILDING_NAME).unlink()
    return report


def _with_words(kept: list[dict]) -> tuple[list[dict], SkipLog, SkipLog]:
    """The samples with a word in some caption variant; those without, counted as `empty_caption`: a caption
    op can leave a sample with nothing to train on (an empty generation), and a record's caption can hold no word
    (emoji or punctuation alone), which no text metric can score; and, by variant name, the variants without a
    word that the written samples leave out (they keep their other variants)."""
    empty, variants, written = SkipLog(), SkipLog(), []
    for row in kept:
        if named := caption_variants(row):
            written.append(row)
            for name in sorted(set(json.loads(row.get("caption_variants") or "{}")) - set(named)):
                variants.skip(name, row["__key__"])
        else:
            empty.skip("empty_caption", row["__key__"])
    return written, empty, variants


def _write_shards(recipe: RecipeConfig, kept: list[dict], named: dict[str, str], out_dir: Path) -> dict:
    """The shards of every split, and the index that lists them (not written yet)."""
    # A split a record names holds for every record of its image, filtered out or not (`named_splits`); the
    # others follow a hash of the image.
    # Within a split, the records of one image lie next to each other (in the order their images first come), so
    # that evaluation, which takes an image with every record of it, can stop reading at its limit.
    by_split: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for row in kept:
        key = row.get("split_key") or row["__key__"]
        split = row.get("split") or named.get(key) or split_of(key, recipe.val_share, recipe.test_share)
        by_split[split].setdefault(key, []).append(row)
    index = {"source": recipe.input.format, "splits": {}}
    # Every class annotated anywhere (real data's `objects` lists): CHAIR's table, where no synonyms are given.
    classes = {o for row in kept for o in json.loads(row["meta_json"]).get("objects") or [] if isinstance(o, str)}
    if classes:
        index["object_classes"] = sorted(classes)
    for split in SPLITS:
        # Each image read as its shard is written: read all first, 1M images of 100 KB held 100 GB at once.
        rows = [row for image in by_split[split].values() for row in image]
        index["splits"][split] = write_shards(map(_shard_sample, rows), out_dir, split, recipe.shard_size)
    return index


def build_report(
    recipe, rows, kept, accounting, skips: SkipLog, total: int, empty: SkipLog, renamed: int = 0, wordless=None
) -> dict:
    wordless = wordless or SkipLog()
    raw = [r["raw_caption"] for r in rows]
    kept_variants = [caption_variants(r) for r in kept]
    new = [longest_caption(v.values()) for v in kept_variants]  # what the shards hold, not a wordless variant
    examples = [
        {"key": r["__key__"], "raw": r["raw_caption"], "captions": v}
        for r, v in zip(kept[: recipe.report_examples], kept_variants, strict=False)
    ]
    # Each caption variant on its own (short, detailed, ...): the early stages' word budgets pick the short ones,
    # which the recaptioned row (each sample's `text`, the longest variant) does not show.
    by_variant: dict[str, list[str]] = defaultdict(list)
    for variants_of_row in kept_variants:
        for name, text in variants_of_row.items():
            by_variant[name].append(text)
    several = len(by_variant) > 1  # one variant is the recaptioned row
    # TTR falls as a text grows, so it compares corpora cut to one token count: the raw and recaptioned texts at the
    # shorter's, the variants at their shortest's (a short variant's was taken over its own 10 tokens beside the
    # others' 80, and read 1.0 against 0.2; one count for all let one sparse variant cut every row to 4 tokens).
    equal = min(sum(len(tokens(t)) for t in texts) for texts in (raw, new))
    variant_equal = min((sum(len(tokens(t)) for t in texts) for texts in by_variant.values()), default=0)
    variants = {f"variant {n}": corpus_stats(texts, variant_equal) for n, texts in by_variant.items() if several}
    return {
        "recipe": asdict(recipe),
        "samples": {
            "input": total,
            "skipped_at_input": skips.total,
            "processed": len(rows),
            "kept": len(kept),
            "renamed_keys": renamed,
        },  # fmt: skip
        "input_skips": {"counts": dict(skips.counts), "first_keys": skips.examples},
        "output_skips": {"counts": dict(empty.counts), "first_keys": empty.examples},
        "wordless_variants": {"counts": dict(wordless.counts), "first_keys": wordless.examples},
        "ops": accounting,
        "text": {
            "raw": corpus_stats(raw, equal),
            "recaptioned": corpus_stats(new, equal),
            **variants,
        },
        "examples": examples,
    }


def _ttr(stats: dict) -> str:
    """A corpus's TTR and the tokens it is taken over ("-" over none)."""
    if not stats.get("ttr_tokens"):
        return "-"
    return f"{stats['ttr_equal_tokens']:.3g} @ {stats['ttr_tokens']}"


def report_markdown(report: dict) -> str:
    s = report["samples"]
    lines = [
        "# Data report",
        "",
        f"{s['input']} input samples, {s['skipped_at_input']} unusable at input, {s['kept']} kept"
        + (
            f" ({s['renamed_keys']} made by an op from another sample, with a key of their own)."
            if s.get("renamed_keys")
            else "."
        ),
        "",
        "| op | in | out | dropped | args |",
        "|---|---|---|---|---|",
    ]
    for o in report["ops"]:  # an op may also make samples (one per caption, a text chunker)
        dropped = f"{o['dropped']}" + (f" (made {o['added']})" if o.get("added") else "")
        lines.append(f"| {o['op']} | {o['in']} | {o['out']} | {dropped} | `{json.dumps(o['args'])}` |")
    if report["input_skips"]["counts"]:
        lines += ["", "Unusable at input: " + ", ".join(f"{k} {v}" for k, v in report["input_skips"]["counts"].items())]
        lines += [f"- {reason}: {', '.join(keys)}" for reason, keys in report["input_skips"]["first_keys"].items()]
    dropped = report.get("output_skips", {}).get("counts", {})
    if dropped:
        lines += ["", "Dropped after the ops: " + ", ".join(f"{k} {v}" for k, v in dropped.items())]
        lines += [f"- {reason}: {', '.join(keys)}" for reason, keys in report["output_skips"]["first_keys"].items()]
    wordless = report.get("wordless_variants", {}).get("counts", {})
    if wordless:
        lines += ["", "Caption variants left out, without a word (their samples keep the others): "]
        lines[-1] += ", ".join(f"{k} {v}" for k, v in wordless.items())
        lines += [f"- {name}: {', '.join(keys)}" for name, keys in report["wordless_variants"]["first_keys"].items()]
    lines += ["", "| corpus | texts | mean words | p50 | p95 | vocabulary | MTLD | MATTR | TTR @ equal tokens |"]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for name, t in report["text"].items():
        if t.get("texts"):
            lines.append(
                f"| {name} | {t['texts']} | {t['mean_words']:.1f} | {t['p50_words']:.0f} | {t['p95_words']:.0f} | "
                f"{t['vocabulary']} | {t['mtld']:.1f} | {t['mattr']:.3f} | {_ttr(t)} |"
            )
    lines += ["", "Examples (raw -> recaptioned):", ""]
    for e in report["examples"]:  # the captions as written: CJK showed as \u4e00 escapes
        lines.append(f"- `{e['key']}`: {e['raw']!r} -> {json.dumps(e['captions'], ensure_ascii=False)}")
    return "\n".join(lines) + "\n"
