"""Running one stage of the curriculum: build its model and data, fit, evaluate, hand off.

A stage writes `<run_dir>/<stage>/`:
    config.yaml     the resolved configuration and inputs; the stage's fingerprint hashes it, less the paths as
                    given, the display-only keys and the evaluation settings (`stage_fingerprint`)
    checkpoints/    Lightning checkpoints (last.ckpt; stopped.ckpt when the instability callback stopped the
                    stage) of the trained parameters only
    export/         what the next stage starts from: projector.safetensors (+ adapter/), and the vision and lm
                    safetensors of parts trained in full, here or in an earlier stage
    metrics.json    the held-out evaluation
    losses.json     the loss of every optimizer step
    alerts.jsonl    stability alerts, one JSON object a line (absent when there were none)
    done.json       written last: the fingerprint, optimizer steps and wall time
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import shutil
import time
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.alerts import AlertSinks
from callbacks.epoch_boundary import BoundaryCheck
from callbacks.evaluation import CaptionEvaluation, class_table, load_synonyms, metrics_line, scores_of_record
from callbacks.fault_injection import FaultInjection
from callbacks.instability import InstabilityMonitor
from callbacks.preemption import StopOnSigterm
from callbacks.progress import stage_progress_bar
from callbacks.throughput import Throughput
from datamodules.caption_datamodule import CaptionDataModule
from modules.handoff import full_parts, load_handoff, save_handoff
from modules.loading import build_vlm, count_image_tokens
from modules.training_module import AlignModule, LoRASFTModule, VLMModule
from modules.vlm import VisionLanguageModel
from stages.config import CurriculumConfig, StageSpec, float32_masters
from stages.launch import launched_ranks
from stages.paths import follow_umask, stored_path, sync_tree, write_text_atomic
from stages.strategies import BesideCheckpointIO
from stages.tb_logger import CurriculumTensorBoardLogger, StageStart, StepLearningRateMonitor

log = logging.getLogger(__name__)


def fingerprint(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Recorded in a stage's config.yaml as given, but not part of its fingerprint: its `inputs` identify the folders
# these name (a normalised path and a digest), so the same folder spelled otherwise (relative or absolute, with
# a trailing slash) is the same input, and a recipe's effect is in the digest of the shards it built.
AS_GIVEN = (("data", "shard_dir"), ("data", "recipe"), ("model", "vision_path"), ("model", "lm_path"),
            ("spec", "trainer", "deepspeed_config"))  # its content is: `deepspeed_config_digest`  # fmt: skip
# Also left out: what only changes what is shown (TensorBoard's logging interval, the progress bar), never the
# weights or the metrics.json of a stage; changing them retrained every stage.
DISPLAY_ONLY = (("spec", "trainer", "enable_progress_bar"), ("spec", "trainer", "log_every_n_steps"))
# The evaluation settings decide a stage's scores, not its weights (checked: a micro curriculum's projectors and
# adapters are bitwise the same with an evaluation every step and with none), so they have a fingerprint of their
# own: a finished stage whose evaluation settings changed is scored again (`rescore_stage`), not trained again.
# Of them, these change only TensorBoard (tables, grids) or the evaluations during training, which are not redone.
EVAL_NOT_SCORED = ("table_rows", "grid_images", "every_n_steps")


# What only changes the validation loss's curve, never the weights (checked: a micro curriculum's projectors and
# adapters are bitwise the same validating after every batch, on 1 batch, or with no sanity check; the sanity
# check runs under Lightning's isolate_rng and the validation loader draws from its own generator); changing
# them (a validation cut short on real data) retrained every finished stage.
VALIDATION_ONLY = tuple(
    ("spec", "trainer", key) for key in ("val_check_interval", "limit_val_batches", "num_sanity_val_steps")
)


def stage_fingerprint(resolved: dict) -> str:
    """The hash of what decides a stage's trained weights. A stage folder's config.yaml keeps the whole config
    beside it, so that a stage recorded under other rules (an older version's) is judged by these
    (`recorded_fingerprint`)."""
    hashed = copy.deepcopy(resolved)
    for *sections, key in AS_GIVEN + DISPLAY_ONLY + VALIDATION_ONLY:
        functools.reduce(dict.__getitem__, sections, hashed).pop(key)
    hashed.pop("eval")
    # Nor what this stage does not read (a new LoRA rank retrained the projector-only align stage, hours on real
    # data): the rates of groups it does not train; model.lora unless it trains LoRA (an adapter handed in keeps
    # the config it was saved with, in its stage's fingerprint); the architectures unless it builds from them.
    spec, model = hashed["spec"], hashed["model"]
    spec["lr"] = {group: rate for group, rate in spec["lr"].items() if group in spec["trainable"]}
    if "lora" not in spec["trainable"]:
        model.pop("lora")
    if not model["random_init"]:
        for key in ("vision_arch", "lm_arch", "image_size"):
            model.pop(key)
    return fingerprint(hashed)


def recorded_fingerprint(recorded: dict | None) -> str | None:
    """The fingerprint of a stage folder's config.yaml (`recorded`) by today's rules; None for one that has
    none (an empty config.yaml: a write cut short), or whose keys are not today's."""
    if not recorded or "fingerprint" not in recorded:
        return None
    return _fingerprint_or_none({k: v for k, v in recorded.items() if k != "fingerprint"})


def _fingerprint_or_none(config: dict) -> str | None:
    try:
        return stage_fingerprint(config)
    except (KeyError, TypeError, AttributeError):  # keys of another version
        return None


def fingerprint_changes(recorded: dict, resolved: dict) -> list[str]:
    """The keys whose change alone changes the stage's fingerprint from config.yaml's (`recorded`): the cause
    of a retrain, not what changed beside it (an eval.limit, a LoRA rank the stage does not read); all changed
    keys when none does alone."""
    before = {k: v for k, v in recorded.items() if k != "fingerprint"}
    changed, was = changed_keys(before, resolved), recorded_fingerprint(recorded)
    causes = [key for key in changed if _fingerprint_or_none(_changed(before, key, resolved)) != was]
    return causes or changed


def _changed(config: dict, key: str, source: dict) -> dict:
    """A copy of `config` with the value of the dotted `key` that `source` holds (None where it has none)."""
    copied = copy.deepcopy(config)
    *sections, last = key.split(".")
    target, value = copied, source
    for section in sections:
        target = target.setdefault(section, {}) if isinstance(target, dict) else {}
        value = value.get(section) if isinstance(value, dict) else None
    if isinstance(target, dict):
        target[last] = value.get(last) if isinstance(value, dict) else None
    return copied


def eval_fingerprint(resolved: dict) -> str:
    """The hash of the settings that decide a stage's final scores (metrics.json) from its trained weights."""
    return fingerprint({k: v for k, v in resolved["eval"].items() if k not in EVAL_NOT_SCORED})


@dataclass
class RunInputs:
    """What every stage of a run reads: the shards and the base model folders, with their fingerprints."""

    run_dir: Path
    shard_dir: Path
    vision_path: Path
    lm_path: Path
    digests: dict[str, str]


class StageStopped(RuntimeError):
    """A stability alert with action `stop` ended the stage (its checkpoint is saved)."""


@dataclass
class StageResult:
    name: str
    fingerprint: str
    global_steps: int
    metrics: dict
    skipped: bool
    rescored: bool = False  # skipped, but scored again: its evaluation settings changed
    non_finite_weights: int = 0  # trained tensors that hold NaN or inf: its scores mean nothing


def write_stage_config(stage_dir: Path, stage_hash: str, resolved: dict) -> None:
    write_text_atomic(
        stage_dir / "config.yaml", yaml.safe_dump({"fingerprint": stage_hash, **resolved}, sort_keys=False)
    )


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two resolved stage configs (added and removed ones too)."""
    keys = []
    for key in sorted(old.keys() | new.keys(), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def prepare_stage_folder(stage_dir: Path, stage_hash: str, resolved: dict, rank_zero: bool) -> None:
    """Empties a stage folder whose config or inputs changed (judged by today's fingerprint of its config.yaml,
    which a stage interrupted by an older version has too), and writes the stage's config.yaml.

    Every rank runs each stage, but only rank 0 touches its folder: when two ranks both rewrote
    config.yaml, one could read it half-written (empty) and fail, and both deleted the same folder.
    """
    stage_dir.mkdir(parents=True, exist_ok=True)
    if not rank_zero:
        return
    config_path = stage_dir / "config.yaml"
    before = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else None
    if before is not None and recorded_fingerprint(before) != stage_hash:  # an empty config.yaml has none: stale
        changed = fingerprint_changes(before, resolved) if before else []
        changed = changed or ["a config.yaml that is empty, or of an older vlm-curriculum"]
        log.warning(
            "stage %s: config or inputs changed since its last run (%s); starting it afresh",
            stage_dir.name,
            ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else ""),
        )
        shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True)
    (stage_dir / "done.json").unlink(missing_ok=True)
    # Lightning's SLURM "hpc" checkpoints, saved at SIGUSR1 by runs before it was turned off (stage_trainer):
    # Lightning resumes from one whenever no last.ckpt is given, and a half-written one failed every rerun.
    for stale in stage_dir.glob("*hpc_ckpt_*"):
        if stale.is_dir() and not stale.is_symlink():  # a folder under DeepSpeed
            shutil.rmtree(stale)
        else:
            stale.unlink()
    write_stage_config(stage_dir, stage_hash, resolved)


def make_module(spec: StageSpec, vlm: VisionLanguageModel, cfg: CurriculumConfig) -> VLMModule:
    optim = spec.optim()
    if "lora" in spec.trainable:
        return LoRASFTModule(vlm, cfg.model.lora, optim, spec.trainable, cfg.model.speed)
    if spec.trainable == ["projector"]:
        return AlignModule(vlm, optim, cfg.model.speed)
    return VLMModule(vlm, spec.trainable, optim, cfg.model.speed)


def resolved_stage_config(cfg: CurriculumConfig, name: str, inputs: RunInputs, init_hash: str | None) -> dict:
    """Everything that decides what this stage computes (`stage_fingerprint` hashes what decides its weights)."""
    spec = cfg.stages[name]
    trainer = cfg.trainer_of(name)
    stage = {**asdict(spec), "trainer": asdict(trainer)}
    instability = cfg.stability.instability
    acting = instability.enabled and instability.action != "warn"
    if trainer.deepspeed_config:  # the file's content decides the run, not only its name
        from stages.strategies import resolve_config_path

        stage["trainer"]["deepspeed_config_digest"] = fingerprint(
            resolve_config_path(trainer.deepspeed_config).read_text()
        )
    return {
        "stage": name,
        "spec": stage,
        "seed": cfg.seed,
        "model": asdict(cfg.model),
        "data": asdict(cfg.data),
        "eval": {**asdict(cfg.eval), **_synonyms_digest(cfg.eval.synonyms)},
        # What changes the trained weights: an action other than `warn` skips, rewinds or stops where the
        # thresholds say; with `warn`, thresholds and sinks only change what is reported.
        "stability": {"instability": asdict(instability) if acting else None, "faults": cfg.stability.faults},
        "inputs": {
            "shard_dir": stored_path(inputs.shard_dir, inputs.run_dir),
            "vision_path": stored_path(inputs.vision_path, inputs.run_dir),
            "lm_path": stored_path(inputs.lm_path, inputs.run_dir),
            "digests": inputs.digests,
            "init_from": init_hash,
        },
    }


def _synonyms_digest(path: str | None) -> dict:
    """The synonym table's content, for the evaluation's fingerprint: a table edited in place rescores."""
    return {"synonyms_digest": fingerprint(Path(path).read_text(encoding="utf-8"))} if path else {}


def _stage_seed(seed: int, name: str) -> int:
    """Each stage's seed depends on the run seed and its name only, so a skipped stage changes nothing."""
    return zlib.crc32(f"{seed}/{name}".encode())


def stability_callbacks(
    cfg: CurriculumConfig, name: str, stage_dir: Path, previous_tail: list[float]
) -> tuple[AlertSinks, InstabilityMonitor | None, BoundaryCheck]:
    stability = cfg.stability
    sinks = AlertSinks(name, stage_dir / "alerts.jsonl", stability.webhook_url)
    monitor = InstabilityMonitor(stability.instability, sinks, name) if stability.instability.enabled else None
    # The boundary check also records the per-step losses, so it runs even when its alerts are off.
    return sinks, monitor, BoundaryCheck(stability.boundary, sinks, name, previous_tail)


def stage_data_and_evaluation(
    cfg: CurriculumConfig,
    name: str,
    inputs: RunInputs,
    vlm: VisionLanguageModel,
    tokenizer,
    processor,
    eval_hash: str,
) -> tuple[CaptionDataModule, CaptionEvaluation]:
    """The stage's training data (its word budget) and its evaluation on the held-out split; `eval_hash`, the
    evaluation settings' fingerprint, is recorded with the scores in metrics.json."""
    spec = cfg.stages[name]
    datamodule = CaptionDataModule(
        inputs.shard_dir, spec.max_words, cfg.data.batch_size, cfg.data.num_workers, cfg.seed
    )
    num_image_tokens = count_image_tokens(vlm, processor)
    datamodule.connect(tokenizer, processor, num_image_tokens, cfg.model.prompt, cfg.model.chat_template)
    budget = datamodule.budget_report()
    log.info(
        "stage %s: %d training images fit max_words=%d, %d skipped",
        name,
        budget["kept"],
        spec.max_words,
        budget["skipped"],
    )
    samples = datamodule.eval_samples(cfg.eval.split, cfg.eval.limit)
    evaluation = CaptionEvaluation(
        name,
        samples,
        datamodule.format,
        processor,
        inputs.run_dir / name / "metrics.json",
        max_new_tokens=cfg.eval.max_new_tokens,
        num_beams=cfg.eval.num_beams,
        batch_size=cfg.eval.batch_size,
        table_rows=cfg.eval.table_rows,
        every_n_steps=cfg.eval.every_n_steps,
        grid_images=cfg.eval.grid_images,
        buckets=tuple(cfg.eval.length_buckets),
        vqa=cfg.eval.vqa,
        extra={"budget": budget, "eval_fingerprint": eval_hash},
        synonyms=class_table(load_synonyms(cfg.eval.synonyms), datamodule.index, samples, datamodule.shard_dir),
    )
    return datamodule, evaluation


def rescore_stage(
    cfg: CurriculumConfig, name: str, inputs: RunInputs, resolved: dict, done: dict, step_offset: int
) -> StageResult:
    """A stage that trained before with the same config and inputs, but whose evaluation settings changed (or whose
    metrics.json is gone): its trained model (the export) is scored again with the new settings, on rank 0, on
    the GPU when the stage trained on one. The evaluations during training are not redone: metrics.json's
    history is emptied (they were made with the old settings; TensorBoard keeps them, and gets the new scores
    as a text `eval/<stage>/rescored` at the stage's last step)."""
    from stages.export import StageSource, load_stage_model

    stage_dir, steps, stage_hash = inputs.run_dir / name, done["global_steps"], done["fingerprint"]
    if rank_zero_only.rank != 0:  # rank 0 scores; the next stage's first collective waits for it
        return StageResult(name, stage_hash, steps, {}, skipped=True)
    log.info("stage %s: trained before with the same config and inputs; evaluation settings changed, scoring it", name)
    if not (stage_dir / "export").is_dir():
        raise FileNotFoundError(
            f"stage {name} finished (done.json) but its export/ is missing; delete {stage_dir} to train it again"
        )
    trainer = cfg.trainer_of(name)
    vlm, tokenizer, processor, _ = load_stage_model(StageSource(stage_dir, resolved, steps), as_trained=True)
    on_gpu = torch.cuda.is_available() and trainer.accelerator not in ("cpu",)
    vlm.to(device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else None)
    eval_hash = eval_fingerprint(resolved)
    _, evaluation = stage_data_and_evaluation(cfg, name, inputs, vlm, tokenizer, processor, eval_hash)
    metrics = evaluation.rescore(vlm, steps)
    write_stage_config(stage_dir, stage_hash, resolved)
    write_text_atomic(stage_dir / "done.json", json.dumps({**done, "eval_fingerprint": eval_hash}, indent=2))
    logger = CurriculumTensorBoardLogger(str(inputs.run_dir), step_offset)
    text = f"scored again with new evaluation settings: {metrics_line(metrics)}"
    logger.experiment.add_text(f"eval/{name}/rescored", text, global_step=logger.run_step(steps - 1))
    logger.finalize("success")  # closes the writer (and its thread)
    diverged = done.get("non_finite_weights", 0)
    return StageResult(name, stage_hash, steps, metrics, skipped=True, rescored=True, non_finite_weights=diverged)


@dataclass
class StageWatch:
    """The callbacks of a stage's trainer that run_stage reads after the fit."""

    sinks: AlertSinks
    monitor: InstabilityMonitor | None
    boundary: BoundaryCheck
    throughput: Throughput
    preemption: StopOnSigterm


def stage_trainer(
    cfg: CurriculumConfig,
    name: str,
    inputs: RunInputs,
    evaluation: CaptionEvaluation,
    step_offset: int,
    previous_tail: list[float],
) -> tuple[L.Trainer, StageWatch]:
    """The stage's Lightning Trainer: its checkpoints, the stability callbacks, throughput, evaluation, logger."""
    stage_dir = inputs.run_dir / name
    checkpoint = ModelCheckpoint(
        dirpath=stage_dir / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=cfg.checkpoint.every_n_train_steps,
        # One last.ckpt, overwritten: in a moved run folder Lightning forgets the file it wrote (its path changed)
        # and would save beside it as last-v1.ckpt, which no rerun reads.
        enable_version_counter=False,
    )
    sinks, monitor, boundary = stability_callbacks(cfg, name, stage_dir, previous_tail)
    faults = FaultInjection(cfg.stability.faults, cfg.seed) if cfg.stability.faults else None
    trainer_config = cfg.trainer_of(name)
    throughput = Throughput(log_every=trainer_config.log_every_n_steps or 50)
    preemption = StopOnSigterm()
    # Lightning refuses a progress bar among the callbacks when enable_progress_bar is false.
    bar = stage_progress_bar(name) if trainer_config.enable_progress_bar is not False else None
    plugins = [] if trainer_config.strategy == "deepspeed" else [BesideCheckpointIO()]
    if isinstance(launched_ranks(), SLURMEnvironment):  # not torchrun inside a SLURM job: its ranks are its own
        # No "hpc" checkpoint at SIGUSR1: saved mid-step, it resumed a run to other losses, and Lightning loads
        # it whenever no last.ckpt is given. SIGUSR1 stops a stage as SIGTERM does (stages.run).
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = L.Trainer(
        **trainer_config.kwargs(),
        logger=CurriculumTensorBoardLogger(str(inputs.run_dir), step_offset),
        callbacks=[StageStart()]  # first: it marks where the stage's TensorBoard events start
        + [c for c in (faults, monitor, boundary, sinks, throughput, evaluation, checkpoint, bar) if c is not None]
        + [StepLearningRateMonitor(), preemption],
        default_root_dir=stage_dir,
        reload_dataloaders_every_n_epochs=1,  # a new, seeded shuffle order every epoch
        plugins=plugins,
    )
    # Frozen towers are kept in eval mode on purpose (VLMModule.train); Lightning warns about that.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    # The caption DataModule resumes mid-epoch itself (it skips the batches already trained on).
    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
    return trainer, StageWatch(sinks, monitor, boundary, throughput, preemption)


def finished_result(
    cfg: CurriculumConfig, name: str, inputs: RunInputs, resolved: dict, step_offset: int
) -> StageResult | None:
    """The result of a stage that finished before with the same fingerprint: its scores as they are, or scored
    again when only the evaluation settings changed. None when the stage must train."""
    stage_dir = inputs.run_dir / name
    done_path = stage_dir / "done.json"
    if not done_path.is_file():
        return None
    done = json.loads(done_path.read_text())
    config_path = stage_dir / "config.yaml"
    recorded = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    # Judged by today's rules on the config it was trained with: one finished under an older version's rules is
    # finished too, and keeps its fingerprint, which the stages after it recorded as theirs to start from.
    if recorded_fingerprint(recorded) != stage_fingerprint(resolved) or recorded["fingerprint"] != done["fingerprint"]:
        return None
    if done.get("eval_fingerprint") == eval_fingerprint(resolved) and (stage_dir / "metrics.json").is_file():
        log.info("stage %s: finished before with the same config and inputs, skipped", name)
        metrics = scores_of_record(json.loads((stage_dir / "metrics.json").read_text()))
        diverged = done.get("non_finite_weights", 0)
        steps = done["global_steps"]
        return StageResult(name, done["fingerprint"], steps, metrics, skipped=True, non_finite_weights=diverged)
    return rescore_stage(cfg, name, inputs, resolved, done, step_offset)


def resume_point(stage_dir: Path, name: str) -> Path | None:
    """The stage's last.ckpt to resume from, if a killed run left one. A run killed before its first checkpoint
    trains every step again, so its alerts are dropped; those after a checkpoint are dropped by AlertSinks,
    and the replayed steps raise them again."""
    last = stage_dir / "checkpoints" / "last.ckpt"  # a file; under DeepSpeed a link to a folder (strategies.py)
    if last.exists():
        log.info("stage %s: resuming from %s", name, last)
        return last
    if rank_zero_only.rank == 0:
        (stage_dir / "alerts.jsonl").unlink(missing_ok=True)
    return None


def scores_of_a_resumed_end(stage_dir: Path, name: str, evaluation: CaptionEvaluation) -> str | None:
    """Lightning resumed at the last step and trained no further: a run killed after that step's checkpoint.
    The final evaluation ran before that checkpoint was written (CaptionEvaluation) and wrote metrics.json:
    its scores go to `evaluation`; the evaluation fingerprint they were scored with is returned."""
    metrics_path = stage_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"stage {name}: {stage_dir / 'checkpoints' / 'last.ckpt'} is at the stage's last step, but "
            f"{metrics_path} (written before that checkpoint) is missing; delete the checkpoint to train the last "
            "steps again"
        )
    record = json.loads(metrics_path.read_text())
    evaluation.metrics = scores_of_record(record)
    return record.get("eval_fingerprint")


