"""Every shipped config parses into a valid CurriculumConfig, and config files stack."""

from pathlib import Path

import pytest

from stages.config import CurriculumConfig
from stages.run import CONFIG_DIR, build_parser

CURRICULA = sorted((CONFIG_DIR / "curriculum").glob("*.yaml"))


def _parse(*args: str) -> CurriculumConfig:
    parser = build_parser()
    namespace = parser.instantiate(parser.parse_args(["curriculum", *args])).curriculum
    values = {k: v for k, v in vars(namespace).items() if k != "config" and not k.startswith("__")}
    return CurriculumConfig(**values)


@pytest.mark.parametrize("path", CURRICULA, ids=[p.name for p in CURRICULA])
def test_every_curriculum_config_parses(path: Path):
    cfg = _parse("--config", str(path))
    assert cfg.stages and all(spec.max_words > 0 for spec in cfg.stages.values())


def test_the_default_is_the_tiny_curriculum():
    cfg = _parse()
    assert list(cfg.stages) == ["align", "sft_short", "sft_medium", "sft_long"]
    assert cfg.stages["align"].trainable == ["projector"]
    budgets = [spec.max_words for spec in cfg.stages.values()]
    assert budgets[1:] == sorted(budgets[1:]) and budgets[-1] > budgets[1]


def test_config_files_stack_and_dotted_overrides_win(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("seed: 1\nmodel: {lora: {r: 4}}\n")
    second.write_text("seed: 2\n")
    cfg = _parse("--config", str(first), "--config", str(second), "--stages.sft_long.trainer.max_epochs=2")
    assert cfg.seed == 2 and cfg.model.lora.r == 4
    assert cfg.stages["sft_long"].trainer.max_epochs == 2
    assert cfg.stages["sft_long"].max_words == 48  # untouched keys keep the default config's values


def test_a_config_that_sets_stages_replaces_the_whole_mapping(tmp_path):
    path = tmp_path / "one_stage.yaml"
    path.write_text("stages: {only: {trainable: [projector], max_words: 5, init_from: base}}\n")
    assert list(_parse("--config", str(path)).stages) == ["only"]


def test_stage_trainer_settings_override_the_run_trainer():
    cfg = _parse("--trainer.max_epochs=3", "--stages.sft_long.trainer.max_epochs=5")
    assert cfg.trainer_of("sft_long").max_epochs == 5
    assert cfg.trainer_of("sft_short").max_epochs == 3


def test_every_stage_trains_on_the_processes_of_the_first():
    # A stage on 1 device after one on 2 ran in both processes, each training it as rank 0 into one folder.
    with pytest.raises(ValueError, match=r"stages.sft_short.trainer.devices: stage sft_short runs with devices 1 and"):
        _parse("--trainer.devices=2", "--stages.sft_short.trainer.devices=1")
    with pytest.raises(ValueError, match=r"stages.align.trainer.num_nodes: stage sft_short runs with num_nodes 1 and"):
        _parse("--stages.align.trainer.num_nodes=2")
    assert _parse("--stages.align.trainer.devices=1").trainer_of("sft_long").devices == 1  # tiny.yaml's own
    _parse("--trainer.devices=[0, 1]", "--stages.sft_short.trainer.devices=0,1", "--stages.align.trainer.devices=2")
    _parse("--trainer.devices=auto", "--stages.align.trainer.devices=-1")  # the same processes, written otherwise


@pytest.mark.parametrize("profile", ["llava15_7b", "mgm_2b", "small_siglip_qwen"])
def test_real_profiles_train_at_llava_rates_not_the_tiny_worlds(profile):
    # mgm_2b and small_siglip_qwen set no stages, so they inherited tiny.yaml's: LoRA at 3e-3 (15x LLaVA's
    # 2e-4), tuned for tiny models trained from scratch, and an evaluation every 100 steps.
    cfg = _parse("--config", str(CONFIG_DIR / "curriculum" / f"{profile}.yaml"))
    sft = [spec for spec in cfg.stages.values() if "lora" in spec.trainable]
    assert sft and all(spec.lr.lora == 2e-4 and spec.lr.projector == 2e-5 for spec in sft)
    assert cfg.stages["align"].lr.projector == 1e-3
    assert all(spec.min_lr_ratio == 0 for spec in cfg.stages.values()), "LLaVA-1.5's cosine decays to zero"
    assert cfg.eval.every_n_steps is None


def test_the_schedule_floor_is_a_stage_setting_and_reaches_the_optimizer(micro_base):
    from modules.loading import build_vlm
    from stages.stage import make_module

    cfg = _parse("--stages.align.min_lr_ratio=0")
    vlm, _, _ = build_vlm(cfg.model, *micro_base)
    assert make_module(cfg.stages["align"], vlm, cfg).optim.min_lr_ratio == 0
    assert cfg.stages["sft_long"].min_lr_ratio == 0.1
    with pytest.raises(ValueError, match=r"stages\.align\.min_lr_ratio must be within 0 and 1, got 1\.5"):
        _parse("--stages.align.min_lr_ratio=1.5")


def test_a_stage_without_a_length_is_warned_about(caplog):
    """A stage with neither max_steps nor max_epochs trained Lightning's default 1000 epochs with no word from us."""
    from stages.config import CurriculumConfig, StageSpec, TrainerConfig

    stages = {
        "align": StageSpec(["projector"], 8, init_from="base"),
        "sft": StageSpec(["projector", "lora"], 20, trainer=TrainerConfig(max_steps=5)),
    }
    caplog.set_level("WARNING", logger="stages.config")
    CurriculumConfig(stages=stages)
    assert "stages.align: neither trainer.max_steps nor trainer.max_epochs is set" in caplog.text
    assert "Lightning trains 1000 epochs (its default)" in caplog.text
    assert "stages.sft:" not in caplog.text
    # Endless training was let through with a warning, then crashed building the schedule (int(inf)).
    stages["sft_more"] = StageSpec(["projector", "lora"], 30, trainer=TrainerConfig(max_epochs=-1))
    with pytest.raises(ValueError, match=r"stages\.sft_more: trainer\.max_epochs -1 with no trainer\.max_steps"):
        CurriculumConfig(stages=stages)
    stages["sft_more"] = StageSpec(["projector", "lora"], 30, trainer=TrainerConfig(max_epochs=-1, max_steps=4))
    CurriculumConfig(stages=stages)  # bounded by its steps
