"""Stock Data-Juicer ops in a recipe: fresh stats for every filter, nothing downloaded, set-up failures named
before an earlier build goes, and ops that make samples counted as such."""

from __future__ import annotations

import json
import os

import pytest

from datamodules.shards import read_index
from stages.data import RecipeConfig, report_markdown, run_data_stage
from tests.conftest import MICRO_WORLD


def _records(out) -> list[dict]:
    import webdataset as wds

    urls = [str(out / shard["url"]) for split in ("train", "val", "test") for shard in read_index(out)["splits"][split]]
    return [json.loads(sample["json"]) for sample in wds.WebDataset(urls, shardshuffle=False)]


def test_a_filter_used_again_after_the_caption_op_judges_the_new_captions(tmp_path):
    """Data-Juicer's filters keep a stat already in the sample: the second words_num_filter judged the raw captions'
    counts, kept 153 of 248 captions, 24 words on average, under max_num 12, and its stats file replaced the
    first's."""
    process = [
        {"words_num_filter": {"min_num": 1, "max_num": 1000}},
        {"oracle_caption_mapper": {}},
        {"words_num_filter": {"min_num": 6, "max_num": 12}},
    ]
    report = run_data_stage(RecipeConfig(process=process), tmp_path / "out", MICRO_WORLD, seed=0)
    second = report["ops"][2]
    assert 0 < second["out"] < second["in"] == 248
    longest = [max(record["caption_words"].values()) for record in _records(tmp_path / "out")]
    assert len(longest) == second["out"] and max(longest) <= 12
    assert [op.get("stats") for op in report["ops"]] == [
        "stats/words_num_filter.jsonl", None, "stats/words_num_filter-2.jsonl",
    ]  # fmt: skip
    raw = [json.loads(line) for line in (tmp_path / "out" / "stats" / "words_num_filter.jsonl").open()]
    again = [json.loads(line) for line in (tmp_path / "out" / "stats" / "words_num_filter-2.jsonl").open()]
    assert len(raw) == len(again) == 248  # every sample judged, dropped ones too
    assert sum(r["num_words"] for r in raw) < sum(a["num_words"] for a in again)  # the raw, then the new captions


@pytest.mark.parametrize(
    ("op", "file"),
    [("stopwords_filter", "stopwords.json"), ("flagged_words_filter", "flagged_words.json")],
)
def test_a_word_list_an_op_lacks_is_not_downloaded_and_the_earlier_build_stays(tmp_path, monkeypatch, op, file):
    """Data-Juicer fetched the list from its server with no timeout (a proxy that never answered hung the build),
    and only once the earlier build's shards were deleted."""
    from data_juicer.utils import asset_utils

    out = tmp_path / "out"
    run_data_stage(RecipeConfig(), out, MICRO_WORLD, seed=0)
    index = (out / "index.json").read_bytes()
    monkeypatch.setattr(asset_utils, "requests", asset_utils.requests)  # put back after the test
    words = "stopwords_dir" if op == "stopwords_filter" else "flagged_words_dir"
    recipe = RecipeConfig(process=[{op: {words: str(tmp_path / "no-lists")}}])
    with pytest.raises(ValueError, match=f"recipe process: {op} could not be set up: an op needs the word list {file}"):
        run_data_stage(recipe, out, MICRO_WORLD, seed=0)
    assert (out / "index.json").read_bytes() == index and len(list(out.glob("train-*.tar"))) > 0


