"""Real inputs as data sets bring them, and what the data stage must not do with them: lose samples in shards the
index does not list, keep a conversation's prompt in a caption, end on one bad character, install packages."""

from __future__ import annotations

import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from datamodules.caption_datamodule import CaptionDataModule
from datamodules.data_inputs import SkipLog, dj_caption, read_dj_jsonl, read_llava_json
from datamodules.shards import write_shards
from stages.data import InputSpec, RecipeConfig, run_data_stage


def test_the_index_lists_every_shard_file_cut_by_samples_only_and_none_for_an_empty_split(tmp_path, monkeypatch):
    """WebDataset's writer also starts a new file at 3 GB: the index listed one shard, the samples past 3 GB went to
    a file it did not list, and the trainer never read them (5000 images of 600 KB cross it). Here the writer's byte
    limit is scaled down 1.5 million times, to 2 KB, where a limit given as infinite stays infinite."""
    original = wds.ShardWriter.__init__

    def scaled(self, pattern, maxcount=100000, maxsize=3e9, **kwargs):
        original(self, pattern, maxcount=maxcount, maxsize=maxsize / 1.5e6, **kwargs)

    monkeypatch.setattr(wds.ShardWriter, "__init__", scaled)
    samples = [
        {"__key__": f"k{i}", "png": bytes(1000), "json": json.dumps({"caption_words": {"caption": 3}}).encode()}
        for i in range(8)
    ]
    entries = write_shards(iter(samples), tmp_path, "train", shard_size=5)
    assert [e["url"] for e in entries] == sorted(p.name for p in tmp_path.glob("train-*.tar"))
    for entry in entries:  # every sample in a listed shard, as many as the index says
        with tarfile.open(tmp_path / entry["url"]) as tar:
            assert len({member.name.split(".")[0] for member in tar.getmembers()}) == entry["count"]
    assert sum(e["count"] for e in entries) == 8
    assert write_shards(iter([]), tmp_path, "val", shard_size=5) == [] and not list(tmp_path.glob("val-*"))


def test_a_data_juicer_conversation_gives_its_reply_as_the_caption(tmp_path):
    """Data-Juicer's llava_to_dj writes a conversation in role markers: the prompt and <image> stayed in the
    caption ("[[human]]: <image> Describe the image briefly. [[gpt]]: a large brown dog ...")."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    text = "[[human]]: <image>\nDescribe the image briefly.\n[[gpt]]: a large brown dog on the grass <|__dj__eoc|>"
    record = {"text": text, "images": ["a.png"]}
    plain = {"text": "<__dj__image> a small cat <|__dj__eoc|>", "images": ["a.png"]}
    (tmp_path / "in.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(plain) + "\n")
    rows = list(read_dj_jsonl(tmp_path / "in.jsonl", SkipLog()))
    captions = [
        " ".join(row["text"].replace("<__dj__image>", " ").replace("<|__dj__eoc|>", " ").split()) for row in rows
    ]
    assert captions == ["a large brown dog on the grass", "a small cat"]


def test_data_juicer_caption_only_records_lose_llava_image_token_and_other_roles_are_counted(tmp_path):
    """`llava_to_dj --only_keep_caption` writes "<image>\n<caption>": the <image> stayed a word of the caption (and
    of every reference and word count); a conversation whose roles are not human/gpt gave its whole prompt as
    the caption, where the LLaVA reader counts it as no_caption."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    kept = {"text": "<image>\nA red square number 0. <|__dj__eoc|>", "images": ["a.png"]}
    roles = {
        "id": "r",
        "text": "[[user]]: <image>\nDescribe it [[assistant]]: a bird <|__dj__eoc|>",
        "images": ["a.png"],
    }
    (tmp_path / "in.jsonl").write_text(json.dumps(kept) + "\n" + json.dumps(roles) + "\n")
    skips = SkipLog()
    rows = list(read_dj_jsonl(tmp_path / "in.jsonl", skips))
    assert [row["text"] for row in rows] == ["<__dj__image> A red square number 0."]
    assert dict(skips.counts) == {"no_caption": 1} and skips.examples == {"no_caption": ["r"]}
    # A role marker inside a caption is its own text; a reply ends at the next marker of any role; of several
    # caption-only captions, the first.
    assert dj_caption("A sign reading [[WARNING]]: keep out") == "A sign reading [[WARNING]]: keep out"
    assert dj_caption("A sign reading [[gpt]]: hello") == "A sign reading [[gpt]]: hello"
    assert dj_caption("[[user]]: q [[gpt]]: a bird [[user]]: q2") == "a bird"
    assert dj_caption("<image>\ncap one\n<image>\ncap two <|__dj__eoc|>") == "cap one"


