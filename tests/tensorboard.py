"""A run's TensorBoard log as tests read it: every event file alone, merged in step order.

Each stage of a run opens its own event file. TensorBoard reads a folder's files in name order; a name
holds the second the file was opened and a counter of the process, so two micro stages opened in the
same second of a long test session sort the wrong way once the counter passes 9 ('...10' < '...9'),
and the folder's scalars came back out of order: a test failed depending on the tests run before it.
"""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

_ALL = {"scalars": 0, "tensors": 0, "images": 0}


class RunEvents:
    """The subset of EventAccumulator's interface the tests use, over every event file of `tb_dir`."""

    def __init__(self, tb_dir: str | Path) -> None:
        files = sorted(Path(tb_dir).glob("events.out.tfevents.*"))
        self.files = [EventAccumulator(str(path), size_guidance=_ALL).Reload() for path in files]

    def Tags(self) -> dict[str, list[str]]:  # noqa: N802 (EventAccumulator's naming)
        tags: dict[str, set[str]] = {}
        for events in self.files:
            for kind, names in events.Tags().items():
                if isinstance(names, list):
                    tags.setdefault(kind, set()).update(names)
        return {kind: sorted(names) for kind, names in tags.items()}

    def _merged(self, kind: str, tag: str) -> list:
        found = [e for events in self.files if tag in events.Tags()[kind] for e in getattr(events, kind.title())(tag)]
        if not found:
            raise KeyError(f"no {kind} {tag!r} in {len(self.files)} event file(s)")
        return sorted(found, key=lambda e: (e.step, e.wall_time))

    def Scalars(self, tag: str) -> list:  # noqa: N802
        return self._merged("scalars", tag)

    def Tensors(self, tag: str) -> list:  # noqa: N802
        return self._merged("tensors", tag)

    def Images(self, tag: str) -> list:  # noqa: N802
        return self._merged("images", tag)
