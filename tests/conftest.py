"""Shared fixtures: a micro synthetic world and micro base models, built once per test session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from datamodules.world import WorldConfig  # noqa: E402
from modules.base_models import TinyBaseConfig, pretrain_lm, pretrain_vision  # noqa: E402
from stages.data import load_recipe, run_data_stage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_RECIPE = REPO / "configs" / "data" / "synthetic.yaml"
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK")


def fresh_launch_env() -> dict[str, str]:
    """This environment for a child process that starts its own ranks: without the process-group variables
    (a test that ran Lightning in-process still holds them, and the child would take that group for its own),
    offline, with the repository importable."""
    return {k: v for k, v in os.environ.items() if k not in DIST_VARS} | {
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }


def run_fresh(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `args` from the repository in `fresh_launch_env`, capturing its output as text."""
    return subprocess.run(args, cwd=REPO, env=fresh_launch_env(), capture_output=True, text=True, timeout=timeout)


MICRO_WORLD = WorldConfig(train_size=192, val_size=32, test_size=24)
MICRO_BASE = TinyBaseConfig(vision_hidden_sizes=(16, 32), vision_steps=4, lm_hidden_size=32, lm_steps=4, batch_size=8)

# Command-line overrides that shrink the default curriculum to seconds.
MICRO_ARGS = [
    "--world.train_size=192",
    "--world.val_size=32",
    "--world.test_size=24",
    "--base.vision_hidden_sizes=[16, 32]",
    "--base.vision_steps=4",
    "--base.lm_hidden_size=32",
    "--base.lm_steps=4",
    "--base.batch_size=8",
    "--data.batch_size=8",
    "--eval.limit=8",
    "--eval.max_new_tokens=12",
    "--trainer.enable_progress_bar=false",
    "--checkpoint.every_n_train_steps=2",
    *[f"--stages.{name}.trainer.max_steps=3" for name in ("align", "sft_short", "sft_medium", "sft_long")],
]

# A toy random-init profile: a CLIP-style ViT tower (all 16 patches kept) and a Qwen2 LM, as flags.
TOY_PROFILE_ARGS = [
    "--model.random_init=true",
    '--model.vision_arch={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, '
    '"num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}',
    '--model.lm_arch={"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, '
    '"num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 128}',
    "--model.image_size=32",
    "--model.grid=null",
]


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory) -> Path:
    """The micro world's shards, built as every shard is: by the Data-Juicer recipe."""
    shard_dir = tmp_path_factory.mktemp("world")
    run_data_stage(load_recipe(SYNTHETIC_RECIPE, ["--shard_size=64"]), shard_dir, MICRO_WORLD, seed=0)
    return shard_dir


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("base")
    pretrain_vision(MICRO_BASE, MICRO_WORLD, 0, base / "vision")
    pretrain_lm(MICRO_BASE, MICRO_WORLD, 0, base / "lm")
    return base / "vision", base / "lm"


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> Path:
    """A finished micro curriculum (with an evaluation every 2 steps), shared by export, eval and report tests."""
    from stages.run import main

    run_dir = tmp_path_factory.mktemp("micro_run") / "run"
    assert main(["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS, "--eval.every_n_steps=2", "--eval.vqa=true"]) == 0
    return run_dir
