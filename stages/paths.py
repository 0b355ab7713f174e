"""How a stage's config.yaml records the folders it read (shards, base models), and how they are found again."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def stored_path(path: Path, run_dir: Path) -> str:
    """How a stage's config.yaml records an input folder: relative to the run folder when inside it (the tiny
    base models, shards built by the run), so that a moved run keeps its fingerprints and finds its inputs;
    else absolute, so that report, export and eval work from any working folder."""
    path, run = Path(path).resolve(), Path(run_dir).resolve()
    return str(path.relative_to(run)) if path.is_relative_to(run) else str(path)


def input_path(stored: str, run_dir: Path) -> Path:
    """The folder a stage's config.yaml records (see `stored_path`); older runs recorded paths relative to
    the working folder of their training, which is tried when the run-relative one does not exist."""
    path = Path(stored)
    if path.is_absolute():
        return path
    inside = Path(run_dir) / path
    return inside if inside.exists() or not path.exists() else path


def write_text_atomic(path: Path, text: str) -> None:
    """Writes `path` whole or not at all (a temporary file beside it, then renamed over it): the files a rerun
    decides by (config.yaml, metrics.json, done.json) are never left half-written by a kill."""
    path = Path(path)
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise
