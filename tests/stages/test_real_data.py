"""Real data: a curriculum on shards built from LLaVA JSON, with and without object annotations.

Real shards carry no synthetic ground truth: evaluation scores them with the text metrics and, where
the records name the classes in their images, CHAIR and recall by a synonym table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from stages.data import InputSpec, RecipeConfig, run_data_stage
from stages.export import evaluate_model
from stages.run import main
from tests.conftest import MICRO_ARGS

COLOURS = {"red": (220, 40, 40), "blue": (40, 40, 220), "green": (40, 180, 40)}
SHAPES = ("circle", "square", "triangle")


def _llava_shards(tmp_path: Path, name: str, annotated: bool) -> Path:
    """48 LLaVA records of plain coloured images, captioned in the tiny LM's words; `annotated`: each
    names its shape class in "objects"."""
    records = []
    for i in range(48):
        colour, shape = list(COLOURS)[i % 3], SHAPES[i // 3 % 3]
        image = tmp_path / "images" / f"{i}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 48), COLOURS[colour]).save(image)
        turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": f"a {colour} {shape}"}]
        records.append({"id": f"r{i}", "image": f"images/{i}.png", "conversations": turns})
        if annotated:
            records[-1]["objects"] = [shape]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(records))
    recipe = RecipeConfig(
        input=InputSpec(format="llava", path=str(path)),
        process=[{"words_num_filter": {"min_num": 1, "max_num": 60}}],
        val_share=0.2,
        test_share=0.2,
    )
    out = tmp_path / name
    run_data_stage(recipe, out)
    return out


def test_malformed_object_annotations_are_skipped_and_counted(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (48, 48)).save(image)
    turns = [{"from": "gpt", "value": "a red circle on the left"}]
    records = [
        {"id": "good", "image": "a.png", "conversations": turns, "objects": ["circle"]},
        {"id": "bad", "image": "a.png", "conversations": turns, "objects": "circle"},
    ]
    (tmp_path / "in.json").write_text(json.dumps(records))
    recipe = RecipeConfig(input=InputSpec(format="llava", path=str(tmp_path / "in.json")), max_skip_share=0.5)
    report = run_data_stage(recipe, tmp_path / "out")
    assert report["input_skips"]["counts"] == {"bad_objects": 1}
    assert report["input_skips"]["first_keys"] == {"bad_objects": ["bad"]}


@pytest.mark.slow
def test_curriculum_on_llava_shards_evaluates_and_reports(tmp_path, micro_base):
    plain = _llava_shards(tmp_path, "plain", annotated=False)
    run_dir = tmp_path / "run"
    args = ["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS, f"--data.shard_dir={plain}"]
    assert main([*args, f"--model.vision_path={micro_base[0]}", f"--model.lm_path={micro_base[1]}"]) == 0

    metrics = json.loads((run_dir / "sft_long" / "metrics.json").read_text())
    assert "bleu4" in metrics and "cider_d" in metrics and metrics["images"] > 0
    assert "chair_i" not in metrics and "pope_random_f1" not in metrics, "no annotations: no object metrics"
    assert all(set(bucket) == {"mean_words", "images"} for bucket in metrics["by_length"].values())
    assert "| sft_long |" in (run_dir / "report.md").read_text()

    # The same images with their classes annotated: eval scores CHAIR by the synonym table.
    annotated = _llava_shards(tmp_path, "annotated", annotated=True)
    table = tmp_path / "synonyms.json"
    table.write_text(json.dumps({"circle": ["ring"], "square": ["box"], "triangle": []}))
    result = evaluate_model(run_dir / "sft_long", annotated, limit=8, max_new_tokens=6, synonyms=table)
    assert {"chair_i", "chair_s", "recall"} <= set(result["metrics"])
    assert main(["eval", f"--model={run_dir / 'sft_long'}", f"--data={annotated}", "--synonyms=nowhere.json"]) == 2
