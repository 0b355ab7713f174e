"""Benchmarks that print figures. `python -m stages.run bench stability --seeds 20`:

- false alarms: the tiny curriculum, shortened, on `seeds` seeds with no fault: every alert is false;
- detection: per fault kind (callbacks/fault_injection.py), a single LoRA SFT stage on the same data
  and base models with the fault at step `fault_step`: detected if an alert of an expected kind
  fires within `max_latency` steps; latency in optimizer steps.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import yaml

from callbacks.fault_injection import FAULTS

CURRICULUM_STAGES = ("align", "sft_short", "sft_medium", "sft_long")
# A shorter tiny curriculum: fewer images and steps, same models and recipe.
SHORT_ARGS = ["--world.train_size=4000", "--base.vision_steps=150", "--base.lm_steps=150", "--eval.limit=32"]
SHORT_ARGS += ["--trainer.enable_progress_bar=false"]
SHORT_STAGE_ARGS = [f"--stages.{name}.trainer.max_steps=120" for name in CURRICULUM_STAGES]
EXPECTED = {
    "nan": {"non_finite"},
    "inf_grad": {"non_finite"},
    "spike": {"loss_spike"},
    "bad_batch": {"grad_spike", "loss_spike", "non_finite"},
}
ONE_STAGE = {"stages": {"sft": {"trainable": ["projector", "lora"], "max_words": 48, "init_from": "base"}}}


def _alerts(run_dir: Path) -> list[dict]:
    return [
        json.loads(line) for path in sorted(run_dir.glob("*/alerts.jsonl")) for line in path.read_text().splitlines()
    ]


def _curriculum(args: list[str], fault: bool = False) -> None:
    """Runs a curriculum; a fault run may end with exit 3, stopped by its alert (under `warn`, once a NaN or
    infinite update has left the weights non-finite)."""
    from stages.run import run_command

    if run_command(["curriculum", *args]) not in ((0, 3) if fault else (0,)):
        raise RuntimeError(f"benchmark run failed: {args}")


def bench_stability(root: Path, seeds: int, fault_seeds: int, fault_step: int = 70, max_latency: int = 3) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    clean = []
    for seed in range(seeds):
        run_dir = root / f"clean-{seed}"
        _curriculum([f"--run_dir={run_dir}", f"--seed={seed}", *SHORT_ARGS, *SHORT_STAGE_ARGS])
        steps = sum(json.loads((run_dir / s / "done.json").read_text())["global_steps"] for s in CURRICULUM_STAGES)
        clean.append({"seed": seed, "steps": steps, "alerts": [a["kind"] for a in _alerts(run_dir)]})
    one_stage = root / "one_stage.yaml"
    one_stage.write_text(yaml.safe_dump(ONE_STAGE))
    detection: dict[str, list[int | None]] = {kind: [] for kind in FAULTS}
    for seed in range(fault_seeds):
        base = root / f"clean-{seed}"
        for kind in FAULTS:
            run_dir = root / f"fault-{kind}-{seed}"
            _curriculum(
                [
                    "--config",
                    str(one_stage),
                    f"--run_dir={run_dir}",
                    f"--seed={seed}",
                    *SHORT_ARGS,
                    "--stages.sft.trainer.max_steps=90",
                    f"--data.shard_dir={base / 'data'}",
                    f"--model.vision_path={base / 'base' / 'vision'}",
                    f"--model.lm_path={base / 'base' / 'lm'}",
                    f"--stability.faults={{{fault_step}: {kind}}}",
                ],
                fault=True,
            )
            hits = [a["step"] - fault_step for a in _alerts(run_dir) if a["kind"] in EXPECTED[kind]]
            hits = [lag for lag in hits if 0 <= lag <= max_latency]
            detection[kind].append(min(hits) if hits else None)
    total_steps = sum(run["steps"] for run in clean)
    false_alarms = sum(len(run["alerts"]) for run in clean)
    report = {
        "clean_runs": seeds,
        "clean_runs_with_an_alert": sum(bool(run["alerts"]) for run in clean),
        "false_alarms_per_1000_steps": 1000 * false_alarms / max(1, total_steps),
        "false_alarm_kinds": sorted({k for run in clean for k in run["alerts"]}),
        "detection": {
            kind: {
                "detected": sum(lag is not None for lag in lags),
                "runs": len(lags),
                "median_latency_steps": statistics.median([lag for lag in lags if lag is not None])
                if any(lag is not None for lag in lags)
                else None,
            }
            for kind, lags in detection.items()
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    (root / "stability_bench.json").write_text(json.dumps(report, indent=2))
    return report


def print_report(report: dict) -> None:
    rate = report["false_alarms_per_1000_steps"]
    print(f"clean runs: {report['clean_runs']}, with any alert: {report['clean_runs_with_an_alert']}")
    print(f"false alarms per 1000 steps: {rate:.2f} (kinds: {report['false_alarm_kinds']})")
    for kind, row in report["detection"].items():
        latency = row["median_latency_steps"]
        print(f"fault {kind:>9}: detected {row['detected']}/{row['runs']}, median latency {latency} steps")
    print(f"wall time {report['wall_s']} s")


def _blip2_bench_inputs(root: Path, images: int, shape: str) -> tuple[Path, list[dict]]:
    """The random-weight BLIP-2 of `shape` (bf16 on CUDA, fp32 on CPU) and LLaVA-style records of `images`
    224-pixel renders of the synthetic world (BLIP-2's processor resizes anyway), made once under `root`."""
    import torch

    from datamodules.blip2_random import build_random_blip2
    from datamodules.world import WorldConfig, make_scene, render

    root.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    model_dir = root / f"blip2-{shape}"
    if not (model_dir / "config.json").is_file():
        dtype = torch.bfloat16 if cuda else torch.float32
        build_random_blip2(model_dir, shape, opt_image_token=True, device="cuda" if cuda else "cpu", dtype=dtype)
    image_dir, records = root / "images", []
    image_dir.mkdir(exist_ok=True)
    world = WorldConfig(image_size=224)
    for index in range(images):
        path = image_dir / f"{index:06d}.png"
        if not path.is_file():
            render(make_scene(world, 0, "bench", index), 224, 0, world).save(path)
        turns = [{"from": "human", "value": "<image>\ndescribe"}, {"from": "gpt", "value": "shapes"}]
        records.append({"id": f"img-{index:06d}", "image": f"images/{path.name}", "conversations": turns})
    return model_dir, records


def _run_figures(count: int, wall: float, half_wall: float | None, report: dict) -> dict:
    """One op's figures from its run on `count` images (`wall` seconds, the data stage's `report`) and on the
    first half of them (`half_wall`; None: a single image, no half run)."""
    op_report = report["ops"][0]
    figures = {
        "images": count,
        "wall_s": round(wall, 4),
        "images_per_s": round(count / wall, 2),
        "op_s": op_report["seconds"],
        "op_phases_s": op_report.get("phases"),
        "outside_op_s": round(wall - op_report["seconds"], 2),
        "kept": report["samples"]["kept"],
    }
    if half_wall is not None:
        # None: the run on all images was no slower than the half run, the timing noise larger
        marginal = (count - count // 2) / (wall - half_wall) if wall > half_wall else None
        figures["half_wall_s"] = round(half_wall, 4)
        figures["marginal_images_per_s"] = None if marginal is None else round(marginal, 2)
    load = (op_report.get("phases") or {}).get("load_model")
    if load is not None:  # a one-off per worker: at 512 images on a GPU it can outweigh the captioning
        figures["images_per_s_after_load"] = round(count / (wall - load), 2)
    return figures


def bench_blip2(
    root: Path, images: int, shape: str, batch_size: int, stock_images: int, max_new_tokens: int = 32
) -> dict:
    """Images/s of the project's `blip2_caption_mapper` and of Data-Juicer's stock `image_captioning_mapper`,
    each end to end through `run_data_stage` (read images, run the op, write shards), on one random-weight
    BLIP-2 of `shape` (bf16 on CUDA, fp32 on CPU), greedy with `max_new_tokens` for ours; the stock op
    runs as it ships (sampling, 128 new tokens, its own batch of 8).

    Each op also runs on the first half of its images: the difference of the two runs gives its marginal
    images/s, free of the costs every run pays once (model load, worker start), so that the speedup does
    not flatter ours, which amortises them over more images than the slow stock op can be given. Before
    both, an untimed run on a few images pays what only the first run of a process pays (CUDA kernels
    loaded and tuned, lazy imports), which would otherwise fall on the half run alone."""
    import torch

    from stages.data import InputSpec, RecipeConfig, run_data_stage

    model_dir, records = _blip2_bench_inputs(root, images, shape)
    cuda = torch.cuda.is_available()
    results = {"shape": shape, "device": torch.cuda.get_device_name() if cuda else "cpu", "runs": {}}
    ours = {
        "blip2_caption_mapper": {
            "model_path": str(model_dir),
            "prompts": {"short": ""},
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": max_new_tokens,  # random weights: every caption costs the full budget
            "num_beams": 1,
            "batch_size": batch_size,
        }
    }
    stock = {"image_captioning_mapper": {"hf_img2seq": str(model_dir), "keep_original_sample": False}}

    def timed_run(op: dict, count: int, out: Path) -> tuple[float, dict]:
        listing = root / f"{out.name}.json"
        listing.write_text(json.dumps(records[:count]))
        recipe = RecipeConfig(input=InputSpec(format="llava", path=str(listing)), process=[op], max_skip_share=1.0)
        started = time.perf_counter()
        report = run_data_stage(recipe, out, captionless_ok=True)
        return time.perf_counter() - started, report

    for name, op, count in (("blip2_caption_mapper", ours, images), ("image_captioning_mapper", stock, stock_images)):
        if count < 1:
            continue
        timed_run(op, min(count, 4), root / f"out-{name}-warmup")
        half_wall = timed_run(op, count // 2, root / f"out-{name}-half")[0] if count >= 2 else None
        wall, report = timed_run(op, count, root / f"out-{name}")
        results["runs"][name] = _run_figures(count, wall, half_wall, report)
        # Written after each op: what was measured survives a device time limit that kills the rest.
        (root / "blip2_bench.json").write_text(json.dumps(results, indent=2))
    runs = results["runs"]
    if len(runs) == 2:
        ours_run, stock_run = runs["blip2_caption_mapper"], runs["image_captioning_mapper"]
        results["speedup"] = round(ours_run["images_per_s"] / stock_run["images_per_s"], 2)
        if ours_run.get("marginal_images_per_s") and stock_run.get("marginal_images_per_s"):
            results["marginal_speedup"] = round(
                ours_run["marginal_images_per_s"] / stock_run["marginal_images_per_s"], 2
            )
    (root / "blip2_bench.json").write_text(json.dumps(results, indent=2))
    return results


def print_blip2_report(results: dict) -> None:
    print(f"BLIP-2 captioning, {results['shape']} shape, random weights, on {results['device']}")
    for name, run in results["runs"].items():
        print(
            f"{name:>24}: {run['images']} images in {run['wall_s']} s = {run['images_per_s']} images/s "
            f"(op {run['op_s']} s, data stage around it {run['outside_op_s']} s)"
        )
        if run.get("op_phases_s"):
            print(" " * 26 + "op phases: " + ", ".join(f"{k} {v} s" for k, v in run["op_phases_s"].items()))
        if "images_per_s_after_load" in run:
            print(" " * 26 + f"without the one-off model load: {run['images_per_s_after_load']} images/s")
        if "marginal_images_per_s" in run:
            half, marginal = run["images"] // 2, run["marginal_images_per_s"]
            marginal = "not measurable (no slower than the half run)" if marginal is None else f"{marginal} images/s"
            print(" " * 26 + f"marginal, from a run on {half} images: {marginal}")
    if "speedup" in results:
        print(f"blip2_caption_mapper / image_captioning_mapper: {results['speedup']}x images/s end to end")
    if "marginal_speedup" in results:
        print(f"blip2_caption_mapper / image_captioning_mapper: {results['marginal_speedup']}x marginal images/s")
