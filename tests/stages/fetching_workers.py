"""Run by a test as a script: an op that needs a missing package, run in two fresh (forkserver) workers.

Prints the error the data stage ends with, as JSON. The op is registered here, so the workers import this file
to unpickle it (the repository is on PYTHONPATH).
"""

from __future__ import annotations

import json
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


if __name__ == "__main__":
    from stages.data import RecipeConfig, run_data_stage
    from tests.conftest import MICRO_WORLD

    recipe = RecipeConfig(process=[{"needs_a_package_mapper": {"num_proc": 2}}])
    try:
        run_data_stage(recipe, Path(sys.argv[1]), MICRO_WORLD, seed=0)
        print(json.dumps(None))
    except Exception as error:  # what a user would see
        print(json.dumps(f"{type(error).__name__}: {error}"))
