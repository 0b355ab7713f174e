"""I/O errors (a full disk, a failing read) are the disk's: said as such, never taken for bad input or a damaged
stage, and never leaving a half-written file that a rerun trusts or that keeps the disk full."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from stages.exits import DISK_ERRORS
from stages.run import main
from tests.conftest import SYNTHETIC_RECIPE


def _eio(*args, **kwargs):
    raise OSError(errno.EIO, "Input/output error", "the file")


def test_a_failed_stat_of_an_input_image_is_not_a_missing_image(tmp_path, monkeypatch):
    # One EIO (or a stale NFS handle) counted the image as gone: the shards were rebuilt and every finished
    # stage trained again.
    from stages.curriculum import _image_stats

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    assert _image_stats([str(image), str(tmp_path / "gone.png")])[str(tmp_path / "gone.png")] is None
    monkeypatch.setattr(Path, "stat", _eio)
    with pytest.raises(OSError, match="Input/output error"):
        _image_stats([str(image)])


def test_a_failed_read_of_an_input_image_is_not_a_corrupt_image(tmp_path, monkeypatch):
    # An EIO dropped the sample for good as corrupt_image (exit 0), and later runs kept those shards.
    import datamodules.images
    from datamodules.images import image_problem

    truncated = tmp_path / "t.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    assert image_problem(truncated) == "corrupt_image", "PIL's own errors carry no errno"

    def vanished(path):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))

    monkeypatch.setattr(datamodules.images, "open_rgb", vanished)
    assert image_problem(truncated) == "missing_image", "gone between the check and the read"
    monkeypatch.setattr(datamodules.images, "open_rgb", _eio)
    with pytest.raises(OSError, match="Input/output error"):
        image_problem(truncated)


def test_a_failed_read_of_a_handoff_file_does_not_call_the_stage_damaged(tmp_path, monkeypatch):
    # "cannot be read ([Errno 5] ...); delete its stage folder": a good stage, deleted on advice.
    import modules.handoff
    from modules.loading import ModelFolderError

    damaged = tmp_path / "stage" / "export" / "projector.safetensors"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"\x08")
    with pytest.raises(ModelFolderError, match="delete its stage folder"):
        modules.handoff._read(damaged)
    with pytest.raises(ModelFolderError, match="delete its stage folder"):
        modules.handoff._read(damaged.with_name("gone.safetensors"))
    # safetensors reports a file it cannot open as FileNotFoundError without errno, whatever the cause: the
    # file is opened first, where the disk's error shows as such.
    real_open = Path.open

    def failing(self, *args, **kwargs):
        return _eio() if self == damaged else real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", failing)
    with pytest.raises(OSError, match="Input/output error") as raised:
        modules.handoff._read(damaged)
    assert not isinstance(raised.value, ModelFolderError)


def test_a_full_disk_ends_the_command_with_one_line_and_exit_74(tmp_path, monkeypatch, capsys):
    import stages.data

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "train-000000.tar"))

    monkeypatch.setattr(stages.data, "write_shards", full)
    build = ["data", "--config", str(SYNTHETIC_RECIPE), "--out_dir", str(tmp_path / "out"), "--world.train_size=64"]
    assert main(build) == 74
    err = capsys.readouterr().err
    assert f"error: [Errno 28] No space left on device: '{tmp_path / 'out' / 'train-000000.tar'}'" in err
    assert "rerun the same command" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "index.json").exists()

    def not_the_disks(*args, **kwargs):  # as transformers raises for a folder without its processor config
        raise OSError("Can't load image processor for 'models/x'")

    monkeypatch.setattr(stages.data, "write_shards", not_the_disks)
    with pytest.raises(OSError, match="Can't load image processor"):  # its traceback, not "fix the disk"
        main(build)


def test_a_checkpoint_save_that_fills_the_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    import stages.strategies
    from stages.strategies import BesideCheckpointIO

    target = tmp_path / "last.ckpt"
    BesideCheckpointIO().save_checkpoint({"step": 1}, target)
    monkeypatch.setattr(stages.strategies.torch, "save", lambda *args: _raise_enospc())
    with pytest.raises(OSError, match="No space left"):
        BesideCheckpointIO().save_checkpoint({"step": 2}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "no .last.ckpt.partial keeps the disk full"
    assert torch.load(target)["step"] == 1


def _raise_enospc():
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_half_written_run_file_is_named_by_report(micro_run, tmp_path, capsys):
    # A 0-byte losses.json (the disk filled up as it was written) ended `report` in an unnamed JSONDecodeError.
    run = tmp_path / "run"
    shutil.copytree(micro_run, run, symlinks=True)
    (run / "sft_short" / "done.json").write_text("")
    assert main(["report", "--run_dir", str(run)]) == 2
    assert f"{run / 'sft_short' / 'done.json'} cannot be read" in capsys.readouterr().err
    json.loads((micro_run / "sft_short" / "done.json").read_text())  # the shared run is untouched


@pytest.mark.parametrize("code", sorted(DISK_ERRORS), ids=lambda code: errno.errorcode[code])
def test_every_disk_error_ends_the_command_with_exit_74(code, tmp_path, monkeypatch, capsys):
    import stages.run

    def failing(parser, args):
        raise OSError(code, os.strerror(code), str(tmp_path / "report.md"))

    monkeypatch.setattr(stages.run, "run_report_command", failing)
    assert main(["report", "--run_dir", str(tmp_path)]) == 74
    err = capsys.readouterr().err
    assert os.strerror(code) in err and "rerun the same command" in err


def test_ctrl_c_ends_any_command_with_exit_130(tmp_path, monkeypatch, capsys):
    # Outside a fit Ctrl-C ended a command with 1 (an error's code) once Lightning was imported, and Lightning
    # ends an interrupted fit with 1 itself (`sys.exit(1)` while it handles the KeyboardInterrupt).
    import stages.run

    def pressed(parser, args):
        raise KeyboardInterrupt

    def lightning_fit(parser, args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)

    for handler in (pressed, lightning_fit):
        monkeypatch.setattr(stages.run, "run_report_command", handler)
        assert main(["report", "--run_dir", str(tmp_path)]) == 130
        assert "interrupted by Ctrl-C: rerun the same command" in capsys.readouterr().err


def test_ctrl_c_in_a_finalizer_between_stages_is_not_lost():
    # The garbage collection between stages runs finalizers (a profiler's, a DataLoader's); Ctrl-C raised inside
    # one was printed as "Exception ignored" and dropped, and the run trained on to its end.
    import gc
    import signal

    from stages.curriculum import free_stage_memory

    class PressedWhileFreed:
        def __init__(self) -> None:
            self.cycle = self  # freed by the collector, not by reference counting

        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # Python runs the handler here, inside the finalizer
                pass

    gc.collect()
    PressedWhileFreed()
    with pytest.raises(KeyboardInterrupt):
        free_stage_memory()


def test_a_missing_file_is_no_disk_error(tmp_path, monkeypatch):
    import stages.run

    def missing(parser, args):  # a bug or a vanished input: its traceback, not "once the disk is fixed"
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "x"))

    monkeypatch.setattr(stages.run, "run_report_command", missing)
    with pytest.raises(FileNotFoundError):
        main(["report", "--run_dir", str(tmp_path)])


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"), OSError(errno.EIO, "I/O")])
def test_an_unreadable_input_image_or_handoff_is_the_disks_error(error, tmp_path, monkeypatch):
    """EACCES (a file another user made) is no corrupt image, dropped for good, and no damaged stage to delete."""
    import datamodules.images
    import modules.handoff
    from datamodules.images import image_problem
    from modules.loading import ModelFolderError

    def failing(*args, **kwargs):
        raise error

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    monkeypatch.setattr(datamodules.images, "open_rgb", failing)
    with pytest.raises(OSError) as raised:
        image_problem(image)
    assert raised.value.errno == error.errno
    handoff = tmp_path / "projector.safetensors"
    handoff.write_bytes(b"\x08")
    monkeypatch.setattr(Path, "open", failing)
    with pytest.raises(OSError) as raised:
        modules.handoff._read(handoff)
    assert raised.value.errno == error.errno and not isinstance(raised.value, ModelFolderError)


def test_an_atomic_write_starts_beside_its_file(tmp_path, monkeypatch):
    """Its scratch file is renamed over the target: made elsewhere (the system's temp folder, another file
    system), the rename fails with EXDEV, and every write in such a run folder failed."""
    from stages.paths import write_text_atomic

    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(Path(src)), real(src, dst)))
    target = tmp_path / "run" / "stages.json"
    target.parent.mkdir()
    write_text_atomic(target, "{}")
    assert target.read_text() == "{}" and [path.parent for path in renamed] == [target.parent]
    assert sorted(p.name for p in target.parent.iterdir()) == ["stages.json"]


def test_decisive_files_and_what_they_vouch_for_reach_the_disk_before_their_rename(tmp_path, monkeypatch):
    # Renamed into place unsynced, a file can be empty after a power cut (the rename reaches the disk before
    # the data): an empty done.json or last.ckpt failed the rerun that read it, and an index.json on the disk
    # could vouch for shards that were not.
    from stages.data import load_recipe, run_data_stage
    from stages.paths import sync_tree, write_text_atomic
    from stages.strategies import BesideCheckpointIO
    from tests.conftest import MICRO_WORLD, SYNTHETIC_RECIPE

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(descriptor):
        events.append(("sync", os.fstat(descriptor).st_ino))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("rename", Path(target).name))
        real_replace(source, target)

    def synced_before(path: Path, renamed: str) -> bool:
        return events.index(("sync", path.stat().st_ino)) < events.index(("rename", renamed))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_text_atomic(tmp_path / "done.json", "{}")
    assert synced_before(tmp_path / "done.json", "done.json") and ("sync", tmp_path.stat().st_ino) in events
    BesideCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    assert synced_before(tmp_path / "last.ckpt", "last.ckpt")
    (tmp_path / "export" / "adapter").mkdir(parents=True)
    (tmp_path / "export" / "adapter" / "weights").write_bytes(b"w")
    events.clear()
    sync_tree(tmp_path / "export")
    assert [("sync", p.stat().st_ino) for p in (tmp_path / "export" / "adapter" / "weights", tmp_path / "export")] == [
        events[0],
        events[-1],
    ]
    events.clear()
    shards = tmp_path / "shards"
    run_data_stage(load_recipe(SYNTHETIC_RECIPE, ["--shard_size=64"]), shards, MICRO_WORLD, seed=0)
    assert all(synced_before(tar, "index.json") for tar in shards.glob("*.tar"))


def test_a_stage_syncs_its_export_before_done_json(tmp_path, monkeypatch):
    # done.json vouches for export/: synced after it, a power cut could leave a finished stage with empty weights.
    import stages.stage
    from stages.run import main
    from tests.conftest import MICRO_ARGS

    order, real_sync, real_write = [], stages.stage.sync_tree, stages.stage.write_text_atomic

    def sync_tree(folder):
        order.append(f"sync {Path(folder).parent.name}/{Path(folder).name}")
        real_sync(folder)

    def write_text_atomic(path, text):
        order.append(f"write {Path(path).parent.name}/{Path(path).name}")
        real_write(path, text)

    monkeypatch.setattr(stages.stage, "sync_tree", sync_tree)
    monkeypatch.setattr(stages.stage, "write_text_atomic", write_text_atomic)
    assert (
        main(
            [
                "curriculum",
                f"--run_dir={tmp_path / 'run'}",
                *MICRO_ARGS,
                "--stages={align: {trainable: [projector], max_words: 48, init_from: base, trainer: {max_steps: 2}}}",
            ]
        )
        == 0
    )
    assert order.index("sync align/export") < order.index("write align/done.json")
