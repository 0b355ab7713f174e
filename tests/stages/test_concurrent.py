"""Processes that share folders: a data build, the runs that read its shards, compares in one root."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from stages.paths import folder_lock, write_text_atomic
from stages.run import main
from tests.conftest import MICRO_ARGS, REPO, SYNTHETIC_RECIPE


def test_a_data_build_is_refused_while_a_run_reads_the_folder_and_the_other_way(micro_world, tmp_path, capsys):
    # A build into shards that a curriculum trained from gave its later stages another world (exit 0), and two
    # builds into one folder deleted each other's files. A curriculum holds a shared lock on its shard folder.
    build = ["data", "--config", str(SYNTHETIC_RECIPE), "--out_dir", str(micro_world), "--seed", "7"]
    before = (micro_world / "index.json").read_bytes()
    with folder_lock(micro_world, "data", shared=True):  # what a running curriculum holds
        assert main(build) == 2
    assert f"the shard folder {micro_world} is being read by another process (a run training" in capsys.readouterr().err
    assert (micro_world / "index.json").read_bytes() == before, "the refused build removed nothing"
    with folder_lock(micro_world, "the shard folder", purpose="a data build"):  # a build under way
        run = ["curriculum", f"--run_dir={tmp_path / 'run'}", f"--data.shard_dir={micro_world}", *MICRO_ARGS]
        assert main(run) == 2
    holder = f"pid {os.getpid()} on {socket.gethostname()}: a data build"
    assert f"--data.shard_dir {micro_world} is being written by {holder}" in capsys.readouterr().err


def test_inputs_changed_during_a_run_stop_it_before_the_next_stage(tmp_path, monkeypatch, capsys):
    # Base models in another run's base/ (which this run cannot lock) rebuilt by that run: the later stages
    # trained on the new ones, silently.
    from callbacks.evaluation import CaptionEvaluation

    original = CaptionEvaluation.on_train_end

    def then_rebuilt(self, trainer, *args):
        original(self, trainer, *args)
        if self.stage == "align":
            weights = next((tmp_path / "run" / "base" / "lm").glob("*.safetensors"))
            os.utime(weights, ns=(0, 0))

    monkeypatch.setattr(CaptionEvaluation, "on_train_end", then_rebuilt)
    assert main(["curriculum", f"--run_dir={tmp_path / 'run'}", *MICRO_ARGS]) == 2
    err = capsys.readouterr().err
    assert "before stage sft_short:" in err and "base/lm changed while this run used it" in err
    assert not (tmp_path / "run" / "sft_short").exists()


def test_a_second_compare_in_one_root_is_refused(tmp_path, capsys):
    # It rewrote the baseline's stages under the first one's runs, and that one's compare.md came from both.
    with folder_lock(tmp_path, "--root", purpose="a compare"):
        assert main(["compare", "--root", str(tmp_path), "--seeds", "1"]) == 2
    assert f"--root {tmp_path} is in use by pid {os.getpid()} on {socket.gethostname()}: a compare" in (
        capsys.readouterr().err
    )


def test_files_written_atomically_follow_the_umask(tmp_path):
    # mkstemp made them 0600: another user of a shared run folder could read the shards but not index.json.
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "done.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "done.json").stat().st_mode) == 0o644


def test_a_refused_rebuild_leaves_the_folder_as_it_was(tmp_path, capsys):
    # The stamp went before the build asked for the lock: refused, it left the shards unstamped and changed
    # their digest under the run that held them, which then stopped too.
    run = tmp_path / "run"
    assert main(["curriculum", f"--run_dir={run}", *MICRO_ARGS]) == 0
    stamp = (run / "data" / "recipe.json").read_bytes()
    with folder_lock(run / "data", "data", shared=True):  # another run training from these shards
        assert main(["curriculum", f"--run_dir={run}", *MICRO_ARGS, "--seed=1"]) == 2
    assert f"data {run / 'data'} is being read by another process" in capsys.readouterr().err
    assert (run / "data" / "recipe.json").read_bytes() == stamp


@pytest.mark.parametrize("code", ["ENOLCK", "EOPNOTSUPP", "ENOSYS", "EINVAL"])
def test_a_file_system_without_locks_is_used_unguarded(tmp_path, monkeypatch, caplog, code):
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING"), folder_lock(tmp_path, "--out_dir"):
        pass
    assert f"takes no locks ({os.strerror(getattr(errno, code))})" in caplog.text


def test_a_refusal_names_the_last_holder_only(tmp_path):
    """The holder's line is rewritten, not appended to: a shorter purpose left the end of a longer one."""
    from stages.paths import FolderBusy, file_lock

    lock = tmp_path / ".lock"
    with file_lock(lock, "--out_dir", purpose="a long purpose from an earlier holder"):
        pass
    with file_lock(lock, "--out_dir", purpose="x"):
        with pytest.raises(FolderBusy) as refused:
            with file_lock(lock, "--out_dir", purpose="y"):
                pass
    assert str(refused.value).endswith(": x; wait for it to end") and "long purpose" not in str(refused.value)


