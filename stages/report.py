"""`<run_dir>/report.md` and its PNG plots, written at the end of every curriculum run.

Every number comes from the run's own files: data/report.json, each stage's config.yaml,
losses.json, alerts.jsonl, metrics.json (with its evaluation history), done.json (wall time,
tokens/s, peak memory) and checkpoints/. `python -m stages.run report --run_dir DIR` rewrites it.
"""

from __future__ import annotations

import json
from math import nan
from pathlib import Path

import yaml

from stages.config import upstream_stage
from stages.data import report_markdown
from stages.metrics import COUNTS
from stages.paths import input_path, write_text_atomic

TABLE = [
    ("chair_i", "CHAIR-i"),
    ("chair_s", "CHAIR-s"),
    ("attr_halluc", "attr"),
    ("recall", "recall"),
    ("pope_adversarial_f1", "POPE adv F1"),
    ("pope_random_yes_ratio", "POPE yes"),
    ("mean_words", "words"),
    ("bleu4", "BLEU-4"),
    ("rouge_l", "ROUGE-L"),
    ("cider_d", "CIDEr-D"),
]


# The curriculum's stage order, written when a run starts: a stopped or interrupted run has a report too.
STAGES_FILE = "stages.json"
LOSS_PLOT, EVAL_PLOT = "loss_curves.png", "eval_history.png"
REPORT_PLOTS = (LOSS_PLOT, EVAL_PLOT)


def listed_stages(run_dir: Path) -> list[str]:
    """The curriculum's stages, in order (stages.json); a run finished before it was written lists them in
    summary.json. None listed: []."""
    return read_json(run_dir / STAGES_FILE, {}).get("stages") or list(read_json(run_dir / "summary.json", {}))


def _stages(run_dir: Path) -> list[str]:
    """The run's stages that have started (have a config.yaml), in curriculum order."""
    listed = listed_stages(run_dir)
    if not listed:
        raise FileNotFoundError(f"--run_dir: {run_dir} has no {STAGES_FILE}; is it a curriculum run folder?")
    started = [name for name in listed if (run_dir / name / "config.yaml").is_file()]
    if not started:
        raise FileNotFoundError(f"--run_dir: no stage of {run_dir} has started yet (no <stage>/config.yaml)")
    return started


def stage_problems(run_dir: Path, configs: dict[str, dict]) -> dict[str, str]:
    """Stages whose files do not describe a finished run of their current config: unfinished (no done.json),
    changed since they finished, or trained from an upstream stage that has been rerun since."""
    problems = {}
    names = list(configs)
    for index, (name, config) in enumerate(configs.items()):
        done = read_json(run_dir / name / "done.json")
        upstream = upstream_stage(names, index, config["spec"]["init_from"])
        if done is None and (run_dir / name / "checkpoints" / "stopped.ckpt").exists():
            problems[name] = "stopped by a stability alert (see Alerts); its checkpoints/stopped.ckpt is kept"
        elif done is None:
            problems[name] = "unfinished (no done.json): its metrics and checkpoints may be missing or partial"
        elif done.get("non_finite_weights"):
            count = done["non_finite_weights"]
            problems[name] = f"{count} of its trained tensors hold NaN or inf: its scores mean nothing"
        elif done["fingerprint"] != config["fingerprint"]:
            problems[name] = "its config changed after it finished; the results shown are of the older config"
        elif upstream in configs and configs[upstream]["fingerprint"] != config["inputs"]["init_from"]:
            problems[name] = f"trained from an earlier {upstream}, which has been rerun since"
        elif upstream in problems:  # the last stage of a rerun killed two stages before it looked current
            problems[name] = f"trained from {upstream}, which is out of date itself"
    return problems


def report_problems(run_dir: Path, configs: dict[str, dict], problems: dict[str, str]) -> dict[str, str]:
    """`problems` and what else makes a stage's results not the run's current ones, which the report says and
    export and eval leave alone (the trained model is the same): inputs rebuilt or gone since it trained (a
    rerun stopped before it would train it again), and scores of other evaluation settings than the first
    stage's (a rescoring goes stage by stage: one stopped part way left scores that do not compare)."""
    problems, digests = dict(problems), {}
    for name, config in configs.items():
        if name not in problems and (changed := changed_inputs(run_dir, config["inputs"], digests)):
            problems[name] = f"its {'; its '.join(changed)}: the results shown are of the inputs it trained on"
    scored = {name: read_json(run_dir / name / "done.json", {}).get("eval_fingerprint") for name in configs}
    first = next((name for name in configs if scored[name]), None)
    for name in configs:
        if name not in problems and scored[name] and scored[name] != scored[first]:
            problems[name] = (
                f"scored with other evaluation settings than {first} (a rescoring stopped part way?): its scores do "
                "not compare with theirs"
            )
    return problems


