"""Signals that stop a run: a scheduler's SIGTERM, SLURM's SIGUSR1; the rerun goes on from the last checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.run import main
from tests.conftest import MICRO_ARGS


@pytest.mark.parametrize("when", ["mid_stage", "at_its_end"])
def test_a_sigterm_exits_143_and_the_rerun_goes_on(tmp_path, monkeypatch, capsys, when):
    """Lightning ends a fit that got SIGTERM (a scheduler's preemption) with SIGTERMException, a SystemExit
    without a code: the run exited 0, as if finished. One that came in the stage's last hooks, after Lightning's
    last look, was dropped: the next stages trained on, and the scheduler had to kill the run."""
    from callbacks.evaluation import CaptionEvaluation

    run_dir = tmp_path / "run"

    def sigterm(self, trainer, *args):  # what Lightning's SIGTERM handler does: set the flag the loops read
        if self.stage == "sft_short" and (when == "at_its_end" or trainer.global_step == 2):
            trainer._signal_connector.received_sigterm = True

    with monkeypatch.context() as patch:
        hook = "on_train_batch_end" if when == "mid_stage" else "on_train_end"
        original = getattr(CaptionEvaluation, hook)

        def then_sigterm(self, trainer, *args):
            original(self, trainer, *args)
            sigterm(self, trainer)

        patch.setattr(CaptionEvaluation, hook, then_sigterm)
        assert main(["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS]) == 143
    assert "interrupted by SIGTERM" in capsys.readouterr().err
    assert (run_dir / "sft_short" / "done.json").is_file() == (when == "at_its_end")
    assert not (run_dir / "sft_medium").exists()
    assert main(["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS]) == 0
    assert json.loads((run_dir / "sft_short" / "done.json").read_text())["global_steps"] == 3


def test_slurms_sigusr1_stops_a_stage_as_sigterm_does_and_leaves_no_hpc_checkpoint(tmp_path, monkeypatch, capsys):
    """Under SLURM Lightning saved an "hpc" checkpoint at SIGUSR1, mid-step, and resumed the rerun from it to
    other losses (it loads one whenever no last.ckpt is given); outside a stage SIGUSR1 killed the run."""
    import os
    import signal

    from callbacks.evaluation import CaptionEvaluation

    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # fmt: skip
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    requeue = []
    with monkeypatch.context() as patch:
        original = CaptionEvaluation.on_train_batch_end

        def then_sigusr1(self, trainer, *args):
            original(self, trainer, *args)
            requeue.append(trainer._accelerator_connector.cluster_environment.auto_requeue)
            if self.stage == "sft_short" and trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

        patch.setattr(CaptionEvaluation, "on_train_batch_end", then_sigusr1)
        assert main(["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS]) == 143
    assert "interrupted by SIGTERM" in capsys.readouterr().err
    assert not list(run_dir.glob("*/*hpc_ckpt*")) and requeue and not any(requeue)  # Lightning's requeue is off
    (run_dir / "sft_short" / "hpc_ckpt_1.ckpt").write_bytes((run_dir / "sft_short/checkpoints/last.ckpt").read_bytes())
    assert main(["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS]) == 0  # an old run's hpc file: removed
    assert json.loads((run_dir / "sft_short" / "done.json").read_text())["global_steps"] == 3
    assert not list(run_dir.glob("*/*hpc_ckpt*"))


def test_torchrun_inside_a_slurm_job_trains_with_torchruns_ranks(tmp_path, monkeypatch):
    # The SLURM plugin (auto-requeue off) was given to every stage inside a SLURM job, torchrun's too: the
    # Trainer took SLURM's rank numbering (rank 0 of 1 on every process) over torchrun's process group.
    from callbacks.evaluation import CaptionEvaluation

    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # fmt: skip
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "GROUP_RANK": "0",
                "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}  # fmt: skip
    for key, value in {**slurm, **torchrun}.items():
        monkeypatch.setenv(key, value)
    environments = []
    original = CaptionEvaluation.on_train_start

    def record(self, trainer, *args):
        environments.append(type(trainer._accelerator_connector.cluster_environment).__name__)
        original(self, trainer, *args)

    monkeypatch.setattr(CaptionEvaluation, "on_train_start", record)
    assert main(["curriculum", f"--run_dir={tmp_path / 'run'}", *MICRO_ARGS]) == 0
    assert set(environments) == {"TorchElasticEnvironment"}


def test_a_sigterm_outside_a_stages_training_exits_143_and_cleans_up(tmp_path):
    """Outside a fit (here the data stage) SIGTERM killed the process at once: no word, and the build's rendered
    images left in work/."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO, fresh_launch_env

    out = tmp_path / "shards"
    args = [sys.executable, "-m", "stages.run", "data", "--config", "configs/data/synthetic.yaml",
            f"--out_dir={out}", "--world.train_size=20000"]  # fmt: skip
    child = subprocess.Popen(args, cwd=REPO, env=fresh_launch_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "work" / "images").is_dir() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        assert child.poll() is None, "the build ended before the signal"
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 143, err[-2000:]
    assert "interrupted by SIGTERM: rerun the same command to go on" in err
    assert not (out / "work" / "images").exists() and not (out / "index.json").exists()  # (work/stats may stay)


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_a_sigterm_during_garbage_collection_is_raised_after_it_not_dropped(sigint):
    """Raised inside a finalizer that the collector runs, an exception is printed as "Exception ignored" and
    dropped: the run went on. Also where SIGINT is ignored (a job started with `&` from a script), where the
    holding was skipped at first."""
    import gc
    import os
    import signal

    from callbacks.preemption import Terminated, signals_held, sigterm_raises

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler)

    class SignalsWhenCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        with sigterm_raises():
            with pytest.raises(Terminated):
                with signals_held():
                    cycle = [SignalsWhenCollected()]
                    cycle.append(cycle)
                    del cycle
                    gc.collect()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_sigterm_while_stopping_is_let_pass():
    # A scheduler may signal twice, or each process of a group: raised again inside the cleanup on the way
    # out, the second one cut it short (a data build's copies of images stayed, for signals 5-40 ms apart).
    import os
    import signal

    from callbacks.preemption import Terminated, sigterm_raises

    cleaned = []
    with pytest.raises(Terminated), sigterm_raises():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # Python runs the handler here
                pass
        finally:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
            cleaned.append(True)
    assert cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back


