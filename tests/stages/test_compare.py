"""`stages.run compare` on the micro world: the baseline's budget, shared inputs, and the summary's arithmetic."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml

from modules.training_module import LearningRates
from stages.compare import METRICS, _pooled, baseline_argv, baseline_stages, collect
from stages.config import CurriculumConfig, StageSpec, TrainerConfig
from stages.metrics import by_length, hallucination
from stages.run import main
from tests.conftest import MICRO_ARGS


def test_baseline_has_the_curriculums_steps_on_its_longest_captions():
    sft = ["projector", "lora"]
    stages = {
        "align": StageSpec(["projector"], 8, init_from="base", trainer=TrainerConfig(max_steps=40)),
        "sft_a": StageSpec(sft, 8, lr=LearningRates(lora=1e-3), trainer=TrainerConfig(max_steps=30)),
        "sft_b": StageSpec(sft, 48, lr=LearningRates(lora=2e-3), trainer=TrainerConfig(max_steps=50)),
    }
    baseline = baseline_stages(CurriculumConfig(stages=stages))
    assert list(baseline) == ["align", "sft"]
    assert baseline["align"]["trainer"]["max_steps"] == 40
    assert baseline["sft"]["trainer"]["max_steps"] == 80 and baseline["sft"]["max_words"] == 48
    assert baseline["sft"]["lr"]["lora"] == 2e-3 and baseline["sft"]["init_from"] == "previous"


def test_baseline_follows_the_chain_the_final_model_was_trained_through():
    # A last stage starting from sft_a trained the final model 30 + 70 steps after align; the baseline had all 150.
    sft, steps = ["projector", "lora"], {"align": 40, "sft_a": 30, "sft_b": 50, "sft_c": 70}
    inits = {"align": "base", "sft_a": "previous", "sft_b": "previous", "sft_c": "sft_a"}
    stages = {
        name: StageSpec(["projector"] if name == "align" else sft, 8 if name == "sft_a" else 48,
                        init_from=inits[name], trainer=TrainerConfig(max_steps=steps[name]))
        for name in steps
    }  # fmt: skip
    assert baseline_stages(CurriculumConfig(stages=stages))["sft"]["trainer"]["max_steps"] == 100
    stages["sft_c"] = StageSpec(sft, 48, init_from="base", trainer=TrainerConfig(max_steps=70))
    with pytest.raises(ValueError, match="the last stage, sft_c, does not start from the first, align"):
        baseline_stages(CurriculumConfig(stages=stages))


def test_a_first_stage_named_sft_or_training_lora_is_handled_before_any_run():
    # A first stage named "sft" shared the baseline's key: the baseline lost its align stage and failed after the
    # curriculum arm had trained. A first stage that trains LoRA made the "one-SFT-stage" baseline a curriculum.
    sft = ["projector", "lora"]
    stages = {
        "sft": StageSpec(["projector"], 8, init_from="base", trainer=TrainerConfig(max_steps=3)),
        "sft_long": StageSpec(sft, 48, trainer=TrainerConfig(max_steps=5)),
    }
    assert list(baseline_stages(CurriculumConfig(stages=stages))) == ["sft", "sft_baseline"]
    stages["sft"] = StageSpec(sft, 8, init_from="base", trainer=TrainerConfig(max_steps=3))
    with pytest.raises(ValueError, match=r"the first stage, sft, trains \['lora'\]: the baseline keeps it"):
        baseline_stages(CurriculumConfig(stages=stages))


def test_baseline_needs_max_steps():
    stages = {
        "align": StageSpec(trainable=["projector"], max_words=8, init_from="base"),
        "sft": StageSpec(trainable=["lora"], max_words=20),
    }
    with pytest.raises(ValueError, match="stages.align.trainer.max_steps"):
        baseline_stages(CurriculumConfig(stages=stages))


def test_length_buckets_pool_the_seeds_as_if_scored_together(tmp_path):
    """Seed 0 has 1 short caption (hallucinating), seed 1 has 3 (clean): the bucket's rates over seeds are
    those of the 4 captions scored at once (CHAIR-s 1/4), not the mean of the seeds' rates (1/2)."""
    red = {"shape": "circle", "colour": "red", "size": "large", "place": "top"}
    star = {"shape": "star", "colour": "blue", "size": "small", "place": "center"}
    seeds = [
        (["a red circle and a green square"], [[red, star]]),
        (["a red circle", "a blue star", "a red circle and a blue star"], [[red], [star], [red, star]]),
    ]
    runs = []
    for seed, (captions, objects) in enumerate(seeds):
        run = tmp_path / f"curriculum-{seed}"
        (run / "sft").mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"sft": {}}))
        metrics = {m: 0.0 for m in METRICS} | {"by_length": by_length(captions, objects)}
        (run / "sft" / "metrics.json").write_text(json.dumps(metrics))
        runs.append(run)
    bucket = collect({"curriculum": runs})["curriculum"]["last_stage_by_length"]["0-8"]
    together = hallucination([c for cs, _ in seeds for c in cs], [o for _, os in seeds for o in os])
    assert bucket["images"] == 4
    for metric in ("chair_i", "chair_s", "recall", "attr_halluc"):
        assert bucket[metric]["pooled"] == pytest.approx(together[metric]), metric
    assert bucket["chair_s"]["pooled"] == pytest.approx(1 / 4) and bucket["chair_s"]["values"] == [1.0, 0.0]
    assert bucket["chair_s"]["std"] == pytest.approx(statistics.stdev([1.0, 0.0]))
    # A bucket where one seed has no mention: its CHAIR-i of 0.0 is no rate. The spread is over the seeds that
    # have mentions; with one such seed it is undefined, not 0.
    one = {"images": 1, "chair_i": 0.5, "mentions": 2}
    none = {"images": 1, "chair_i": 0.0, "mentions": 0}
    assert _pooled([one, none], "chair_i") == {"pooled": 0.5, "std": None, "values": [0.5, 0.0]}


