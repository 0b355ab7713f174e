"""The data stage through the real Data-Juicer pipeline: inputs, bad samples, BLIP-2, shards, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from datamodules.data_inputs import SkipLog
from datamodules.shards import read_index
from datamodules.text_stats import corpus_stats, mattr, mtld, percentile
from datamodules.world import WorldConfig, vocabulary_corpus
from stages.data import InputSpec, RecipeConfig, load_recipe, run_data_stage, split_of
from tests.conftest import SYNTHETIC_RECIPE
from tests.stages.blip2_fixture import build_tiny_blip2

BLIP2_OPS = [
    {
        "blip2_caption_mapper": {
            "prompts": {"short": "", "detailed": "a picture of"},
            "max_new_tokens": 10,
            "max_words": 8,
        }
    },
    {"words_num_filter": {"min_num": 1, "max_num": 60}},
    {"image_shape_filter": {"min_width": 32, "min_height": 32}},
]


@pytest.fixture(scope="module")
def blip2(tmp_path_factory) -> Path:
    return build_tiny_blip2(tmp_path_factory.mktemp("blip2"))


def _image(path: Path, side: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (side * 3 % 255, 80, 160)).save(path)


def _recipe(blip2: Path, fmt: str, path: Path, **kwargs) -> RecipeConfig:
    ops = [{**BLIP2_OPS[0]["blip2_caption_mapper"], "model_path": str(blip2)}]
    process = [{"blip2_caption_mapper": ops[0]}, *BLIP2_OPS[1:]]
    return RecipeConfig(input=InputSpec(format=fmt, path=str(path)), process=process, **kwargs)


@pytest.fixture
def llava(tmp_path) -> Path:
    """Six records: four good (one too small for the image filter), one missing image, one corrupt."""
    records = []
    for i in range(4):
        _image(tmp_path / "images" / f"{i}.png", side=16 if i == 3 else 48)
        records.append({"id": f"s{i}", "image": f"images/{i}.png", "conversations": _turns(f"a caption number {i}")})
    records.append({"id": "missing", "image": "images/nowhere.png", "conversations": _turns("lost")})
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png at all")
    records.append({"id": "corrupt", "image": "images/bad.png", "conversations": _turns("broken")})
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return path


def _turns(answer: str) -> list[dict]:
    return [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": answer}]


def test_llava_input_through_blip2_and_filters_with_every_skip_counted(blip2, llava, tmp_path):
    out = tmp_path / "shards"
    report = run_data_stage(_recipe(blip2, "llava", llava, max_skip_share=0.5), out)
    assert report["samples"] == {"input": 6, "skipped_at_input": 2, "processed": 4, "kept": 3, "renamed_keys": 0}
    assert report["input_skips"]["counts"] == {"missing_image": 1, "corrupt_image": 1}
    assert report["input_skips"]["first_keys"] == {"missing_image": ["missing"], "corrupt_image": ["corrupt"]}
    assert [(o["op"], o["in"], o["out"]) for o in report["ops"]] == [
        ("blip2_caption_mapper", 4, 4),
        ("words_num_filter", 4, 4),
        ("image_shape_filter", 4, 3),
    ]
    stats = [json.loads(line) for line in (out / "stats" / "image_shape_filter.jsonl").read_text().splitlines()]
    assert len(stats) == 4  # stats for every sample, the dropped one too
    index = read_index(out)
    assert sum(s["count"] for split in index["splits"].values() for s in split) == 3
    sample_words = [w for split in index["splits"].values() for s in split for w in s["caption_words"]]
    assert all(set(words) == {"short", "detailed"} and max(words.values()) <= 8 for words in sample_words)
    assert "blip2_caption_mapper" in (out / "report.md").read_text()


def test_too_many_unusable_samples_fail_naming_the_file(blip2, llava, tmp_path):
    with pytest.raises(ValueError, match=r"llava\.json.*2 of 6.*max_skip_share"):
        run_data_stage(_recipe(blip2, "llava", llava, max_skip_share=0.1), tmp_path / "out")


def test_dj_jsonl_with_a_truncated_last_line(blip2, tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    lines = [
        json.dumps({"text": "<__dj__image> first", "images": ["a.png"]}),
        json.dumps({"text": "second", "images": ["b.png"]}),
    ]
    lines.append('{"text": "<__dj__image> cut off", "ima')  # a download that stopped mid-line
    lines.append(json.dumps({"text": "no image here"}))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines))
    report = run_data_stage(_recipe(blip2, "dj_jsonl", path, max_skip_share=0.6), tmp_path / "out")
    assert report["input_skips"]["counts"] == {"unreadable_line": 1, "no_image": 1}
    assert report["samples"]["kept"] == 2


def _shard_records(out: Path) -> list[dict]:
    import webdataset as wds

    urls = [str(out / s["url"]) for split in read_index(out)["splits"].values() for s in split]
    return [
        json.loads(sample["json"]) for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    ]


def test_stock_image_captioning_mapper_through_the_same_recipe_format(llava, tmp_path):
    # Data-Juicer's own op, loading a local BLIP-2 laid out like OPT-2.7B's vocabulary (the op pins its image token).
    from tests.stages.blip2_fixture import build_tiny_blip2

    model = build_tiny_blip2(tmp_path / "opt_layout_blip2", opt_image_token=True)
    stock = {"image_captioning_mapper": {"hf_img2seq": str(model), "keep_original_sample": False}}
    recipe = RecipeConfig(
        input=InputSpec(format="llava", path=str(llava)),
        process=[stock, {"image_shape_filter": {"min_width": 32, "min_height": 32}}],
        max_skip_share=0.5,
    )
    report = run_data_stage(recipe, tmp_path / "out")
    assert [(op["op"], op["in"], op["out"]) for op in report["ops"]] == [
        ("image_captioning_mapper", 4, 4),
        ("image_shape_filter", 4, 3),
    ]
    records = _shard_records(tmp_path / "out")
    assert sorted(r["key"] for r in records) == ["s0", "s1", "s2"]
    vocabulary = {w for line in vocabulary_corpus() for w in line.split()}
    for record in records:
        caption = record["captions"]["caption"]
        assert "__dj__" not in caption and caption.split() and set(caption.split()) <= vocabulary
        assert record["caption_words"]["caption"] == len(caption.split())


def test_caption_variants_without_a_word_are_left_out_and_counted():
    # A variant of emoji alone was kept beside a real one: it counts a word, so a 1-word budget trained on it.
    from stages.data import _with_words, build_report, caption_variants, report_markdown

    def row(key: str, variants: dict) -> dict:
        return {"__key__": key, "caption_variants": json.dumps(variants), "text": "", "raw_caption": ""}

    rows = [row("a", {"short": "🔥🔥", "long": "a dog runs on the grass"}), row("b", {"short": "?!", "long": " "})]
    assert caption_variants(rows[0]) == {"long": "a dog runs on the grass"}
    kept, empty, wordless = _with_words(rows)
    assert [r["__key__"] for r in kept] == ["a"] and dict(empty.counts) == {"empty_caption": 1}
    assert dict(wordless.counts) == {"short": 1} and wordless.examples == {"short": ["a"]}
    recipe = RecipeConfig(input=InputSpec(format="dj_jsonl", path="x.jsonl"), process=[])
    report = build_report(recipe, rows, kept, [], SkipLog(), 2, empty, 0, wordless)
    assert report["wordless_variants"]["counts"] == {"short": 1}
    assert "without a word (their samples keep the others): short 1" in report_markdown(report)


def test_samples_left_without_a_caption_are_counted_not_written(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    lines = [
        json.dumps({"text": "<__dj__image> a red circle", "images": ["a.png"]}),
        json.dumps({"text": "<__dj__image>", "images": ["b.png"]}),
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    recipe = RecipeConfig(input=InputSpec(format="dj_jsonl", path=str(tmp_path / "data.jsonl")), process=[])
    report = run_data_stage(recipe, tmp_path / "out")
    assert report["output_skips"]["counts"] == {"empty_caption": 1}
    assert report["samples"]["kept"] == 1
    assert [r["captions"] for r in _shard_records(tmp_path / "out")] == [{"caption": "a red circle"}]
    assert "empty_caption 1" in (tmp_path / "out" / "report.md").read_text()
    # Every caption without a word: the build wrote an empty index (exit 0), and the curriculum then blamed the
    # evaluated split's share.
    (tmp_path / "data.jsonl").write_text(lines[1] + "\n" + lines[1].replace("<__dj__image>", "<__dj__image> 🐶 !!"))
    with pytest.raises(ValueError, match=r"kept 2 of 2 samples, and none has a word in a caption \(empty_caption"):
        run_data_stage(recipe, tmp_path / "empty")
    assert not (tmp_path / "empty" / "index.json").exists()


def test_the_recipe_fingerprint_is_its_content_not_its_argument_order():
    # Its repr kept an op's arguments in the order written: reordered, the shards were rebuilt and every finished
    # stage trained again.
    from stages.config import CurriculumConfig, StageSpec
    from stages.curriculum import data_fingerprints

    cfg = CurriculumConfig(stages={"align": StageSpec(["projector"], 8, init_from="base")})

    def wanted(args: dict) -> str:
        return data_fingerprints(RecipeConfig(process=[{"words_num_filter": args}]), cfg)[0]

    assert wanted({"min_num": 3, "max_num": 100}) == wanted({"max_num": 100, "min_num": 3})
    assert wanted({"min_num": 3, "max_num": 100}) != wanted({"min_num": 4, "max_num": 100})
    # A build stamped as before (by the recipe's repr) is still taken for its recipe: no forced rebuild.
    from stages.curriculum import SHARD_FORMAT, _data_inputs
    from stages.stage import fingerprint

    recipe = RecipeConfig(process=[{"words_num_filter": {"min_num": 3}}])
    old_stamp = fingerprint({"recipe": recipe, **_data_inputs(recipe, cfg), "format": SHARD_FORMAT})  # as written
    assert data_fingerprints(recipe, cfg)[1] == old_stamp
    # Shards of the inputs whose reading or drawing changed are rebuilt; the default world's are not.
    dj = RecipeConfig(input=InputSpec(format="dj_jsonl", path="in.jsonl"), process=[])
    dj_before = fingerprint({"recipe": dj, **_data_inputs(dj, cfg), "format": SHARD_FORMAT})
    assert dj_before not in data_fingerprints(dj, cfg)
    overlapping = replace(cfg, world=WorldConfig(overlap=0.1))
    assert data_fingerprints(recipe, overlapping)[1] != fingerprint(
        {"recipe": recipe, **_data_inputs(recipe, overlapping), "format": SHARD_FORMAT}
    )


def test_the_same_recipe_and_inputs_give_byte_identical_shards(tmp_path):
    world = WorldConfig(train_size=40, val_size=8, test_size=8)
    recipe = load_recipe(SYNTHETIC_RECIPE, ["--shard_size=16"])
    first, second = tmp_path / "a", tmp_path / "b"
    run_data_stage(recipe, first, world, seed=3)
    run_data_stage(recipe, second, world, seed=3)
    tars = sorted(p.name for p in first.glob("*.tar"))
    assert tars == sorted(p.name for p in second.glob("*.tar")) and len(tars) == 5
    assert all((first / t).read_bytes() == (second / t).read_bytes() for t in tars)
    assert (first / "index.json").read_text() == (second / "index.json").read_text()


def test_split_by_key_hash_is_stable():
    keys = [f"k{i}" for i in range(2000)]
    splits = [split_of(k, 0.1, 0.1) for k in keys]
    assert 150 < splits.count("test") < 250 and 150 < splits.count("val") < 250
    # The same in another process with another string-hash salt (Python's own hash() would differ), and
    # pinned: a change of hash moves samples between splits, so old and new shards would share test images.
    code = "from stages.data import split_of; print(''.join(split_of(f'k{i}', .1, .1)[0] for i in range(2000)))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == "".join(split[0] for split in splits)
    assert [split_of(k, 0.1, 0.1) for k in ("k15", "k20", "k0")] == ["test", "val", "train"]


def test_text_statistics_against_hand_computed_values():
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([1, 2, 3, 4], 95) == 4
    # MATTR, window 2: windows (a a) (a b) (b c) -> TTRs 0.5, 1, 1
    assert mattr(["a", "a", "b", "c"], window=2) == pytest.approx(2.5 / 3)
    # MTLD: "a a a a" -> forward: TTR 1, 0.5 (<= 0.72: one factor, reset), 1, 0.5 (second factor): 4 / 2
    assert mtld(["a", "a", "a", "a"]) == pytest.approx(2.0)
    # Both passes and the partial factor: forward a a | b c -> 1 factor + partial 0 -> 4 / 1;
    # backward c b a a never falls to 0.72 (TTR 0.75): partial (1 - 0.75) / 0.28 -> 4 / 0.893 = 4.48.
    assert mtld(["a", "a", "b", "c"]) == pytest.approx((4.0 + 4 / (0.25 / 0.28)) / 2)
    stats = corpus_stats(["a red circle", "a red circle and a blue star"], ttr_tokens=3)
    assert stats["mean_words"] == pytest.approx(5.0) and stats["vocabulary"] == 6  # (3 + 7) / 2
    assert stats["ttr_equal_tokens"] == pytest.approx(1.0) and stats["ttr_tokens"] == 3


def test_the_stock_captioner_with_its_defaults_writes_readable_identical_shards(llava, tmp_path):
    """Data-Juicer's default keeps the original sample beside the new one: both had the same key, which a
    shard cannot hold twice (reading it failed); and it samples, so two runs wrote different shards."""
    from tests.stages.blip2_fixture import build_tiny_blip2

    model = build_tiny_blip2(tmp_path / "opt_layout_blip2", opt_image_token=True)
    recipe = RecipeConfig(
        input=InputSpec(format="llava", path=str(llava)),
        process=[{"image_captioning_mapper": {"hf_img2seq": str(model)}}],
        max_skip_share=0.5,
    )
    report = run_data_stage(recipe, tmp_path / "a")
    # Random weights: a generated caption may hold no word (punctuation alone), left out as empty_caption.
    dropped = report["output_skips"]["first_keys"].get("empty_caption", [])
    assert report["samples"]["kept"] == 8 - len(dropped) >= 6 and report["samples"]["renamed_keys"] == 4
    records = _shard_records(tmp_path / "a")
    every = {"s0", "s0_1", "s1", "s1_1", "s2", "s2_1", "s3", "s3_1"}
    assert sorted(r["key"] for r in records) == sorted(every - set(dropped))
    run_data_stage(recipe, tmp_path / "b")
    tars = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert all((tmp_path / "a" / t).read_bytes() == (tmp_path / "b" / t).read_bytes() for t in tars)


@pytest.mark.parametrize(
    ("process", "message"),
    [
        ([{"blip2_caption_mapper": {"max_word": 3}}], "Unknown parameter 'max_word'"),
        ([{"words_num_filter": {"min_nun": 11}}], "Unknown parameter 'min_nun'"),
        ([{"word_num_filter": {}}], "Unknown operator 'word_num_filter'"),
        (
            [{"oracle_caption_mapper": {}}, {"image_text_similarity_filter": {}}],
            "image_text_similarity_filter after oracle_caption_mapper would judge no image",
        ),
        (  # found at the first batch before, as a hub id error, once every image was read
            [{"blip2_caption_mapper": {"model_path": "models/no-such-blip2"}}],
            "blip2_caption_mapper.model_path models/no-such-blip2 is no model folder",
        ),
        (  # failed at the op's first batch with "couldn't connect to huggingface.co", a misspelt folder too
            [{"image_captioning_mapper": {"hf_img2seq": "models/no-such-blip2"}}],
            "image_captioning_mapper.hf_img2seq models/no-such-blip2 is no model folder",
        ),
        (
            [{"image_captioning_mapper": {}}],
            "hf_img2seq Salesforce/blip2-opt-2.7b (Data-Juicer's default) is no model folder (no config.json there) "
            "and not in the Hugging Face cache",
        ),
    ],
)
def test_a_recipe_process_that_would_be_silently_wrong_fails_before_any_op(process, message, tmp_path):
    """Misspelt op arguments were passed on and ignored (a word cap of 3 capped nothing)."""
    recipe = RecipeConfig(process=process)
    with pytest.raises(ValueError, match="recipe process") as error:
        run_data_stage(recipe, tmp_path / "out", WorldConfig(train_size=8, val_size=2, test_size=2))
    assert message in str(error.value)
    assert not list((tmp_path / "out").glob("*.tar"))


def test_the_stock_captioner_takes_a_hub_id_from_the_cache_offline(tmp_path, monkeypatch):
    """Offline, a hub id in the Hugging Face cache is as good as a folder; one missing from it fails by name."""
    from huggingface_hub import constants

    from stages.recipe_ops import check_stock_captioner

    snapshot = tmp_path / "hub" / "models--someone--blip2-small" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--someone--blip2-small" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--blip2-small" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    check_stock_captioner({"hf_img2seq": "someone/blip2-small"})
    with pytest.raises(ValueError, match="hf_img2seq someone/blip2-large is no model folder"):
        check_stock_captioner({"hf_img2seq": "someone/blip2-large"})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, the hub decides at the op's first batch
    check_stock_captioner({"hf_img2seq": "someone/blip2-large"})


def test_a_text_mapper_after_the_caption_op_fails_instead_of_being_ignored(tmp_path):
    """The shards take caption_variants, which a later text mapper does not change: the report described
    captions that were not in the shards."""
    process = [{"oracle_caption_mapper": {}}, {"remove_specific_chars_mapper": {"chars_to_remove": "o"}}]
    with pytest.raises(ValueError, match="an op after the caption op changed the text of sample"):
        run_data_stage(
            RecipeConfig(process=process), tmp_path / "out", WorldConfig(train_size=8, val_size=2, test_size=2)
        )


def test_equal_size_ttr_over_zero_tokens_is_over_zero_tokens():
    """Raw alt-texts with no words give both sides an equal size of 0: the new captions' TTR was over all."""
    assert (corpus_stats(["a dog"], ttr_tokens=0)["ttr_tokens"], corpus_stats(["a dog"])["ttr_tokens"]) == (0, 2)