def test_a_sigterm_after_one_a_finalizer_swallowed_still_raises():
    # Raised inside a finalizer, Terminated is printed as "Exception ignored" and dropped: a first fix for the
    # second SIGTERM ignored every later one from then on, and the run went on to exit 0.
    import os
    import signal

    from callbacks.preemption import Terminated, sigterm_raises

    class SignalledWhenFreed:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs here, inside the finalizer
                pass

    with pytest.raises(Terminated), sigterm_raises():
        freed = SignalledWhenFreed()
        del freed
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass


def _stopped(error: BaseException):
    def handler(parser, args):
        raise error

    return handler


@pytest.mark.parametrize("stop", ["sigterm_outside_a_fit", "sigterm_in_a_fit", "ctrl_c"])
def test_a_command_that_runs_curricula_ends_as_its_stopped_curriculum_does(stop, tmp_path, monkeypatch, capsys):
    # compare and bench stability run curricula in their process: a curriculum stopped by SIGTERM or Ctrl-C
    # ended them as a failure ("the curriculum run ... failed", exit 2; "benchmark run failed", exit 1).
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import stages.run
    from callbacks.preemption import Terminated

    error = {
        "sigterm_outside_a_fit": Terminated(),
        "sigterm_in_a_fit": SIGTERMException(),
        "ctrl_c": KeyboardInterrupt(),
    }
    monkeypatch.setattr(stages.run, "run_curriculum_command", _stopped(error[stop]))
    code = 130 if stop == "ctrl_c" else 143
    assert main(["compare", "--seeds=1", f"--root={tmp_path / 'compare'}"]) == code
    assert main(["bench", "stability", "--seeds=1", "--fault_seeds=1", f"--root={tmp_path / 'bench'}"]) == code
    err = capsys.readouterr().err
    assert "failed" not in err and err.count("rerun the same command") == 2, err


