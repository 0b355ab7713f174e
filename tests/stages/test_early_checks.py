"""Values that failed, or did something else, only after minutes of work (the base models, the data) are
refused before it, with exit 2 and the key named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stages.run import main
from tests.conftest import MICRO_ARGS, SYNTHETIC_RECIPE, TOY_PROFILE_ARGS


def _fails_before_any_work(tmp_path: Path, capsys, *flags: str) -> str:
    """The error a micro curriculum with `flags` ends on, checked to come before the base models and the data."""
    with pytest.raises(SystemExit) as exit_info:
        code = main(["curriculum", f"--run_dir={tmp_path / 'run'}", *MICRO_ARGS, *flags])
        raise SystemExit(code)
    assert exit_info.value.code == 2
    assert not (tmp_path / "run" / "base").exists() or "model.vision_path" in " ".join(flags)
    assert not (tmp_path / "run" / "data").exists()
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        # numpy refused the world's seed after the base models were pretrained, blaming data.recipe.
        ("--seed=-1", "seed must be within 0 and 2**32 - 1, got -1"),
        # AdamW refused the group given twice once the stage had started, after its folder had been emptied.
        ("--stages.align.trainable=[projector, projector]", "stages.align.trainable names a group twice"),
        # Counted from the output: 5 crashed in the first stage.
        ("--model.vision_layer=5", "model.vision_layer must be negative"),
        ("--stages.sft_long.trainer.precision=transformer-engine", "stages.sft_long.trainer.precision transformer-"),
        # An empty folder ran in runs/tiny without a word; an empty shard folder said "--data.shard_dir:  has no".
        ("--run_dir=", "run_dir: empty; name a folder"),
        ("--data.shard_dir=", "data.shard_dir: empty; name a shard folder"),
        # Meant as one stage's change, a file's stages replace the curriculum's: the error did not say so.
        ("--stages={sft: {trainable: [projector], max_words: 8}}", "a config file's `stages` replaces the whole"),
    ],
)
def test_a_bad_value_is_refused_when_the_config_is_read(tmp_path, capsys, flag, message):
    assert message in _fails_before_any_work(tmp_path, capsys, flag)


@pytest.mark.parametrize(
    ("edit", "message"),
    [(("shard_size:", "shard_sizes:"), "Option 'shard_sizes' is not accepted"), (("5000", "0"), "shard_size must")],
)
def test_a_bad_recipe_is_refused_before_the_base_models(tmp_path, capsys, edit, message):
    """A misspelt key or a bad value in the data recipe ended the run with a traceback once the base models had
    been pretrained (minutes), when the data stage read the recipe."""
    text = SYNTHETIC_RECIPE.read_text()
    assert edit[0] in text
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.replace(edit[0], edit[1], 1))
    err = _fails_before_any_work(tmp_path, capsys, f"--data.recipe={recipe}")
    assert f"--data.recipe {recipe}:" in err and message in err, err


def test_a_prompt_with_words_the_tokenizer_lacks_is_refused(tmp_path, capsys, micro_base):
    """The tiny base's word-level tokenizer read each word it lacks as <unk>: the run trained on that prompt
    without a word said."""
    models = [f"--model.vision_path={micro_base[0]}", f"--model.lm_path={micro_base[1]}"]
    err = _fails_before_any_work(tmp_path, capsys, *models, "--model.prompt=please describe this photograph")
    assert "--model.prompt 'please describe this photograph': ['please', 'this', 'photograph'] are unknown" in err


def test_a_vision_layer_deeper_than_the_tower_is_refused_before_the_data(tmp_path, capsys, micro_base):
    models = [f"--model.vision_path={micro_base[0]}", f"--model.lm_path={micro_base[1]}"]
    depth = len(json.loads((micro_base[0] / "config.json").read_text())["hidden_sizes"]) + 1  # with the stem's
    err = _fails_before_any_work(tmp_path, capsys, *models, f"--model.vision_layer=-{depth + 1}")
    assert re.search(rf"--model.vision_layer -{depth + 1}: the tower has hidden states -1 to -{depth}\b", err), err


def test_random_init_takes_an_architecture_for_one_part_and_a_folder_for_the_other(tmp_path, capsys, micro_base):
    """The docstring allowed it; the run failed with a traceback, asking for the LM's architecture too."""
    vision_arch = next(arg for arg in TOY_PROFILE_ARGS if arg.startswith("--model.vision_arch="))
    profile = ["--model.random_init=true", vision_arch, "--model.image_size=32", "--model.grid=null"]
    flags = [*profile, f"--model.lm_path={micro_base[1]}"]
    for name in ("sft_short", "sft_medium", "sft_long"):  # align alone: the point is the models it is built from
        flags.append(f"--stages.{name}.trainer.max_steps=1")
    run = tmp_path / "run"
    assert main(["curriculum", f"--run_dir={run}", *MICRO_ARGS, *flags, "--eval.limit=2"]) == 0
    assert (run / "base" / "random_init" / "vision" / "config.json").is_file()
    assert not (run / "base" / "random_init" / "lm").exists()
    # Without a folder, a part needs its architecture: named before any work.
    err = _fails_before_any_work(tmp_path / "second", capsys, *profile)
    assert "--model.lm_arch: random_init without a model folder in --model.lm_path (None)" in err, err


