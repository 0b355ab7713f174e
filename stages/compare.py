"""`stages.run compare`: the curriculum against a one-SFT-stage baseline, over several seeds.

For each seed the curriculum runs as configured; the baseline then runs on the same shards and the
same base models with the same total optimizer steps: the curriculum's first (align) stage as it
is, then one LoRA SFT stage on the longest captions (the largest `max_words` of the curriculum, the
last stage's learning rates) for the sum of the curriculum's SFT steps. Writes, under `root`:

    compare.json   every metric per arm, stage and seed, and their mean and spread
    compare.md     the table (mean +- standard deviation over seeds), also per caption-length bucket
                   (there the seeds pooled: a bucket holds 2 images in one seed and 200 in another)
    compare.png    CHAIR-i and recall against mean caption length, per arm and stage
"""

from __future__ import annotations

import json
import logging
import statistics
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import yaml
from lightning.pytorch.utilities import rank_zero_only

from stages.config import CurriculumConfig, upstream_stage
from stages.metrics import DENOMINATORS
from stages.paths import folder_lock, input_path
from stages.report import pyplot, save_figure

log = logging.getLogger(__name__)

METRICS = [
    "chair_i",
    "chair_s",
    "attr_halluc",
    "recall",
    "pope_random_f1",
    "pope_popular_f1",
    "pope_adversarial_f1",
    "mean_words",
    "bleu4",
    "cider_d",
]


def _final_chain(cfg: CurriculumConfig) -> list[str]:
    """The stages the curriculum's final model was trained through, first to last (`init_from` followed back
    from the last stage): a stage off that chain trains nothing the final model holds."""
    names = list(cfg.stages)
    chain = [names[-1]]
    while (source := upstream_stage(names, names.index(chain[0]), cfg.stages[chain[0]].init_from)) != "base":
        chain.insert(0, source)
    return chain


def baseline_stages(cfg: CurriculumConfig) -> dict:
    """The baseline's stages for a curriculum: its first stage, then one SFT stage with the steps the curriculum's
    final model had after the first stage."""
    names = list(cfg.stages)
    if len(names) < 2:
        raise ValueError("compare: the curriculum needs an align stage and at least one SFT stage")
    sft_groups = sorted({"lora", "lm"} & set(cfg.stages[names[0]].trainable))
    if sft_groups:  # kept as it is in the baseline, it would make the baseline a curriculum too
        raise ValueError(
            f"compare: the first stage, {names[0]}, trains {sft_groups}: the baseline keeps it as it is, before its "
            "one SFT stage; make the first stage an align stage (trainable [projector])"
        )
    chain = _final_chain(cfg)
    if chain[0] != names[0]:  # the baseline's SFT stage starts from the first stage
        raise ValueError(
            f"compare: the last stage, {names[-1]}, does not start from the first, {names[0]}, through init_from "
            f"(it is trained through {' -> '.join(chain)} from base); the baseline's SFT stage starts from the first"
        )
    steps = {}
    for name in names:
        max_steps, max_epochs = cfg.trainer_of(name).max_steps, cfg.trainer_of(name).max_epochs
        if max_steps is None or max_steps < 1:
            raise ValueError(f"compare: stages.{name}.trainer.max_steps must be set to match the optimizer steps")
        if max_epochs not in (None, -1):  # an epoch ended the curriculum's stages early, not the baseline's one
            raise ValueError(
                f"compare: {cfg.trainer_flag(name, 'max_epochs')} {max_epochs}: the arms are matched by optimizer "
                "steps, which max_epochs would cut short in one arm and not the other; leave it unset"
            )
        steps[name] = max_steps
    first, last, sft_stages = cfg.stages[names[0]], cfg.stages[names[-1]], chain[1:]

    def plain(spec) -> dict:
        return {k: v for k, v in asdict(spec).items() if v is not None}

    sft = plain(last)
    sft.update(
        max_words=max(cfg.stages[n].max_words for n in sft_stages),
        init_from="previous",
        trainer={**sft.get("trainer", {}), "max_steps": sum(steps[n] for n in sft_stages)},
    )
    align = plain(first)
    align["trainer"] = {**align.get("trainer", {}), "max_steps": steps[names[0]]}
    # A name of its own: a first stage named "sft" took the baseline's key, and the baseline lost its align stage.
    return {names[0]: align, "sft" if names[0] != "sft" else "sft_baseline": sft}


def _sample_std(values: list[float]) -> float | None:
    """The sample standard deviation (n - 1); None, undefined, for fewer than 2 values (it read +- 0.000)."""
    return statistics.stdev(values) if len(values) > 1 else None


def _mean_spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": _sample_std(values), "values": values}