def test_punctuation_does_not_make_new_word_types():
    assert corpus_stats(["A dog, on grass.", "a dog on grass"])["vocabulary"] == 4
    # and the type-token ratio compares raw and new captions over as many words, punctuation left out
    from stages.data import build_report

    raw = {"__key__": "k", "raw_caption": "a dog - a cat -- on grass", "text": "a dog and a cat on grass"}
    kept = [{**raw, "caption_variants": json.dumps({"long": raw["text"]})}]
    report = build_report(RecipeConfig(), [raw], kept, [], SkipLog(), 1, SkipLog())
    assert report["text"]["raw"]["ttr_tokens"] == report["text"]["recaptioned"]["ttr_tokens"] == 6


def test_a_value_the_preflight_check_cannot_read_does_not_stop_the_recipe():
    from stages.recipe_ops import check_process

    check_process([{"words_num_filter": {"min_num": 6, "max_num": float("inf")}}])  # the op itself takes it


NUM_PROC_SCRIPT = """
import json, sys
from pathlib import Path
from stages.data import InputSpec, RecipeConfig, run_data_stage

def recipe(llava, model, num_proc):
    args = {"model_path": model, "prompts": {"short": ""}, "max_new_tokens": 6, "batch_size": 2}
    args.update({"num_proc": num_proc} if num_proc else {})
    return RecipeConfig(input=InputSpec(format="llava", path=llava), process=[{"blip2_caption_mapper": args}],
                        max_skip_share=0.5)

if __name__ == "__main__":  # workers started fresh import this file again
    llava, model, out = sys.argv[1:]
    reports = [run_data_stage(recipe(llava, model, n), Path(out) / f"np{n}") for n in (None, 2)]
    print(json.dumps([report["ops"][0] for report in reports]))
"""