def test_a_model_file_an_op_lacks_is_not_downloaded(tmp_path, monkeypatch):
    """Data-Juicer's loaders (fasttext, kenlm, sentencepiece, ...) fetch a missing model file with wget, which has
    no timeout either."""
    import wget
    from data_juicer.utils import model_utils

    from stages.recipe_ops import forbid_downloads

    def downloading(*args, **kwargs):
        raise AssertionError(f"a download was started: {args}")

    monkeypatch.setattr(wget, "download", downloading)
    monkeypatch.setattr(model_utils, "check_model", model_utils.check_model)  # put back after the test
    monkeypatch.setattr(model_utils, "DJMC", str(tmp_path / "models"))
    from data_juicer.ops.mapper import detect_character_locations_mapper as by_name  # imports check_model by name

    monkeypatch.setattr(by_name, "check_model", by_name.check_model)
    forbid_downloads()
    with pytest.raises(ValueError, match="the model file yoloe-11l-seg.pt"):
        by_name.check_model("yoloe-11l-seg.pt")
    with pytest.raises(ValueError, match=r"the model file lid\.176\.bin, which is not in .*models"):
        model_utils.check_model("lid.176.bin")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lid.176.bin").write_bytes(b"model")
    assert model_utils.check_model("lid.176.bin") == str(tmp_path / "models" / "lid.176.bin")
    with pytest.raises(ValueError, match="could not be loaded from"):  # damaged: Data-Juicer downloads it again
        model_utils.check_model("lid.176.bin", force=True)


def test_an_op_that_makes_samples_is_counted_as_making_them(tmp_path):
    """text_chunk_mapper makes a sample per chunk: the report said it dropped -970."""
    report = run_data_stage(
        RecipeConfig(process=[{"text_chunk_mapper": {"max_len": 10}}]), tmp_path / "out", MICRO_WORLD, seed=0
    )
    op = report["ops"][0]
    assert op["dropped"] == 0 and op["added"] == op["out"] - op["in"] > 0
    assert f"| text_chunk_mapper | {op['in']} | {op['out']} | 0 (made {op['added']}) |" in report_markdown(report)
    assert all(len(record["captions"]["caption"]) <= 10 for record in _records(tmp_path / "out"))  # characters


def test_an_unknown_op_is_named_without_data_juicers_hint_for_its_own_runner(tmp_path):
    with pytest.raises(ValueError, match="Unknown operator 'word_num_filter'") as error:
        run_data_stage(RecipeConfig(process=[{"word_num_filter": {}}]), tmp_path / "out", MICRO_WORLD)
    assert "strict_preflight" not in str(error.value)  # the data stage has no such option


def test_images_an_op_writes_go_to_the_build_not_beside_the_input_images(tmp_path, monkeypatch):
    """Data-Juicer's default put image_blur_mapper's copies in the user's image folder, under
    __dj__produced_data__, a new set for every change of its arguments, and nothing removed them."""
    from PIL import Image

    from stages.data import InputSpec

    monkeypatch.delenv("DJ_PRODUCED_DATA_DIR", raising=False)
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    records = []
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 200, 90)).save(images / f"{i}.png")
        records.append({"text": f"<__dj__image> a caption with number {i}", "images": [f"images/{i}.png"]})
    (tmp_path / "data" / "in.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*"))
    recipe = RecipeConfig(
        input=InputSpec(format="dj_jsonl", path=str(tmp_path / "data" / "in.jsonl")),
        process=[{"image_blur_mapper": {"p": 1.0, "radius": 4}}],
    )
    report = run_data_stage(recipe, tmp_path / "out")
    assert report["samples"]["kept"] == 3
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*")) == before
    assert not (tmp_path / "out" / "work").exists()  # the blurred copies now live in the shards
    assert "DJ_PRODUCED_DATA_DIR" not in os.environ


def test_shards_rebuild_when_a_file_an_op_reads_changes(tmp_path):
    """An edited stopwords list left the shards as they were (only model folders were watched), although a fresh
    build with it kept none."""
    from stages.config import CurriculumConfig, StageSpec
    from stages.curriculum import _data_inputs
    from stages.data import InputSpec as Input

    words, table = tmp_path / "words", tmp_path / "table.json"
    words.mkdir()
    (words / "stopwords.json").write_text('{"en": ["a"]}')
    table.write_text("{}")
    ops = [{"stopwords_filter": {"stopwords_dir": str(words)}}, {"some_mapper": {"mapping_file": str(table)}}]
    recipe = RecipeConfig(input=Input(), process=ops)
    cfg = CurriculumConfig(stages={"align": StageSpec(["projector"], 8, init_from="base")})
    before = _data_inputs(recipe, cfg)
    (words / "stopwords.json").write_text('{"en": ["zzz"]}')
    assert _data_inputs(recipe, cfg) != before
    before = _data_inputs(recipe, cfg)
    table.write_text('{"a": "b"}')
    assert _data_inputs(recipe, cfg) != before


