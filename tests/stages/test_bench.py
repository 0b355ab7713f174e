"""The BLIP-2 captioning benchmark runs both ops end to end and accounts for its time (no timing asserted)."""

from __future__ import annotations

import json

from stages.run import main


def test_blip2_bench_runs_both_ops_and_splits_the_time(tmp_path, capsys):
    argv = ["bench", "blip2", "--shape=tiny", "--images=8", "--stock_images=4", "--batch_size=4", "--max_new_tokens=6"]
    assert main([*argv, f"--root={tmp_path}"]) == 0
    assert "images/s" in capsys.readouterr().out
    result = json.loads((tmp_path / "blip2_bench.json").read_text())
    ours, stock = result["runs"]["blip2_caption_mapper"], result["runs"]["image_captioning_mapper"]
    assert (ours["images"], ours["kept"], stock["images"], stock["kept"]) == (8, 8, 4, 4)
    assert set(ours["op_phases_s"]) == {"load_model", "read_images", "preprocess", "generate", "decode"}
    assert ours["op_s"] <= ours["wall_s"] and result["speedup"] > 0
    shard = json.loads((tmp_path / "out-blip2_caption_mapper" / "report.json").read_text())
    assert all(len(e["captions"]["short"].split()) >= 1 for e in shard["examples"])
