"""Runs whose ranks torchrun or srun start all at once, and launches a run cannot coordinate."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from stages.launch import LaunchError, join_launched_ranks
from stages.run import main
from tests.conftest import MICRO_ARGS, run_fresh

TWO_RANKS_ON_CPU = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    return run_fresh([*command, "-m", "stages.run", "curriculum", *args, *MICRO_ARGS, *TWO_RANKS_ON_CPU])


@pytest.mark.slow
def test_a_fresh_run_started_by_torchrun_prepares_once_and_trains(tmp_path):
    # torchrun starts every rank at once: both built the base models into one folder, and rank 1 was refused
    # rank 0's lock on the run's data ("in use by pid ..."), which ended the run. Rank 0 now prepares first.
    run = tmp_path / "run"
    done = _torchrun(f"--run_dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("pretraining the tiny vision tower") == 1
    assert list(json.loads((run / "summary.json").read_text())) == ["align", "sft_short", "sft_medium", "sft_long"]
    # The stage's figures count both ranks' batches (rank 0's alone showed half): 3 steps of 8 on each of 2 ranks.
    resources = json.loads((run / "align" / "done.json").read_text())["resources"]
    assert resources["ranks"] == 2 and resources["train_samples"] == 48
    # What fails on rank 0 while it prepares ends rank 1 too, naming the error (it waited until the timeout).
    failed = _torchrun(f"--run_dir={tmp_path / 'bad'}", "--model.lm_path=/nonexistent/lm")
    assert failed.returncode != 0
    assert "rank 0 failed to prepare the run: FileNotFoundError: not model folders" in failed.stderr


@pytest.mark.slow
def test_ranks_that_do_not_share_the_run_folder_are_refused(tmp_path):
    # Nodes with the run folder on their own disks: node 1's ranks built their own base models and shards and
    # failed stages later, on a handoff only rank 0 had written ("has no projector.safetensors").
    script = str(Path(__file__).with_name("launch_two_folders.py"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    done = run_fresh([*command, script, str(tmp_path), *MICRO_ARGS, *TWO_RANKS_ON_CPU])
    assert done.returncode != 0
    assert f"--run_dir {tmp_path / 'rank1'}: rank 1 on {socket.gethostname()} cannot see the file rank 0" in (
        done.stderr
    )
    assert not (tmp_path / "rank0" / "base").exists() and not (tmp_path / "rank1" / "base").exists()


def test_several_nodes_without_torchrun_or_srun_are_refused(tmp_path, capsys):
    # The same command on each node, as Lightning's own launcher runs: each node's first process took itself
    # for rank 0, built the run's inputs, and node 1 was refused node 0's lock while node 0 waited for it.
    assert main(["curriculum", f"--run_dir={tmp_path / 'run'}", *MICRO_ARGS, "--trainer.num_nodes=2"]) == 2
    assert "trainer.num_nodes 2: start the ranks of a run on several nodes with torchrun or srun" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run" / "base").exists()


def test_a_launcher_that_started_other_ranks_than_the_stages_train_on_is_refused(monkeypatch):
    # What torchrun --nproc_per_node=2 sets for its first rank.
    launched = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "GROUP_RANK": "0"}
    for key, value in launched.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(LaunchError, match=r"the launcher started 2 ranks \(TorchElasticEnvironment\) and the stages"):
        join_launched_ranks(num_nodes=1, processes=1, gpu=False)


def test_a_slurm_job_of_one_task_is_refused_for_two_devices(monkeypatch):
    # sbatch --ntasks 1 with --trainer.devices 2: under SLURM Lightning starts no rank of its own, and the run
    # trained on one process while its config (and fingerprint) said two.
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # fmt: skip
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(LaunchError, match=r"started 1 ranks \(SLURMEnvironment\) and the stages train on 2"):
        join_launched_ranks(num_nodes=1, processes=2, gpu=False)
    join_launched_ranks(num_nodes=1, processes=1, gpu=False)  # one task, one device: nothing to join


def _twice_on_two_ranks(rank: int, port: int, out: str) -> None:
    import time

    import torch.distributed as dist

    from stages.launch import rank_zero_first

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for run in ("first", "second"):  # a compare runs several curricula in one process
        with rank_zero_first("to prepare the run"):
            if rank == 0:
                time.sleep(0.5)
                Path(out, run).write_text("built")
            else:
                Path(out, f"seen-{run}").write_text(str(Path(out, run).is_file()))
    dist.destroy_process_group()


def test_rank_zero_first_waits_for_rank_0_every_time():
    # Its store key named only the block: the second curriculum of a compare found the first one's key and
    # went on without waiting for rank 0.
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_twice_on_two_ranks, args=(_free_port(), out), nprocs=2)
        assert [Path(out, f"seen-{run}").read_text() for run in ("first", "second")] == ["True", "True"]


def test_torchrun_inside_a_slurm_job_keeps_torchruns_ranks(monkeypatch):
    # Any sbatch job looks like SLURM's: the stages' Trainer was given SLURM's rank numbering (rank 0 of 1 on
    # every process) while the process group had torchrun's. The stage Trainer takes the SLURM plugin only when
    # launched_ranks is SLURM's.
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    from stages.launch import launched_ranks

    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # fmt: skip
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert isinstance(launched_ranks(), SLURMEnvironment)
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "GROUP_RANK": "0"}
    for key, value in torchrun.items():
        monkeypatch.setenv(key, value)
    assert isinstance(launched_ranks(), TorchElasticEnvironment) and launched_ranks().global_rank() == 1


def _verdicts_on_two_ranks(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from stages.launch import rank_zero_verdict

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    answer = rank_zero_verdict(lambda: f"decided on rank {dist.get_rank()}", "to decide")
    try:
        rank_zero_verdict(lambda: 1 / 0, "to check the inputs")
        failed = "no error"
    except (LaunchError, ZeroDivisionError) as error:
        failed = f"{type(error).__name__}: {error}"
    Path(out, f"rank{rank}").write_text(json.dumps([answer, failed]))
    dist.destroy_process_group()


def test_rank_0s_verdict_and_its_error_reach_every_rank():
    # The inputs' check computed digests on every rank and broadcast rank 0's: a failure there on rank 0 left
    # the other ranks in the broadcast until the group's timeout.
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_verdicts_on_two_ranks, args=(_free_port(), out), nprocs=2)
        ranks = [json.loads(Path(out, f"rank{rank}").read_text()) for rank in (0, 1)]
    assert ranks[0] == ["decided on rank 0", "ZeroDivisionError: division by zero"]
    assert ranks[1] == [
        "decided on rank 0",
        "LaunchError: rank 0 failed to check the inputs: ZeroDivisionError: division by zero",
    ]