def test_an_op_argument_that_is_no_path_is_no_input_even_when_a_folder_has_its_name(tmp_path, monkeypatch):
    """chars_to_remove "." named the working folder: a run's log file written there changed the data fingerprint,
    and every run rebuilt the shards and retrained every stage."""
    from stages.config import CurriculumConfig, StageSpec
    from stages.curriculum import _data_inputs
    from stages.data import InputSpec as Input

    monkeypatch.chdir(tmp_path)
    recipe = RecipeConfig(input=Input(), process=[{"remove_specific_chars_mapper": {"chars_to_remove": "."}}])
    cfg = CurriculumConfig(stages={"align": StageSpec(["projector"], 8, init_from="base")})
    before = _data_inputs(recipe, cfg)
    (tmp_path / "train.log").write_text("a line")
    assert _data_inputs(recipe, cfg) == before


@pytest.mark.parametrize(
    ("process", "message"),
    [
        ([{"words_num_filter": [6, 60]}], r"process\[0\]: words_num_filter's arguments are a mapping .* got list"),
        (["words_num_filter"], r"process\[0\]: an op is a mapping"),
        ([{"naive_grouper": {}}, {"naive_reverse_grouper": {}}], r"naive_grouper merges samples into groups"),
        (
            [
                {"words_num_filter": {}},
                {"oracle_caption_mapper": {}},
                {"topk_specified_field_selector": {"field_key": "__dj__stats__.num_words", "topk": 3}},
            ],
            r"process\[2\]: topk_specified_field_selector reads __dj__stats__.num_words, which no filter after "
            r"oracle_caption_mapper",
        ),
        (
            [{"specified_numeric_field_filter": {"field_key": "__dj__stats__.num_words", "min_value": 1}}],
            r"which no filter before it computed; put the filter that computes it first",
        ),
    ],  # fmt: skip
)
def test_an_op_of_the_wrong_shape_is_named_before_any_work(tmp_path, process, message):
    """A list of arguments failed with "'list' object is not a mapping", a grouper with "unhashable type: 'list'",
    both as tracebacks after the earlier build had gone."""
    from stages.recipe_ops import check_process

    with pytest.raises(ValueError, match=message):
        check_process(process)


def test_ops_after_a_filter_read_its_stats_until_a_mapper_changes_the_samples(tmp_path):
    """Data-Juicer's selectors and field filters read the stats earlier filters wrote (a first fix for stale stats
    dropped them after every filter, and these ops failed with an AssertionError)."""
    process = [
        {"words_num_filter": {"min_num": 1, "max_num": 1000}},
        {"topk_specified_field_selector": {"field_key": "__dj__stats__.num_words", "topk": 10}},
    ]
    report = run_data_stage(RecipeConfig(process=process), tmp_path / "out", MICRO_WORLD, seed=0)
    assert [(op["op"], op["out"]) for op in report["ops"]] == [
        ("words_num_filter", 248),
        ("topk_specified_field_selector", 10),
    ]


def test_a_build_inside_a_run_that_fails_removes_its_rendered_images(tmp_path, monkeypatch):
    """Only the data command cleaned up: a curriculum's build that failed (or got SIGTERM) left its images."""
    from data_juicer.ops.filter.text_length_filter import TextLengthFilter

    def fails(self, dataset, **kwargs):
        raise RuntimeError("the op failed")

    monkeypatch.setattr(TextLengthFilter, "run", fails)
    recipe = RecipeConfig(process=[{"text_length_filter": {"min_len": 1, "max_len": 1000}}])
    with pytest.raises(RuntimeError, match="the op failed"):
        run_data_stage(recipe, tmp_path / "data", MICRO_WORLD, seed=0, in_run=True)
    assert sorted(p.name for p in (tmp_path / "data" / "work").iterdir()) == ["stats"]  # no rendered images