def test_half_an_emoji_skips_its_record_and_names_it(tmp_path):
    """An unpaired surrogate (an emoji cut in half) ended the whole build: "'utf-8' codec can't encode character
    '\\ud83d' ... surrogates not allowed", naming no file, record or key."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    turns = [{"from": "gpt", "value": "a red circle under the sun \ud83d"}]
    good = [{"from": "gpt", "value": "a red circle"}]
    records = [
        {"id": "cut", "image": "a.png", "conversations": turns},
        {"id": "ok", "image": "a.png", "conversations": good},
    ]
    (tmp_path / "in.json").write_text(json.dumps(records))
    skips = SkipLog()
    assert [row["__key__"] for row in read_llava_json(tmp_path / "in.json", skips)] == ["ok"]
    assert skips.counts == {"bad_record": 1} and skips.examples == {"bad_record": ["cut"]}


def test_a_line_that_is_not_utf8_is_one_unreadable_line(tmp_path):
    """One Latin-1 byte in a jsonl file ended the build: "'utf-8' codec can't decode byte 0xe9 in position 2845",
    naming neither file nor line. In a LLaVA JSON file (one document) it fails, naming the file."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    line = json.dumps({"text": "<__dj__image> a small cat", "images": ["a.png"]}).encode()
    latin1 = (
        json.dumps({"text": "<__dj__image> a caf\u00e9", "images": ["a.png"]}).encode().replace(b"\\u00e9", b"\xe9")
    )
    bom = b"\xef\xbb\xbf"
    (tmp_path / "in.jsonl").write_bytes(bom + line + b"\r\n" + latin1 + b"\n" + bom + line + b"\n")
    skips = SkipLog()
    assert [row["__key__"] for row in read_dj_jsonl(tmp_path / "in.jsonl", skips)] == ["in-0", "in-2"]
    assert skips.counts == {"unreadable_line": 1} and skips.examples == {"unreadable_line": ["in-1"]}
    # Lines split as text is split: at a lone \r too (a first fix read a CR-only file as one unreadable line).
    (tmp_path / "cr.jsonl").write_bytes(line + b"\r" + line + b"\r\r\n" + line)
    assert [row["__key__"] for row in read_dj_jsonl(tmp_path / "cr.jsonl", SkipLog())] == ["cr-0", "cr-1", "cr-3"]
    (tmp_path / "in.json").write_bytes(b'[{"id": "caf\xe9"}]')
    with pytest.raises(ValueError, match=f"{tmp_path / 'in.json'}: not UTF-8 text"):
        list(read_llava_json(tmp_path / "in.json", SkipLog()))


