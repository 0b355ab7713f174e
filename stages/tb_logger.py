"""One TensorBoard log for the whole curriculum, with a global step that runs on across stages."""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
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

    def global_step(self, stage_step: int) -> int:
        return stage_step + self.step_offset