def test_workers_of_the_blip2_op_start_fresh_and_write_the_same_shards(blip2, llava, tmp_path):
    """num_proc 2 after the op had run in-process forked workers from a process whose torch threads were
    running: it hung (seen killed at 600 s). Its workers now start fresh, as Data-Juicer's own model ops'."""
    import os
    import subprocess
    import sys

    script = tmp_path / "num_proc.py"
    script.write_text(NUM_PROC_SCRIPT)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    args = [sys.executable, str(script), str(llava), str(blip2), str(tmp_path)]
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    in_process, workers = json.loads(done.stdout.strip().splitlines()[-1])
    assert "phases" in in_process and "phases" not in workers and workers["workers"] == 2
    tars = sorted(p.name for p in (tmp_path / "npNone").glob("*.tar"))
    assert tars and all((tmp_path / "npNone" / t).read_bytes() == (tmp_path / "np2" / t).read_bytes() for t in tars)


def test_a_rebuild_leaves_only_its_own_shards_and_a_killed_one_no_index(tmp_path, monkeypatch):
    """A rebuild into a folder left the earlier build's extra shards beside its own, and one killed half-way
    left the earlier index over new shards, which then trained as a whole build."""
    import stages.data
    from tests.conftest import MICRO_WORLD

    out = tmp_path / "shards"
    run_data_stage(load_recipe(SYNTHETIC_RECIPE, ["--shard_size=64"]), out, MICRO_WORLD, seed=0)
    assert len(list(out.glob("train-*.tar"))) == 3  # 192 images
    run_data_stage(load_recipe(SYNTHETIC_RECIPE, ["--shard_size=1000"]), out, MICRO_WORLD, seed=0)
    listed = [shard["url"] for shards in read_index(out)["splits"].values() for shard in shards]
    assert (
        sorted(path.name for path in out.glob("*.tar"))
        == sorted(listed)
        == ["test-000000.tar", "train-000000.tar", "val-000000.tar"]
    )

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed("killed after writing the shards")

    monkeypatch.setattr(stages.data, "build_report", killed)
    with pytest.raises(Killed):
        run_data_stage(load_recipe(SYNTHETIC_RECIPE, ["--shard_size=1000"]), out, MICRO_WORLD, seed=1)
    assert (out / "train-000000.tar").is_file()
    with pytest.raises(FileNotFoundError, match="no shard index"):
        read_index(out)
    monkeypatch.undo()
    run_data_stage(load_recipe(SYNTHETIC_RECIPE, ["--shard_size=1000"]), out, MICRO_WORLD, seed=1)  # its leftovers
    assert read_index(out)


