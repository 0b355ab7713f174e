"""Run by tests as a script: ops run in two fresh (forkserver) workers.

`fetching_workers.py OUT`: an op that needs a missing package; prints the error the data stage ends with, as JSON.
`fetching_workers.py OUT two_builds`: two builds in this process, each with an op whose workers note where
Data-Juicer would write the images they make (DJ_PRODUCED_DATA_DIR); prints what each build's workers saw and the
variable afterwards. The ops are registered here, so the workers import this file to unpickle them (the
repository is on PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from data_juicer.ops.base_op import OPERATORS, UNFORKABLE, Mapper
from data_juicer.utils.lazy_loader import LazyLoader


@UNFORKABLE.register_module("needs_a_package_mapper")
@OPERATORS.register_module("needs_a_package_mapper")
class NeedsAPackageMapper(Mapper):
    def process_single(self, sample: dict) -> dict:
        LazyLoader("vlm_curriculum_no_such_package").anything  # noqa: B018  (the first use imports it)
        return sample


@UNFORKABLE.register_module("produced_dir_probe_mapper")
@OPERATORS.register_module("produced_dir_probe_mapper")
class ProducedDirProbeMapper(Mapper):
    def __init__(self, probe_dir: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.probe_dir = probe_dir

    def process_single(self, sample: dict) -> dict:
        (Path(self.probe_dir) / f"{os.getpid()}.txt").write_text(os.environ.get("DJ_PRODUCED_DATA_DIR", "unset"))
        return sample


def two_builds(out: Path) -> None:
    from stages.data import RecipeConfig, run_data_stage
    from tests.conftest import MICRO_WORLD

    seen = {}
    for name in ("first", "second"):
        probes = out / f"probes-{name}"
        probes.mkdir()
        op = {"produced_dir_probe_mapper": {"probe_dir": str(probes), "num_proc": 2}}
        run_data_stage(RecipeConfig(process=[op]), out / name, MICRO_WORLD, seed=0)
        seen[name] = sorted(path.read_text() for path in probes.iterdir())
    print(json.dumps({**seen, "env_after": os.environ.get("DJ_PRODUCED_DATA_DIR", "unset")}))


if __name__ == "__main__":
    from stages.data import RecipeConfig, run_data_stage
    from tests.conftest import MICRO_WORLD

    if sys.argv[2:] == ["two_builds"]:
        two_builds(Path(sys.argv[1]))
        sys.exit(0)
    recipe = RecipeConfig(process=[{"needs_a_package_mapper": {"num_proc": 2}}])
    try:
        run_data_stage(recipe, Path(sys.argv[1]), MICRO_WORLD, seed=0)
        print(json.dumps(None))
    except Exception as error:  # what a user would see
        print(json.dumps(f"{type(error).__name__}: {error}"))