def test_another_users_lock_file_still_guards_the_folder(tmp_path, monkeypatch):
    """A lock file this user may read but not write (another user's, in a folder both write) is locked through a
    read-only handle: without that fallback the second writer went on unguarded. The file is left as it was."""
    import pathlib

    from stages.paths import FolderBusy, file_lock

    lock = tmp_path / ".lock"
    lock.write_text("pid 1 on elsewhere: another user's build\n")
    opened = pathlib.Path.open

    def not_writable(self, mode="r", *args, **kwargs):  # tests run as root here, whom chmod does not stop
        if self == lock and mode != "r":
            raise PermissionError(13, "Permission denied", str(self))
        return opened(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", not_writable)
    with file_lock(lock, "--out_dir", purpose="mine"):
        with pytest.raises(FolderBusy):
            with file_lock(lock, "--out_dir", purpose="theirs"):
                pass
    assert lock.read_text() == "pid 1 on elsewhere: another user's build\n"


def test_only_rank_0_of_a_multi_device_compare_locks_its_root(tmp_path, monkeypatch):
    # Lightning's launcher starts the other ranks by running the same command again: they found rank 0's lock,
    # exited 2, and the launcher killed the run.
    from lightning.pytorch.utilities import rank_zero_only

    import stages.compare

    monkeypatch.setattr(stages.compare, "_compare", lambda *args: {"ran": True})
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with folder_lock(tmp_path, "--root"):  # rank 0's
        assert stages.compare.run_compare(REPO / "configs/curriculum/compare.yaml", [0], tmp_path, []) == {"ran": True}


def test_an_empty_stage_config_is_taken_for_a_changed_one(tmp_path):
    # yaml.safe_load of an empty config.yaml is None: the stage folder was kept, and a stale last.ckpt with it.
    from stages.stage import prepare_stage_folder

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_text("stale")
    (tmp_path / "config.yaml").write_text("")
    prepare_stage_folder(tmp_path, "abc", {"spec": {}}, rank_zero=True)
    assert not (tmp_path / "checkpoints").exists()


_KILLED_WITH_A_WORKER = """
import multiprocessing, os, sys, time
from pathlib import Path
from stages.paths import file_lock
with file_lock(Path(sys.argv[1]), "--run_dir run"):
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))  # a DataLoader worker
    worker.start()
    print(worker.pid, flush=True)
    os._exit(0)  # as a killed run: nothing unwinds
"""


def test_a_killed_runs_forked_workers_do_not_keep_its_lock(tmp_path):
    # flock belongs to the open file, which forked workers share: after `kill -9` of a run with DataLoader
    # workers, its orphaned workers held the run's lock for seconds (until torch's watchdog ended them), and a
    # rerun then was refused.
    import fcntl
    import signal
    import subprocess
    import sys
    import time

    lock = tmp_path / ".lock"
    run = subprocess.Popen([sys.executable, "-c", _KILLED_WITH_A_WORKER, str(lock)], cwd=REPO, stdout=subprocess.PIPE)
    worker = int(run.stdout.readline())  # not read to its end: the worker holds the pipe too
    run.wait(timeout=60)
    try:
        os.kill(worker, 0)  # the worker lives on
        with lock.open() as handle:
            # The worker drops its copy as it starts: on a loaded machine it may not have run yet (CI saw that
            # once). Held by the worker, the lock stayed taken for its whole 60 s; a few seconds tell them apart.
            deadline = time.monotonic() + 5
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
    finally:
        os.kill(worker, signal.SIGKILL)
        run.stdout.close()