@pytest.mark.parametrize("name", ["work/thesis.tex", "train-000000.tar"])
def test_one_name_a_build_writes_is_enough_to_refuse_a_folder(tmp_path, capsys, name):
    from stages.run import main

    home = tmp_path / "home"
    (home / name).parent.mkdir(parents=True, exist_ok=True)
    (home / name).write_text("mine")
    assert main(["data", "--config", str(SYNTHETIC_RECIPE), "--out_dir", str(home), "--world.train_size=64"]) == 2
    assert f"holds {name.split('/')[0]}, which this command writes" in capsys.readouterr().err
    assert (home / name).read_text() == "mine"


def test_a_build_into_a_folder_of_other_files_is_refused_and_deletes_nothing(tmp_path, capsys):
    """Into a home folder, a build deleted its work/ and stats/ (and its report.md) before reading the input;
    with a mistyped input path, an earlier build lost its shards."""
    from stages.run import main
    from tests.conftest import MICRO_WORLD

    home = tmp_path / "home"
    for name in ("work/thesis.tex", "stats/analysis.R", "report.md"):
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text("mine")
    build = ["data", "--config", str(SYNTHETIC_RECIPE), "--out_dir", str(home), "--world.train_size=64"]
    assert main(build) == 2
    assert f"--out_dir {home} holds report.md, stats, work, which this command writes" in capsys.readouterr().err
    assert all((home / name).read_text() == "mine" for name in ("work/thesis.tex", "stats/analysis.R", "report.md"))
    out = tmp_path / "shards"
    run_data_stage(load_recipe(SYNTHETIC_RECIPE), out, MICRO_WORLD, seed=0)
    (out / "notes.txt").write_text("beside an earlier build: kept")
    missing = tmp_path / "nowhere.jsonl"
    own = ["data", "--config", str(SYNTHETIC_RECIPE), "--out_dir", str(out), "--input.format=dj_jsonl"]
    assert main([*own, f"--input.path={missing}"]) == 2
    assert f"input.path: {missing} does not exist" in capsys.readouterr().err
    assert sum(shard["count"] for shard in read_index(out)["splits"]["train"]) == 192, "the earlier build stays"
    run_data_stage(load_recipe(SYNTHETIC_RECIPE), out, MICRO_WORLD, seed=1)
    assert (out / "notes.txt").is_file()


