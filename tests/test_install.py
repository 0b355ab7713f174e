"""A non-editable install (a wheel) runs from any folder: configs/ travels in it, `--config configs/...` finds
the shipped profiles, and a `modules/` package or `callbacks.py` of the user's own project in the working
folder does not replace the project's packages (`python -m` puts the working folder first on sys.path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_runs_from_any_folder_with_its_own_configs(tmp_path):
    src = tmp_path / "src"
    for name in ("stages", "modules", "datamodules", "callbacks", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # The wheel's default config differs from the repository's: the printed config shows which one was read.
    tiny = src / "configs" / "curriculum" / "tiny.yaml"
    tiny.write_text(tiny.read_text().replace("seed: 0\n", "seed: 4242\n", 1))
    # setuptools' PEP 517 hook itself, as pip calls it (torch and tensorboard require setuptools).
    build = [sys.executable, "-c", "from setuptools import build_meta; build_meta.build_wheel('../dist')"]
    built = subprocess.run(build, cwd=src, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    shipped = {str(path.relative_to(ROOT)) for path in (ROOT / "configs").rglob("*") if path.is_file()}
    assert shipped and shipped <= names, shipped - names

    work = tmp_path / "work"
    (work / "modules").mkdir(parents=True)
    (work / "modules" / "__init__.py").write_text("")
    (work / "callbacks.py").write_text("raise SystemExit('the working folder callbacks.py was imported')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1"}

    def command(*args: str) -> subprocess.CompletedProcess:
        line = [sys.executable, "-m", "stages.run", *args, "--print_config"]
        return subprocess.run(line, cwd=work, env=env, capture_output=True, text=True)

    default = command("curriculum")
    assert default.returncode == 0, default.stderr[-3000:]
    assert "seed: 4242" in default.stdout
    # A shipped profile by its repository name; its DeepSpeed JSON and data recipe are read from the wheel too.
    profile = command("curriculum", "--config", "configs/curriculum/mgm_2b.yaml")
    assert profile.returncode == 0, profile.stderr[-3000:]
    assert "deepspeed_config: configs/deepspeed/zero2.json" in profile.stdout
