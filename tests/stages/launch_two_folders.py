"""Run by test_launch.py under torchrun: each rank names a run folder of its own, as ranks on nodes whose run
folders are on their own disks would see theirs. `launch_two_folders.py BASE [ARGS...]`"""

from __future__ import annotations

import os
import sys

import stages.launch
from stages.run import main

if __name__ == "__main__":
    stages.launch.SHARED_FOLDER_PATIENCE = 1.0  # rank 1 never sees rank 0's file: no need to wait 10 s for it
    base, *args = sys.argv[1:]
    sys.exit(main(["curriculum", f"--run_dir={base}/rank{os.environ['RANK']}", *args]))