def run_stage(
    cfg: CurriculumConfig,
    name: str,
    inputs: RunInputs,
    init_dir: Path | None,
    init_hash: str | None,
    step_offset: int,
    previous_tail: list[float] | None = None,
) -> StageResult:
    """Runs stage `name` unless it already finished with the same fingerprint; resumes from last.ckpt."""
    stage_dir = inputs.run_dir / name
    resolved = resolved_stage_config(cfg, name, inputs, init_hash)
    finished = finished_result(cfg, name, inputs, resolved, step_offset)
    if finished is not None:
        return finished
    stage_hash, eval_hash = stage_fingerprint(resolved), eval_fingerprint(resolved)
    started = time.perf_counter()
    L.seed_everything(_stage_seed(cfg.seed, name), workers=True, verbose=False)
    vlm, tokenizer, processor = build_vlm(cfg.model, inputs.vision_path, inputs.lm_path)
    # Before the handoff loads: its low bits too, of a part trained in full here or carried from a stage that did.
    full = set(cfg.stages[name].trainable) | (full_parts(init_dir) if init_dir is not None else set())
    float32_masters(vlm, full, cfg.trainer_of(name).precision, cfg.trainer_of(name).strategy)
    if init_dir is not None:
        if cfg.trainer_of(name).trained_dtype() == torch.float64:
            # Lightning casts to float64 only when the fit starts: loaded into float32 first, a float64 handoff
            # lost its low bits. (Narrower dtypes are left to Lightning and DeepSpeed, which cast as they do.)
            vlm.double()
        load_handoff(vlm, init_dir)
    module = make_module(cfg.stages[name], vlm, cfg)
    datamodule, evaluation = stage_data_and_evaluation(cfg, name, inputs, vlm, tokenizer, processor, eval_hash)
    trainer, watch = stage_trainer(cfg, name, inputs, evaluation, step_offset, previous_tail or [])
    # Only now, with the stage built: a stage that fails to build leaves the previous run's folder as it was.
    prepare_stage_folder(stage_dir, stage_hash, resolved, rank_zero_only.rank == 0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # The ranks already started by an earlier stage wait until rank 0 has emptied a stale stage folder: one that
        # looked before saw the old last.ckpt, resumed from it, and failed once rank 0 had deleted it.
        torch.distributed.barrier()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_point(stage_dir, name))
    if watch.monitor is not None and watch.monitor.stopped:
        if trainer.is_global_zero:  # the report's loss curve and table of the stopped stage
            watch.boundary.write_losses(stage_dir / "losses.json")
        # The alert's step, as alerts.jsonl numbers it (trainer.global_step counts the steps done: one more).
        step = watch.monitor.alerts[-1].step if watch.monitor.alerts else trainer.global_step - 1
        raise StageStopped(
            f"stage {name} stopped by a stability alert at step {step}; see {stage_dir / 'alerts.jsonl'}"
            f" and {stage_dir / 'checkpoints' / 'stopped.ckpt'}"
        )
    scored_with = eval_hash  # the evaluation settings of the scores in metrics.json
    if trainer.is_global_zero and not evaluation.final_done:
        scored_with = scores_of_a_resumed_end(stage_dir, name, evaluation)
    diverged = save_handoff(module.vlm, stage_dir / "export", write=trainer.is_global_zero)  # all ranks: ZeRO-3 gathers
    if diverged:  # trained on through NaN or inf (`action: warn`): a caption with no objects scores CHAIR 0
        log.warning("stage %s: %d trained tensors hold NaN or inf (%s, ...): its scores mean nothing; see alerts.jsonl",
                    name, len(diverged), ", ".join(diverged[:2]))  # fmt: skip
    if trainer.is_global_zero:
        follow_umask(stage_dir / "export")
        sync_tree(stage_dir / "export")  # on the disk before done.json vouches for it
    done = {
        "fingerprint": stage_hash,
        "eval_fingerprint": scored_with,
        "global_steps": trainer.global_step,
        "wall_s": round(time.perf_counter() - started, 1),
        "resources": watch.throughput.summary(),
    }
    if cfg.stability.webhook_url:
        done["webhook_failures"] = watch.sinks.webhook_failures
    if diverged:
        done["non_finite_weights"] = len(diverged)
    if trainer.is_global_zero:
        watch.boundary.write_losses(stage_dir / "losses.json")
        write_text_atomic(stage_dir / "done.json", json.dumps(done, indent=2))
    # The other ranks go on to the next stage, which reads this stage's export: wait until rank 0 wrote it.
    trainer.strategy.barrier("stage_written")
    # A SIGTERM after Lightning's last look (in on_train_end): the stage is done; stop, on every rank if any got it.
    if trainer.strategy.reduce_boolean_decision(trainer.received_sigterm or watch.preemption.signalled, all=False):
        raise SIGTERMException
    if scored_with != eval_hash:  # resumed at its last step, scored before with other settings (rank 0 only)
        return rescore_stage(cfg, name, inputs, resolved, done, step_offset)
    metrics, steps = evaluation.metrics, trainer.global_step
    return StageResult(name, stage_hash, steps, metrics, skipped=False, non_finite_weights=len(diverged))