def changed_inputs(run_dir: Path, inputs: dict, cache: dict) -> list[str]:
    """What became of the inputs (shards, vision, lm) a stage's config.yaml records whose folder's digest is not
    the one it trained with: "shards changed since it trained ...", or "... are missing". `cache`: the digests
    of the folders already read."""
    from stages.curriculum import input_digests  # imports torch: only for a report

    folders = tuple(input_path(inputs[field], run_dir) for field in ("shard_dir", "vision_path", "lm_path"))
    if folders not in cache:
        cache[folders] = input_digests(*folders)
    labels = {"shards": "shards", "vision": "vision tower", "lm": "LM"}
    changed, missing = [], []
    for (key, now), folder in zip(cache[folders].items(), folders, strict=True):
        recorded = (inputs.get("digests") or {}).get(key)  # runs before digests were recorded: none
        if recorded is None or now == recorded:
            continue
        if now == "missing":
            missing.append(f"{labels[key]} ({folder})")
        else:
            changed.append(labels[key])
    said = [f"{' and '.join(changed)} changed since it trained (rebuilt, or copied without their file times)"]
    said = said if changed else []
    said += [f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"] if missing else []
    return said


def stage_configs(run_dir: Path) -> dict[str, dict]:
    """The config.yaml of each stage of the run that has started, in curriculum order."""
    configs = {}
    for name in _stages(run_dir):
        path = run_dir / name / "config.yaml"
        try:
            configs[name] = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"{path} cannot be read ({error}); rerun the curriculum to write it again") from error
    return configs


def read_json(path: Path, default=None):
    """The file's JSON, `default` if there is none; one that does not parse (a disk that filled up while it
    was written) fails naming itself."""
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} cannot be read ({error}); rerun the curriculum to write it again") from error


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    pyplot().close(fig)


def plotted(ax) -> dict[str, tuple[list, list]]:
    """{label: (x, y)} of the lines drawn on `ax`: what a figure shows, for tests and callers."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def plot_losses(run_dir: Path, stages: list[str], out: Path) -> dict[str, tuple[list, list]]:
    """Per-step training loss of every stage on one global step axis, stages in their own colours; returns
    the plotted {stage: (steps, losses)}."""
    fig, ax = pyplot().subplots(figsize=(8, 3.5))
    offset = 0
    for name in stages:
        losses = [nan if v is None else v for v in (read_json(run_dir / name / "losses.json") or {}).get("losses", [])]
        ax.plot(range(offset, offset + len(losses)), losses, label=name, linewidth=1)  # TensorBoard's steps
        offset += len(losses)
    ax.set_xlabel("optimizer step (whole curriculum)")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    lines = plotted(ax)
    save_figure(fig, out)
    return lines


def plot_eval_history(run_dir: Path, stages: list[str], out: Path) -> dict[str, dict[str, tuple[list, list]]]:
    """CHAIR-i and recall (BLEU-4 and CIDEr-D for data without object annotations) at every evaluation
    (periodic and end of stage), on the global step axis; returns the plotted {metric: {stage: (steps, values)}}."""
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.2))
    records = [read_json(run_dir / name / "metrics.json") or {} for name in stages]
    histories = [_history(record) for record in records]
    annotated = all("chair_i" in h for history in histories for h in history)
    keys = ("chair_i", "recall") if annotated else ("bleu4", "cider_d")
    offset = 0
    for name, metrics, history in zip(stages, records, histories, strict=True):
        steps = [offset + h["global_step"] - 1 for h in history]  # the step each evaluation follows
        for ax, key in zip(axes, keys, strict=True):
            ax.plot(steps, [h[key] for h in history], marker="o", markersize=3, label=name)
        offset += metrics.get("global_step", 0)
    for ax, key in zip(axes, keys, strict=True):
        ax.set_xlabel("optimizer step (whole curriculum)")
        ax.set_ylabel(key)
    axes[1].legend(fontsize=8)
    lines = {key: plotted(ax) for ax, key in zip(axes, keys, strict=True)}
    save_figure(fig, out)
    return lines


def _history(record: dict) -> list[dict]:
    """A stage's evaluations by step, its final scores included: a stage scored again has an empty history (its
    evaluations during training are not redone), and the plot showed no point at all."""
    history = list(record.get("history", []))
    step = record.get("global_step")
    if step is not None and (not history or history[-1]["global_step"] != step):
        history.append({key: value for key, value in record.items() if key != "history"})
    return history


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_report(run_dir: Path) -> Path:
    """Writes report.md, loss_curves.png and eval_history.png into `run_dir`; returns the report's path."""
    stages = _stages(run_dir)
    configs = stage_configs(run_dir)
    lines = [f"# Training report: {run_dir.name}", ""]
    lines += _data_section(run_dir, configs[stages[0]])
    lines += _stages_section(run_dir, configs)
    plot_losses(run_dir, stages, run_dir / LOSS_PLOT)
    lines += _loss_section(run_dir, stages)
    lines += _alerts_section(run_dir, stages)
    plot_eval_history(run_dir, stages, run_dir / EVAL_PLOT)
    lines += _evaluation_section(run_dir, stages)
    lines += _checkpoints_section(run_dir, stages)
    lines += _resources_section(run_dir, stages)
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def _data_section(run_dir: Path, first: dict) -> list[str]:
    """The shards the run trained on, and their data report where `stages.run data` wrote one."""
    shard_dir = input_path(first["inputs"]["shard_dir"], run_dir)
    lines = ["## Data", "", f"Shards: `{shard_dir}`."]
    data = read_json(shard_dir / "report.json")
    if data is None:
        return [*lines, "No data report beside the shards (they were not built by `stages.run data`).", ""]
    lines += [line.replace("# Data report", "").strip("\n") for line in report_markdown(data).splitlines()[1:]]
    return [*lines, ""]


