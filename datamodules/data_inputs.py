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

import errno
import hashlib
import json
import posixpath
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from datamodules.images import image_problem
from datamodules.shards import SPLITS
from datamodules.world import WorldConfig, make_scene, png_bytes, render

DJ_IMAGE_TOKEN = "<__dj__image>"
DJ_CHUNK_END = "<|__dj__eoc|>"


# The role markers of Data-Juicer's multi-turn text (its llava_to_dj conversion): "[[human]]: <image>\nDescribe
# the image. [[gpt]]: A dog ...". The caption is the first reply; the prompt and the image token are not.
DJ_GPT = "[[gpt]]:"


DJ_ROLE = re.compile(r"\[\[[^\[\]\s]+\]\]:")  # a conversation's role marker: [[human]]:, [[gpt]]:, [[user]]:
# llava_to_dj starts a conversation with its first role marker (after the image token): "[[WARNING]]:" inside a
# caption is the caption's own text.
DJ_CONVERSATION = re.compile(rf"\s*(?:{re.escape(DJ_IMAGE_TOKEN)}\s*)?{DJ_ROLE.pattern}")


def dj_caption(text: str) -> str | None:
    """The caption of a Data-Juicer text: the text itself, or the first reply of a conversation in its role
    markers (the prompt and <image> had stayed in the caption the model trained on), up to the next marker of
    any role; None for a conversation with no `[[gpt]]:` reply (roles of other names: the whole prompt was taken
    for the caption). LLaVA's `<image>` is dropped: Data-Juicer's `llava_to_dj --only_keep_caption` writes
    "<image>\\n<caption>" (it was a word of every caption and reference), and of several such captions in one
    record the first is taken, as of a conversation's replies."""
    if DJ_CONVERSATION.match(text):  # "[[gpt]]:" inside a plain caption is its text, as any marker there is
        if DJ_GPT not in text:
            return None
        text = DJ_ROLE.split(text.split(DJ_GPT, 1)[1], maxsplit=1)[0]
    text = strip_dj_tokens(text)
    return " ".join(next((part.split() for part in text.split("<image>") if part.strip()), []))


def strip_dj_tokens(text: str) -> str:
    """`text` without Data-Juicer's image and chunk-end tokens, whitespace collapsed."""
    for token in (DJ_IMAGE_TOKEN, DJ_CHUNK_END):
        text = text.replace(token, " ")
    return " ".join(text.split())


SPLIT_SIZES = ("train_size", "val_size", "test_size")


