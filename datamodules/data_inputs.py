"""Reading raw samples for the data stage, in Data-Juicer's multimodal format.

Every input becomes rows of `{"__key__", "text": "<__dj__image> <raw caption>", "images": [path],
"meta_json", "split"}`. Three formats:

- `synthetic`: the synthetic world's scenes, rendered to PNG files, with their noisy raw caption
  and their ground truth in `meta_json` (the oracle captioner reads it);
- `llava`: a LLaVA-style JSON list of {"id", "image", "conversations": [{"from", "value"}, ...]};
  the raw caption is the first answer;
- `dj_jsonl`: Data-Juicer jsonl, one {"text", "images", ...} object a line.

A `llava` or `dj_jsonl` record may carry `"objects": ["dog", "frisbee"]`, the classes annotated in its
image (COCO-style): they travel into the shards, and evaluation scores CHAIR and recall against them.

Relative image paths resolve against the input file's folder (or `image_root`). A sample that
cannot be used (unreadable line, no image, missing or corrupt image file) is skipped and counted
by reason, with its key; nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from datamodules.world import WorldConfig, make_scene, png_bytes, render

DJ_IMAGE_TOKEN = "<__dj__image>"
DJ_CHUNK_END = "<|__dj__eoc|>"


def strip_dj_tokens(text: str) -> str:
    """`text` without Data-Juicer's image and chunk-end tokens, whitespace collapsed."""
    for token in (DJ_IMAGE_TOKEN, DJ_CHUNK_END):
        text = text.replace(token, " ")
    return " ".join(text.split())


SPLIT_SIZES = ("train_size", "val_size", "test_size")


@dataclass
class SkipLog:
    """Samples skipped before processing, by reason, with the first few keys of each reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    keep_examples: int = 5

    def skip(self, reason: str, key: str) -> None:
        self.counts[reason] += 1
        keys = self.examples.setdefault(reason, [])
        if len(keys) < self.keep_examples:
            keys.append(key)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def image_problem(path: Path) -> str | None:
    """None if `path` is a readable image, else the reason it is not."""
    if not path.is_file():
        return "missing_image"
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "corrupt_image"
    return None


def _row(key: str, raw: str, image: Path, meta: dict | None = None, split: str | None = None) -> dict:
    text = f"{DJ_IMAGE_TOKEN} {raw}".strip()
    return {"__key__": key, "text": text, "images": [str(image)], "meta_json": json.dumps(meta or {}), "split": split}


def read_synthetic(world: WorldConfig, seed: int, image_dir: Path) -> Iterator[dict]:
    """The synthetic world's scenes as raw samples; the images are written to `image_dir`."""
    image_dir.mkdir(parents=True, exist_ok=True)
    for split, size_field in zip(("train", "val", "test"), SPLIT_SIZES, strict=True):
        for index in range(getattr(world, size_field)):
            scene = make_scene(world, seed, split, index)
            path = image_dir / f"{scene.key}.png"
            path.write_bytes(png_bytes(render(scene, world.image_size, seed, world)))
            meta = {k: v for k, v in scene.metadata().items() if k in ("key", "background", "objects", "questions")}
            yield _row(scene.key, scene.raw_caption, path, meta, split)


def _checked(key: str, image: str | None, base: Path, skips: SkipLog) -> Path | None:
    if not image:
        skips.skip("no_image", key)
        return None
    path = Path(image) if Path(image).is_absolute() else base / image
    problem = image_problem(path)
    if problem:
        skips.skip(problem, key)
        return None
    return path


def _annotations(record: dict, key: str, skips: SkipLog) -> dict | None:
    """The record's object classes as metadata ({} without any); None (skipped, counted) when malformed."""
    if "objects" not in record:
        return {}
    objects = record["objects"]
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        skips.skip("bad_objects", key)
        return None
    return {"objects": objects}


def read_llava_json(path: Path, skips: SkipLog, image_root: Path | None = None) -> Iterator[dict]:
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON list of LLaVA records ({error})") from error
    base = image_root or path.parent
    for number, record in enumerate(records):
        key = str(record.get("id", f"{path.stem}-{number}"))
        answers = [turn["value"] for turn in record.get("conversations", []) if turn.get("from") == "gpt"]
        if not answers:
            skips.skip("no_caption", key)
            continue
        meta = _annotations(record, key, skips)
        image = None if meta is None else _checked(key, record.get("image"), base, skips)
        if image is not None:
            yield _row(key, answers[0].replace("<image>", "").strip(), image, meta)


def read_dj_jsonl(path: Path, skips: SkipLog, image_root: Path | None = None) -> Iterator[dict]:
    base = image_root or path.parent
    with path.open() as lines:
        for number, line in enumerate(lines):
            key = f"{path.stem}-{number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skips.skip("unreadable_line", key)
                continue
            key = str(record.get("__key__") or record.get("id") or key)
            images = record.get("images") or []
            meta = _annotations(record, key, skips)
            image = None if meta is None else _checked(key, images[0] if images else None, base, skips)
            if image is not None:
                yield _row(key, strip_dj_tokens(record.get("text", "")), image, meta)