def test_an_export_stopped_midway_leaves_no_partial_folder(micro_run, tmp_path, monkeypatch):
    # Only a disk error removed it: after Ctrl-C or SIGTERM the merged weights stayed beside the export.
    import stages.export
    from callbacks.preemption import Terminated

    def stopped(*args, **kwargs):
        raise Terminated

    monkeypatch.setattr(stages.export.shutil, "copyfile", stopped)  # after the weights are written
    with pytest.raises(Terminated):
        stages.export.export_model(stages.export.find_stage(micro_run), tmp_path / "hf")
    assert not (tmp_path / ".hf.partial").exists() and not (tmp_path / "hf").exists()
    # Once it is whole it stays, stopped as the earlier export is removed: a first fix removed both.
    monkeypatch.undo()
    remove = stages.export.shutil.rmtree

    def stopped_at_the_swap(path, *args, **kwargs):
        if Path(path) == tmp_path / "hf":
            raise Terminated
        remove(path, *args, **kwargs)

    monkeypatch.setattr(stages.export.shutil, "rmtree", stopped_at_the_swap)
    with pytest.raises(Terminated):
        stages.export.export_model(stages.export.find_stage(micro_run), tmp_path / "hf")
    assert (tmp_path / ".hf.partial" / "model.safetensors").is_file()


def _two_ranks_signalled(run: Path, marker: str, whom: str, delay: float = 0.0, signum: int = 15) -> tuple[int, str]:
    """A two-rank micro curriculum (Lightning's own launcher starts rank 1) that gets `signum` once `marker` is in
    its output: on every process (`whom="group"`, as a scheduler or Ctrl-C signals a job) or on rank 1 alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO, fresh_launch_env

    argv = [sys.executable, "-m", "stages.run", "curriculum", f"--run_dir={run}", *MICRO_ARGS]
    argv += ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
    child = subprocess.Popen(
        argv, cwd=REPO, env=fresh_launch_env(), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    lines = []
    try:
        for line in child.stderr:
            lines.append(line)
            if marker in line:
                time.sleep(delay)
                if whom == "group":
                    os.killpg(child.pid, signum)
                else:
                    rank1 = subprocess.run(["pgrep", "-P", str(child.pid)], capture_output=True, text=True)
                    os.kill(int(rank1.stdout.split()[0]), signum)
                lines.append(child.stderr.read())
                break
        return child.wait(timeout=120), "".join(lines)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code", "name"), [(15, 143, "SIGTERM"), (2, 130, "Ctrl-C")])
def test_a_two_rank_run_stopped_while_rank_zero_waits_for_rank_one_says_so(tmp_path, signum, code, name):
    # Signalled as rank 1 starts, rank 1 ended by the signal and rank 0, waiting for it in the group's setup (in
    # C++, where no signal handler runs), was SIGKILLed by Lightning's watcher of the ranks: exit 137, no word.
    marker = "Initializing distributed: GLOBAL_RANK: 0"
    got, err = _two_ranks_signalled(tmp_path / "run", marker, "group", 1.0, signum)
    assert got == code, err[-3000:]
    assert f"interrupted by {name} on rank 1: rerun the same command to go on" in err


@pytest.mark.slow
def test_a_sigterm_on_rank_one_between_stages_ends_the_run_with_143(tmp_path):
    # Rank 1 ended with 143; rank 0 failed in its next collective with gloo's error and a traceback (exit 1).
    run = tmp_path / "run"
    code, err = _two_ranks_signalled(run, "stage sft_medium: caption budget changed", "rank1")
    assert code == 143, err[-3000:]
    assert "interrupted by SIGTERM on rank 1" in err and "Traceback" not in err
    assert (run / "sft_short" / "done.json").is_file() and not (run / "sft_long" / "done.json").exists()
