"""Two CPU ranks: a SIGTERM on one rank stops both after the same batch, and a checkpoint that rank 0 writes
gives every rank its own random generators and loss statistics back (tests/callbacks/ddp_ranks.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import run_fresh

SCRIPT = str(Path(__file__).with_name("ddp_ranks.py"))


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "step"), [("sigterm", 21), ("sigterm_early", 1)])
def test_a_sigterm_on_one_rank_stops_every_rank_after_the_same_batch(tmp_path, mode, step):
    # Lightning's SIGTERM handler broadcast from inside the handler, into another rank's collective: a two-rank
    # run hung (3 of 5 tries) or died of a gloo size mismatch (2 of 5) instead of exiting 143; also with the
    # signal before the first batch.
    done = run_fresh([sys.executable, SCRIPT, str(tmp_path), mode], timeout=180)
    assert done.returncode == 143, done.stderr[-3000:]
    stopped = [json.loads((tmp_path / f"stopped{rank}.json").read_text()) for rank in (0, 1)]
    assert stopped[0] == stopped[1] == step, stopped  # the batch it came in (or the first), then no other


def test_a_resumed_rank_gets_its_own_random_stream_and_loss_statistics(tmp_path, micro_base):
    # Only rank 0's state was saved: after a resume rank 1 drew rank 0's LoRA dropout masks (a two-rank run's
    # losses left an unbroken run's at the second resumed step) and judged spikes against rank 0's losses.
    done = run_fresh([sys.executable, SCRIPT, str(tmp_path), "states", *map(str, micro_base)], timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"states{rank}.json").read_text())
        assert got["draws"] == got["expected"], rank
        assert got["loss_history"] == [float(rank)] * 3 and got["all_losses"] == [10.0 + rank]


@pytest.mark.slow
def test_two_ranks_throughput_counts_survive_resumes(tmp_path):
    """Resumed at its last step (Lightning then skips on_train_end, where the ranks are added up), a 2-rank fit
    said half its samples; the last.ckpt saved after on_train_end held the sum on every rank, and a resume on
    one rank counted it twice (640 samples for 320)."""
    import lightning as L

    from callbacks.throughput import Throughput
    from tests.callbacks.test_throughput import Masked
    from tests.callbacks.toy import KeyedRegression, loader

    done = run_fresh([sys.executable, SCRIPT, str(tmp_path), "throughput"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads((tmp_path / "throughput.json").read_text())  # 2 ranks x 32 samples a step
    assert counts == {
        "fresh": {"train_samples": 256},
        "at_end": {"train_samples": 256, "resumed_at_step": 4},
        "on": {"train_samples": 320, "resumed_at_step": 4},
    }
    counter = Throughput()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=6, callbacks=[counter], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Masked(), loader(KeyedRegression(size=2048)), ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert counter.summary()["train_samples"] == 320 + 32 and counter.summary()["resumed_at_step"] == 5


def test_only_rank_zero_prints_the_run_summary(micro_run, tmp_path, monkeypatch, capsys):
    # Every rank printed the summary table and the run folder; after a rerun that rescored a stage (rank 0 alone
    # rescores) the other ranks' tables lacked that stage.
    import shutil

    from lightning.pytorch.utilities import rank_zero_only

    from stages.run import main
    from tests.conftest import MICRO_ARGS

    run = tmp_path / "run"
    shutil.copytree(micro_run, run, copy_function=shutil.copy2)  # times kept: finished
    args = ["curriculum", f"--run_dir={run}", *MICRO_ARGS, "--eval.every_n_steps=2", "--eval.vqa=true"]
    assert main(args) == 0
    assert "run folder:" in capsys.readouterr().out
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert main(args) == 0
    assert "run folder:" not in capsys.readouterr().out
