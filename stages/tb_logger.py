"""One TensorBoard log for the whole curriculum, with a global step that runs on across stages.

The step of every value is the index (from 0, counted across stages) of the optimizer step it belongs to,
or, for an evaluation, of the step it follows: as Lightning logs `train/loss` and `val/loss`. A stage
that starts or resumes at its step s removes from the log whatever an earlier attempt wrote from s on (a
killed run's steps after its checkpoint, a changed stage's old curves), which this attempt writes again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.summary.writer.record_writer import RecordWriter
from typing_extensions import override


class CurriculumTensorBoardLogger(TensorBoardLogger):
    """A TensorBoardLogger writing to `<run_dir>/tb` whose steps start at `step_offset`.

    Every stage builds its own Trainer, whose global step starts at 0; the offset is the number of
    optimizer steps of the stages before, so curves continue instead of overlapping.
    """

    def __init__(self, run_dir: str, step_offset: int = 0) -> None:
        super().__init__(save_dir=run_dir, name="tb", version="", default_hp_metric=False)
        self.step_offset = step_offset

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, None if step is None else step + self.step_offset)

    @override
    @rank_zero_only
    def log_hyperparams(self, params, metrics=None) -> None:
        """Each stage's resolved config is saved as config.yaml in its folder instead."""

    def run_step(self, stage_step: int) -> int:
        """A step of this stage on the run's step axis (the steps of the stages before it come first)."""
        return stage_step + self.step_offset

    @rank_zero_only
    def start_at(self, stage_step: int) -> None:
        """Marks this stage's events as starting at `stage_step`: TensorBoard drops the events that it read
        before this mark at that step and after. The events SummaryWriter's `purge_step` writes, written here
        because the step is known only once Lightning has restored the checkpoint, after opening the writer."""
        step = self.run_step(stage_step)
        writer = self.experiment.file_writer
        writer.add_event(Event(step=step, file_version="brain.Event:2"))
        writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
        mine = getattr(writer.event_writer, "_file_name", None)
        if mine is not None:
            purge_events(Path(self.log_dir), Path(mine), step)


def purge_events(tb_dir: Path, keep: Path | None, step: int) -> None:
    """Rewrites the event files of `tb_dir`, but `keep` (the one being written, if any), without their events at
    `step` and after; one left without any value is removed (each rerun of a stage left one more). TensorBoard's default
    reader (its Rust data server) ignores the purge marks: a stage trained again showed its earlier attempt's
    evaluation between the new ones, where a tag was not logged again at that step."""
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        if keep is not None and path.resolve() == keep.resolve():
            continue
        records = list(RawEventFileLoader(str(path)).Load())  # as written: a parsed loader migrates summaries
        events = [Event.FromString(raw) for raw in records]
        kept = [
            raw
            for raw, event in zip(records, events, strict=True)
            if event.HasField("file_version") or event.step < step
        ]
        if not any(event.HasField("summary") and event.step < step for event in events):
            path.unlink()
            continue
        if len(kept) == len(records):
            continue
        partial = path.with_name(f".{path.name}.partial")
        with partial.open("wb") as sink:
            writer = RecordWriter(sink)
            for raw in kept:
                writer.write(raw)
        os.replace(partial, path)


def text_writers(loggers) -> list[tuple]:
    """(logger, writer, step function) for the loggers that take text and images: TensorBoard's, whose writer
    has `add_text`. Scalars go to every logger through `log_metrics`; a CSV or other logger gets no text. The
    step function puts a stage's step on the run's axis (the curriculum's logger) or leaves it (a plain one)."""
    writers = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):  # its `experiment` opens the writer; others' may do more
            writers.append((logger, logger.experiment, getattr(logger, "run_step", lambda step: step)))
    return writers


class StepLearningRateMonitor(LearningRateMonitor):
    """Lightning's LearningRateMonitor, logging once per optimizer step.

    Lightning's logs at the start of every batch of a logged step, so under gradient accumulation each
    rate was written N times at one step (TensorBoard drew them as one point, the event file held N).
    """

    def __init__(self) -> None:
        super().__init__(logging_interval="step")
        self._logged_step: int | None = None

    @override
    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step == self._logged_step:
            return  # a later micro-batch of the same optimizer step
        self._logged_step = trainer.global_step
        super().on_train_batch_start(trainer, *args, **kwargs)


class StageStart(L.Callback):
    """Calls `start_at` with the step the stage trains from: 0, or the step of the checkpoint it resumed."""

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        if isinstance(trainer.logger, CurriculumTensorBoardLogger):
            trainer.logger.start_at(trainer.global_step)