@pytest.mark.slow
def test_compare_runs_both_arms_on_the_same_inputs(tmp_path, capsys):
    tiny = "configs/curriculum/tiny.yaml"
    override = json.dumps(MICRO_ARGS)
    assert main(["compare", "--profile", tiny, "--seeds=2", f"--root={tmp_path}", f"--override={override}"]) == 0
    assert "| baseline | sft |" in capsys.readouterr().out
    from stages.paths import input_path

    for seed in (0, 1):
        runs = {arm: tmp_path / f"{arm}-{seed}" for arm in ("curriculum", "baseline")}
        configs = {arm: yaml.safe_load(next(run.glob("*/config.yaml")).read_text()) for arm, run in runs.items()}
        for key in ("shard_dir", "lm_path"):  # the curriculum's own folders, which the baseline reads
            folders = {arm: input_path(configs[arm]["inputs"][key], runs[arm]) for arm in runs}
            assert folders["baseline"] == folders["curriculum"].resolve()
        assert json.loads((tmp_path / f"baseline-{seed}" / "sft" / "done.json").read_text())["global_steps"] == 9
    result = json.loads((tmp_path / "compare.json").read_text())
    values = [
        json.loads((tmp_path / f"baseline-{seed}" / "sft" / "metrics.json").read_text())["chair_i"] for seed in (0, 1)
    ]
    summary = result["baseline"]["stages"]["sft"]["chair_i"]
    assert summary["values"] == values
    assert summary["mean"] == pytest.approx(statistics.fmean(values))
    assert summary["std"] == pytest.approx(statistics.stdev(values))
    assert (tmp_path / "compare.png").stat().st_size > 1000 and (tmp_path / "compare.md").is_file()


