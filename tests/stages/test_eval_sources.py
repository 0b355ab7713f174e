"""What `eval` and `export` load: the stage a run folder stands for, on the base models it trained on, and
bad inputs named before the model loads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from stages.run import main


@pytest.fixture()
def run_copy(micro_run, tmp_path) -> Path:
    """A copy of the finished micro run (files' times kept, as `cp -p` keeps them), free to damage."""
    copy = tmp_path / "run"
    shutil.copytree(micro_run, copy)
    return copy


def _rerun_started(run: Path, stage: str) -> None:
    """What a rerun with a changed `stage`, killed inside it, leaves: its config.yaml with the new fingerprint,
    no done.json; the stages after it as they were."""
    config = yaml.safe_load((run / stage / "config.yaml").read_text())
    config["fingerprint"] = "0" * 16
    (run / stage / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run / stage / "done.json").unlink()


def test_a_run_whose_rerun_stopped_early_is_not_taken_for_its_last_stage(run_copy, capsys, caplog):
    """Export and eval of the run folder took the old sft_long, trained from the sft_short being retrained two
    stages before it, and report.md called it current: only the stage right after sft_short was flagged."""
    _rerun_started(run_copy, "sft_short")
    assert main(["export", "--run_dir", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert "last stage, sft_long, is out of date: trained from sft_medium, which is out of date itself" in err, err
    assert main(["eval", "--model", str(run_copy), "--limit=2"]) == 2
    assert "--model:" in capsys.readouterr().err
    # Named, it is taken as it is, with a warning.
    with caplog.at_level("WARNING"):
        assert main(["eval", "--model", str(run_copy / "sft_long"), "--limit=2", "--max_new_tokens=2"]) == 0
    assert "sft_long is out of date: trained from sft_medium, which is out of date itself" in caplog.text
    from stages.report import write_report

    report = write_report(run_copy).read_text()
    assert "trained from an earlier sft_short" in report and "sft_medium, which is out of date itself" in report


def test_base_models_changed_since_a_stage_trained_are_said(run_copy, caplog):
    """A rerun with other base.* settings rebuilt base/ and stopped; eval of a stage trained on the old base
    models loaded its projector and adapter on the new ones and scored them without a word."""
    weights = run_copy / "base" / "lm" / "model.safetensors"
    os.utime(weights, ns=(1, 1))
    with caplog.at_level("WARNING"):
        assert main(["eval", "--model", str(run_copy / "sft_long"), "--limit=2", "--max_new_tokens=2"]) == 0
    assert f"{run_copy / 'base' / 'lm'} changed since the stage trained on it" in caplog.text


def test_a_stopped_or_damaged_stage_is_named_as_such(run_copy, capsys):
    (run_copy / "align" / "done.json").unlink()
    (run_copy / "align" / "checkpoints").mkdir(exist_ok=True)
    (run_copy / "align" / "checkpoints" / "stopped.ckpt").write_bytes(b"")
    assert main(["eval", "--model", str(run_copy / "align")]) == 2
    # It said "has no summary.json; has its curriculum finished?"
    assert "no done.json there; that stage was stopped by a stability alert" in capsys.readouterr().err
    (run_copy / "sft_long" / "done.json").write_text('{"global_steps": ')
    assert main(["export", "--run_dir", str(run_copy / "sft_long")]) == 2
    assert f"{run_copy / 'sft_long' / 'done.json'} cannot be read" in capsys.readouterr().err


def test_inputs_eval_cannot_use_are_named_before_the_model_loads(run_copy, micro_run, capsys, monkeypatch):
    import stages.export

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(stages.export, "load_stage_model", never)
    stage = ["eval", "--model", str(micro_run / "sft_long")]
    assert main([*stage, "--synonyms", "/nope.json"]) == 2
    assert "--synonyms" in capsys.readouterr().err
    assert main([*stage, "--data", str(run_copy / "nowhere")]) == 2
    assert f"--data: {run_copy / 'nowhere'} has no index.json" in capsys.readouterr().err
    shutil.rmtree(run_copy / "data")  # the shards it trained on, moved away
    assert main(["eval", "--model", str(run_copy / "sft_long")]) == 2
    assert (
        "the shards" in (err := capsys.readouterr().err) and "has no index.json (moved or deleted?); give --data" in err
    )


def test_an_incomplete_export_names_the_missing_file_and_a_sharded_one_loads(micro_run, tmp_path, capsys):
    from stages.export import load_exported

    out = tmp_path / "export"
    assert main(["export", "--run_dir", str(micro_run), "--out_dir", str(out)]) == 0
    sharded = tmp_path / "sharded"
    shutil.copytree(out, sharded)
    (sharded / "model.safetensors").unlink()
    load_exported(out)[0].save_pretrained(sharded, max_shard_size="20KB")  # as an upload in parts holds it
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert main(["eval", "--model", str(sharded), "--limit=2", "--max_new_tokens=2"]) == 0
    (out / "model.safetensors").unlink()
    assert main(["eval", "--model", str(out)]) == 2
    assert f"--model: {out} is an incomplete export, without model.safetensors" in capsys.readouterr().err


def test_eval_help_names_the_splits_type(capsys):
    # Given as choices, jsonargparse's help showed its type as "<function <locals>.<lambda> at 0x7f...>".
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "<lambda>" not in (out := capsys.readouterr().out) and "Literal['train', 'val', 'test']" in out


def test_the_eval_table_prints_counts_whole():
    from stages.export import metrics_table

    table = metrics_table({"chair_i": 0.25, "images": 8.0, "cut_short": 2.0})
    assert [line.split() for line in table.splitlines()] == [["chair_i", "0.2500"], ["images", "8"], ["cut_short", "2"]]
