"""What a run writes to TensorBoard, and the tests' reader, which merges a run's event files by step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from stages.run import main
from tests.conftest import MICRO_ARGS
from tests.tensorboard import RunEvents

STAGES = ("align", "sft_short", "sft_medium", "sft_long")


def test_event_files_opened_in_one_second_are_read_in_step_order(tmp_path):
    for stage, steps in (("9", (1, 2, 3)), ("10", (4, 5, 6))):  # a stage's file, then the next stage's
        writer = SummaryWriter(tmp_path / stage)
        for step in steps:
            writer.add_scalar("train/loss", float(step), step)
        writer.close()
        # As a long session names them: the same second, the process's counter at 9 and then 10.
        (file,) = (tmp_path / stage).glob("events.out.tfevents.*")
        file.rename(tmp_path / f"events.out.tfevents.1795454710.vm.1.{stage}")
    assert sorted(p.name for p in tmp_path.glob("events*"))[0].endswith(".10"), "name order is the wrong order"
    assert [e.step for e in RunEvents(tmp_path).Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def _tensorboard(tb_dir: Path) -> EventAccumulator:
    """The log as TensorBoard's own reader sees it: the folder's files in name order, purges applied."""
    return EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0}).Reload()


def _losses(run_dir: Path) -> list[float]:
    return [v for name in STAGES for v in json.loads((run_dir / name / "losses.json").read_text())["losses"]]


def _run(run_dir: Path, *flags: str) -> None:
    assert main(["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS, "--trainer.log_every_n_steps=1", *flags]) == 0


def test_a_stage_trained_again_replaces_its_curves_and_the_later_stages(tmp_path):
    """A changed stage (3 steps, then 2) is trained again, and so are the stages after it: each curve shows this
    run's points only. The old ones stayed beside them (from step 3 on: two losses a step, and old points
    past the new end)."""
    run_dir = tmp_path / "run"
    _run(run_dir)
    _run(run_dir, "--stages.sft_short.trainer.max_steps=2")
    events = _tensorboard(run_dir / "tb")
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(11))
    assert [e.value for e in losses] == pytest.approx(_losses(run_dir), rel=1e-6)
    assert [e.step for e in events.Scalars("eval/recall")] == [2, 4, 7, 10]
    assert [e.step for e in events.Scalars("lr-AdamW/projector")] == list(range(11))


def test_an_earlier_attempts_events_are_removed_not_only_hidden(tmp_path):
    """TensorBoard's default reader (its Rust data server) ignores the purge marks: after sft_medium was trained
    again with 5 steps, it showed the old attempt's evaluation at step 8 between the new ones. Each file read
    alone, as that reader reads them, holds this attempt's points only."""
    run_dir = tmp_path / "run"
    _run(run_dir)
    _run(run_dir, "--stages.sft_medium.trainer.max_steps=5")
    assert [e.step for e in RunEvents(run_dir / "tb").Scalars("eval/recall")] == [2, 5, 10, 13]
    assert [e.step for e in RunEvents(run_dir / "tb").Scalars("train/loss")] == list(range(14))
    # The old attempt's files of sft_medium and sft_long, left without a value, are gone (one more each rerun).
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == len(STAGES)


def test_a_resumed_stage_writes_each_step_once(tmp_path, monkeypatch):
    """Killed after align's 7th step (its checkpoint after the 4th), the rerun trains steps 4 to 6 again, whose
    losses the killed run had logged: TensorBoard shows each step once, as losses.json has it."""
    from stages.tb_logger import CurriculumTensorBoardLogger
    from tests.stages.test_rerun import _run_killed_at_align_step

    log_metrics = CurriculumTensorBoardLogger.log_metrics

    def flushed(self, metrics, step=None) -> None:  # on disk at once, as a long run's are every 2 minutes
        log_metrics(self, metrics, step)
        self.experiment.flush()

    monkeypatch.setattr(CurriculumTensorBoardLogger, "log_metrics", flushed)
    run_dir = tmp_path / "run"
    flags = ["--stages.align.trainer.max_steps=8", "--checkpoint.every_n_train_steps=4"]
    _run_killed_at_align_step(run_dir, 7, monkeypatch, *flags, "--trainer.log_every_n_steps=1")
    _run(run_dir, *flags)
    losses = _tensorboard(run_dir / "tb").Scalars("train/loss")
    assert [e.step for e in losses] == list(range(17))
    assert [e.value for e in losses] == pytest.approx(_losses(run_dir), rel=1e-6)