def test_a_bad_recipe_leaves_the_earlier_build_and_one_that_keeps_nothing_fails_naming_the_ops(tmp_path):
    """A recipe whose ops keep no sample wrote an index of empty splits (exit 0), and the curriculum then blamed
    the evaluated split's share."""
    from tests.conftest import MICRO_WORLD

    out = tmp_path / "shards"
    run_data_stage(load_recipe(SYNTHETIC_RECIPE), out, MICRO_WORLD, seed=0)
    bad = RecipeConfig(process=[{"blip2_caption_mapper": {"model_path": str(tmp_path / "nowhere")}}])
    with pytest.raises(ValueError, match="is no model folder"):
        run_data_stage(bad, out, MICRO_WORLD, seed=0)
    assert sum(shard["count"] for shard in read_index(out)["splits"]["train"]) == 192  # still the earlier build
    keeps_none = [{"oracle_caption_mapper": {}}, {"words_num_filter": {"min_num": 1000}}]
    with pytest.raises(ValueError, match=r"kept none of 248 samples \(words_num_filter dropped 248; stats in "):
        run_data_stage(RecipeConfig(process=keeps_none), out, MICRO_WORLD, seed=0)
    assert sorted(p.name for p in (out / "work").iterdir()) == ["stats"]  # the rendered images go, the stats stay
    assert sum(shard["count"] for shard in read_index(out)["splits"]["train"]) == 192  # the earlier build, whole


