"""What a stage's fingerprint holds: what decides its weights, and nothing it does not read; and the stages of
a run written under the rules of an older version."""

from __future__ import annotations

import pytest

from tests.conftest import MICRO_ARGS


def test_settings_a_stage_does_not_read_are_not_in_its_fingerprint(tmp_path):
    """A new LoRA rank, a rate for a group align does not train, or a random-init image size without random_init
    retrained the projector-only align stage (on real data: hours) and every stage after it."""
    from modules.loading import LoraSpec, ModelConfig
    from modules.training_module import LearningRates
    from stages.config import CurriculumConfig, StageSpec
    from stages.stage import RunInputs, resolved_stage_config, stage_fingerprint

    inputs = RunInputs(tmp_path, tmp_path / "data", tmp_path / "vision", tmp_path / "lm", {})

    def prints(model: ModelConfig, lora_rate: float = 2e-3) -> tuple[str, str]:
        rates = LearningRates(lora=lora_rate)
        stages = {
            "align": StageSpec(["projector"], 8, "base", rates),
            "sft": StageSpec(["projector", "lora"], 8, lr=rates),
        }
        cfg = CurriculumConfig(stages=stages, model=model)
        return tuple(stage_fingerprint(resolved_stage_config(cfg, name, inputs, None)) for name in stages)

    align, sft = prints(ModelConfig())
    assert prints(ModelConfig(image_size=224)) == (align, sft)  # without random_init no stage reads it
    rank, rate = prints(ModelConfig(lora=LoraSpec(r=4))), prints(ModelConfig(), lora_rate=1e-4)
    assert rank[0] == rate[0] == align
    assert rank[1] != sft and rate[1] != sft  # the stage that attaches and trains the adapter reads both
    random_init = prints(ModelConfig(random_init=True))[0]
    assert random_init != align and prints(ModelConfig(random_init=True, image_size=224))[0] != random_init


def _older_rules(monkeypatch):
    """Fingerprints as an older version made them: other hashes of the same configs."""
    import stages.stage

    today = stages.stage.stage_fingerprint
    monkeypatch.setattr(
        stages.stage, "stage_fingerprint", lambda resolved: stages.stage.fingerprint(["old", today(resolved)])
    )


@pytest.mark.parametrize("change", [[], ["--trainer.limit_val_batches=1"]])
def test_a_run_finished_under_older_fingerprint_rules_is_still_finished(tmp_path, monkeypatch, capsys, change):
    """Leaving out what a stage does not read, and then the validation settings, changed every stage's fingerprint:
    a run finished (or interrupted) under the older version retrained every stage, its log naming no changed key.
    Also when what changed since is what today's rules leave out (a first fix accepted only older fingerprints of
    today's config, and a cut-short validation retrained a run finished before the upgrade)."""
    from stages.run import main

    run = ["curriculum", f"--run_dir={tmp_path / 'run'}", *MICRO_ARGS]
    with monkeypatch.context() as older:
        _older_rules(older)
        assert main(run) == 0
    capsys.readouterr()
    assert main([*run, *change]) == 0
    assert capsys.readouterr().out.count("skipped: done before") == 4


def test_a_stage_interrupted_under_older_rules_resumes_from_its_checkpoint(tmp_path, monkeypatch, caplog):
    from stages.run import main
    from tests.stages.test_rerun import _run_killed_at_align_step

    with monkeypatch.context() as older:
        _older_rules(older)
        _run_killed_at_align_step(tmp_path / "run", 3, monkeypatch)  # its checkpoint: step 2
    with caplog.at_level("INFO"):
        assert main(["curriculum", f"--run_dir={tmp_path / 'run'}", *MICRO_ARGS, "--trainer.limit_val_batches=1"]) == 0
    assert "stage align: resuming from" in caplog.text and "starting it afresh" not in caplog.text


def test_validation_settings_are_not_in_a_stages_fingerprint(tmp_path):
    """They change only the validation loss's curve (a micro curriculum's weights are bitwise the same validating
    after every batch, on one batch, or with no sanity check): cutting a validation short retrained every stage."""
    from stages.config import CurriculumConfig, StageSpec, TrainerConfig
    from stages.stage import RunInputs, resolved_stage_config, stage_fingerprint

    inputs = RunInputs(tmp_path, tmp_path / "data", tmp_path / "vision", tmp_path / "lm", {})

    def print_of(**trainer) -> str:
        stage = StageSpec(["projector", "lora"], 8, "base", trainer=TrainerConfig(**trainer))
        return stage_fingerprint(resolved_stage_config(CurriculumConfig(stages={"sft": stage}), "sft", inputs, None))

    plain = print_of()
    assert print_of(val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0) == plain
    assert print_of(max_steps=7) != plain and print_of(accumulate_grad_batches=2) != plain


def test_a_stage_started_afresh_names_what_changed_its_fingerprint_only(tmp_path, caplog):
    # The evaluation settings that changed beside the real cause were named too ("eval.limit, spec.lr").
    import yaml

    from stages.config import CurriculumConfig, StageSpec
    from stages.stage import RunInputs, prepare_stage_folder, resolved_stage_config, stage_fingerprint

    inputs = RunInputs(tmp_path, tmp_path / "data", tmp_path / "vision", tmp_path / "lm", {})

    def resolved(**changes) -> dict:
        stage = StageSpec(["projector"], changes.pop("max_words", 8), "base")
        cfg = CurriculumConfig(stages={"align": stage}, **changes)
        return resolved_stage_config(cfg, "align", inputs, None)

    old = resolved()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"fingerprint": stage_fingerprint(old), **old}))
    from modules.loading import LoraSpec, ModelConfig
    from stages.config import EvalConfig

    # A LoRA rank the projector-only stage does not read and an evaluation setting changed beside the real cause.
    new = resolved(max_words=12, model=ModelConfig(lora=LoraSpec(r=4)), eval=EvalConfig(limit=16))
    with caplog.at_level("WARNING"):
        prepare_stage_folder(tmp_path, stage_fingerprint(new), new, rank_zero=True)
    assert "config or inputs changed since its last run (spec.max_words); starting it afresh" in caplog.text


@pytest.mark.slow
def test_validation_settings_leave_the_weights_bitwise_the_same(micro_run, tmp_path):
    """What lets them out of the fingerprint: validating after every batch, on one batch, with no sanity check
    trains the same weights (Lightning's sanity check runs under isolate_rng; the validation loader draws from a
    generator of its own). A change that made validation draw from the training's random streams fails here."""
    from stages.run import main

    inputs = [f"--data.shard_dir={micro_run / 'data'}", f"--model.vision_path={micro_run / 'base' / 'vision'}"]
    inputs.append(f"--model.lm_path={micro_run / 'base' / 'lm'}")
    validation = ["--trainer.val_check_interval=1", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0"]
    run = tmp_path / "run"
    assert main(["curriculum", f"--run_dir={run}", *MICRO_ARGS, *inputs, *validation, "--eval.every_n_steps=2"]) == 0
    weights = sorted(path.relative_to(micro_run) for path in micro_run.glob("*/export/**/*.safetensors"))
    assert len(weights) == 7  # align's projector; each SFT stage's projector and adapter
    for path in weights:
        assert (run / path).read_bytes() == (micro_run / path).read_bytes(), path