def test_gradient_norms_share_the_steps_of_the_loss_and_each_rate_is_logged_once_a_step(tmp_path):
    """With log_every_n_steps 2 and accumulation 2: the loss, the gradient norm and the learning rates at the same
    steps (1, 3, ...; the norm was at 0, 2, ...), each once (the rates were written once per micro-batch), and the
    loss logged is the step's, as losses.json has it (it was the last micro-batch's)."""
    run_dir = tmp_path / "run"
    flags = ["--trainer.accumulate_grad_batches=2", "--stages.align.trainer.max_steps=4"]
    assert main(["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS, "--trainer.log_every_n_steps=2", *flags]) == 0
    events = RunEvents(run_dir / "tb")
    steps = [1, 3, 5, 8, 11]  # align: 4 steps, then 3 a stage; each stage counts (k + 1) % 2 from its own start
    assert [e.step for e in events.Scalars("train/loss")] == steps
    assert [e.step for e in events.Scalars("train/grad_norm")] == steps
    assert [e.step for e in events.Scalars("lr-AdamW/projector")] == steps
    losses = _losses(run_dir)
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([losses[s] for s in steps], rel=1e-6)


def test_a_stage_stopped_on_an_evaluated_step_is_scored_there_once(tmp_path):
    """Stopped by an alert at the step `every_n_steps` had just evaluated, the stage was evaluated again as its
    final scores: every eval value twice at one step, and the captions generated twice."""
    run_dir = tmp_path / "run"
    stop = ["--stability.faults={1: nan}", "--stability.instability.action=stop", "--eval.every_n_steps=2"]
    assert main(["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS, *stop, "--eval.vqa=true"]) == 3
    events = RunEvents(run_dir / "tb")
    for tag in ("eval/chair_i", "eval_length/0-8/mean_words", "eval/vqa_exact"):
        assert [e.step for e in events.Scalars(tag)] == [1], tag
    assert [e.step for e in events.Tensors("eval/align/captions/text_summary")] == [1]
    metrics = json.loads((run_dir / "align" / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and [h["global_step"] for h in metrics["history"]] == [2]
    assert metrics["vqa_exact"] == metrics["history"][0]["vqa_exact"] == events.Scalars("eval/vqa_exact")[0].value


def test_stages_removed_from_the_end_leave_tensorboard_and_the_summary(tmp_path):
    """A curriculum rerun without its last stage kept that stage's curves past the new end in TensorBoard; a rerun
    that stopped kept the summary.json of the run before, whose scores no longer matched the stages' files."""
    import yaml

    run_dir = tmp_path / "run"
    _run(run_dir)
    stages = yaml.safe_load((Path(__file__).parents[1] / "configs/curriculum/tiny.yaml").read_text())["stages"]
    del stages["sft_long"]
    three = tmp_path / "three.yaml"
    three.write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    micro = [flag for flag in MICRO_ARGS if "sft_long" not in flag]
    assert (
        main(["curriculum", f"--config={three}", f"--run_dir={run_dir}", *micro, "--trainer.log_every_n_steps=1"]) == 0
    )
    events = RunEvents(run_dir / "tb")
    assert [e.step for e in events.Scalars("train/loss")] == list(range(9))
    assert "eval/sft_long/captions/text_summary" not in events.Tags()["tensors"]
    assert "eval/sft_short/captions/text_summary" in events.Tags()["tensors"]
    assert set(json.loads((run_dir / "summary.json").read_text())) == {"align", "sft_short", "sft_medium"}
    refused_everywhere = ["--trainer.accelerator=cpu", "--trainer.precision=16-mixed"]
    refused = main(["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS, *refused_everywhere])
    assert refused == 2 and (run_dir / "summary.json").exists(), "a rerun refused by its checks changed nothing"
    stop = ["--stability.faults={1: nan}", "--stability.instability.action=stop", "--seed=1"]
    assert main(["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS, *stop]) == 3
    assert not (run_dir / "summary.json").exists()