def _pooled(records: list[dict], metric: str) -> dict:
    """A bucket's rate over seeds as one sample: the seeds' rates weighted by their denominators (summed
    numerators over summed denominators), with the spread of the per-seed rates of the seeds that have any (a
    seed with no mention in the bucket reads CHAIR 0.0, which is no rate: it widened the spread)."""
    values = [r[metric] for r in records]
    key = DENOMINATORS[metric]
    weights = [r.get(key) for r in records]
    if None in weights:  # metrics.json written before the denominators were recorded
        log.warning("compare: a run's metrics.json lacks %s, %s's denominator: averaged unweighted", key, metric)
        weights = [1.0] * len(values)
    total = sum(weights)
    return {
        "pooled": sum(v * w for v, w in zip(values, weights, strict=True)) / total if total else 0.0,
        "std": _sample_std([v for v, w in zip(values, weights, strict=True) if w > 0]),
        "values": values,
    }


def collect(runs: dict[str, list[Path]]) -> dict:
    """{arm: {stage: {metric: {mean, std, values}}, by_length of the last stage}} from the runs' files."""
    result: dict = {}
    for arm, run_dirs in runs.items():
        stages = list(json.loads((run_dirs[0] / "summary.json").read_text()))
        per_stage = {}
        for stage in stages:  # the metrics the data allows: real data without object classes has no CHAIR
            records = [json.loads((run / stage / "metrics.json").read_text()) for run in run_dirs]
            per_stage[stage] = {m: _mean_spread([r[m] for r in records]) for m in METRICS if _in_all(records, m)}
        last = [json.loads((run / stages[-1] / "metrics.json").read_text())["by_length"] for run in run_dirs]
        buckets = sorted({b for record in last for b in record}, key=lambda b: int(b.split("-")[0].rstrip("+")))
        by_length = {}
        for bucket in buckets:
            records = [r[bucket] for r in last if bucket in r]
            by_length[bucket] = {
                "images": sum(int(r["images"]) for r in records),
                **{m: _pooled(records, m) for m in DENOMINATORS if _in_all(records, m)},
            }
        result[arm] = {"stages": per_stage, "last_stage_by_length": by_length}
    return result


def _in_all(records: list[dict], metric: str) -> bool:
    return all(metric in record for record in records)


def _cell(values: dict, key: str, centre: str) -> str:
    if key not in values:
        return "-"
    std = values[key]["std"]
    return f"{values[key][centre]:.3f}" + ("" if std is None else f" +- {std:.3f}")