def _stages_section(run_dir: Path, configs: dict[str, dict]) -> list[str]:
    """Each stage's spec, the stages whose results are out of date, the export, and the settings they share."""
    lines = ["## Stages", "", "| stage | trainable | max words | steps | lr | init from | fingerprint |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for name, config in configs.items():
        spec = config["spec"]
        steps = read_json(run_dir / name / "done.json", {}).get("global_steps")
        lines.append(
            f"| {name} | {', '.join(spec['trainable'])} | {spec['max_words']} | {_fmt(steps)} | "
            f"{json.dumps({g: spec['lr'][g] for g in spec['trainable']})} | {spec['init_from']} | "
            f"`{config['fingerprint']}` |"
        )
    problems = report_problems(run_dir, configs, stage_problems(run_dir, configs))
    if problems:
        lines += [
            "",
            "**Not every stage's results are current** (rerun the curriculum command to bring them up to date):",
        ]
        lines += [f"- {name}: {problem}" for name, problem in problems.items()]
    record = read_json(run_dir / "export_hf" / "vlm_export.json")
    if record is not None:
        from stages.export import stale_export  # imports transformers: only for a run with an export

        stale = stale_export(record)
        lines += ["", f"**`export_hf` is out of date**: {stale}." if stale else f"`export_hf` holds {record['stage']}."]
    first = next(iter(configs.values()))
    shared = {key: first[key] for key in ("seed", "model", "data", "eval", "stability")}
    if shared["stability"]["instability"] is None:  # the fingerprint's placeholder for the `warn` action
        shared["stability"] = {**shared["stability"], "instability": "action warn: alerts only, the weights unchanged"}
    lines += ["", "Resolved settings shared by the stages (each stage's full config is its config.yaml):", ""]
    return [*lines, "```yaml", yaml.safe_dump(shared, sort_keys=False).rstrip(), "```", ""]


def _loss_section(run_dir: Path, stages: list[str]) -> list[str]:
    lines = ["## Training loss", "", f"![loss curves]({LOSS_PLOT})", ""]
    lines += ["| stage | first loss | last loss | min |", "|---|---|---|---|"]
    for name in stages:
        losses = [v for v in (read_json(run_dir / name / "losses.json") or {}).get("losses", []) if v is not None]
        if losses:
            lines.append(f"| {name} | {losses[0]:.4f} | {losses[-1]:.4f} | {min(losses):.4f} |")
    return lines


def _alerts_section(run_dir: Path, stages: list[str]) -> list[str]:
    lines = ["", "## Alerts", ""]
    alerts = [
        json.loads(line)
        for name in stages
        if (run_dir / name / "alerts.jsonl").is_file()
        for line in (run_dir / name / "alerts.jsonl").read_text().splitlines()
    ]
    if not alerts:
        return [*lines, "None: no loss, gradient or boundary alert fired.", ""]
    lines += ["| stage | step | kind | value | threshold | action | causes |", "|---|---|---|---|---|---|---|"]
    lines += [
        f"| {a['stage']} | {a['step']} | {a['kind']} | {float(a['value']):.4g} | {float(a['threshold']):.4g} | "
        f"{a['action']} | {', '.join(a.get('causes', []))} |"
        for a in alerts
    ]
    return [*lines, ""]


def _evaluation_section(run_dir: Path, stages: list[str]) -> list[str]:
    """Every stage's scores, then its hallucination by generated caption length."""
    lines = ["## Evaluation", ""]
    metrics = {name: read_json(run_dir / name / "metrics.json", {}) for name in stages}
    evaluated = [metrics[name] for name in stages if metrics[name]] or [{}]  # a run stopped early: its last one
    images = int(evaluated[-1].get("images", 0))
    settings = {name: json.dumps(metrics[name].get("generation", {})) for name in stages if metrics[name]}
    if len(set(settings.values())) > 1:  # a rescoring with new settings stopped part way (see Stages)
        generation = "; ".join(f"{name} `{value}`" for name, value in settings.items())
    else:
        generation = f"`{json.dumps(evaluated[-1].get('generation', {}))}`"
    lines += [f"Held-out images: {images}; generation: {generation}.", ""]
    vqa = [("vqa_exact", "VQA"), ("vqa_accuracy", "VQA acc")]  # exact match; VQAv2's, for several human answers
    table = TABLE + [(key, label) for key, label in vqa if any(key in metrics[name] for name in stages)]
    # Captions cut at max_new_tokens, when an evaluation cut any: their lengths and scores are the limit's.
    table += [("cut_short", "cut short")] if any(metrics[name].get("cut_short") for name in stages) else []
    lines += ["| stage | " + " | ".join(label for _, label in table) + " |", "|---" * (len(table) + 1) + "|"]
    for name in stages:
        row = [metrics[name].get(key) for key, _ in table]
        row = [int(v) if key in COUNTS and v is not None else v for (key, _), v in zip(table, row, strict=True)]
        lines.append(f"| {name} | " + " | ".join(map(_fmt, row)) + " |")
    lines += ["", "Hallucination by generated caption length (compare stages within a row of equal length):", ""]
    lines += ["| stage | bucket | images | CHAIR-i | CHAIR-s | recall | words |", "|---" * 7 + "|"]
    for name in stages:
        for bucket, m in metrics[name].get("by_length", {}).items():
            scores = " | ".join(_fmt(m.get(key)) for key in ("chair_i", "chair_s", "recall", "mean_words"))
            lines.append(f"| {name} | {bucket} | {int(m['images'])} | {scores} |")
    return [*lines, "", f"![evaluation history]({EVAL_PLOT})", ""]


def _checkpoints_section(run_dir: Path, stages: list[str]) -> list[str]:
    lines = ["## Checkpoints", "", "| stage | file | MiB |", "|---|---|---|"]
    for name in stages:
        for path in sorted((run_dir / name / "checkpoints").glob("*.ckpt")):
            files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]  # DeepSpeed's: a folder
            lines.append(
                f"| {name} | {path.relative_to(run_dir)} | {sum(f.stat().st_size for f in files) / 2**20:.2f} |"
            )
        if (run_dir / name / "export").is_dir():
            lines.append(f"| {name} | {name}/export/ (projector + adapter for the next stage) | |")
    return lines


def _resources_section(run_dir: Path, stages: list[str]) -> list[str]:
    lines = ["", "## Resources", ""]
    header = "| stage | wall s | train s | tokens/s | samples/s | process peak RSS GiB | peak GPU GiB |"
    lines += [header, "|---" * 7 + "|"]
    resumed = {}
    for name in stages:
        done = read_json(run_dir / name / "done.json", {})
        r = done.get("resources", {})
        lines.append(
            f"| {name} | {_fmt(done.get('wall_s'))} | {_fmt(r.get('train_s'))} | {_fmt(r.get('tokens_per_s'))} | "
            f"{_fmt(r.get('samples_per_s'))} | {_fmt(r.get('peak_rss_gib'))} | {_fmt(r.get('peak_gpu_gib'))} |"
        )
        if r.get("resumed_at_step") is not None:
            resumed[name] = r["resumed_at_step"]
    if resumed:
        where = ", ".join(f"{name} at step {step}" for name, step in resumed.items())
        lines += ["", f"Resumed ({where}): wall time and peak memory since the resume; train s and rates of every "
                  "step kept."]  # fmt: skip
    return lines
