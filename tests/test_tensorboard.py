"""The tests' TensorBoard reader merges a run's event files by step, whatever their names' order."""

from __future__ import annotations

from torch.utils.tensorboard import SummaryWriter

from tests.tensorboard import RunEvents


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