def test_the_data_command_refuses_a_seed_numpy_cannot_take(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "--config", str(SYNTHETIC_RECIPE), f"--out_dir={tmp_path / 'shards'}", "--seed=-1"])
    assert exit_info.value.code == 2 and "--seed must be within 0 and 2**32 - 1" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()


def test_a_validation_interval_past_an_epoch_is_refused_before_any_stage(tmp_path, capsys, micro_world, micro_base):
    """Lightning refused it once the stage had started, after a finished stage of a rerun had been emptied."""
    inputs = [f"--data.shard_dir={micro_world}", f"--model.vision_path={micro_base[0]}"]
    inputs.append(f"--model.lm_path={micro_base[1]}")
    run = tmp_path / "run"
    code = main(
        ["curriculum", f"--run_dir={run}", *MICRO_ARGS, *inputs, "--stages.sft_short.trainer.val_check_interval=25"]
    )
    err = capsys.readouterr().err
    # The micro world's 192 training images in batches of 8: 24 batches an epoch.
    assert code == 2 and "stages.sft_short.trainer.val_check_interval 25: more than the 24 training batches" in err
    assert not (run / "align").exists()


def test_max_epochs_cut_short_by_max_steps_is_said(micro_world, caplog):
    from datamodules.shards import read_index
    from stages.curriculum import check_epochs
    from tests.test_configs import _parse

    cfg = _parse(*MICRO_ARGS, "--stages.align.trainer.max_epochs=2")
    with caplog.at_level("WARNING"):
        check_epochs(cfg, read_index(micro_world))
    assert "stages.align: max_steps 3 ends it before its max_epochs 2 (24 optimizer steps each)" in caplog.text
    assert "sft_short" not in caplog.text  # max_epochs unset: the steps decide, as meant


def test_deterministic_kernels_end_with_the_stage_that_asked_for_them():
    """Lightning leaves torch's global switch as it is when `deterministic` is unset: the stage after one with
    deterministic true kept its kernels, and a rerun that skipped that stage trained without them."""
    import lightning as L
    import torch

    from stages.config import TrainerConfig

    try:
        L.Trainer(**TrainerConfig(accelerator="cpu", deterministic=True).kwargs(), logger=False)
        assert torch.are_deterministic_algorithms_enabled()
        L.Trainer(**TrainerConfig(accelerator="cpu").kwargs(), logger=False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_share_of_the_validation_batches_is_refused_on_one_device_only(micro_world):
    """Lightning refused a share of a stream without a length at the first stage's start; on several devices the
    validation loader has a length, and a share works."""
    from datamodules.shards import ShardError, read_index
    from stages.curriculum import check_epochs
    from tests.test_configs import _parse

    index = read_index(micro_world)
    with pytest.raises(ShardError, match=r"trainer.limit_val_batches 0.5: a share needs the validation set's length"):
        check_epochs(_parse(*MICRO_ARGS, "--trainer.limit_val_batches=0.5"), index)
    two = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    check_epochs(_parse(*MICRO_ARGS, *two, "--stages.align.trainer.limit_val_batches=0.5"), index)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "holds no config keys (empty, only comments, or null)"),  # jsonargparse: "Unexpected config: "
        (b"# only a comment\n", "holds no config keys (empty, only comments, or null)"),
        (b"seed: 3  # caf\xe9\n", "not UTF-8 text"),  # a UnicodeDecodeError's traceback
    ],
)
@pytest.mark.parametrize("command", ["curriculum", "data"])
def test_a_config_file_without_keys_or_not_utf8_fails_naming_it(tmp_path, capsys, content, message, command):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", str(path), "--print_config"])
    assert exit_info.value.code == 2 and f"--config {path}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "content", "key"),
    [
        ("curriculum", "trainer:\n  # max_steps: 3\n", "trainer"),
        ("curriculum", "stages:\n  align:\n    lr:\n", "stages.align.lr"),
        ("data", "input:\n", "input"),
        ("data", "world:\n", "world"),
        ("compare", "trainer:\n", "trainer"),
        ("bench train", "model:\n", "model"),
    ],
)
def test_an_empty_section_of_a_config_file_is_named_with_the_file(tmp_path, capsys, command, content, key):
    """A section whose keys are all commented out is null: jsonargparse said "functools.partial(...) argument
    after ** must be a mapping, not NoneType" or "Unexpected config: input:", naming neither key nor file."""
    path = tmp_path / "empty_section.yaml"
    path.write_text(content)
    flag = "--profile" if command == "compare" else "--config"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                *command.split(),
                flag,
                str(path),
                f"--root={tmp_path / 'c'}" if command == "compare" else "--print_config",
            ]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"{flag} {path}: {key} must be a mapping of its keys, got None (an empty section" in err