def test_workers_that_start_fresh_refuse_installs_too(tmp_path):
    """The refusal was set up in the stage's process only: an op's forkserver workers (model ops, num_proc) start
    from a fresh interpreter, and there Data-Juicer would pip-install what the op lacked."""
    import subprocess
    import sys

    from tests.conftest import REPO, fresh_launch_env

    script = REPO / "tests" / "stages" / "fetching_workers.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], cwd=REPO, env=fresh_launch_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    error = json.loads(done.stdout.strip().splitlines()[-1])
    assert error and "needs_a_package_mapper: an op needs vlm_curriculum_no_such_package, which is not" in error


def test_an_op_that_fails_at_its_first_use_leaves_the_earlier_build_whole(tmp_path, monkeypatch):
    """document_simhash_deduplicator imports simhash only when it first hashes: refused then (nothing is installed),
    after the earlier build had been deleted. The ops now run before it goes."""
    from data_juicer.ops.filter.text_length_filter import TextLengthFilter

    out = tmp_path / "shards"
    run_data_stage(RecipeConfig(), out, MICRO_WORLD, seed=0)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}

    def needs_a_package(self, dataset, **kwargs):
        raise ImportError("an op needs simhash-pybind, which is not installed")

    monkeypatch.setattr(TextLengthFilter, "run", needs_a_package)
    recipe = RecipeConfig(process=[{"text_length_filter": {"min_len": 1, "max_len": 1000}}])
    with pytest.raises(ValueError, match="text_length_filter: an op needs simhash-pybind"):
        run_data_stage(recipe, out, MICRO_WORLD, seed=0)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name not in (".lock", ".building")}
    assert after == before and (out / "stats").is_dir()  # index, shards and reports of the earlier build


def test_a_deduplicator_after_a_text_mapper_judges_the_changed_text(tmp_path):
    """Data-Juicer's deduplicators keep a hash already in the sample: after a mapper made two captions the same,
    a second document_deduplicator kept both (6 in, 6 out; 4 without the first deduplicator)."""
    from stages.data import InputSpec

    captions = ["a red cat on a mat", "a red cat on a mat!", "a blue dog in a park", "a blue dog in a park!",
                "three green birds", "one yellow fish"]  # fmt: skip
    (tmp_path / "images").mkdir()
    lines = []
    for i, caption in enumerate(captions):
        _png(tmp_path / "images" / f"{i}.png", i)
        lines.append(json.dumps({"text": f"<__dj__image> {caption}", "images": [f"images/{i}.png"]}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines))
    process = [
        {"document_deduplicator": {}},
        {"remove_specific_chars_mapper": {"chars_to_remove": "!"}},
        {"document_deduplicator": {}},
    ]
    recipe = RecipeConfig(input=InputSpec(format="dj_jsonl", path=str(tmp_path / "in.jsonl")), process=process)
    report = run_data_stage(recipe, tmp_path / "out")
    assert [(op["in"], op["out"]) for op in report["ops"]] == [(6, 6), (6, 6), (6, 4)]


def _png(path, seed: int) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32), (30 * seed, 120, 200)).save(path)


def test_a_second_build_in_one_process_writes_its_workers_images_into_its_own_folder(tmp_path):
    """The forkserver the ops' workers come from keeps the environment it started with: a second build's workers
    wrote their images into the first build's work/ (DJ_PRODUCED_DATA_DIR). An empty DJ_PRODUCED_DATA_DIR came
    back from a build as the build's deleted work/produced."""
    import subprocess
    import sys

    from tests.conftest import REPO, fresh_launch_env

    script = REPO / "tests" / "stages" / "fetching_workers.py"
    env = {**fresh_launch_env(), "DJ_PRODUCED_DATA_DIR": ""}
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "two_builds"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["env_after"] == ""
    assert seen["first"] == [str(tmp_path / "first" / "work" / "produced")] * 2
    assert seen["second"] == [str(tmp_path / "second" / "work" / "produced")] * 2