def test_images_are_read_as_their_shard_is_written_not_all_first(tmp_path, monkeypatch):
    # Every image's bytes were read into one list before the first shard was written: at 8k images of 100 KB
    # peak RSS was 1.4 GB against 0.65 GB read as written; at 1M images, 100 GB.
    import stages.data
    from tests.conftest import MICRO_WORLD

    read, written = [], []
    real_read, real_write = stages.data.shard_image, stages.data.write_shards

    def reading(path):
        read.append(path)
        return real_read(path)

    def writing(samples, out_dir, split, shard_size):
        written.append(len(read))
        return real_write(samples, out_dir, split, shard_size)

    monkeypatch.setattr(stages.data, "shard_image", reading)
    monkeypatch.setattr(stages.data, "write_shards", writing)
    run_data_stage(load_recipe(SYNTHETIC_RECIPE), tmp_path / "out", MICRO_WORLD, seed=0)
    assert written[0] == 0 and len(read) == 248, "no image read before the first split's shards start"


def test_an_op_that_fails_puts_the_start_method_back(tmp_path, monkeypatch):
    """An op with workers sets the process's multiprocessing start method; it was put back only when every op
    succeeded, and a failed build left a program that goes on (compare, bench, a notebook) with another one."""
    import multiprocess
    from data_juicer.ops.filter.text_length_filter import TextLengthFilter

    from tests.conftest import MICRO_WORLD

    def fails(self, dataset, **kwargs):
        raise RuntimeError("the op failed")

    monkeypatch.setattr(TextLengthFilter, "run", fails)
    before = multiprocess.get_start_method(allow_none=True)
    multiprocess.set_start_method("spawn", force=True)  # not what the op's workers set (fork, on Linux)
    try:
        process = [{"text_length_filter": {"min_len": 1, "max_len": 1000, "num_proc": 2}}]
        recipe = RecipeConfig(input=InputSpec(format="synthetic"), process=process)
        with pytest.raises(RuntimeError, match="the op failed"):
            run_data_stage(recipe, tmp_path / "out", MICRO_WORLD, seed=0)
        assert multiprocess.get_start_method(allow_none=True) == "spawn"
    finally:
        multiprocess.set_start_method(before, force=True)