STAGES = "stages:\n  align: {trainable: [projector], max_words: 8, init_from: base, trainer: {devices: auto}}\n"


@pytest.mark.parametrize(
    ("stage", "flag", "culprit"),
    [
        ("  sft_a: {trainable: [lora], max_words: 4O}\n", None, "stages.sft_a.max_words (--config {path})"),
        ("  sft_b: {trainable: [lora], max_words: 9, trainer: {max_step: 7}}\n", None, "stages.sft_b.trainer.max_step"),
        ("", "--stages.align.lr.projector=fast", "stages.align.lr.projector (the command line)"),
        ("", "--stages.align.max_wrds=5", "stages.align.max_wrds (the command line)"),
        # A union's inner error showed "Got value: auto", align's valid value: the hint named align.
        ("  sft: {trainable: [lora], max_words: 9, trainer: {devices: [0, auto]}}\n", None, "stages.sft.trainer"),
        ("  sft: {trainable: [lora, 3], max_words: 9}\n", None, "stages.sft.trainable"),
    ],
)
def test_a_bad_value_of_a_stage_names_the_stage(tmp_path, capsys, stage, flag, culprit):
    """jsonargparse named the key within the stage ('Parser key "max_words": ... Got value: 4O'), not which of
    the stages holds it."""
    path = tmp_path / "stages.yaml"
    path.write_text(STAGES + stage)
    with pytest.raises(SystemExit) as exit_info:
        main(["curriculum", "--config", str(path), *([flag] if flag else []), "--print_config"])
    err = capsys.readouterr().err
    set_in = err.split("Set in: ")[-1].splitlines()[0] if "Set in: " in err else ""
    assert exit_info.value.code == 2 and set_in.startswith(culprit.format(path=path)) and ";" not in set_in, err


def test_a_bad_stage_value_in_a_config_named_from_the_working_folder_names_the_stage(tmp_path, capsys, monkeypatch):
    """jsonargparse reads a config file from the file's own folder: `cf/b.yaml` was not found again, no hint."""
    (tmp_path / "cf").mkdir()
    (tmp_path / "cf" / "b.yaml").write_text("stages:\n  align:\n    trainable: [projector]\n    max_words: abc\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["curriculum", "--config", "cf/b.yaml", "--print_config"])
    assert "Set in: stages.align.max_words (--config cf/b.yaml)" in capsys.readouterr().err


@pytest.mark.parametrize("under", [False, True])
def test_an_output_folder_that_is_a_file_or_under_one_is_named(tmp_path, capsys, under):
    # mkdir's "[Errno 17] File exists" named no flag; a file on the way gave NotADirectoryError's traceback.
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    out = afile / "sub" if under else afile
    assert main(["data", "--config", str(SYNTHETIC_RECIPE), f"--out_dir={out}"]) == 2
    assert f"error: --out_dir: {afile} is a file, not a folder" in capsys.readouterr().err
    assert main(["curriculum", f"--run_dir={out}", *MICRO_ARGS]) == 2
    assert f"error: --run_dir: {afile} is a file, not a folder" in capsys.readouterr().err
    assert afile.read_text() == "not a folder"
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # "[Errno 17] File exists"
    assert main(["data", "--config", str(SYNTHETIC_RECIPE), f"--out_dir={tmp_path / 'dangling'}"]) == 2
    err = capsys.readouterr().err
    assert f"--out_dir: {tmp_path / 'dangling'} is a link to {tmp_path / 'gone'}, which does not" in err
    with pytest.raises(SystemExit):  # the working folder
        main(["data", "--config", str(SYNTHETIC_RECIPE), "--out_dir="])
    assert "--out_dir: empty" in capsys.readouterr().err
