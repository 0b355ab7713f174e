"""Rerunning a curriculum: what is skipped, what resumes, what starts afresh, after kills at awkward moments."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from stages.run import main
from tests.conftest import MICRO_ARGS

# align ends on a checkpoint step (every 2 steps): the case where a kill after that checkpoint left a stage
# that Lightning would not train again.
ALIGN_4 = ["--stages.align.trainer.max_steps=4"]


class Killed(BaseException):
    """Stands for SIGKILL or an out-of-memory kill: nothing after it runs (Lightning re-raises it)."""


def _run(run_dir: Path, *extra: str) -> int:
    return main(["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS, *extra])


def _kill_final_evaluation_of(stage: str, monkeypatch) -> None:
    from callbacks.evaluation import CaptionEvaluation

    original = CaptionEvaluation._run

    def run(self, trainer, pl_module, final):
        if final and self.stage == stage:
            raise Killed(f"killed during the final evaluation of {stage}")
        return original(self, trainer, pl_module, final)

    monkeypatch.setattr(CaptionEvaluation, "_run", run)


def _run_killed_at_align_step(run_dir: Path, step: int, monkeypatch, *flags: str, stage: str = "align") -> None:
    """Runs the curriculum until `stage` has finished optimizer step `step` (and written that step's checkpoint,
    if one is due), then kills it."""
    from callbacks.evaluation import CaptionEvaluation

    original = CaptionEvaluation.on_train_batch_end

    def killed(self, trainer, *args):
        if self.stage == stage and trainer.global_step == step:
            raise Killed(f"killed after {stage}'s step {step}")
        return original(self, trainer, *args)

    with monkeypatch.context() as patch:
        patch.setattr(CaptionEvaluation, "on_train_batch_end", killed)
        with pytest.raises(Killed):
            _run(run_dir, *flags)


def _run_killed_in_aligns_handoff(run_dir: Path, monkeypatch, *flags: str) -> None:
    """Runs the curriculum until align writes its handoff (its last checkpoint and metrics.json are written),
    then kills it."""
    import stages.stage

    original = stages.stage.save_handoff

    def save_handoff(vlm, path, write=True):
        if path.parent.name == "align":
            raise Killed("killed while writing the handoff")
        return original(vlm, path, write=write)

    with monkeypatch.context() as patch:
        patch.setattr(stages.stage, "save_handoff", save_handoff)
        with pytest.raises(Killed):
            _run(run_dir, *flags)


def test_a_stage_killed_in_its_final_evaluation_resumes_and_evaluates(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _kill_final_evaluation_of("align", patch)
        with pytest.raises(Killed):
            _run(run_dir, *ALIGN_4)
    # The final evaluation runs before the last step's checkpoint is written: the rerun trains steps 3-4 again.
    assert not (run_dir / "align" / "metrics.json").exists()
    assert _run(run_dir, *ALIGN_4) == 0
    assert json.loads((run_dir / "align" / "done.json").read_text())["global_steps"] == 4
    assert json.loads((run_dir / "align" / "metrics.json").read_text())["global_step"] == 4
    assert "align" in json.loads((run_dir / "summary.json").read_text())


def test_a_stage_killed_after_its_last_checkpoint_finishes_on_rerun(tmp_path, monkeypatch):
    """Killed while the handoff was written: last.ckpt is at the last step, so Lightning trains no further and
    calls no training hook. The rerun crashed on its missing metrics, every time."""
    run_dir = tmp_path / "run"
    _run_killed_in_aligns_handoff(run_dir, monkeypatch, *ALIGN_4)
    metrics = json.loads((run_dir / "align" / "metrics.json").read_text())
    written = (run_dir / "align" / "metrics.json").stat().st_mtime_ns
    assert _run(run_dir, *ALIGN_4) == 0
    assert (run_dir / "align" / "metrics.json").stat().st_mtime_ns == written, "read, not evaluated again"
    assert json.loads((run_dir / "align" / "done.json").read_text())["global_steps"] == 4
    assert json.loads((run_dir / "summary.json").read_text())["align"]["chair_i"] == metrics["chair_i"]
    assert (run_dir / "align" / "export" / "projector.safetensors").is_file()


def test_the_same_folders_spelled_otherwise_are_the_same_inputs(tmp_path, micro_world, micro_base, monkeypatch, capsys):
    """The raw flag values were part of every stage's fingerprint: a relative path, or a trailing slash, where
    the first run had an absolute one, retrained the whole curriculum (and emptied the finished stages)."""
    import os

    vision, lm = micro_base
    run_dir = tmp_path / "run"
    assert (
        _run(run_dir, f"--data.shard_dir={micro_world}", f"--model.vision_path={vision}", f"--model.lm_path={lm}") == 0
    )
    monkeypatch.chdir(tmp_path)
    relative = [os.path.relpath(path, tmp_path) + "/" for path in (micro_world, vision, lm)]
    capsys.readouterr()
    flags = [f"--data.shard_dir={relative[0]}", f"--model.vision_path={relative[1]}", f"--model.lm_path={relative[2]}"]
    assert _run(Path("run"), *flags, "--data.recipe=./configs/data/synthetic.yaml") == 0
    assert capsys.readouterr().out.count("skipped: done before") == 4


def test_stability_settings_are_in_the_fingerprint_where_they_change_the_weights(tmp_path):
    """Only the action and the faults were: with `skip`, turning the monitor off (or changing its thresholds)
    changes which updates are applied, yet the finished stages were skipped on rerun."""
    from callbacks.instability import InstabilityConfig
    from stages.config import CurriculumConfig, StabilityConfig, StageSpec
    from stages.stage import RunInputs, resolved_stage_config, stage_fingerprint

    inputs = RunInputs(tmp_path, tmp_path / "data", tmp_path / "vision", tmp_path / "lm", {})
    stages = {"align": StageSpec(["projector"], 8, init_from="base")}

    def hash_of(**instability) -> str:
        cfg = CurriculumConfig(stages=stages, stability=StabilityConfig(InstabilityConfig(**instability)))
        return stage_fingerprint(resolved_stage_config(cfg, "align", inputs, None))

    warn = hash_of(action="warn")
    assert hash_of(action="warn", z=3.0) == hash_of(action="warn", enabled=False) == warn  # reporting only
    skip = hash_of(action="skip")
    assert len({warn, skip, hash_of(action="skip", z=3.0), hash_of(action="skip", enabled=False)}) == 3
    assert hash_of(action="skip", enabled=False) == warn  # no monitor: nothing is skipped


def test_settings_that_only_change_what_is_shown_are_not_in_the_fingerprint(tmp_path):
    """Turning the progress bar off or showing more table rows retrained every stage of a finished run."""
    from stages.config import CurriculumConfig, EvalConfig, StageSpec, TrainerConfig
    from stages.stage import RunInputs, eval_fingerprint, resolved_stage_config, stage_fingerprint

    inputs = RunInputs(tmp_path, tmp_path / "data", tmp_path / "vision", tmp_path / "lm", {})

    def prints(eval_config=None, **trainer) -> tuple[str, str]:
        stages = {"align": StageSpec(["projector"], 8, init_from="base", trainer=TrainerConfig(**trainer))}
        cfg = CurriculumConfig(stages=stages, eval=eval_config or EvalConfig())
        resolved = resolved_stage_config(cfg, "align", inputs, None)
        return stage_fingerprint(resolved), eval_fingerprint(resolved)

    shown = {prints(), prints(enable_progress_bar=False), prints(log_every_n_steps=1)}
    shown.add(prints(EvalConfig(table_rows=32, grid_images=0, every_n_steps=5)))
    assert len(shown) == 1
    # What changes the weights changes the stage's fingerprint; what changes the scores, only the evaluation's.
    trained, scored = prints(max_steps=7), prints(EvalConfig(limit=16))
    assert trained[0] != prints()[0] and trained[1] == prints()[1]
    assert scored[0] == prints()[0] and scored[1] != prints()[1]


def _micro_config(seed: int):
    from stages.config import CurriculumConfig, StageSpec
    from tests.conftest import MICRO_BASE, MICRO_WORLD

    stages = {"align": StageSpec(["projector"], 8, init_from="base")}
    return CurriculumConfig(stages=stages, seed=seed, base=MICRO_BASE, world=MICRO_WORLD)


def _count_calls(monkeypatch, module, name: str) -> list:
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(name) or original(*args, **kwargs))
    return calls


@pytest.mark.parametrize(
    ("build", "killed", "counted"),
    [("prepare_base_models", "pretrain_lm", "pretrain_vision"), ("prepare_data", "run_data_stage", "run_data_stage")],
)
def test_a_build_killed_midway_is_built_again(tmp_path, monkeypatch, build, killed, counted):
    """A rebuild for seed 1, killed midway (the base models: after the tower was saved; the shards: once
    written, before the stamp), left seed 0's stamp: the seed-0 rerun then trained on a mix of the two
    (seed 1's tower with seed 0's language model)."""
    import stages.curriculum as curriculum

    getattr(curriculum, build)(_micro_config(0), tmp_path)
    original = getattr(curriculum, killed)

    def kill(*args, **kwargs):
        if killed == "run_data_stage":
            original(*args, **kwargs)
        raise Killed()

    with monkeypatch.context() as patch:
        patch.setattr(curriculum, killed, kill)
        with pytest.raises(Killed):
            getattr(curriculum, build)(_micro_config(1), tmp_path)
    calls = _count_calls(monkeypatch, curriculum, counted)
    getattr(curriculum, build)(_micro_config(0), tmp_path)
    assert calls == [counted]


def test_the_stage_boundary_check_compares_with_the_stage_started_from(tmp_path, monkeypatch):
    """It took the losses of the stage before in the list: a stage starting from the base models, or from an
    earlier stage, was compared with a stage whose weights it never saw."""
    import stages.curriculum as curriculum
    from stages.config import StageSpec
    from stages.stage import StageResult

    stages = {
        "align": StageSpec(["projector"], 8, init_from="base"),
        "sft_a": StageSpec(["lora"], 8, init_from="base"),
        "sft_b": StageSpec(["lora"], 8, init_from="align"),
        "sft_c": StageSpec(["lora"], 20),
    }
    tails = {}

    def run_stage(cfg, name, inputs, init_dir, init_hash, step_offset, previous_tail):
        tails[name] = previous_tail  # instead of training: record the tail, and leave losses of its own
        (inputs.run_dir / name).mkdir()
        (inputs.run_dir / name / "losses.json").write_text(json.dumps({"losses": [float(len(tails))]}))
        return StageResult(name, name, 1, {}, skipped=False)

    monkeypatch.setattr(curriculum, "run_stage", run_stage)
    monkeypatch.setattr(curriculum, "write_report", lambda run_dir: run_dir / "report.md")
    cfg = _micro_config(0)
    curriculum.run_curriculum(type(cfg)(**{**vars(cfg), "stages": stages}), tmp_path)
    assert tails == {"align": [], "sft_a": [], "sft_b": [1.0], "sft_c": []}  # sft_c: a longer budget, no check


def test_a_resumed_stage_does_not_repeat_its_alerts(tmp_path, monkeypatch):
    """The steps after the checkpoint are trained again, and raised their alerts again: alerts.jsonl and the
    report listed the step-2 NaN twice."""
    run_dir = tmp_path / "run"
    flags = [*ALIGN_4, "--stability.faults={2: nan}", "--stability.instability.action=skip"]
    _run_killed_at_align_step(run_dir, 3, monkeypatch, *flags)  # the checkpoint is at step 2, the alert at step 2
    assert len((run_dir / "align" / "alerts.jsonl").read_text().splitlines()) == 1
    assert _run(run_dir, *flags) == 0
    for name in ("align", "sft_short"):
        alerts = [json.loads(line) for line in (run_dir / name / "alerts.jsonl").read_text().splitlines()]
        assert [(a["kind"], a["step"]) for a in alerts] == [("non_finite", 2)], name
    assert (run_dir / "report.md").read_text().count("| align | 2 | non_finite |") == 1


def test_a_file_written_atomically_is_never_left_half_written(tmp_path, monkeypatch):
    import os

    from stages.paths import write_text_atomic

    path = tmp_path / "done.json"
    write_text_atomic(path, '{"fingerprint": "old"}')
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        write_text_atomic(path, '{"fingerprint": "new", "global_steps": 400}')
    assert path.read_text() == '{"fingerprint": "old"}' and [p.name for p in tmp_path.iterdir()] == ["done.json"]


def test_changed_evaluation_settings_score_finished_stages_again_without_training_them(tmp_path, caplog, capsys):
    """The evaluation settings were part of every stage's fingerprint: asking for more images or VQA on a
    finished run trained every stage again. Now each stage's trained model is scored again, and its scores
    are those a fresh run with the new settings gets."""
    stages = ("align", "sft_short", "sft_medium", "sft_long")
    run = tmp_path / "run"
    assert _run(run, "--eval.every_n_steps=1") == 0
    trained = {name: (run / name / "checkpoints" / "last.ckpt").stat().st_mtime_ns for name in stages}
    done_before = {name: json.loads((run / name / "done.json").read_text()) for name in stages}
    new_eval = ["--eval.limit=6", "--eval.vqa=true"]
    caplog.clear()
    caplog.set_level("INFO", logger="stages.stage")
    capsys.readouterr()
    assert _run(run, *new_eval) == 0
    assert caplog.text.count("evaluation settings changed, scoring it") == 4
    # Said as such (the console said "skipped: done before"), and TensorBoard gets the new scores as text.
    assert capsys.readouterr().out.count("(scored again: evaluation settings changed)") == 4
    from tests.tensorboard import RunEvents

    texts = RunEvents(run / "tb").Tags()["tensors"]
    assert all(f"eval/{name}/rescored/text_summary" in texts for name in stages)
    fresh = tmp_path / "fresh"
    assert _run(fresh, *new_eval) == 0
    for name in stages:
        assert (run / name / "checkpoints" / "last.ckpt").stat().st_mtime_ns == trained[name], f"{name} trained again"
        done = json.loads((run / name / "done.json").read_text())
        assert done["wall_s"] == done_before[name]["wall_s"] and done["fingerprint"] == done_before[name]["fingerprint"]
        rescored = json.loads((run / name / "metrics.json").read_text())
        expected = json.loads((fresh / name / "metrics.json").read_text())
        assert rescored["images"] == 6 and "vqa_exact" in rescored and rescored["history"] == []
        assert {k: v for k, v in rescored.items() if k != "history"} == {
            k: v for k, v in expected.items() if k != "history"
        }
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sft_long"]["images"] == 6
    # Settings that change only TensorBoard or the evaluations during training neither train nor score again.
    scored = {name: (run / name / "metrics.json").stat().st_mtime_ns for name in stages}
    assert _run(run, *new_eval, "--eval.every_n_steps=2", "--eval.table_rows=2", "--eval.grid_images=0") == 0
    assert {name: (run / name / "metrics.json").stat().st_mtime_ns for name in stages} == scored


def test_a_stage_resumed_from_a_checkpoint_at_an_epochs_end_trains_the_next_epoch_whole(tmp_path, monkeypatch):
    """Resumed from a checkpoint written on an epoch's last batch, the loader skipped as many batches again at
    the start of the next epoch (Lightning still reports the finished epoch's progress): the rest of the stage
    trained on other batches than an uninterrupted run, its losses off by up to 4e-2 (4 of 28 steps)."""
    from datamodules.shards import budget_counts, read_index

    reference = tmp_path / "reference"
    assert _run(reference, "--stages.align.trainer.max_steps=4") == 0
    epoch = budget_counts(read_index(reference / "data"), "train", 8)[0] // 8  # align's batches per epoch
    steps = [f"--stages.align.trainer.max_steps={epoch + 4}", f"--checkpoint.every_n_train_steps={epoch}"]
    assert _run(reference, *steps) == 0
    run = tmp_path / "run"
    _run_killed_at_align_step(run, epoch + 2, monkeypatch, *steps)  # two steps into the second epoch
    assert _run(run, *steps) == 0
    resumed, uninterrupted = (json.loads((r / "align" / "losses.json").read_text())["losses"] for r in (run, reference))
    assert len(resumed) == len(uninterrupted) == epoch + 4
    assert resumed == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)


def test_a_resumed_lora_stage_draws_the_dropout_masks_of_an_unbroken_run(tmp_path, monkeypatch):
    """The validation after step 2 (its checkpoint) drew from torch's global generator, LoRA dropout's, and the
    resume restored the state from before the draw: from step 3 on the stage trained on other dropout masks."""
    flags = ["--stages.sft_short.trainer.max_steps=4", "--stages.sft_short.trainer.val_check_interval=2"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert _run(reference, *flags) == 0
    _run_killed_at_align_step(run, 3, monkeypatch, *flags, stage="sft_short")  # its last checkpoint: step 2
    assert _run(run, *flags) == 0
    losses = (json.loads((r / "sft_short" / "losses.json").read_text())["losses"] for r in (run, reference))
    resumed, uninterrupted = losses
    assert len(resumed) == len(uninterrupted) == 4
    assert resumed == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)


def test_a_stage_trained_by_epochs_resumes_on_the_batches_it_had_not_trained_on(tmp_path, monkeypatch, caplog):
    """With max_epochs and no max_steps, Lightning built the train loader to size the learning-rate schedule
    before the checkpoint was restored, and kept it for the resumed epoch: the stage trained its first batches
    again and never saw its last ones (losses off from the resumed step on)."""
    from datamodules.shards import budget_counts, read_index

    epochs = ["--stages.align.trainer.max_steps=-1", "--stages.align.trainer.max_epochs=1"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert _run(reference, *epochs) == 0
    steps = budget_counts(read_index(reference / "data"), "train", 8)[0] // 8  # align's batches per epoch
    # The schedule is sized as Lightning sized it (an epoch's batches); its default 20 warm-up steps are cut.
    assert f"warmup_steps 20 is more than half of the stage's {steps} optimizer steps: warming up over" in caplog.text
    _run_killed_at_align_step(run, 7, monkeypatch, *epochs)  # its last checkpoint: step 6
    assert _run(run, *epochs) == 0
    resumed, uninterrupted = (json.loads((r / "align" / "losses.json").read_text())["losses"] for r in (run, reference))
    assert len(resumed) == len(uninterrupted) > 7
    assert resumed == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)


def test_a_moved_run_killed_again_resumes_from_its_newest_checkpoint(tmp_path, monkeypatch):
    """In a moved run folder Lightning forgot the last.ckpt it wrote (its path changed) and saved beside it as
    last-v1.ckpt; killed again, the rerun read last.ckpt and lost every step since the move."""
    import torch

    steps = "--stages.align.trainer.max_steps=8"
    for run, step in ((tmp_path / "run", 3), (tmp_path / "moved", 7)):
        _run_killed_at_align_step(run, step, monkeypatch, steps)
        if run.name == "run":
            shutil.move(run, tmp_path / "moved")
    checkpoints = tmp_path / "moved" / "align" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 6  # every 2 steps


def test_a_rerun_that_skips_every_stage_writes_the_same_summary(tmp_path):
    # A skipped stage gave summary.json its whole metrics.json record (stage, step, generation, history).
    run = tmp_path / "run"
    assert _run(run) == 0
    summary = (run / "summary.json").read_text()
    assert _run(run) == 0
    assert (run / "summary.json").read_text() == summary
    assert "history" not in json.loads(summary)["align"]


def test_a_second_run_in_a_busy_run_folder_is_refused(tmp_path, capsys):
    # Two runs at once in one folder resumed from each other's half-written checkpoints, or one deleted the
    # stage folder the other trained in; both exited 0.
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with (run / ".lock").open("a+") as held:  # as a run still going holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere: a curriculum run\n")
        held.flush()
        assert _run(run) == 2
        fcntl.flock(held, fcntl.LOCK_UN)
    err = capsys.readouterr().err
    assert f"--run_dir {run} is in use by pid 4242 on elsewhere: a curriculum run; wait for it to end" in err
    assert not (run / "data").exists(), "refused before any work"
    assert _run(run, *ALIGN_4) == 0, "the lock is gone with the run that held it"


def test_a_run_in_a_folder_of_other_files_is_refused_and_deletes_nothing(tmp_path, capsys):
    # In a home folder, a run deleted data/work/ (its data build's scratch) and a stage folder named like a
    # stage that held a config.yaml ("starting it afresh").
    home = tmp_path / "home"
    for name in ("data/work/marker.txt", "align/config.yaml", "align/notes.txt"):
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text("mine")
    assert _run(home) == 2
    assert f"--run_dir {home} holds align, data, which this command writes" in capsys.readouterr().err
    assert all((home / name).read_text() == "mine" for name in ("data/work/marker.txt", "align/notes.txt"))


@pytest.mark.parametrize("name", ["data", "report.md", "loss_curves.png"])
def test_one_name_a_run_writes_is_enough_to_refuse_a_folder(tmp_path, capsys, name):
    from stages.report import REPORT_PLOTS

    assert name in ("data", "report.md", *REPORT_PLOTS)
    home = tmp_path / "home"
    home.mkdir()
    (home / name).write_text("mine")
    assert _run(home) == 2
    assert f"holds {name}, which this command writes" in capsys.readouterr().err
    assert (home / name).read_text() == "mine"


def test_a_run_folder_of_an_older_version_is_its_own(tmp_path, capsys):
    # Runs before stages.json wrote summary.json: such a folder is a run's, not a user's.
    run = tmp_path / "run"
    (run / "align").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    assert _run(run, f"--data.shard_dir={tmp_path / 'missing'}") == 2  # stops at the next check, not this one
    err = capsys.readouterr().err
    assert "which this command writes" not in err and "missing" in err


def test_a_data_build_left_by_an_older_version_in_a_run_folder_is_rebuilt(tmp_path):
    # Older versions wrote work/ and stats/ before any mark; a build they killed blocked the rerun ("not a
    # folder it made"), though the run folder was the run's own.
    run = tmp_path / "run"
    for name in ("stages.json", "data/work/images/0.png", "data/stats/words_num_filter.jsonl"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("{}")
    assert _run(run, *ALIGN_4) == 0
    assert not (run / "data" / "work").exists() and (run / "data" / "index.json").is_file()


def test_a_damaged_handoff_file_is_named(tmp_path, capsys):
    # safetensors' "incomplete metadata" named no file, and a rerun kept failing on it.
    run = tmp_path / "run"
    assert _run(run, *ALIGN_4) == 0
    projector = run / "align" / "export" / "projector.safetensors"
    projector.write_bytes(projector.read_bytes()[:20])
    (run / "sft_short" / "done.json").unlink()
    assert _run(run, *ALIGN_4) == 2
    err = capsys.readouterr().err
    assert f"{projector} cannot be read" in err and f"delete its stage folder ({run / 'align'})" in err


def test_a_stage_resumed_at_its_last_step_with_new_evaluation_settings_is_scored_with_them(tmp_path, monkeypatch):
    """Killed after its last checkpoint, then rerun with other evaluation settings: the stage kept the scores of
    the old settings, and done.json vouched for the new ones, so no later run scored it again."""
    run_dir = tmp_path / "run"
    _run_killed_in_aligns_handoff(run_dir, monkeypatch, *ALIGN_4)
    assert _run(run_dir, *ALIGN_4, "--eval.max_new_tokens=5") == 0
    record = json.loads((run_dir / "align" / "metrics.json").read_text())
    done = json.loads((run_dir / "align" / "done.json").read_text())
    assert record["generation"]["max_new_tokens"] == 5 and record["eval_fingerprint"] == done["eval_fingerprint"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["align"]["mean_words"] == record["mean_words"] and "eval_fingerprint" not in summary["align"]


@pytest.mark.parametrize("killed", [False, True])
def test_failed_webhook_posts_are_counted_in_done_json(tmp_path, monkeypatch, killed):
    # Killed after the checkpoint at step 2, the resumed stage counted only the post of the step it replayed: the
    # failed post of step 0 was in no checkpoint.
    import socket

    with socket.socket() as probe:  # a port that refuses connections once closed
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/hook"
    run = tmp_path / "run"
    faults = ["--stability.faults={0: nan, 2: nan}", "--stability.instability.action=skip"]
    faults.append(f"--stability.webhook_url={dead}")
    if killed:
        _run_killed_at_align_step(run, 3, monkeypatch, *ALIGN_4, *faults)
    assert _run(run, *ALIGN_4, *faults) == 0
    alerts = (run / "align" / "alerts.jsonl").read_text().splitlines()
    assert len(alerts) == 2 and json.loads((run / "align" / "done.json").read_text())["webhook_failures"] == 2


def test_lora_targets_the_lm_lacks_fail_before_any_stage_trains(tmp_path, capsys):
    # Found when the first LoRA stage attached its adapter: after the align stage had trained, with a traceback.
    run = tmp_path / "run"
    assert _run(run, "--model.lora.target_modules=[q_proj, qkv]") == 2
    err = capsys.readouterr().err
    assert "--model.lora.target_modules: ['qkv'] are not modules of" in err and "q_proj" in err
    assert not (run / "align").exists()


def test_the_synonym_tables_content_is_in_the_evaluation_fingerprint(tmp_path):
    # Only its path was hashed: a table edited in place rescored nothing.
    from stages.config import CurriculumConfig, EvalConfig, StageSpec
    from stages.stage import RunInputs, eval_fingerprint, resolved_stage_config, stage_fingerprint

    table = tmp_path / "synonyms.json"
    inputs = RunInputs(tmp_path, tmp_path / "data", tmp_path / "vision", tmp_path / "lm", {})

    def prints() -> tuple[str, str]:
        stages = {"align": StageSpec(["projector"], 8, init_from="base")}
        cfg = CurriculumConfig(stages=stages, eval=EvalConfig(synonyms=str(table)))
        resolved = resolved_stage_config(cfg, "align", inputs, None)
        return stage_fingerprint(resolved), eval_fingerprint(resolved)

    table.write_text('{"dog": ["puppy"]}')
    before = prints()
    table.write_text('{"dog": ["puppy", "hound"]}')
    after = prints()
    assert before[0] == after[0] and before[1] != after[1]


def test_a_finished_stage_without_its_export_is_named_when_it_must_be_scored_again(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(run, *ALIGN_4) == 0
    shutil.rmtree(run / "align" / "export")
    assert _run(run, *ALIGN_4, "--eval.limit=6") == 2
    assert (
        f"stage align finished (done.json) but its export/ is missing; delete {run / 'align'}"
        in capsys.readouterr().err
    )


def test_checkpoints_are_staged_beside_themselves_not_in_the_temp_folder(tmp_path, monkeypatch):
    """Lightning staged every checkpoint in /tmp (an fsspec transaction) and moved it over: a kill in between left
    it there, and across file systems the move was a copy. Every checkpoint now reaches its name by a rename
    within its own folder, and nothing is staged in the temp folder."""
    import os
    import tempfile

    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    moves: list[tuple[Path, Path]] = []
    replace, move = os.replace, shutil.move

    def record(recorder):
        def wrapped(source, target, *args, **kwargs):
            if str(target).endswith(".ckpt"):
                moves.append((Path(source), Path(target)))
            return recorder(source, target, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(os, "replace", record(replace))
    monkeypatch.setattr(shutil, "move", record(move))
    assert _run(tmp_path / "run", "--stages.align.trainer.max_steps=2") == 0
    assert len(moves) >= 4  # at least one checkpoint a stage
    assert all(source.parent == target.parent for source, target in moves), moves[:2]


def test_a_retrained_stage_names_what_changed_and_its_old_export_is_called_out_of_date(tmp_path, caplog, capsys):
    # An upgrade (or a change) that retrained the run left export_hf with the old weights: eval and report.md
    # said nothing. The retrain's message did not say which setting changed.
    from stages.export import evaluate_model
    from stages.report import write_report

    run = tmp_path / "run"
    assert _run(run) == 0
    assert main(["export", "--run_dir", str(run)]) == 0
    assert "`export_hf` holds sft_long." in write_report(run).read_text()
    caplog.set_level("WARNING")
    assert _run(run, "--stages.sft_long.min_lr_ratio=0.5") == 0
    assert "config or inputs changed since its last run (spec.min_lr_ratio)" in caplog.text
    result = evaluate_model(run / "export_hf", limit=2, max_new_tokens=4)
    assert "has been trained again since" in result["model"]["stale"]
    assert "**`export_hf` is out of date**" in write_report(run).read_text()
    # Its shards rebuilt since: eval, scoring on them by default, scored another data set without a word.
    assert "shards_changed" not in evaluate_model(run / "sft_long", limit=2, max_new_tokens=4)["model"]
    os.utime(next((run / "data").glob("test-*.tar")), ns=(0, 0))
    assert "was rebuilt after" in evaluate_model(run / "sft_long", limit=2, max_new_tokens=4)["model"]["shards_changed"]


def test_a_rerun_names_the_stage_folders_its_curriculum_has_not(micro_run, tmp_path, caplog):
    # A stage renamed or removed kept its folder, checkpoints and export, with no word, out of every report.
    import logging

    run = tmp_path / "run"
    shutil.copytree(micro_run, run, copy_function=shutil.copy2)  # times kept: finished
    (run / "sft_all").mkdir()
    (run / "sft_all" / "config.yaml").write_text("fingerprint: abc\n")
    with caplog.at_level(logging.WARNING, logger="stages.curriculum"):
        assert main(["curriculum", f"--run_dir={run}", *MICRO_ARGS, "--eval.every_n_steps=2", "--eval.vqa=true"]) == 0
    assert "holds stages this curriculum has not (sft_all)" in caplog.text
