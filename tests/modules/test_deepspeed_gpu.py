"""Lightning's DeepSpeed strategy on a GPU, as the real profiles train: bf16-mixed, ZeRO-2 and ZeRO-3.

Skipped without CUDA (CI has none); on the GPU machine: `pytest -m gpu tests/modules/test_deepspeed_gpu.py`.
A run killed (SIGKILL) in the middle of its SFT stage and rerun continues from its checkpoint to the
uninterrupted run's losses, and the merged export of the resumed run captions as its unmerged stage
(base models + projector + LoRA adapter) does; finished stages are scored again on the GPU when only the
evaluation settings change. The CPU versions of these checks are in
test_deepspeed.py; this file is the same flow on CUDA kernels and DeepSpeed's GPU engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.modules.test_deepspeed import (
    REPO,
    TWO_STAGES,
    ZERO3_TINY,
    _losses,
    _two_stage_config,
    kill_mid_stage_and_rerun,
)

pytest.importorskip("deepspeed")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK")
# Deterministic cuBLAS, so that the resumed run can be compared with the uninterrupted one; an op
# without a deterministic CUDA kernel warns (deterministic=warn) instead of failing the run.
ENV = {k: v for k, v in os.environ.items() if k not in DIST_VARS} | {
    "HF_HUB_OFFLINE": "1",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}


def _command(run_dir: Path, tmp_path: Path, zero: str, micro_world: Path, micro_base, *extra: str) -> list[str]:
    config = REPO / "configs" / "deepspeed" / "zero2.json"
    if zero == "zero3":
        config = tmp_path / "zero3_tiny.json"
        config.write_text(json.dumps(ZERO3_TINY))
    args = [
        "curriculum", f"--run_dir={run_dir}", "--config", _two_stage_config(tmp_path), *TWO_STAGES,
        f"--data.shard_dir={micro_world}", f"--model.vision_path={micro_base[0]}", f"--model.lm_path={micro_base[1]}",
        "--stages.sft_short.trainer.max_steps=8", "--checkpoint.every_n_train_steps=2",
        "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed",
        "--trainer.deterministic=warn", "--trainer.strategy=deepspeed", f"--trainer.deepspeed_config={config}",
        "--model.speed.loss_chunk_tokens=16", "--model.speed.checkpoint_every=1", *extra,
    ]  # fmt: skip
    return [sys.executable, "-c", f"import sys; from stages.run import main; sys.exit(main({args!r}))"]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_killed_mid_sft_on_gpu_resumes_and_exports_what_it_trained(tmp_path, micro_world, micro_base, zero):
    from stages.export import evaluate_model, export_model, find_stage

    clean_dir, killed_dir = tmp_path / "clean", tmp_path / "killed"
    done = subprocess.run(
        _command(clean_dir, tmp_path, zero, micro_world, micro_base),
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # Read on the GPU at train start: after fit the module is back on the CPU.
    assert json.loads((clean_dir / "sft_short" / "done.json").read_text())["resources"]["peak_gpu_gib"] > 0
    if zero == "zero2":  # finished stages scored again on the GPU when only the evaluation settings changed
        again = subprocess.run(
            _command(clean_dir, tmp_path, zero, micro_world, micro_base, "--eval.max_new_tokens=6"),
            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stdout.count("(scored again: evaluation settings changed)") == 2, again.stdout[-3000:]

    command = _command(killed_dir, tmp_path, zero, micro_world, micro_base)
    kill_mid_stage_and_rerun(command, ENV, killed_dir / "sft_short", timeout=900)
    torch.testing.assert_close(_losses(killed_dir, "sft_short"), _losses(clean_dir, "sft_short"), rtol=1e-3, atol=1e-5)

    exported = export_model(find_stage(killed_dir), tmp_path / "export")
    merged = evaluate_model(exported, limit=8, max_new_tokens=12)
    unmerged = evaluate_model(killed_dir / "sft_short", limit=8, max_new_tokens=12)
    assert merged["captions"] == unmerged["captions"]