def test_base_models_of_an_overlapping_world_are_pretrained_again_once(tmp_path, monkeypatch):
    """The world with `overlap` is drawn otherwise since 2026-12-07: its shards are rebuilt (format 3), and its tiny
    tower, pretrained on the old drawing, has to be too, or a rerun and a fresh clone differ."""
    import stages.curriculum as curriculum
    from stages.config import CurriculumConfig, StageSpec
    from stages.stage import fingerprint

    built = []
    monkeypatch.setattr(curriculum, "pretrain_vision", lambda *args: built.append("vision") or 1.0)
    monkeypatch.setattr(curriculum, "pretrain_lm", lambda *args: built.append("lm") or 1.0)
    stages = {"align": StageSpec(["projector"], 8, init_from="base")}
    for overlap, again in ((0.0, False), (0.1, True)):
        cfg = CurriculumConfig(stages=stages, world=WorldConfig(overlap=overlap))
        (tmp_path / "base").mkdir(exist_ok=True)
        before = fingerprint({"base": cfg.base, "world": cfg.world, "seed": cfg.seed})  # as stamped until then
        (tmp_path / "base" / "build.json").write_text(json.dumps({"fingerprint": before}))
        built.clear()
        curriculum.prepare_base_models(cfg, tmp_path)
        assert built == (["vision", "lm"] if again else [])
