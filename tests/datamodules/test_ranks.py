"""Two real ranks read the shards: split by node, the same number of batches each, every epoch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from datamodules.shards import read_index
from tests.conftest import run_fresh

pytestmark = pytest.mark.slow


def test_two_ranks_get_equal_batch_counts_from_different_shards(micro_world, micro_base, tmp_path):
    # 3 shards of 64 over 2 ranks: one rank holds twice the samples of the other; with_epoch evens the batches.
    assert len(read_index(micro_world)["splits"]["train"]) == 3
    script = Path(__file__).with_name("ddp_keys.py")
    done = run_fresh([sys.executable, str(script), str(micro_world), *map(str, micro_base), str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    per_epoch = 192 // (8 * 2)  # kept training images // (batch x ranks)
    for seen in ranks:
        assert [sum(epoch == e for epoch, _ in seen) for e in (0, 1)] == [per_epoch, per_epoch]
    # Within the first 8 batches (one shard's worth) the ranks read different shards: no key in common.
    first = [{k for _, keys in seen[:8] for k in keys} for seen in ranks]
    assert len(first[0]) == len(first[1]) == 64 and not first[0] & first[1]
    # Validation too: every rank the same number of batches (under ZeRO-3 each forward pass needs every rank).
    validated = [json.loads((tmp_path / f"val{r}.json").read_text()) for r in (0, 1)]
    assert [len(v) for v in validated] == [2 * per_epoch, 2 * per_epoch]
    for epoch in (0, 1):  # and every validated sample once (padding rows have no key)
        keys = [k for v in validated for e, batch in v if e == epoch for k in batch if k]
        assert len(keys) == len(set(keys)) == 192