@dataclass
class SkipLog:
    """Samples skipped before processing, by reason, with the first few keys of each reason; and every
    image file the input named, usable or not (a curriculum re-checks them before it reuses the shards)."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    keep_examples: int = 5
    image_files: dict[str, list[int] | None] = field(default_factory=dict)
    """Every image file the input named: its [size, modification time] when it was read (None: missing)."""

    def skip(self, reason: str, key: str) -> None:
        self.counts[reason] += 1
        keys = self.examples.setdefault(reason, [])
        if len(keys) < self.keep_examples:
            keys.append(key)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _row(
    key: str, raw: str, image: Path, meta: dict | None = None, split: str | None = None, split_key: str | None = None
) -> dict:
    text = f"{DJ_IMAGE_TOKEN} {raw}".strip()
    meta_json = json.dumps(meta or {})
    row = {"__key__": key, "text": text, "images": [str(image)], "meta_json": meta_json, "split": split}
    return row | {"split_key": split_key or key}


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
    try:  # before it is read: an image replaced while the data stage runs is then seen as changed next time
        stat = path.stat()
        skips.image_files[str(path.absolute())] = [stat.st_size, stat.st_mtime_ns]
    except ValueError:  # a NUL byte in the name ("embedded null byte" ended the build, naming no record)
        skips.skip("bad_image_path", key)
        return None
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:  # past the file system's limit (a traceback, and exit 1)
            skips.skip("bad_image_path", key)
            return None
        skips.image_files[str(path.absolute())] = None
    problem = image_problem(path)
    if problem:
        skips.skip(problem, key)
        return None
    return path


def _annotations(record: dict, key: str, skips: SkipLog) -> dict | None:
    """The record's object classes and questions as metadata ({} without any); None (skipped, counted) when
    either is malformed."""
    meta = {}
    if "objects" in record:
        objects = record["objects"]
        if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
            skips.skip("bad_objects", key)
            return None
        meta["objects"] = objects
    if "questions" in record:
        questions = _questions(record["questions"])
        if questions is None:
            skips.skip("bad_questions", key)
            return None
        meta["questions"] = questions
    return meta


def _questions(questions) -> list[dict] | None:
    """A record's `questions` ([{"question", "answers": [human answers, ten in VQAv2: strings, or VQAv2's own
    {"answer": ...} records] or "answer", "type"}]) as the evaluation asks them: `answer` the most given one,
    case aside (exact match), `answers` all of them (VQA accuracy), `type` a name for the per-type scores
    ("yes/no" becomes "yes_no"; unset: "other"). None when malformed."""
    if not isinstance(questions, list):
        return None
    parsed = []
    for q in questions:
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not q["question"].strip():
            return None
        answers = q.get("answers", [q["answer"]] if isinstance(q.get("answer"), str) else None)
        if isinstance(answers, list):
            answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
        if not _strings(answers) or not answers or not all(a.strip() for a in answers):
            return None
        most = Counter(a.strip().lower() for a in answers).most_common(1)[0][0]
        kind = q.get("type", "other")
        if not isinstance(kind, str) or not re.sub(r"\W+", "", kind):
            return None
        parsed.append(
            {
                "question": q["question"].strip(),
                "answer": next(a for a in answers if a.strip().lower() == most),
                "answers": answers,
                "type": re.sub(r"\W+", "_", kind).strip("_"),
            }
        )
    return parsed


def _record_row(record: dict, key: str, caption: str, images, base: Path, skips: SkipLog) -> dict | None:
    """A llava / dj_jsonl record as a raw row, or None when it cannot be used (skipped and counted): its
    object classes, its own split (train / val / test) if it names one, and exactly one readable image."""
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:  # half an emoji (an unpaired surrogate) ended the build, naming no record
        skips.skip("bad_record", key)
        return None
    meta = _annotations(record, key, skips)
    if meta is None:
        return None
    if not (images is None or isinstance(images, str) or _strings(images)):
        skips.skip("bad_record", key)  # an image field that is neither a path nor a list of paths
        return None
    images = [images] if isinstance(images, str) else list(images or [])
    if len(images) > 1:  # the shards and the model take one image a sample
        skips.skip("several_images", key)
        return None
    split = record.get("split")
    if split is not None and split not in SPLITS:
        skips.skip("bad_split", key)
        return None
    path = _checked(key, images[0] if images else None, base, skips)
    if path is None:
        return None
    # Without a split of its own, the sample's split comes from its image (the path relative to the input,
    # "./a.png" and "a.png" alike): records that share an image (one per caption, COCO-style) share a split.
    return _row(key, caption, path, meta, split, split_key=_relative(images[0], base))


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _relative(image: str, base: Path) -> str:
    """The image's path as the record writes it, relative to the input's folder (or `image_root`) and normalised
    ("./a.png" is "a.png") without following symbolic links: the same data set gives the same split keys
    wherever it lies, a linked image folder included. An absolute path outside that folder stays absolute."""
    path = posixpath.normpath(Path(image).as_posix())
    if not posixpath.isabs(path):
        return path
    folder = posixpath.normpath(base.absolute().as_posix())
    return posixpath.relpath(path, folder) if path.startswith(folder + "/") else path


# What breaks a key as a tar member name: a dot splits the key from the file extension there, and tar ends a
# name at a NUL (two members "k", the sample lost, uncounted); other control characters go too.
_KEY_BREAKERS = re.compile(r"[.\x00-\x1f\x7f]")


def unique_keys(rows: list[dict], skips: SkipLog) -> list[dict]:
    """`rows` with keys that WebDataset keeps whole: dots and control characters become "_" (`_KEY_BREAKERS`;
    the original id stays in the sample's metadata as `id`). A key seen
    before is skipped and counted (`duplicate_key`): two samples of one key break a shard."""
    ids = {row["__key__"] for row in rows}
    seen, used, kept = set(), set(), []
    for row in rows:
        original = row["__key__"]
        if original in seen:
            skips.skip("duplicate_key", original)
            continue
        seen.add(original)
        key = _KEY_BREAKERS.sub("_", original)
        if key != original:
            if key in ids or key in used:  # "a.b" beside an "a_b" of its own, or "a.b_c" beside "a_b.c": apart
                key += "_" + hashlib.sha1(original.encode()).hexdigest()[:6]
            used.add(key)
            row["meta_json"] = json.dumps({**json.loads(row["meta_json"]), "id": original})
            row["__key__"] = key
        kept.append(row)
    return kept


def record_key(value, fallback: str) -> str:
    """A record's own id as its sample key; `fallback` (input stem and record number) when it has none: a null,
    an empty or blank id made a key "None" or "" (a nameless tar member that WebDataset drops)."""
    return fallback if value is None or not str(value).strip() else str(value)


def read_llava_json(path: Path, skips: SkipLog, image_root: Path | None = None) -> Iterator[dict]:
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark (Windows editors) too
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON list of LLaVA records ({error})") from error
    except UnicodeDecodeError as error:  # one document: no record to skip alone (the error named no file)
        raise ValueError(f"{path}: not UTF-8 text ({error})") from error
    if not isinstance(records, list):
        raise ValueError(f"{path}: not a JSON list of LLaVA records (a {type(records).__name__})")
    base = image_root or path.parent
    for number, record in enumerate(records):
        if not isinstance(record, dict):
            skips.skip("bad_record", f"{path.stem}-{number}")
            continue
        key = record_key(record.get("id"), f"{path.stem}-{number}")
        turns = record.get("conversations", [])
        if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
            skips.skip("bad_record", key)
            continue
        answers = [turn.get("value") for turn in turns if turn.get("from") == "gpt"]
        if not answers:
            skips.skip("no_caption", key)
            continue
        if not isinstance(answers[0], str):
            skips.skip("bad_record", key)
            continue
        row = _record_row(record, key, answers[0].replace("<image>", "").strip(), record.get("image"), base, skips)
        if row is not None:
            yield row


def read_dj_jsonl(path: Path, skips: SkipLog, image_root: Path | None = None) -> Iterator[dict]:
    base = image_root or path.parent
    # Read as Latin-1, which keeps every byte as it is, and split as text is (at \n, \r\n or a lone \r: no byte of a
    # UTF-8 character is either), then decoded line by line: a line that is not UTF-8 is one unreadable line
    # (decoded as a whole, the file's one bad byte ended the build, naming neither file nor line).
    with path.open(encoding="latin-1", newline=None) as lines:
        for number, text in enumerate(lines):
            key = f"{path.stem}-{number}"
            try:  # "-sig": a byte-order mark (at the start of the file, or of a file joined on) lost its record
                line = text.encode("latin-1").decode("utf-8-sig")
            except UnicodeDecodeError:
                skips.skip("unreadable_line", key)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skips.skip("unreadable_line", key)
                continue
            if not isinstance(record, dict):
                skips.skip("bad_record", key)
                continue
            key = record_key(record.get("__key__"), record_key(record.get("id"), key))
            if not isinstance(record.get("text", ""), str):
                skips.skip("bad_record", key)
                continue
            caption = dj_caption(record.get("text", ""))
            if caption is None:  # as the LLaVA reader counts a conversation without a gpt turn
                skips.skip("no_caption", key)
                continue
            row = _record_row(record, key, caption, record.get("images"), base, skips)
            if row is not None:
                yield row