def markdown(result: dict, seeds: list[int]) -> str:
    lines = [f"# Curriculum vs one-SFT-stage baseline ({len(seeds)} seed{'s' * (len(seeds) > 1)}: {seeds})", ""]
    lines += ["Mean +- sample standard deviation over seeds (none with 1 seed), on the held-out split after each "]
    lines += ["stage.", ""]
    scored = [m for m in METRICS if any(m in s for data in result.values() for s in data["stages"].values())]
    lines += ["| arm | stage | " + " | ".join(scored) + " |", "|---" * (len(scored) + 2) + "|"]
    for arm, data in result.items():
        for stage, metrics in data["stages"].items():
            lines.append(f"| {arm} | {stage} | " + " | ".join(_cell(metrics, m, "mean") for m in scored) + " |")
    lines += ["", "Final stage, by generated caption length (matched lengths), the seeds pooled: each rate over all"]
    lines += ["seeds' images in the bucket, +- the sample standard deviation of the per-seed rates (of the seeds"]
    lines += ["with a denominator in the bucket: mentions for CHAIR-i and attr, images for CHAIR-s, objects for"]
    lines += ["recall).", ""]
    lines += ["| arm | bucket | images | chair_i | chair_s | recall | attr_halluc |", "|---" * 7 + "|"]
    for arm, data in result.items():
        for bucket, m in data["last_stage_by_length"].items():
            cells = [_cell(m, k, "pooled") for k in ("chair_i", "chair_s", "recall", "attr_halluc")]
            lines.append(f"| {arm} | {bucket} | {m['images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.5))
    for arm, marker in zip(result, ("o", "s"), strict=False):
        stages = result[arm]["stages"]
        words = [s["mean_words"]["mean"] for s in stages.values()]
        for ax, key in zip(axes, ("chair_i", "recall"), strict=True):
            if not all(key in s for s in stages.values()):  # data without object classes
                continue
            ax.errorbar(
                words,
                [s[key]["mean"] for s in stages.values()],
                xerr=[s["mean_words"]["std"] or 0.0 for s in stages.values()],  # none with 1 seed
                yerr=[s[key]["std"] or 0.0 for s in stages.values()],
                marker=marker,
                capsize=3,
                label=arm,
            )
            for name, x, y in zip(stages, words, [s[key]["mean"] for s in stages.values()], strict=True):
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax, label in zip(axes, ("CHAIR-i", "recall"), strict=True):
        ax.set_xlabel("mean generated caption length (words)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    save_figure(fig, out)


def curriculum_argv(profile: Path, run_dir: Path, seed: int, overrides: list[str]) -> list[str]:
    """The curriculum arm's command line: run folder and seed after the overrides, whose --config files may set a
    seed (every copy of tiny.yaml does): every "seed" of a compare was the same run."""
    return ["curriculum", "--config", str(profile), *overrides, f"--run_dir={run_dir}", f"--seed={seed}"]


def baseline_argv(
    profile: Path, baseline_config: Path, run_dir: Path, seed: int, overrides: list[str], folders: dict[str, Path]
) -> list[str]:
    """The baseline arm's command line: the profile and the overrides, then its stages, on the curriculum's
    shards and base models (`folders`)."""
    # --stages.* overrides are already folded into baseline_stages.yaml, which comes after the other overrides:
    # a --config among them that sets stages would otherwise turn the baseline into the curriculum.
    rest, dropping = [], False
    for token in overrides:
        if dropping:  # the value of a space-separated `--stages.x.y value`
            dropping = False
        elif token.startswith("--stages."):
            dropping = "=" not in token
        else:
            rest.append(token)
    # The same order as the curriculum arm's (profile, overrides, run folder, seed), then the baseline's stages.
    return [
        "curriculum", "--config", str(profile), *rest, f"--run_dir={run_dir}", f"--seed={seed}",
        "--config", str(baseline_config), f"--data.shard_dir={folders['shard_dir']}",
        f"--model.vision_path={folders['vision_path']}", f"--model.lm_path={folders['lm_path']}",
    ]  # fmt: skip


class CompareFailed(RuntimeError):
    """One of the compared runs failed (its own error is printed above)."""


def run_compare(profile: Path, seeds: list[int], root: Path, overrides: list[str]) -> dict:
    """Runs both arms for every seed (finished stages are skipped on a rerun) and writes the comparison."""
    from stages.config_checks import mapping_error, not_a_mapping
    from stages.run import curriculum_config, curriculum_parser, with_project_configs

    overrides = list(with_project_configs(tuple(overrides)))  # configs/... from any folder, as on the command line
    for token in overrides:
        if token.split("=", 1)[0] in ("--seed", "--run_dir"):  # every "seed" was the same run, or trained elsewhere
            raise ValueError(f"--override: {token.split('=', 1)[0]} is compare's own (--seeds, --root)")
    parser = curriculum_parser()
    parser.argv = ("--config", str(profile), *overrides)  # what it parses, for its messages
    namespace = parser.parse_args(["--config", str(profile), *overrides])
    misplaced = not_a_mapping(CurriculumConfig, namespace)
    if misplaced:
        raise ValueError(f"--override: {mapping_error(misplaced)}")  # the profile's own are checked before
    try:
        cfg = curriculum_config(parser.instantiate(namespace))
    except TypeError as error:
        raise ValueError(f"--override: {error}") from error
    root.mkdir(parents=True, exist_ok=True)
    # One compare at a time in a root: a second one rewrote the baseline's stages under the first one's runs.
    # Rank 0's: the other ranks of a multi-device run re-run this command and belong to it.
    with folder_lock(root, "--root", purpose="a compare") if rank_zero_only.rank == 0 else nullcontext():
        return _compare(cfg, profile, seeds, root, overrides)


def _compare(cfg: CurriculumConfig, profile: Path, seeds: list[int], root: Path, overrides: list[str]) -> dict:
    from stages.run import run_command

    baseline_config = root / "baseline_stages.yaml"
    baseline_config.write_text(yaml.safe_dump({"stages": baseline_stages(cfg)}, sort_keys=False))
    runs: dict[str, list[Path]] = {"curriculum": [], "baseline": []}
    for seed in seeds:
        curriculum = root / f"curriculum-{seed}"
        if run_command(curriculum_argv(profile, curriculum, seed, overrides)):
            raise CompareFailed(f"compare: the curriculum run {curriculum} failed")
        # The baseline reads the very shards and base models the curriculum trained from.
        inputs = yaml.safe_load((curriculum / next(iter(cfg.stages)) / "config.yaml").read_text())["inputs"]
        folders = {key: input_path(inputs[key], curriculum) for key in ("shard_dir", "vision_path", "lm_path")}
        baseline = root / f"baseline-{seed}"
        if run_command(baseline_argv(profile, baseline_config, baseline, seed, overrides, folders)):
            raise CompareFailed(f"compare: the baseline run {baseline} failed")
        runs["curriculum"].append(curriculum)
        runs["baseline"].append(baseline)
    result = collect(runs)
    (root / "compare.json").write_text(json.dumps({"seeds": seeds, "profile": str(profile), **result}, indent=2))
    (root / "compare.md").write_text(markdown(result, seeds), encoding="utf-8")
    plot(result, root / "compare.png")
    return result
