"""Runs whose ranks a launcher starts all at once: torchrun, or srun on a SLURM cluster.

Lightning's own launcher starts a node's other ranks only when the first stage begins, by running the same
command again: by then the first process has built the run's base models and shards, and the others find them
built. torchrun and srun start every rank at once, and every rank of a fresh run built the base models into
the same folder (and refused each other's locks). Such ranks join their process group before any file work
(`join_launched_ranks`; Lightning then uses it), and rank 0 prepares the run first (`rank_zero_first`).

Lightning's own launcher on several nodes (the same command on each node, with NODE_RANK) has the problem of
torchrun and srun without their process group: each node's first process took itself for rank 0. Runs on
several nodes are started with torchrun or srun, and refused otherwise. Every rank must see the run folder
on one shared file system (`check_shared_folder`): on node-local disks, the other nodes' ranks found no base
models and shards from rank 0, built their own, and a later stage failed on a handoff only rank 0 had.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver  # lightning 2.6's

log = logging.getLogger(__name__)
T = TypeVar("T")
# Rank 0 may build the run's shards (hours of captioning on real data) while the other ranks wait: they wait
# on a key of the group's store, leaving the group's collectives their default timeout, which finds a hung
# rank (a gloo group made with this timeout hung for 13 minutes and more after a torchrun restart).
PREPARE_TIMEOUT = timedelta(days=2)
SHARED_FOLDER_PATIENCE = 10.0
# How long the first process has to stop on its own once a rank it started ended by one of these signals.
STOP_GRACE = 15.0
STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}
_started: list[subprocess.Popen] = []  # the ranks Lightning's launcher started from this process


class LaunchError(RuntimeError):
    """The ranks of a run were started in a way the run cannot coordinate, or rank 0 failed to prepare it."""


def launched_ranks():
    """The cluster environment of a launcher that starts every rank itself (torchrun, or SLURM, whose tasks
    srun starts), or None (Lightning's own launcher)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for environment in (TorchElasticEnvironment, SLURMEnvironment):
        if environment.detect():
            return environment()
    return None


def several_ranks() -> bool:
    """Whether this process is one of several in a process group (one process, or no group yet: not)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def join_launched_ranks(num_nodes: int, processes: int, gpu: bool) -> None:
    """Joins the process group of ranks a launcher started all at once; fails on launches the run cannot
    coordinate: several nodes without torchrun or srun, or a launcher that started another number of ranks
    than the stages train on (`processes`: devices x num_nodes)."""
    launched = launched_ranks()
    if launched is None:
        if num_nodes > 1:
            raise LaunchError(
                f"trainer.num_nodes {num_nodes}: start the ranks of a run on several nodes with torchrun or srun, "
                "which start them all at once (the same command on each node, as Lightning's own launcher runs, "
                "left every node's first process building the run's models and shards as if it were rank 0)"
            )
        return
    if launched.world_size() != processes:  # Lightning starts no rank of its own under them: it trained on one
        raise LaunchError(
            f"the launcher started {launched.world_size()} ranks ({type(launched).__name__}) and the stages train "
            f"on {processes} (trainer.devices x trainer.num_nodes); make them agree (under SLURM, srun starts "
            "--ntasks-per-node tasks on each node)"
        )
    if processes == 1 or dist.is_initialized():
        return
    # Lightning would join the group when the first stage starts, with the same address and ranks; the "cpu"
    # backend carries this module's messages (gloo), the "cuda" one the training's collectives (NCCL).
    os.environ["MASTER_ADDR"] = launched.main_address
    os.environ["MASTER_PORT"] = str(launched.main_port)
    backend = "cpu:gloo,cuda:nccl" if gpu and torch.cuda.is_available() else "gloo"
    log.info("joining the launcher's %d ranks as rank %d (%s)", launched.world_size(), launched.global_rank(), backend)
    dist.init_process_group(backend, rank=launched.global_rank(), world_size=launched.world_size())
    atexit.register(dist.destroy_process_group)  # as Lightning does for the groups it starts


@contextmanager
def rank_zero_first(what: str) -> Iterator[None]:
    """Rank 0 runs the block first and the other ranks wait, then run it themselves (finding what rank 0
    built); one process, or no process group yet: just the block. When the block fails on rank 0, the other
    ranks fail too, naming its error, instead of waiting for it until the group's timeout."""
    if not several_ranks():
        yield
        return
    # A key of its own each time: a compare runs several curricula in one process, and torchrun's store keeps
    # the keys of a restarted attempt (a restart read rank 0's old error, or went on without waiting).
    fresh = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(fresh, src=0)  # every rank enters together: no long wait here
    store, key = dist.distributed_c10d._get_default_store(), f"vlm_curriculum/rank0/{fresh[0]}/{what}"
    if dist.get_rank() != 0:
        store.wait([key], PREPARE_TIMEOUT)
        verdict = store.get(key).decode()
        if verdict:
            raise LaunchError(f"rank 0 failed {what}: {verdict}")
        yield
        return
    try:
        yield
    except BaseException as error:
        store.set(key, f"{type(error).__name__}: {error}")
        raise
    store.set(key, "")


def check_shared_folder(folder: Path, flag: str) -> None:
    """Fails unless every rank sees a file that rank 0 writes in `folder`; one process, or no process group
    yet: nothing to check. A file of a new name each time (no rank has a cached lookup of it), looked for over
    `SHARED_FOLDER_PATIENCE` seconds, as a shared file system may show another node's new file a little later."""
    if not several_ranks():
        return
    name = [f".rank0-{uuid.uuid4().hex}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name, src=0)
    marker = Path(folder) / name[0]
    if dist.get_rank() == 0:
        marker.write_text(f"written by rank 0 on {socket.gethostname()}; every rank of the run looks for it\n")
    deadline = time.monotonic() + SHARED_FOLDER_PATIENCE
    while not (seen := marker.is_file()) and time.monotonic() < deadline:
        time.sleep(1.0)
    verdicts: list = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, (seen, socket.gethostname()))
    if dist.get_rank() == 0:
        marker.unlink(missing_ok=True)
    blind = [f"rank {rank} on {host}" for rank, (found, host) in enumerate(verdicts) if not found]
    if blind:
        raise LaunchError(
            f"{flag} {folder}: {', '.join(blind)} cannot see the file rank 0 wrote there: every rank of a run "
            "must see the run folder on one shared file system (not a node's own disk)"
        )


def rank_zero_verdict(decide: Callable[[], T], what: str) -> T:
    """`decide()` on rank 0 alone, its answer on every rank; its error, raised on every rank (the others had
    waited for rank 0 in the broadcast until the group's timeout). One process: just `decide()`."""
    if not several_ranks():
        return decide()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [("answer", decide())]
        except BaseException as error:
            dist.broadcast_object_list([("error", f"{type(error).__name__}: {error}")], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise LaunchError(f"rank 0 failed {what}: {value}")
    return value


def every_rank_state(state: dict) -> dict:
    """`state` with every rank's own beside it (`"ranks"`), for a checkpoint that rank 0 alone writes: a rank's
    random generators and loss histories are its own, and a resumed rank restored rank 0's (its dropout masks,
    and the losses it judges spikes against, changed at the resume). One process: `state` as it is. Every rank
    must call it, as every rank builds the checkpoint that Lightning saves."""
    if not several_ranks():
        return state
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return {**state, "ranks": gathered}


def own_rank_state(state: dict) -> dict:
    """This rank's part of an `every_rank_state` state; the state as saved (rank 0's) from a checkpoint of one
    rank, or of another number of ranks."""
    ranks = state.get("ranks")
    if ranks is None or not several_ranks():
        return state
    if len(ranks) != dist.get_world_size():
        log.warning(
            "a checkpoint of %d ranks resumed on %d: every rank takes rank 0's state", len(ranks), dist.get_world_size()
        )
        return state
    return ranks[dist.get_rank()]


def watch_started_ranks() -> None:
    """Puts `_RankWatcher` in the place of Lightning's watcher of the ranks its launcher starts (a private
    function: checked against lightning 2.6)."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    if not hasattr(subprocess_script, "_launch_process_observer"):
        log.warning("this Lightning has no _launch_process_observer: a rank stopped by a signal ends the run with 137")
        return
    subprocess_script._launch_process_observer = _watch


def _watch(child_processes: list[subprocess.Popen]) -> None:
    _started[:] = child_processes
    _RankWatcher(main_pid=os.getpid(), child_processes=child_processes).start()


def _stopped(processes: list[subprocess.Popen]) -> tuple[int, int] | None:
    """(rank, signal) of the first of `processes` (ranks 1, 2, ...) that SIGTERM or SIGINT ended, by the
    signal itself (-n) or by `stages.run` after it (128 + n); None when none did."""
    for rank, proc in enumerate(processes, 1):
        for signum in STOP_SIGNALS:
            if proc.poll() in (-signum, 128 + signum):
                return rank, signum
    return None


def rank_stopped_by_a_signal(wait: float) -> tuple[int, int] | None:
    """(rank, signal) of a rank that Lightning's launcher started from this process and that SIGTERM or SIGINT
    ended, waiting up to `wait` seconds for those still running to end; None when none did (or none was started)."""
    deadline = time.monotonic() + wait
    while any(proc.poll() is None for proc in _started) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _stopped(_started)


class _RankWatcher(_ChildProcessObserver):
    """Lightning's watcher (a look every 5 s), except for a rank that SIGTERM or Ctrl-C ended: the first
    process gets `STOP_GRACE` seconds to stop on its own (it was signalled too, or its next collective fails and
    `stages.run` says why); then it gets the signal once more, so that what cleans up on the way out runs where
    Python code runs, and 5 s later the ranks still running are killed and it ends with the signal's code."""

    def _run(self) -> bool:
        stopped = _stopped(self._child_processes)
        if stopped is None:
            return super()._run()  # all ended well: done; one failed: SIGKILL all, as Lightning does
        rank, signum = stopped
        time.sleep(STOP_GRACE)  # a daemon thread: gone with the process if it ends meanwhile
        os.kill(self._main_pid, signum)
        time.sleep(5.0)
        for proc in self._child_processes:
            if proc.poll() is None:
                proc.kill()
        print(
            f"interrupted by {STOP_SIGNALS[signum]} on rank {rank}: rerun the same command to go on (this process, "
            "waiting for it where no signal handler runs, did not stop on its own)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)
