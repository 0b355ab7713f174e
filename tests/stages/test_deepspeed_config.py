"""What a DeepSpeed JSON and a precision may not decide under the project's DeepSpeed strategy, refused when the
config is read (before the data, the base models and any stage), and what of the JSON a stage's fingerprint holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.run import main
from tests.conftest import MICRO_ARGS

ZERO2 = '{"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": true}'


def _refused(tmp_path: Path, capsys, *flags: str) -> str:
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["curriculum", f"--run_dir={run}", *MICRO_ARGS, "--trainer.strategy=deepspeed", *flags])
    assert exit_info.value.code == 2 and not run.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("block", "message"),
    [
        # The JSON's optimizer trained at its own rate with no warm-up or decay: lr, warmup_steps unused, unsaid.
        ('"optimizer": {"type": "AdamW", "params": {"lr": 0.5}}', "optimizer (the stage's AdamW: stages.<name>.lr"),
        # A scheduler block was ignored (Lightning steps the stage's own schedule), unsaid.
        ('"scheduler": {"type": "WarmupLR"}', "scheduler (the stage's schedule: stages.<name>.warmup_steps"),
    ],
)
def test_a_deepspeed_optimizer_or_scheduler_is_refused(tmp_path, capsys, block, message):
    config = tmp_path / "ds.json"
    config.write_text(ZERO2[:-1] + ", " + block + "}")
    err = _refused(tmp_path, capsys, f"--trainer.deepspeed_config={config}")
    assert "trainer.deepspeed_config:" in err and message in err, err


@pytest.mark.parametrize(
    ("config", "precision", "message"),
    [
        # Lightning refused it when the stage built its Trainer (exit 1), after the data and base models.
        (ZERO2, "--stages.sft_long.trainer.precision=64-true", "precision 64-true: Lightning's DeepSpeed strategy"),
        # DeepSpeed's DDP_BFLOAT16: bf16 weights and no float32 masters (a bf16 handoff, updates rounded away).
        ('{"zero_optimization": {"stage": 0}}', "--trainer.precision=bf16-mixed", "ZeRO stage 0 (or none) with"),
        ("{}", "--stages.align.trainer.precision=bf16-true", "ZeRO stage 0 (or none) with precision bf16-true"),
    ],
)
def test_precisions_deepspeed_does_not_train_as_meant_are_refused(tmp_path, capsys, config, precision, message):
    path = tmp_path / "ds.json"
    path.write_text(config)
    err = _refused(tmp_path, capsys, f"--trainer.deepspeed_config={path}", precision)
    assert message in err, err


def test_a_run_level_combination_every_stage_overrides_is_not_refused(tmp_path):
    """The run's bf16 under ZeRO stage 0 was refused though every stage trained in float32."""
    from stages.config import CurriculumConfig, StageSpec, TrainerConfig

    zero0 = tmp_path / "zero0.json"
    zero0.write_text('{"zero_optimization": {"stage": 0}}')
    run = TrainerConfig(strategy="deepspeed", deepspeed_config=str(zero0), precision="bf16-mixed", max_steps=2)
    fp32 = StageSpec(["projector"], 8, "base", trainer=TrainerConfig(precision="32-true"))
    CurriculumConfig(stages={"a": fp32}, trainer=run)
    with pytest.raises(ValueError, match="stages.a.trainer.deepspeed_config .*ZeRO stage 0"):
        CurriculumConfig(stages={"a": StageSpec(["projector"], 8, "base")}, trainer=run)


def test_the_deepspeed_config_is_fingerprinted_by_its_content_not_its_name(tmp_path):
    """The same JSON named another way (an absolute path) retrained every finished stage, and emptied a killed
    stage's folder with its checkpoints."""
    from stages.config import CurriculumConfig, StageSpec, TrainerConfig
    from stages.stage import RunInputs, resolved_stage_config, stage_fingerprint

    inputs = RunInputs(tmp_path, tmp_path / "data", tmp_path / "vision", tmp_path / "lm", {})
    (tmp_path / "other.json").write_text(ZERO2.replace("2", "3"))

    def print_of(path: str) -> str:
        trainer = TrainerConfig(strategy="deepspeed", deepspeed_config=path, accelerator="cpu")
        stage = StageSpec(["projector"], 8, "base", trainer=trainer)
        return stage_fingerprint(resolved_stage_config(CurriculumConfig(stages={"a": stage}), "a", inputs, None))

    from stages.run import CONFIG_DIR

    shipped = "configs/deepspeed/zero2.json"  # found in the repository from any folder
    assert print_of(shipped) == print_of(str(CONFIG_DIR / "deepspeed" / "zero2.json"))
    assert print_of(str(tmp_path / "other.json")) != print_of(shipped)