def test_an_image_name_no_file_can_have_skips_its_record_and_names_it(tmp_path):
    """A NUL byte ended the build with "embedded null byte" (no record named); a name past the file system's
    limit of 255 bytes with a traceback (ENAMETOOLONG) and exit 1."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    records = [
        {"id": "nul", "image": "a\u0000.png", "conversations": [{"from": "gpt", "value": "a cat"}]},
        {"id": "long", "image": "x" * 300 + ".png", "conversations": [{"from": "gpt", "value": "a cat"}]},
        {"id": "ok", "image": "a.png", "conversations": [{"from": "gpt", "value": "a cat"}]},
    ]
    (tmp_path / "in.json").write_text(json.dumps(records))
    skips = SkipLog()
    assert [row["__key__"] for row in read_llava_json(tmp_path / "in.json", skips)] == ["ok"]
    assert skips.counts == {"bad_image_path": 2} and skips.examples == {"bad_image_path": ["nul", "long"]}


def test_data_juicer_installs_nothing_while_a_recipe_runs(monkeypatch):
    """Its lazy loader pip- or uv-installed a package an op lacked, mid-build: image_deduplicator put a torchvision
    that did not match torch into the environment, and every later command failed at import."""
    import subprocess

    from data_juicer.utils.lazy_loader import LazyLoader

    from stages.recipe_ops import check_process

    def installed(*args, **kwargs):
        raise AssertionError(f"a package install was started: {args}")

    monkeypatch.setattr(subprocess, "check_call", installed)
    monkeypatch.setattr(LazyLoader, "_install_package", LazyLoader._install_package)  # put back after the test
    check_process([])
    missing = LazyLoader("vlm_curriculum_no_such_package")
    with pytest.raises(ImportError, match="an op needs vlm.curriculum.no.such.package, which is not installed"):
        missing.anything  # noqa: B018  (the first use imports it)


def test_the_report_describes_each_caption_variant(tmp_path):
    """Its recaptioned row is each sample's longest variant: with a short and a detailed BLIP-2 prompt the report gave
    a vocabulary of 1 (the detailed captions') where the shards held 3 word types, and the early stages train on
    the short ones."""
    from stages.data import RecipeConfig, build_report, report_markdown

    raw = {"__key__": "k", "raw_caption": "a photo", "text": "left left green"}
    kept = [{**raw, "caption_variants": json.dumps({"short": "red red", "detailed": "left left green"})}]
    report = build_report(RecipeConfig(), [raw], kept, [], SkipLog(), 1, SkipLog())
    text = report["text"]
    assert text["variant short"]["vocabulary"] == 1 and text["variant detailed"]["vocabulary"] == 2
    assert text["variant short"]["mean_words"] == 2 and "| variant short | 1 | 2.0 |" in report_markdown(report)
    single = [{**raw, "caption_variants": json.dumps({"caption": "left left green"})}]
    assert "variant caption" not in build_report(RecipeConfig(), [raw], single, [], SkipLog(), 1, SkipLog())["text"]
    # The variants' TTR over their shortest's tokens (a short variant's was over its own fewer tokens: 1.0 beside
    # 0.2), raw and recaptioned over theirs, so that one sparse variant does not cut every row; the recaptioned row
    # is the longest variant with a word ("? ? ? ? ?" was measured, not what the shards hold).
    rows = [{**raw, "raw_caption": "a b a b a b", "text": "? ? ? ? ?"}]
    kept = [{**rows[0], "caption_variants": json.dumps({"short": "a dog", "long": "b b b b b b", "odd": "? ? ? ? ?"})}]
    report = build_report(RecipeConfig(), rows, kept, [], SkipLog(), 1, SkipLog())
    text = report["text"]
    assert {name: t["ttr_tokens"] for name, t in text.items()} == {
        "raw": 6, "recaptioned": 6, "variant short": 2, "variant long": 2
    }  # fmt: skip
    assert text["recaptioned"]["mean_words"] == 6 and text["recaptioned"]["vocabulary"] == 1
    assert "| variant short | 1 | 2.0 | 2 | 2 | 2 | 2.0 | 1.000 | 1 @ 2 |" in report_markdown(report)
    from datamodules.text_stats import longest_caption  # the caption ops' new text, which later filters read

    assert longest_caption(["a dog", "? ? ? ? ?"]) == "a dog" and longest_caption(["?", "! !"]) == "! !"


def test_the_records_of_one_image_are_evaluated_as_one_image_against_all_their_captions(tmp_path):
    # COCO-style data (a record per caption) was scored record by record, each against its own caption: "images"
    # counted records, BLEU-4 0.449 where the captions together gave 0.935, CHAIR weighed images by their records.
    question = {"question": "is there a dog?", "answers": ["yes"] * 10}
    texts = {"r0_0": "a dog on grass", "r1_0": "a red car", "r0_1": "a brown dog running", "r0_2": "a dog in a park"}
    records = []
    for key, text in texts.items():  # the records of image 0 apart in the input, the first one unannotated
        image = f"{key[1]}.png"
        Image.new("RGB", (48, 48), (90 * int(key[1]), 0, 0)).save(tmp_path / image)
        records.append({"id": key, "image": image, "split": "test", "conversations": [{"from": "gpt", "value": text}]})
        if key != "r0_0":
            records[-1] |= {"objects": ["dog", "grass"] if key == "r0_1" else ["car" if key == "r1_0" else "dog"]}
        records[-1] |= {"questions": [question]} if key.startswith("r0") else {}
    (tmp_path / "in.json").write_text(json.dumps(records))
    recipe = RecipeConfig(input=InputSpec(format="llava", path=str(tmp_path / "in.json")), process=[])
    run_data_stage(recipe, tmp_path / "out")
    data = CaptionDataModule(tmp_path / "out", max_words=10**6)
    samples = data.eval_samples("test")
    assert [key for key, _, _ in samples] == ["r0_0", "r1_0"]
    first = samples[0][2]
    assert sorted(first["captions"].values()) == ["a brown dog running", "a dog in a park", "a dog on grass"]
    assert first["objects"] == ["dog", "grass"], "classes of the later records, the first one unannotated"
    assert [q["question"] for q in first["questions"]] == ["is there a dog?"], "asked once, not once per record"
    (only,) = data.eval_samples("test", limit=1)  # the records of an image lie together: read up to the limit
    assert only[0] == "r0_0" and len(only[2]["captions"]) == 3