def test_compare_needs_a_seed(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--seeds", "0", "--root", str(tmp_path)])
    assert exit_info.value.code == 2 and "--seeds must be at least 1, got 0" in capsys.readouterr().err


def test_a_config_among_the_overrides_does_not_replace_the_baselines_stages(tmp_path):
    """A --config override that set stages came after baseline_stages.yaml: the baseline ran the curriculum."""
    from stages.run import build_parser

    tiny = "configs/curriculum/tiny.yaml"
    mine = tmp_path / "my_stages.yaml"
    mine.write_text(
        "stages:\n"
        "  align: {trainable: [projector], max_words: 8, init_from: base, trainer: {max_steps: 4}}\n"
        "  sft_a: {trainable: [projector, lora], max_words: 8, trainer: {max_steps: 3}}\n"
        "  sft_b: {trainable: [projector, lora], max_words: 48, trainer: {max_steps: 5}}\n"
    )
    parser = build_parser()
    overrides = [f"--config={mine}", "--eval.limit=8"]
    cfg = curriculum_config_of(parser, ["curriculum", "--config", tiny, *overrides])
    baseline_config = tmp_path / "baseline_stages.yaml"
    baseline_config.write_text(yaml.safe_dump({"stages": baseline_stages(cfg)}))
    folders = {key: tmp_path / key for key in ("shard_dir", "vision_path", "lm_path")}
    argv = baseline_argv(tiny, baseline_config, tmp_path / "baseline-0", 0, overrides, folders)
    baseline = curriculum_config_of(build_parser(), argv)
    assert list(baseline.stages) == ["align", "sft"] and baseline.stages["sft"].trainer.max_steps == 8
    assert baseline.eval.limit == 8 and baseline.data.shard_dir == str(tmp_path / "shard_dir")


def test_space_separated_stage_overrides_leave_no_stray_value_in_the_baseline(tmp_path):
    # `--stages.sft_long.trainer.max_steps 5` (the README's form): the flag was dropped, its value kept, and
    # the baseline failed on "unrecognized arguments: 5" after the curriculum arm had trained.
    from stages.run import build_parser

    tiny = "configs/curriculum/tiny.yaml"
    overrides = ["--stages.sft_long.trainer.max_steps", "5", "--eval.limit", "8", "--stages.align.max_words=9"]
    cfg = curriculum_config_of(build_parser(), ["curriculum", "--config", tiny, *overrides])
    baseline_config = tmp_path / "baseline_stages.yaml"
    baseline_config.write_text(yaml.safe_dump({"stages": baseline_stages(cfg)}))
    folders = {key: tmp_path / key for key in ("shard_dir", "vision_path", "lm_path")}
    argv = baseline_argv(tiny, baseline_config, tmp_path / "baseline-0", 0, overrides, folders)
    assert "5" not in argv and argv[argv.index("--eval.limit") + 1] == "8"
    baseline = curriculum_config_of(build_parser(), argv)
    assert baseline.eval.limit == 8 and baseline.stages["align"].max_words == 9


def curriculum_config_of(parser, argv):
    from stages.run import curriculum_config

    return curriculum_config(parser.instantiate(parser.parse_args(argv)).curriculum)


def test_each_seed_is_its_own_whatever_the_override_configs_set(tmp_path):
    """`--seed` came before the overrides, and a --config among them that set a seed (every copy of tiny.yaml
    does) made every "seed" the same run: identical arms, a spread of 0, under the heading "2 seeds"."""
    from stages.compare import curriculum_argv
    from stages.run import build_parser

    tiny = "configs/curriculum/tiny.yaml"
    mine = tmp_path / "mine.yaml"
    mine.write_text("seed: 0\n")
    folders = {key: tmp_path / key for key in ("shard_dir", "vision_path", "lm_path")}
    baseline_config = tmp_path / "baseline_stages.yaml"
    cfg = curriculum_config_of(build_parser(), ["curriculum", "--config", tiny])
    baseline_config.write_text(yaml.safe_dump({"stages": baseline_stages(cfg)}))
    for seed in (1, 2):
        for argv in (
            curriculum_argv(tiny, tmp_path / "c", seed, [f"--config={mine}"]),
            baseline_argv(tiny, baseline_config, tmp_path / "b", seed, [f"--config={mine}"], folders),
        ):
            assert curriculum_config_of(build_parser(), argv).seed == seed


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--seed=7", "--override: --seed is compare's own (--seeds, --root)"),
        ("--run_dir=/tmp/x", "--override: --run_dir is compare's own"),
        # A traceback ("argument after ** must be a mapping"), and --run_dir failed after a whole arm had trained.
        ("--stages.align.trainer=[1]", "--override: stages.align.trainer must be a mapping of its keys"),
        # An epoch ended the curriculum's stages before their steps; the baseline's one stage trained on.
        ("--trainer.max_epochs=1", "compare: trainer.max_epochs 1: the arms are matched by optimizer steps"),
    ],
)
def test_overrides_compare_cannot_honour_are_refused_before_any_run(tmp_path, capsys, override, message):
    assert main(["compare", "--seeds=1", f"--root={tmp_path / 'c'}", f"--override={json.dumps([override])}"]) == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "c").glob("*-0"))


def test_data_without_object_classes_is_compared_on_the_metrics_it_has(tmp_path):
    """Real data without object annotations has no CHAIR, POPE or attribute scores: compare ended with a KeyError
    after every run had trained."""
    from stages.compare import markdown, plot

    runs = []
    for seed in (0, 1):
        run = tmp_path / f"baseline-{seed}"
        (run / "sft").mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"sft": {}}))
        text = {"mean_words": 9.0 + seed, "bleu4": 0.1 * seed, "cider_d": 0.5}
        by_length = {"0-8": {"images": 3, "mean_words": 6.0}, "9-20": {"images": 5, "mean_words": 12.0}}
        (run / "sft" / "metrics.json").write_text(json.dumps({**text, "by_length": by_length}))
        runs.append(run)
    result = collect({"baseline": runs})
    assert set(result["baseline"]["stages"]["sft"]) == {"mean_words", "bleu4", "cider_d"}
    table = markdown(result, [0, 1])
    assert "| arm | stage | mean_words | bleu4 | cider_d |" in table and "| baseline | sft | 9.500 +- 0.707 |" in table
    assert "| baseline | 0-8 | 6 | - | - | - | - |" in table
    one_seed = collect({"baseline": runs[:1]})
    assert one_seed["baseline"]["stages"]["sft"]["bleu4"]["std"] is None, "1 seed: no spread (it read +- 0.000)"
    assert "| baseline | sft | 9.000 | 0.000 | 0.500 |" in markdown(one_seed, [0])
    plot(one_seed, tmp_path / "one_seed.png")
    plot(result, tmp_path / "compare.png")
