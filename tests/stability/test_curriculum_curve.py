"""Stability regressions: the pinned micro curriculum reproduces its per-step losses, falls, and
resumes after a kill with the same tail; in float32 it falls and stays near the pinned curve. Golden
values and how to regenerate them: golden.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.stability.golden import GOLDEN, STAGES, STEPS, command, env, read_losses

REPO = Path(__file__).resolve().parents[2]
ENV = env()
# Same torch build, float64: another CPU's kernels move the losses by about 5e-6 (golden.py), and a real
# change to the training path by far more than 1e-4.
RTOL, ATOL = 1e-4, 1e-5
# Each stage's last 3 losses must average at least this much below its first 3.
FALL = 0.05

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def golden() -> dict:
    record = json.loads(GOLDEN.read_text())
    if record["torch"].split("+")[0] != torch.__version__.split("+")[0]:
        pytest.skip(f"golden losses were pinned under torch {record['torch']}; regenerate: {record['regenerate']}")
    return record


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> dict[str, list[float]]:
    run_dir = tmp_path_factory.mktemp("stability") / "run"
    subprocess.run(command(run_dir), cwd=REPO, env=ENV, check=True, capture_output=True, timeout=600)
    return read_losses(run_dir)


def _assert_matches(losses: dict[str, list[float]], golden: dict) -> None:
    for name in STAGES:
        assert len(losses[name]) == STEPS, name
        torch.testing.assert_close(
            torch.tensor(losses[name]), torch.tensor(golden["losses"][name]), rtol=RTOL, atol=ATOL
        )


def test_losses_match_the_golden_file(clean_run, golden):
    _assert_matches(clean_run, golden)


def test_every_stage_curve_falls(clean_run):
    for name in STAGES:
        first, last = sum(clean_run[name][:3]) / 3, sum(clean_run[name][-3:]) / 3
        assert last < (1 - FALL) * first, f"{name}: {first:.4f} -> {last:.4f}"


def test_the_float32_run_falls_and_follows_the_golden_curve(tmp_path, golden):
    """The same run in float32, as users train on the CPU: its rounding differs from machine to machine (golden.py),
    so per-step losses cannot be pinned; each stage's curve must fall and its mean loss stay near the golden
    run's. Measured under the pinned kernels, AVX-512 and one thread: align within 9e-4 (relative), the SFT
    stages within 1.9e-2. That only catches gross breakage: halving every learning rate moves the means by
    0.3% to 4% and passes here; the float64 tests above catch it at the first steps."""
    run_dir = tmp_path / "run"
    float32 = ["--trainer.precision=32-true", "--base.dtype=float32"]
    subprocess.run(command(run_dir) + float32, cwd=REPO, env=ENV, check=True, capture_output=True, timeout=600)
    losses = read_losses(run_dir)
    for index, name in enumerate(STAGES):
        first, last = sum(losses[name][:3]) / 3, sum(losses[name][-3:]) / 3
        assert last < (1 - FALL) * first, f"{name}: {first:.4f} -> {last:.4f}"
        mean, pinned = (sum(values) / STEPS for values in (losses[name], golden["losses"][name]))
        assert mean == pytest.approx(pinned, rel=1e-2 if index == 0 else 5e-2), name


def test_killed_in_the_middle_of_a_stage_and_rerun_reproduces_the_golden_tail(tmp_path, golden):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(run_dir), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run_dir / "sft_medium" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no graceful shutdown: as a crash or a preempted node
    proc.wait(timeout=60)
    assert not (run_dir / "sft_medium" / "done.json").exists(), "the kill came too late to test a resume"

    subprocess.run(command(run_dir), cwd=REPO, env=ENV, check=True, capture_output=True, timeout=600)
    _assert_matches(read_losses(run_dir), golden)


def test_every_speed_lever_on_reproduces_the_golden_curve(tmp_path, golden):
    """Chunked label-only loss, checkpointing and compiled layers change rounding only: in float64 they move
    the golden curve by about 3e-7 (relative), and are held to the golden tolerance."""
    run_dir = tmp_path / "run"
    levers = ["--model.speed.loss_chunk_tokens=7", "--model.speed.checkpoint_every=1"]
    levers.append("--model.speed.compile=aot_eager")  # dynamo + AOT autograd, without inductor's C++ build
    subprocess.run(command(run_dir) + levers, cwd=REPO, env=ENV, check=True, capture_output=True, timeout=600)
    _assert_matches(read_losses(run_dir), golden)
