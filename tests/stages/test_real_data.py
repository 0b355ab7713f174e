"""Real data: a curriculum on shards built from LLaVA JSON, with and without object annotations.

Real shards carry no synthetic ground truth: evaluation scores them with the text metrics and, where
the records name the classes in their images, CHAIR and recall by a synonym table.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from datamodules.caption_datamodule import CaptionDataModule
from datamodules.captions import select_caption
from datamodules.images import image_problem, open_rgb, shard_image
from datamodules.shards import budget_counts, read_index
from stages.data import InputSpec, RecipeConfig, run_data_stage
from stages.export import evaluate_model
from stages.run import main
from tests.conftest import MICRO_ARGS

COLOURS = {"red": (220, 40, 40), "blue": (40, 40, 220), "green": (40, 180, 40)}
SHAPES = ("circle", "square", "triangle")


def _llava_shards(tmp_path: Path, name: str, annotated: bool, val_share: float = 0.2) -> Path:
    """48 LLaVA records of plain coloured images, captioned in the tiny LM's words; `annotated`: each
    names its shape class in "objects"."""
    records = []
    for i in range(48):
        colour, shape = list(COLOURS)[i % 3], SHAPES[i // 3 % 3]
        image = tmp_path / "images" / f"{i}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 48), COLOURS[colour]).save(image)
        turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": f"a {colour} {shape}"}]
        records.append({"id": f"r{i}", "image": f"images/{i}.png", "conversations": turns})
        if annotated:
            records[-1]["objects"] = [shape]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(records))
    recipe = RecipeConfig(
        input=InputSpec(format="llava", path=str(path)),
        process=[{"words_num_filter": {"min_num": 1, "max_num": 60}}],
        val_share=val_share,
        test_share=0.2,
    )
    out = tmp_path / name
    run_data_stage(recipe, out)
    return out


def test_malformed_object_annotations_are_skipped_and_counted(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (48, 48)).save(image)
    turns = [{"from": "gpt", "value": "a red circle on the left"}]
    records = [
        {"id": "good", "image": "a.png", "conversations": turns, "objects": ["circle"]},
        {"id": "bad", "image": "a.png", "conversations": turns, "objects": "circle"},
    ]
    (tmp_path / "in.json").write_text(json.dumps(records))
    recipe = RecipeConfig(input=InputSpec(format="llava", path=str(tmp_path / "in.json")), max_skip_share=0.5)
    report = run_data_stage(recipe, tmp_path / "out")
    assert report["input_skips"]["counts"] == {"bad_objects": 1}
    assert report["input_skips"]["first_keys"] == {"bad_objects": ["bad"]}


@pytest.mark.slow
def test_curriculum_on_llava_shards_evaluates_and_reports(tmp_path, micro_base):
    plain = _llava_shards(tmp_path, "plain", annotated=False, val_share=0.0)  # no val split: no val loss
    run_dir = tmp_path / "run"
    args = ["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS, f"--data.shard_dir={plain}"]
    assert main([*args, f"--model.vision_path={micro_base[0]}", f"--model.lm_path={micro_base[1]}"]) == 0

    metrics = json.loads((run_dir / "sft_long" / "metrics.json").read_text())
    assert "bleu4" in metrics and "cider_d" in metrics and metrics["images"] > 0
    assert "chair_i" not in metrics and "pope_random_f1" not in metrics, "no annotations: no object metrics"
    assert all(set(bucket) == {"mean_words", "images"} for bucket in metrics["by_length"].values())
    assert "| sft_long |" in (run_dir / "report.md").read_text()

    # The same images with their classes annotated: eval scores CHAIR by the synonym table.
    annotated = _llava_shards(tmp_path, "annotated", annotated=True)
    table = tmp_path / "synonyms.json"
    table.write_text(json.dumps({"circle": ["ring"], "square": ["box"], "triangle": []}))
    result = evaluate_model(run_dir / "sft_long", annotated, limit=8, max_new_tokens=6, synonyms=table)
    assert {"chair_i", "chair_s", "recall"} <= set(result["metrics"])
    assert main(["eval", f"--model={run_dir / 'sft_long'}", f"--data={annotated}", "--synonyms=nowhere.json"]) == 2


def test_images_read_as_a_viewer_shows_them(tmp_path, monkeypatch):
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    Image.new("RGB", (40, 24), (200, 0, 0)).save(rotated, exif=exif)
    assert open_rgb(rotated).size == (24, 40)
    deep = tmp_path / "grey16.png"
    Image.new("I;16", (8, 8), 32768).save(deep)  # mid grey in 16 bits
    assert open_rgb(deep).getpixel((0, 0)) == (128, 128, 128)

    for mode, value, name in (("I;16B", 32768, "big_endian.tif"), ("F", 0.5, "float.tif")):
        Image.new(mode, (8, 8), value).save(tmp_path / name)  # 16-bit big-endian and 0..1 float TIFFs
        assert open_rgb(tmp_path / name).getpixel((0, 0))[0] in (127, 128) and image_problem(tmp_path / name) is None
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(clear)
    assert open_rgb(clear).getpixel((0, 0)) == (255, 255, 255), "transparent shows as white, not black"

    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(rotated.read_bytes()[:-200])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as Data-Juicer's import leaves it
    assert image_problem(truncated) == "corrupt_image" and ImageFile.LOAD_TRUNCATED_IMAGES is True

    bmp, jfif = tmp_path / "a.bmp", tmp_path / "b.jfif"
    Image.new("RGB", (8, 8), (0, 0, 255)).save(bmp)
    jfif.write_bytes(rotated.read_bytes())
    extension, data = shard_image(bmp)
    assert extension == "png" and open_rgb(data).getpixel((0, 0)) == (0, 0, 255)
    assert shard_image(jfif) == ("jpg", rotated.read_bytes()), "a JPEG keeps its bytes, whatever its suffix"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 960 pixels is past twice the limit: a "bomb"
    assert image_problem(rotated) == "too_large_image"


def test_llava_keys_splits_and_image_lists_are_kept_or_counted(tmp_path):
    for i in range(3):
        Image.new("RGB", (48, 48), (40 * i, 90, 90)).save(tmp_path / f"{i}.png")
    turns = [{"from": "gpt", "value": "a red circle on the left side"}]
    records = [
        {"id": "img.5", "image": "0.png", "conversations": turns},  # a dot would split the key in a shard
        {"id": "dup", "image": "1.png", "conversations": turns},
        {"id": "dup", "image": "2.png", "conversations": turns},  # same id again
        {"id": "pair", "image": ["1.png", "2.png"], "conversations": turns},  # two images: not one sample
        {"id": "mine", "image": "1.png", "conversations": turns, "split": "test"},
        {"id": "also", "image": "./1.png", "conversations": turns},  # the same image: the split it was named
        {"id": "a_b", "image": "0.png", "conversations": turns},
        {"id": "a.b", "image": "0.png", "conversations": turns},  # "a_b" once its dot goes: kept apart
        {"id": "odd", "image": "1.png", "conversations": turns, "split": "holdout"},
        *[{"id": f"cap{i}", "image": "2.png", "conversations": turns} for i in range(6)],  # one image, 6 captions
    ]
    (tmp_path / "in.json").write_text(json.dumps(records))
    recipe = RecipeConfig(
        input=InputSpec(format="llava", path=str(tmp_path / "in.json")), max_skip_share=0.5, val_share=0.3
    )
    report = run_data_stage(recipe, tmp_path / "out")
    assert report["input_skips"]["counts"] == {"duplicate_key": 1, "several_images": 1, "bad_split": 1}
    assert report["input_skips"]["first_keys"]["duplicate_key"] == ["dup"]
    every = _records(tmp_path / "out")
    renamed = next(key for key in every if key.startswith("a_b_"))
    assert set(every) == {"img_5", "dup", "mine", "also", "a_b", renamed, *(f"cap{i}" for i in range(6))}
    assert every["img_5"][1]["id"] == "img.5" and every[renamed][1]["id"] == "a.b"
    assert every["mine"][0] == every["also"][0] == "test"
    assert len({every[f"cap{i}"][0] for i in range(6)}) == 1, "records of one image share its split"


def test_input_files_from_windows_editors_and_llava_answers_with_image_tags_are_read(tmp_path):
    """A byte-order mark before a LLaVA JSON list; blank lines between jsonl records (skipped, not counted as
    bad); LLaVA-style answers that repeat the `<image>` tag (kept out of the caption)."""
    from datamodules.data_inputs import SkipLog, read_dj_jsonl, read_llava_json

    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    turns = [{"from": "human", "value": "<image>\ndescribe"}, {"from": "gpt", "value": "<image>\na red circle"}]
    (tmp_path / "in.json").write_text("\ufeff" + json.dumps([{"id": "a", "image": "0.png", "conversations": turns}]))
    skips = SkipLog()
    (row,) = read_llava_json(tmp_path / "in.json", skips)
    assert row["text"].endswith(" a red circle") and row["text"].count("image") == 1, row["text"]
    line = json.dumps({"id": "b", "text": "<__dj__image> a blue star", "images": ["0.png"]})
    (tmp_path / "in.jsonl").write_text(f"\ufeff{line}\n\n   \n{line.replace('b', 'c', 1)}\n\n")
    assert [row["__key__"] for row in read_dj_jsonl(tmp_path / "in.jsonl", skips)] == ["b", "c"]
    assert not skips.counts


def test_an_empty_caption_variant_is_never_a_target():
    assert select_caption({"short": "", "detailed": "a red circle"}, 8) == "a red circle"
    assert select_caption({"short": "  "}, 8) is None
    # The longest that fits, whatever order the variants are listed in.
    assert select_caption({"long": "a b c d", "short": "a b"}, 10) == "a b c d"
    assert select_caption({"long": "a b c d", "short": "a b"}, 3) == "a b"
    index = {"splits": {"train": [{"caption_words": [{"short": 0, "detailed": 3}, {"short": 0, "detailed": 12}]}]}}
    assert budget_counts(index, "train", 8) == (1, 1)


def test_shards_rebuild_when_the_input_changes_not_the_world(tmp_path):
    from stages.curriculum import prepare_data
    from stages.run import build_parser, curriculum_config

    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i in range(4):
        Image.new("RGB", (48, 48), (60 * i, 0, 0)).save(images / f"{i}.png")
        records.append(
            {"id": f"r{i}", "image": f"images/{i}.png", "conversations": [{"from": "gpt", "value": "a red circle"}]}
        )
    data = tmp_path / "in.json"
    data.write_text(json.dumps(records))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"input: {{format: llava, path: {data}}}\nprocess: []\n")

    def shards(*flags: str) -> tuple[Path, int]:
        parser = build_parser()
        args = parser.parse_args(["curriculum", f"--data.recipe={recipe}", *flags])
        args.curriculum.pop("config", None)
        shard_dir = prepare_data(curriculum_config(parser.instantiate(args).curriculum), tmp_path / "run")
        return shard_dir, (shard_dir / "index.json").stat().st_mtime_ns

    _, built = shards()
    assert shards("--world.palette=5", "--seed=3")[1] == built, "the world does not make LLaVA shards"
    data.write_text(json.dumps(records[:3]))
    shard_dir, rebuilt = shards()
    assert rebuilt != built and sum(s["count"] for v in read_index(shard_dir)["splits"].values() for s in v) == 3


def test_shards_rebuild_when_an_image_file_changes(tmp_path, caplog):
    """Replacing an image (same path, same input file) rebuilds the shards with the new bytes; a missing image
    that appears rebuilds them too; an untouched input folder reuses them."""
    import logging
    import tarfile

    from stages.curriculum import prepare_data
    from stages.run import build_parser, curriculum_config

    images = tmp_path / "images"
    images.mkdir()
    records = [{"id": f"r{i}", "image": f"images/{i}.png", "conversations": [{"from": "gpt", "value": "a circle"}]}
               for i in range(41)]  # fmt: skip
    for i in range(40):  # images/40.png is missing: skipped, 1 of 41 (within max_skip_share)
        Image.new("RGB", (48, 48), (5 * i, 0, 0)).save(images / f"{i}.png")
    data = tmp_path / "in.json"
    data.write_text(json.dumps(records))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"input: {{format: llava, path: {data}}}\nprocess: []\nval_share: 0\ntest_share: 0\n")

    def build() -> tuple[int, dict[str, bytes]]:
        parser = build_parser()
        args = parser.parse_args(["curriculum", f"--data.recipe={recipe}"])
        args.curriculum.pop("config", None)
        shard_dir = prepare_data(curriculum_config(parser.instantiate(args).curriculum), tmp_path / "run")
        with tarfile.open(shard_dir / "train-000000.tar") as tar:
            pngs = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")}
        return (shard_dir / "index.json").stat().st_mtime_ns, pngs

    caplog.set_level(logging.INFO, logger="stages.curriculum")
    built, pngs = build()
    assert len(pngs) == 40
    assert build()[0] == built, "nothing changed: the shards are reused"
    Image.new("RGB", (48, 48), (0, 0, 255)).save(images / "7.png")
    rebuilt, pngs = build()
    assert rebuilt != built and pngs["r7.png"] == (images / "7.png").read_bytes()
    assert "1 image file(s) changed" in caplog.text
    Image.new("RGB", (48, 48)).save(images / "40.png")
    assert len(build()[1]) == 41, "the missing image appeared"


def test_a_stage_without_a_batch_of_fitting_captions_fails_before_training(tmp_path, micro_base, capsys):
    shards = _llava_shards(tmp_path, "plain", annotated=False)  # 2-word captions
    args = ["curriculum", f"--run_dir={tmp_path / 'run'}", *MICRO_ARGS, f"--data.shard_dir={shards}"]
    args += [f"--model.vision_path={micro_base[0]}", f"--model.lm_path={micro_base[1]}", "--stages.align.max_words=1"]
    assert main(args) == 2
    assert "stage align: 0 training images" in capsys.readouterr().err
    assert not (tmp_path / "run" / "align").exists()
    # A split the shards hold no samples of (a recipe with val_share 0, say): named before training too.
    no_val = tmp_path / "no_val"
    shutil.copytree(shards, no_val)
    index = read_index(no_val)
    index["splits"]["val"] = []
    (no_val / "index.json").write_text(json.dumps(index))
    assert main([*args[:-1], f"--data.shard_dir={no_val}", "--eval.split=val"]) == 2
    assert "no 'val' samples to evaluate on" in capsys.readouterr().err


def test_the_budget_check_counts_every_rank():
    from datamodules.shards import ShardError, check_shards_serve
    from stages.config import TrainerConfig
    from stages.curriculum import ranks

    assert [ranks(TrainerConfig(devices=d, accelerator="cpu")) for d in (None, "auto", 2, "2", "0,3", "1,")] == [
        1, 1, 2, 2, 2, 1,
    ]  # fmt: skip
    assert ranks(TrainerConfig(devices=2, num_nodes=3)) == 6
    index = {"splits": {"train": [{"count": 300, "caption_words": [{"c": 5}] * 300}], "test": [{"count": 1}]}}
    check_shards_serve(index, Path("shards"), {"sft": (8, 1, 1)}, 200, "test")
    with pytest.raises(ShardError, match=r"fewer than one optimizer step \(1 batch\(es\) of 200\) for each of 2 rank"):
        check_shards_serve(index, Path("shards"), {"sft": (8, 2, 1)}, 200, "test")
    with pytest.raises(ShardError, match=r"\(2 batch\(es\) of 100\) for each of 2 rank"):  # accumulation
        check_shards_serve(index, Path("shards"), {"sft": (8, 2, 2)}, 100, "test")
    check_shards_serve(index, Path("shards"), {"sft": (8, 1, 3)}, 100, "test")


def test_malformed_records_are_skipped_and_counted_not_a_traceback(tmp_path):
    Image.new("RGB", (48, 48), (90, 90, 90)).save(tmp_path / "0.png")
    good = [{"from": "gpt", "value": "a red circle on the left side"}]
    records = [
        {"id": "ok", "image": "0.png", "conversations": good},
        "a string, not a record",
        {"id": "null_turns", "image": "0.png", "conversations": None},
        {"id": "list_answer", "image": "0.png", "conversations": [{"from": "gpt", "value": ["a", "b"]}]},
        {"id": "number_image", "image": 5, "conversations": good},
        {"id": "a.b_c", "image": "0.png", "conversations": good},
        {"id": "a_b.c", "image": "0.png", "conversations": good},  # both become a_b_c once their dots go
    ]
    (tmp_path / "in.json").write_text(json.dumps(records))
    recipe = RecipeConfig(input=InputSpec(format="llava", path=str(tmp_path / "in.json")), max_skip_share=0.9)
    report = run_data_stage(recipe, tmp_path / "out")
    assert report["input_skips"]["counts"] == {"bad_record": 4}
    assert report["input_skips"]["first_keys"]["bad_record"] == ["in-1", "null_turns", "list_answer", "number_image"]
    keys = set(_records(tmp_path / "out"))
    assert len(keys) == 3 and "ok" in keys and "a_b_c" in keys

    lines = ['{"text": null, "images": ["0.png"]}', "[1, 2]", "null", '{"text": "a cat", "images": 5}']
    lines.append('{"text": "<__dj__image> a red circle here", "images": ["0.png"]}')
    (tmp_path / "in.jsonl").write_text("\n".join(lines))
    recipe = RecipeConfig(input=InputSpec(format="dj_jsonl", path=str(tmp_path / "in.jsonl")), max_skip_share=0.9)
    report = run_data_stage(recipe, tmp_path / "out_jsonl")
    assert report["input_skips"]["counts"] == {"bad_record": 4} and report["samples"]["kept"] == 1


def test_shards_rebuild_when_a_model_folder_of_the_recipe_changes(tmp_path):
    from stages.config import CurriculumConfig, StageSpec
    from stages.curriculum import _data_inputs
    from stages.data import InputSpec as Input

    folder, blurred = tmp_path / "blip2", tmp_path / "blurred"
    folder.mkdir()
    blurred.mkdir()
    (folder / "config.json").write_text("{}")
    ops = [{"image_blur_mapper": {"save_dir": str(blurred)}}, {"blip2_caption_mapper": {"model_path": str(folder)}}]
    recipe = RecipeConfig(input=Input(), process=ops)
    cfg = CurriculumConfig(stages={"align": StageSpec(["projector"], 8, init_from="base")})
    before = _data_inputs(recipe, cfg)
    (blurred / "0.png").write_bytes(b"an op's output")  # an output folder, written by every build: not an input
    assert _data_inputs(recipe, cfg) == before
    (folder / "model.safetensors").write_bytes(b"retrained")
    assert _data_inputs(recipe, cfg) != before


def _records(out: Path) -> dict[str, tuple[str, dict]]:
    """Every record of the shards by key: (split, metadata); `eval_samples` joins the records of one image."""
    import webdataset as wds

    records = {}
    for split, shards in read_index(out)["splits"].items():
        urls = [str(out / shard["url"]) for shard in shards]
        for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()) if urls else []:
            records[sample["__key__"]] = (split, json.loads(sample["json"]))
    return records


def _split_records(out: Path) -> dict[str, str]:
    return {key: split for key, (split, _) in _records(out).items()}


def test_a_named_split_holds_for_its_image_even_when_that_record_is_filtered_out(tmp_path):
    # Each image has a short record naming "test" (dropped by words_num_filter) and a long one naming no split.
    # The named splits were gathered after the filters: every image went by hash, 20 of 20 into train.
    short, long = [{"from": "gpt", "value": "a dot"}], [{"from": "gpt", "value": "a red circle on the left side"}]
    records = []
    for i in range(20):
        Image.new("RGB", (48, 48), (10 * i, 0, 0)).save(tmp_path / f"{i}.png")
        records.append({"id": f"short{i}", "image": f"{i}.png", "split": "test", "conversations": short})
        records.append({"id": f"long{i}", "image": f"{i}.png", "conversations": long})
    # One more image, named test by one record and train by another: skipped, both records counted.
    Image.new("RGB", (48, 48)).save(tmp_path / "both.png")
    for split in ("test", "train"):
        records.append({"id": f"both_{split}", "image": "both.png", "split": split, "conversations": long})
    (tmp_path / "in.json").write_text(json.dumps(records))
    recipe = RecipeConfig(
        input=InputSpec(format="llava", path=str(tmp_path / "in.json")),
        process=[{"words_num_filter": {"min_num": 4, "max_num": 60}}],
        val_share=0.0,
        test_share=0.0,  # by hash, everything would be train
    )
    report = run_data_stage(recipe, tmp_path / "out")
    assert report["input_skips"]["counts"] == {"split_conflict": 2}
    assert sorted(report["input_skips"]["first_keys"]["split_conflict"]) == ["both_test", "both_train"]
    assert _split_records(tmp_path / "out") == {f"long{i}": "test" for i in range(20)}


def test_split_keys_do_not_depend_on_where_the_data_set_lies(tmp_path):
    # The image path was resolved (links followed) before it was made relative: a linked image folder, or a
    # JSON naming "../images/...", gave keys with the absolute path, and 16 of 30 samples changed split.
    splits = []
    for copy in ("a", "b"):
        images = tmp_path / copy / "disk" / "images"
        images.mkdir(parents=True)
        for i in range(30):
            Image.new("RGB", (48, 48), (8 * i, 0, 0)).save(images / f"{i}.png")
        data = tmp_path / copy / "data"
        data.mkdir()
        (data / "images").symlink_to(images)
        records = [{"id": f"r{i}", "image": f"images/{i}.png" if i % 2 else f"../disk/images/{i}.png",
                    "conversations": [{"from": "gpt", "value": "a red circle"}]} for i in range(30)]  # fmt: skip
        (data / "in.json").write_text(json.dumps(records))
        recipe = RecipeConfig(
            input=InputSpec(format="llava", path=str(data / "in.json")), val_share=0.3, test_share=0.3
        )
        run_data_stage(recipe, tmp_path / copy / "out")
        splits.append(_split_records(tmp_path / copy / "out"))
    assert splits[0] == splits[1] and len(splits[0]) == 30
    assert len(set(splits[0].values())) == 3


def test_an_image_replaced_while_the_data_stage_reads_is_seen_as_changed(tmp_path, monkeypatch):
    # The stamp took each image's size and time after the stage returned: an image replaced after it was read
    # was stamped with its new time, and the next run reused shards holding the old bytes.
    import stages.data
    from stages.curriculum import _changed_images

    image = tmp_path / "0.png"
    Image.new("RGB", (48, 48), (200, 0, 0)).save(image)
    (tmp_path / "in.json").write_text(
        json.dumps([{"id": "r0", "image": "0.png", "conversations": [{"from": "gpt", "value": "a red circle"}]}])
    )
    original = stages.data.named_splits

    def replace_after_reading(rows, skips):  # runs once every image was read
        Image.new("RGB", (64, 64), (0, 0, 200)).save(image)
        os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
        return original(rows, skips)

    monkeypatch.setattr(stages.data, "named_splits", replace_after_reading)
    recipe = RecipeConfig(input=InputSpec(format="llava", path=str(tmp_path / "in.json")), val_share=0, test_share=0)
    run_data_stage(recipe, tmp_path / "out")
    stamped = json.loads((tmp_path / "out" / "image_files.json").read_text())
    assert _changed_images({"images": stamped}) == [str(image)]


def test_a_16_bit_image_keeps_its_brightness_whatever_its_brightest_pixel(tmp_path):
    # The scale was guessed from the image's own maximum: 255/65535 (0.4% grey) came out white, 256/65535 black.
    for value in (255, 256, 65535):
        path = tmp_path / f"{value}.png"
        Image.new("I;16", (4, 4), value).save(path)
        assert abs(open_rgb(path).getpixel((0, 0))[0] - value / 256) <= 1, value


def test_a_null_or_empty_id_falls_back_to_the_record_number(tmp_path):
    # "id": "" made a nameless tar member that WebDataset drops (counted in index.json, never read);
    # "id": null made the key "None", and a second one was skipped as a duplicate.
    for i in range(4):
        Image.new("RGB", (48, 48), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    turns = [{"from": "gpt", "value": "a red circle"}]
    records = [
        {"id": ident, "image": f"{i}.png", "conversations": turns} for i, ident in enumerate(["", None, None, " "])
    ]
    (tmp_path / "in.json").write_text(json.dumps(records))
    recipe = RecipeConfig(input=InputSpec(format="llava", path=str(tmp_path / "in.json")), val_share=0, test_share=0)
    report = run_data_stage(recipe, tmp_path / "out")
    assert report["input_skips"]["counts"] == {}
    assert sorted(_split_records(tmp_path / "out")) == ["in-0", "in-1", "in-2", "in-3"]
    assert sum(shard["count"] for shard in read_index(tmp_path / "out")["splits"]["train"]) == 4


def test_unicode_punctuation_around_words_is_stripped_in_the_report():
    from datamodules.text_stats import tokens

    assert tokens("“Dog” runs… — fast. «chat» ¡hola!") == ["dog", "runs", "fast", "chat", "hola"]
    assert tokens("一只猫。 a dog's") == ["一", "只", "猫", "a", "dog's"], "a Chinese sentence was one word type"


def test_chair_counts_a_class_of_the_data_set_that_no_evaluated_image_shows(tmp_path):
    """Without a synonym table the classes came from the evaluated images alone: a caption naming a triangle
    on a circle image scored no hallucination while no evaluated image showed a triangle, and the scores
    changed with how many images were evaluated."""
    from callbacks.evaluation import class_table, score
    from datamodules.caption_datamodule import CaptionDataModule

    shards = _llava_shards(tmp_path, "annotated", annotated=True)
    data = CaptionDataModule(shards, max_words=60)
    assert data.index["object_classes"] == ["circle", "square", "triangle"]
    circle = next((key, meta) for key, _, meta in data.eval_samples("test") if meta["objects"] == ["circle"])
    results = [(circle[0], circle[1], "a red circle and a blue triangle")]
    assert score(results, synonyms=class_table(None, data.index))["chair_i"] == 0.5
    assert score(results)["chair_i"] == 0.0  # the evaluated image's classes only: the triangle went unseen
    assert class_table({"dog": ["puppy"]}, data.index) == {"dog": ["puppy"]}  # a given table wins


def test_captions_in_other_scripts_build_train_and_evaluate(tmp_path, micro_run):
    # A JSONL saved with a byte-order mark lost its first record; an id with a NUL made two tar members "k" and
    # the sample vanished (counted in index.json, never read); emoji-only captions reached the evaluation, which
    # stopped on them, as on every Russian or Chinese reference ("no reference caption").
    captions = ["Кошка на диване", "一只猫坐在沙发上", "Un chien à côté du canapé", "🐶🐱", "a red circle"]
    lines = []
    for i in range(40):
        Image.new("RGB", (48, 48), (6 * i, 0, 0)).save(tmp_path / f"{i}.png")
        ident = "nul\x00key" if i == 1 else f"s{i}"
        lines.append(json.dumps({"id": ident, "text": captions[i % 5], "images": [f"{i}.png"], "split": "test"}))
    (tmp_path / "in.jsonl").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    recipe = RecipeConfig(input=InputSpec(format="dj_jsonl", path=str(tmp_path / "in.jsonl")), process=[])
    report = run_data_stage(recipe, tmp_path / "out")
    assert report["input_skips"]["counts"] == {}, "the first record and the NUL key kept"
    assert report["samples"]["kept"] == 32 and report["output_skips"]["counts"] == {"empty_caption": 8}
    records = _split_records(tmp_path / "out")
    assert len(records) == sum(s["count"] for shards in read_index(tmp_path / "out")["splits"].values() for s in shards)
    assert "s0" in records and "nul_key" in records
    assert '"caption": "一只猫坐在沙发上"' in (tmp_path / "out" / "report.md").read_text(), "not as \\u escapes"
    budgets = CaptionDataModule(tmp_path / "out", max_words=60).index["splits"]["test"]
    assert {words["caption"] for shard in budgets for words in shard["caption_words"]} == {3, 8, 6}
    result = evaluate_model(micro_run / "sft_long", tmp_path / "out", split="test", max_new_tokens=4)
    assert result["data"]["images"] == 32 and 0 <= result["metrics"]["bleu1"] <= 1


def test_real_vqa_questions_are_built_into_the_shards_and_scored_by_vqa_accuracy(tmp_path, micro_run):
    # A record's questions were dropped by the data stage: `eval --vqa` on real data said the shards held none,
    # and VQAv2's accuracy (ten human answers a question) was computed nowhere.
    lines = []
    for i in range(12):
        Image.new("RGB", (48, 48), (20 * i, 0, 0)).save(tmp_path / f"{i}.png")
        question = {"question": "is there a red circle ?", "answers": ["yes"] * 7 + ["no"] * 3, "type": "yes/no"}
        if i % 3 == 1:
            question = {"question": "what color is the circle ?", "answer": "red"}  # one answer, type unset
        if i % 3 == 2:  # VQAv2's own answer records; "Blue" and "blue" are one answer, given most
            answers = ["red", "red", "Blue", "blue", "blue"]
            question = {
                "question": "what color ?",
                "answers": [{"answer": a, "answer_id": n} for n, a in enumerate(answers)],
            }
        record = {"id": f"q{i}", "text": "a red circle", "images": [f"{i}.png"], "split": "test"}
        lines.append(json.dumps({**record, "questions": [question]}))
    bad = [{"question": "?", "answers": []}, [{"question": "", "answer": "x"}], [{"question": "q"}], "what ?"]
    for i, questions in enumerate(bad):
        lines.append(json.dumps({"id": f"bad{i}", "text": "a red circle", "images": ["0.png"], "questions": questions}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    jsonl = InputSpec(format="dj_jsonl", path=str(tmp_path / "in.jsonl"))
    report = run_data_stage(RecipeConfig(input=jsonl, process=[], max_skip_share=0.5), tmp_path / "out")
    assert report["input_skips"]["counts"] == {"bad_questions": 4}
    meta = {key: m for key, _, m in CaptionDataModule(tmp_path / "out", max_words=60).eval_samples("test")}
    assert meta["q0"]["questions"] == [
        {"question": "is there a red circle ?", "answer": "yes", "answers": ["yes"] * 7 + ["no"] * 3, "type": "yes_no"}
    ]
    assert meta["q1"]["questions"] == [
        {"question": "what color is the circle ?", "answer": "red", "answers": ["red"], "type": "other"}
    ]
    assert meta["q2"]["questions"][0]["answer"] == "Blue" and len(meta["q2"]["questions"][0]["answers"]) == 5
    metrics = evaluate_model(micro_run / "sft_long", tmp_path / "out", vqa=True, max_new_tokens=4)["metrics"]
    assert metrics["vqa_questions"] == 12
    assert {"vqa_accuracy", "vqa_accuracy_yes_no", "vqa_accuracy_other", "vqa_exact_other"} <= metrics.keys()
    assert 0 <= metrics["vqa_accuracy"] <= 1


def test_the_command_line_reads_and_writes_utf_8_under_any_locale(tmp_path):
    # Under a locale whose encoding is not UTF-8 (here C with Python's locale coercion off, the encoding ASCII),
    # a data build of Russian captions failed writing report.md ("'ascii' codec can't encode").
    import subprocess
    import sys

    from tests.conftest import REPO, fresh_launch_env

    # jsonargparse read the recipe, naming a folder "données", in the locale's encoding too.
    turns = [{"from": "gpt", "value": "Кошка на диване, café"}]
    records, data = [], tmp_path / "données"
    data.mkdir()
    for i in range(12):
        Image.new("RGB", (48, 48), (20 * i, 0, 0)).save(data / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": turns})
    (data / "in.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"input: {{format: llava, path: {data / 'in.json'}}}\nprocess: []\n", encoding="utf-8")
    env = fresh_launch_env() | {"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    command = [sys.executable, "-m", "stages.run", "data", "--config", str(recipe)]
    done = subprocess.run(
        [*command, "--out_dir", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Кошка на диване, café" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def test_captions_the_tokenizer_cannot_read_are_said(tmp_path, micro_base, micro_world, caplog):
    # The tiny base's word-level tokenizer read each Chinese caption as one <unk>: a run trained on <unk> to the
    # end (empty captions, BLEU 0), silently.
    from transformers import AutoTokenizer

    from stages.curriculum import warn_unknown_caption_tokens

    tokenizer = AutoTokenizer.from_pretrained(micro_base[1])
    warn_unknown_caption_tokens(tokenizer, micro_world, micro_base[1])
    assert "unknown to" not in caplog.text, "the world's own captions"
    # Each Chinese word is one <unk>: half the tokens of the first caption set, more than half of the others.
    captions = {"half": "a red circle 猫 狗 鸟", "most": "a red 猫 狗 鸟", "all": "一只红色的猫坐在沙发上"}
    for name, text in captions.items():
        for i in range(12):
            Image.new("RGB", (48, 48), (20 * i, 0, 0)).save(tmp_path / f"{i}.png")
        records = [{"id": f"r{i}", "images": [f"{i}.png"], "text": text} for i in range(12)]
        (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
        recipe = RecipeConfig(input=InputSpec(format="dj_jsonl", path=str(tmp_path / "in.jsonl")), process=[])
        run_data_stage(recipe, tmp_path / name)
        warn_unknown_caption_tokens(tokenizer, tmp_path / name, micro_base[1])
    assert f"caption tokens of {tmp_path / 'half'}'s" not in caplog.text, "half of them known: a model can learn"
    assert f"60% of the caption tokens of {tmp_path / 'most'}'s first" in caplog.text
    assert f"100% of the caption tokens of {tmp_path / 'all'}'s first" in caplog.text
