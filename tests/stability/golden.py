"""The pinned stability run: its command, and regenerating its golden per-step losses.

Regenerate (after a deliberate change to the training path) with:

    python -m tests.stability.golden

which runs the command below in a temporary folder and rewrites golden_micro.json with the torch
version it ran under. Review the diff of the losses before committing it.

These curves are chaotic: a last-bit difference in one kernel grows to 1e-3 in the first align loss
(after the base models' pretraining) and to 10% by the last stage. So the run trains in float64, base
models included: the same commit's curves under AVX-512 kernels, unpinned BLAS or one OpenMP thread
instead of two differ from the pinned run's by at most 5e-6 (relative), where in float32 they differed
by up to 7e-2 (measured on one Sapphire Rapids machine, 2026-11-24). It also pins what decides the CPU
kernels' rounding (ENV below): torch's own kernels, MKL's BLAS and oneDNN take their AVX2 code paths,
with two OpenMP threads. The pins alone were not enough: a float32 golden file written under them on
one Intel machine was 2e-3 off on another in the first align loss. What is left of 5e-6 comes from the
cross-entropy: transformers computes the LM's loss in float32 (`logits.float()`), even from float64 logits.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN = Path(__file__).with_name("golden_micro.json")
STAGES = ["align", "sft_short", "sft_medium", "sft_long"]
STEPS = 20

# float64 on CPU, deterministic algorithms, fixed seed: the micro world and micro base models of the
# fast tier, STEPS optimizer steps per stage, a checkpoint every 2 steps (for the kill/resume test).
ARGS = [
    "--seed=0",
    "--trainer.accelerator=cpu",
    "--trainer.precision=64-true",
    "--base.dtype=float64",
    "--trainer.deterministic=true",
    "--world.train_size=512",
    "--world.val_size=32",
    "--world.test_size=16",
    "--base.vision_hidden_sizes=[32, 64]",
    "--base.vision_steps=100",
    "--base.lm_hidden_size=64",
    "--base.lm_steps=100",
    "--base.batch_size=16",
    "--data.batch_size=16",
    "--eval.limit=8",
    "--eval.max_new_tokens=12",
    "--trainer.enable_progress_bar=false",
    "--checkpoint.every_n_train_steps=2",
    *[f"--stages.{name}.trainer.max_steps={STEPS}" for name in STAGES],
    *[f"--stages.{name}.warmup_steps=2" for name in STAGES],
    *[f"--stages.{name}.lr.projector=0.01" for name in STAGES],
    *[f"--stages.{name}.lr.lora=0.01" for name in STAGES[1:]],
]


# Same kernels on every x86-64 CPU with AVX2 (CI's machines vary from session to session).
ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "2",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


def env() -> dict[str, str]:
    return {**os.environ, **ENV}


def command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "stages.run", "curriculum", f"--run_dir={run_dir}", *ARGS]


def read_losses(run_dir: Path) -> dict[str, list[float]]:
    return {name: json.loads((run_dir / name / "losses.json").read_text())["losses"] for name in STAGES}


def main() -> None:
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        subprocess.run(command(run_dir), check=True, env=env())
        losses = read_losses(run_dir)
    record = {
        "command": "python -m stages.run curriculum --run_dir=<tmp> " + " ".join(ARGS),
        "regenerate": "python -m tests.stability.golden",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "pinned": ENV,
        "losses": losses,
    }
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
