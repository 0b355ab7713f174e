"""The configuration schema of a curriculum run: typed dataclasses that jsonargparse fills from
YAML files and dotted command-line overrides (`--stages.sft_long.trainer.max_epochs 2`).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal

import torch

from callbacks.alerts import check_webhook_url
from callbacks.epoch_boundary import BoundaryConfig
from callbacks.fault_injection import check_faults
from callbacks.instability import InstabilityConfig, check_action_under_deepspeed
from datamodules.world import WorldConfig
from modules.base_models import TinyBaseConfig
from modules.loading import ModelConfig
from modules.speed import SpeedSpec
from modules.training_module import GROUPS, LOSS_WEIGHTINGS, LearningRates, OptimSpec, match_norm_statistics
from stages.metrics import DEFAULT_BUCKETS, check_buckets
from stages.paths import project_file

# Lightning's precision names (lightning.fabric.connector's _PRECISION_INPUT), its short aliases included.
PRECISIONS = (
    "32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true",
    "transformer-engine", "transformer-engine-float16", "32", "16", "64", "bf16",
)  # fmt: skip

# Lightning's short precision names: "bf16" and "16" are its mixed precisions, not the "-true" ones.
PRECISION_ALIASES = {"bf16": "bf16-mixed", "16": "16-mixed", "32": "32-true", "64": "64-true"}


def unified_precision(precision) -> str:
    """Lightning's full name of a precision setting (unset: 32-true)."""
    precision = str(precision or "32-true")
    return PRECISION_ALIASES.get(precision, precision)


def trained_dtype(precision: str | None, strategy: str | None) -> torch.dtype | None:
    """The dtype Lightning casts the model to while it trains (a "-true" precision; DeepSpeed's bf16 or fp16: its
    parameters), which the evaluations during training saw; None for 32-true and the mixed precisions, which
    leave the model as built."""
    precision = unified_precision(precision)
    deepspeed = strategy == "deepspeed"
    if precision == "bf16-true" or (deepspeed and precision == "bf16-mixed"):
        return torch.bfloat16
    if precision == "16-true" or (deepspeed and precision == "16-mixed"):
        return torch.float16
    return torch.float64 if precision == "64-true" else None


def float32_masters(vlm: torch.nn.Module, full: set[str], precision: str | None, strategy: str | None) -> None:
    """Casts the `full` parts ("vision", "lm": trained in full by this stage or an earlier one, whose handoff
    carries them) to float32 when `model.dtype` stores them in bf16 or fp16 and nothing else casts the model.
    Under the mixed precisions and 32-true, AdamW wrote its updates (about the rate, 1e-5) straight into bf16
    weights, where most rounded away (3 steps moved 12% of a tiny LM's weights, against 95% in float32); and a
    later stage loaded the float32 handoff into bf16, training its LoRA on a rounded LM that the export (float32)
    did not merge it onto. DeepSpeed in bf16/fp16 keeps float32 masters of its own and casts the model, as a
    "-true" precision does as the user asked: neither is touched. The weights and their optimizer state then take
    float32 memory, and under 32-true float32 compute (the mixed precisions autocast as before). A stage scored
    again (`eval`) is built the same way, as its evaluations during training saw it."""
    if trained_dtype(precision, strategy) is not None:
        return
    for group in sorted(full & {"vision", "lm"}):
        part = getattr(vlm, group)
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in part.parameters()):
            logging.getLogger(__name__).info(
                "%s trained in full (here or in a stage this one starts from): float32 weights, twice the memory "
                "of model.dtype's half precision, so that its updates do not round away",
                group,
            )
            part.float()


def cast_as_trained(module: torch.nn.Module, precision: str | None, strategy: str | None) -> None:
    """Casts `module` as the stage's training cast it, so that it is scored as the evaluations during training
    scored it: a "-true" precision casts parameters and buffers (Lightning, under DeepSpeed too); DeepSpeed's
    mixed bf16 / fp16 casts the parameters only (since 0.19.8; buffers such as RoPE's `inv_freq` stay float32
    unless the JSON sets `data_types.buffer_dtype`), and the project matches BatchNorm statistics to their
    weights (`match_norm_statistics`)."""
    dtype = trained_dtype(precision, strategy)
    if dtype is None:
        return
    if strategy == "deepspeed" and not str(precision).endswith("-true"):
        for param in module.parameters():
            param.data = param.data.to(dtype)
        match_norm_statistics(module)
    else:
        module.to(dtype=dtype)


@dataclass
class TrainerConfig:
    """Arguments of `lightning.Trainer`. Unset (null) fields inherit: a stage's from the run's
    `trainer`, the run's from Lightning's own defaults."""

    accelerator: str | None = None
    devices: int | list[int] | str | None = None
    """How many devices (2), which ([0, 3] or "0,3"), or "auto"; -1: every visible GPU."""
    num_nodes: int | None = None
    strategy: str | None = None
    """"auto", "ddp", ... (Lightning's strategy names), or "deepspeed" with `deepspeed_config`."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON (configs/deepspeed/zero2.json, zero3.json, zero2_offload.json) for strategy "deepspeed"."""
    precision: str | None = None
    """"32-true", "bf16-mixed", "16-mixed", ..."""
    max_epochs: int | None = None
    max_steps: int | None = None
    accumulate_grad_batches: int | None = None
    gradient_clip_val: float | None = None
    log_every_n_steps: int | None = None
    val_check_interval: int | float | None = None
    """Validate every N training batches of an epoch, counted from its start (micro-batches: with accumulation 2,
    every N/2 optimizer steps; at most an epoch's batches), or at this share of each epoch."""
    limit_val_batches: int | float | None = None
    """Validation batches per validation: a count, 0 (none), 1.0 (all), or a share on several devices (one
    device's validation stream has no length to take a share of)."""
    num_sanity_val_steps: int | None = None
    deterministic: bool | Literal["warn"] | None = None
    """true: deterministic kernels, failing on an op that has none; "warn": warn on it instead."""
    enable_progress_bar: bool | None = None

    def trained_dtype(self) -> torch.dtype | None:
        return trained_dtype(self.precision, self.strategy)

    def merged(self, override: TrainerConfig) -> TrainerConfig:
        """This config with every field that `override` sets replaced; a strategy other than deepspeed drops
        the DeepSpeed config it would otherwise inherit (a stage can leave a DeepSpeed run)."""
        changes = {f.name: getattr(override, f.name) for f in fields(override) if getattr(override, f.name) is not None}
        if changes.get("strategy", "deepspeed") != "deepspeed" and "deepspeed_config" not in changes:
            changes["deepspeed_config"] = None
        return replace(self, **changes)

    def check(self, where: str = "trainer", merged: bool = True) -> None:
        """Fails on values Lightning would reject only once a stage has started (or accept and misbehave on),
        naming the field as `<where>.<field>`. `merged`: a stage's settings as it trains (the run's own, which
        every stage may override, are not judged as a combination of precision and DeepSpeed config)."""
        if self.max_steps is not None and self.max_steps != -1 and self.max_steps < 1:
            raise ValueError(f"{where}.max_steps must be at least 1 (or -1: the epochs decide), got {self.max_steps}")
        if self.max_epochs is not None and self.max_epochs != -1 and self.max_epochs < 1:
            raise ValueError(f"{where}.max_epochs must be at least 1 (or -1: the steps decide), got {self.max_epochs}")
        for name in ("accumulate_grad_batches", "log_every_n_steps", "num_nodes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{where}.{name} must be at least 1, got {value}")
        self._check_devices(where)
        interval = self.val_check_interval
        if interval is not None and (interval <= 0 or (isinstance(interval, float) and interval > 1)):
            raise ValueError(
                f"{where}.val_check_interval must be training batches >= 1 (micro-batches, not optimizer steps) "
                f"or a share of the epoch in (0, 1], got {interval}"
            )
        limit = self.limit_val_batches
        if limit is not None and (limit < 0 or (isinstance(limit, float) and limit > 1)):
            raise ValueError(f"{where}.limit_val_batches must be a count >= 0 or a share in [0, 1], got {limit}")
        if self.num_sanity_val_steps is not None and self.num_sanity_val_steps < -1:
            raise ValueError(f"{where}.num_sanity_val_steps must be -1 (all) or more, got {self.num_sanity_val_steps}")
        if self.gradient_clip_val is not None and self.gradient_clip_val < 0:
            raise ValueError(f"{where}.gradient_clip_val must not be negative, got {self.gradient_clip_val}")
        self._check_names(where)
        if str(self.precision).startswith("transformer-engine"):  # it failed when the stage built its Trainer
            raise ValueError(
                f"{where}.precision {self.precision}: not supported here (Transformer Engine's FP8 layers would "
                "replace the LM's Linear layers, LoRA's included, which this project has not run); use bf16-mixed"
            )
        if str(self.precision) == "16-true" and self.strategy != "deepspeed":  # DeepSpeed keeps float32 masters
            raise ValueError(
                f"{where}.precision 16-true keeps the optimizer's state in float16, where AdamW's eps (1e-8) is 0: "
                "its first step turned every weight NaN. Use 16-mixed (on a GPU) or bf16-true"
            )
        if self.strategy == "deepspeed" and self.deepspeed_config is None:
            raise ValueError(f"{where}.strategy deepspeed needs {where}.deepspeed_config (configs/deepspeed/*.json)")
        if self.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            # Lightning says so only when the stage's Trainer is built: after the data build and the base models.
            raise ValueError(f"{where}.strategy deepspeed: deepspeed is not installed (pip install -e '.[deepspeed]')")
        if self.strategy not in (None, "deepspeed") and self.strategy.startswith("deepspeed"):
            raise ValueError(
                f"{where}.strategy {self.strategy}: use strategy deepspeed with {where}.deepspeed_config "
                "(configs/deepspeed/zero2.json, ...): Lightning's named DeepSpeed strategies divide the loss twice "
                "under gradient accumulation"
            )
        if self.strategy != "deepspeed" and self.deepspeed_config is not None:
            raise ValueError(f"{where}.deepspeed_config is set but {where}.strategy is not deepspeed")
        if self.deepspeed_config is not None:
            from stages.strategies import read_config

            try:
                read_config(self.deepspeed_config)
            except FileNotFoundError:
                raise ValueError(
                    f"{where}.deepspeed_config: {self.deepspeed_config} is no file (from the working folder or "
                    "the repository: configs/deepspeed/zero2.json, zero3.json, zero2_offload.json)"
                ) from None
            except ValueError as error:
                raise ValueError(f"{where}.deepspeed_config: {error}") from None
            if merged:  # a stage's settings as it trains: the run's may be overridden by every stage
                self._check_deepspeed_precision(where)

    def _check_deepspeed_precision(self, where: str) -> None:
        """Precisions DeepSpeed does not train as the project means them: float64 Lightning refuses (once the
        stage built its Trainer, after the data, the base models and any earlier stage), and under ZeRO stage 0
        DeepSpeed trains bf16 weights with no float32 master copy (its `DDP_BFLOAT16`), where most updates round
        away: the handoff it saved was bf16."""
        from stages.strategies import zero_stage

        precision = unified_precision(self.precision)
        if precision == "64-true":
            raise ValueError(
                f"{where}.precision {self.precision}: Lightning's DeepSpeed strategy does not train in float64; use "
                f"{where}.strategy auto (or ddp) for float64 runs"
            )
        if precision in ("bf16-mixed", "bf16-true") and zero_stage(self.deepspeed_config) == 0:
            raise ValueError(
                f"{where}.deepspeed_config {self.deepspeed_config}: ZeRO stage 0 (or none) with precision "
                f"{self.precision}: DeepSpeed then trains bf16 weights with no float32 master copy, where most "
                "updates round away; use ZeRO stage 1 or more (configs/deepspeed/zero2.json)"
            )

    def _check_devices(self, where: str) -> None:
        devices = self.devices
        if devices is None or devices == -1:
            return
        if isinstance(devices, list):
            if not devices or min(devices) < 0:
                raise ValueError(f"{where}.devices must list device indices (e.g. [0, 3]), got {devices}")
            return
        text = str(devices).strip()
        if text in ("0", "", "[]"):
            raise ValueError(f"{where}.devices must name at least one device, got {devices!r}")
        if text in ("auto", "-1"):
            return
        parts = [p.strip() for p in text.split(",")]
        if not all(p.isdigit() for p in parts if p) or (isinstance(devices, int) and devices < 0):
            raise ValueError(
                f'{where}.devices must be a count, a list of indices ([0, 3] or "0,3") or auto, got {devices!r}'
            )

    def _check_names(self, where: str) -> None:
        """Precision, accelerator and strategy names Lightning knows: a misspelt one failed only when its stage
        built its Trainer, after the data, the base models and any earlier stage."""
        from lightning.pytorch.accelerators import AcceleratorRegistry
        from lightning.pytorch.strategies import StrategyRegistry

        if self.precision is not None and str(self.precision) not in PRECISIONS:
            raise ValueError(f"{where}.precision {self.precision!r} is none of {', '.join(PRECISIONS)}")
        accelerators = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
        if self.accelerator is not None and self.accelerator not in accelerators:
            raise ValueError(f"{where}.accelerator {self.accelerator!r} is none of {', '.join(accelerators)}")
        strategies = ["auto", *StrategyRegistry.available_strategies()]
        if self.strategy is not None and self.strategy not in strategies:
            raise ValueError(f"{where}.strategy {self.strategy!r} is no Lightning strategy (auto, ddp, deepspeed, ...)")
        if self.strategy is not None and any(kind in self.strategy for kind in ("spawn", "fork", "notebook")):
            # Lightning's multiprocessing launcher trains in child processes and hands back only the weights: the
            # stage's callbacks (scores, alerts, steps) stay in the children, and every stage reported step 0.
            raise ValueError(
                f"{where}.strategy {self.strategy}: stages need their ranks launched as scripts; use ddp (or deepspeed)"
            )

    def kwargs(self) -> dict:
        """Keyword arguments of `lightning.Trainer`; strategy "deepspeed" becomes the configured DeepSpeed strategy."""
        self.check()
        kwargs = {k: v for k, v in asdict(self).items() if v is not None and k != "deepspeed_config"}
        # Lightning leaves torch's global switch as it finds it when deterministic is unset: a stage after one
        # with deterministic true kept deterministic kernels, and lost them on a rerun that skipped that stage.
        kwargs.setdefault("deterministic", False)
        if self.strategy == "deepspeed":
            from stages.strategies import deepspeed_strategy

            kwargs["strategy"] = deepspeed_strategy(self.deepspeed_config, self.accelerator)
        return kwargs


@dataclass
class StageSpec:
    """One stage of the curriculum: what trains, on which captions, from which weights."""

    trainable: list[str]
    """Parameter groups that train: any of "projector", "lora", "vision", "lm"."""
    max_words: int
    """Caption word budget: each image trains on its longest caption of at most this many words;
    images with none are skipped (and counted)."""
    init_from: str = "previous"
    """Where the projector and adapter come from: "previous" (the stage before), "base" (fresh), or a stage name."""
    lr: LearningRates = field(default_factory=LearningRates)
    warmup_steps: int = 20
    """Linear warm-up over these optimizer steps (at most half of the stage's: more is cut, with a warning)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays towards this fraction of each peak rate (0: to zero, as LLaVA-1.5's does),
    reached after the stage's last step: the last step trains a little above it (as in Hugging Face's schedules)."""
    loss_weighting: str = "token"
    """"token": every caption token of an optimizer step weighs the same, across its accumulated micro-batches
    (as one big batch); "micro_batch": each micro-batch's mean weighs the same (the original LLaVA / MGM
    scripts, HF Trainer before 4.46). The same without accumulation."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def optim(self) -> OptimSpec:
        """The optimizer and schedule settings the stage's LightningModule takes."""
        return OptimSpec(self.lr, self.warmup_steps, self.min_lr_ratio, self.loss_weighting)

    def check(self, where: str) -> None:
        """Fails on a value no stage can run with, naming the field as `<where>.<field>` (stages.<name>.*):
        called by `CurriculumConfig`, which knows the stage's name."""
        unknown = sorted(set(self.trainable) - set(GROUPS))
        if unknown or not self.trainable:
            raise ValueError(f"{where}.trainable must be a non-empty list of {GROUPS}; unknown: {unknown}")
        if len(set(self.trainable)) != len(self.trainable):  # AdamW refused the repeat once the stage had started
            raise ValueError(f"{where}.trainable names a group twice: {self.trainable}")
        if self.max_words < 1:
            raise ValueError(f"{where}.max_words must be positive, got {self.max_words}")
        for group in self.trainable:  # 0 trains nothing, a negative rate ascends the loss: neither is meant
            if not getattr(self.lr, group) > 0:
                rate = getattr(self.lr, group)
                raise ValueError(f"{where}.lr.{group} must be positive for a trained group, got {rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"{where}.warmup_steps must not be negative, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"{where}.min_lr_ratio must be within 0 and 1, got {self.min_lr_ratio}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"{where}.loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")


def check_speed(speed: SpeedSpec, trainer: TrainerConfig) -> None:
    """Refuses lever combinations this project has not made work."""
    if speed.compile and trainer.strategy == "deepspeed" and trainer.deepspeed_config:
        from stages.strategies import zero_stage

        if zero_stage(trainer.deepspeed_config) == 3:
            raise ValueError(
                f"--model.speed.compile {speed.compile} with ZeRO-3 ({trainer.deepspeed_config}): ZeRO-3 gathers "
                "partitioned weights in module hooks, which this project has not run under torch.compile; use "
                "ZeRO-2 or leave model.speed.compile unset"
            )


@dataclass
class DataConfig:
    """The shards every stage reads, and how they are loaded."""

    shard_dir: str | None = None
    """Folder of WebDataset shards with index.json, built before; unset: `recipe` builds them in <run_dir>/data."""
    recipe: str = "configs/data/synthetic.yaml"
    """The Data-Juicer recipe that builds the shards (relative paths: from the working folder, then the repo)."""
    batch_size: int = 32
    """Per-device batch size."""
    num_workers: int = 0
    """DataLoader worker processes per device."""

    def __post_init__(self) -> None:
        if self.shard_dir is not None and not self.shard_dir.strip():  # "--data.shard_dir:  has no index.json"
            raise ValueError("data.shard_dir: empty; name a shard folder, or leave it unset to build the shards")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(
                f"data.batch_size must be at least 1 and data.num_workers at least 0, got {self.batch_size}, "
                f"{self.num_workers}"
            )
        # Here, not when the data is prepared: that comes after the base models (minutes of pretraining). The
        # shard folder is checked when a run starts (`check_inputs`): compare names one it has yet to build.
        if self.shard_dir is None and not project_file(self.recipe).is_file():
            raise ValueError(f"data.recipe: {self.recipe} is no file (from the working folder or the repository)")


@dataclass
class EvalConfig:
    """Evaluation after every stage: greedy captions on a held-out split."""

    split: str = "test"
    limit: int = 256
    """Images evaluated (the first ones of the split, in shard order)."""
    max_new_tokens: int = 64
    num_beams: int = 1
    batch_size: int = 128
    table_rows: int = 8
    """Rows of the TensorBoard text table of ground truth against generated captions."""
    every_n_steps: int | None = None
    """Also evaluate every this many optimizer steps during a stage (null: only at its end)."""
    grid_images: int = 8
    """Images in the TensorBoard grid of images with their generated captions (0: no grid)."""
    vqa: bool = False
    """Also ask the held-out images' questions (the world's yes/no, counting, colour; a real record's own) at each
    stage's end: exact-match accuracy overall and per type, and VQAv2's accuracy where a question has several
    human answers. Off by default: the tiny curriculum trains captioning only."""
    length_buckets: list[int] = field(default_factory=lambda: list(DEFAULT_BUCKETS))
    """Upper edges (words) of the generated-caption length buckets that hallucination is also reported by."""
    synonyms: str | None = None
    """Real data whose samples carry object class names: a JSON file {class: [words naming it]} for CHAIR
    (e.g. COCO's synonym list); unset: every class annotated in the data set names itself."""

    def __post_init__(self) -> None:
        from callbacks.evaluation import load_synonyms

        load_synonyms(self.synonyms)  # a bad table fails before any work, naming the flag
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"eval.split must be train, val or test, got {self.split!r}")
        for name in ("limit", "max_new_tokens", "num_beams", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be at least 1, got {getattr(self, name)}")
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ValueError(f"eval.every_n_steps must be at least 1 or null, got {self.every_n_steps}")
        if self.table_rows < 0 or self.grid_images < 0:
            raise ValueError("eval.table_rows and eval.grid_images must not be negative")
        check_buckets(self.length_buckets, "eval.length_buckets")


@dataclass
class CheckpointConfig:
    """When a stage saves `last.ckpt`."""

    every_n_train_steps: int = 100
    """Also checkpoint every this many optimizer steps (`last.ckpt`), so that an interrupted stage resumes."""

    def __post_init__(self) -> None:
        if self.every_n_train_steps < 1:
            raise ValueError(f"checkpoint.every_n_train_steps must be at least 1, got {self.every_n_train_steps}")


@dataclass
class StabilityConfig:
    """Alerts on loss and gradient instability and on loss jumps at epoch and stage boundaries."""

    instability: InstabilityConfig = field(default_factory=InstabilityConfig)
    boundary: BoundaryConfig = field(default_factory=BoundaryConfig)
    webhook_url: str | None = None
    """Also POST every alert here as JSON (a Slack-compatible body); delivery failures are logged."""
    faults: dict[int, str] = field(default_factory=dict)
    """Chaos testing: inject a fault at these optimizer steps of every stage, e.g. {80: spike}
    (nan, spike, bad_batch, inf_grad; see callbacks/fault_injection.py)."""

    def __post_init__(self) -> None:
        check_faults(self.faults)
        if self.webhook_url:
            check_webhook_url(self.webhook_url)


# What a run folder holds besides its stages' folders, and init_from's own words.
RESERVED_STAGE_NAMES = ("base", "data", "tb", "export_hf", "previous")


def check_stage_name(name: str) -> None:
    """A stage's name is its folder in the run folder, which a changed stage empties on the next run: a name
    like "data" or "../x" emptied the shards, or a folder outside the run."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise ValueError(f"stages: stage name {name!r} must be letters, digits, _ and - (it names a folder)")
    if name.lower() in RESERVED_STAGE_NAMES:  # "Data" is the folder "data" where file names ignore case (macOS)
        raise ValueError(f"stages: stage name {name!r} is taken by the run folder; none of {RESERVED_STAGE_NAMES}")


def check_seed(seed: int, flag: str) -> None:
    """numpy's range: a seed of -1 failed after the base models, in the world's drawing, blamed on data.recipe."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"{flag} must be within 0 and 2**32 - 1, got {seed}")


def upstream_stage(names: list[str], index: int, init_from: str) -> str:
    """The stage that stage number `index` of `names` starts from ("previous": the one before it), or "base"."""
    return names[index - 1] if init_from == "previous" else init_from


def device_count(devices) -> int | str:
    """How many devices `devices` names, as a count ([0, 1], "0,1" and 2 are 2), or "all" (auto, -1, unset)."""
    if devices in (None, "auto", -1, "-1"):
        return "all"
    if isinstance(devices, list):
        return len(devices)
    text = str(devices)
    return len([d for d in text.split(",") if d.strip()]) if "," in text else int(text)


@dataclass
class CurriculumConfig:
    """A curriculum run: the data, the base models, and the stages in order."""

    stages: dict[str, StageSpec]
    """Stages in the order they run, keyed by name."""
    run_dir: str | None = None
    """Output folder; unset: runs/<name of the last --config file, or tiny>."""
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    base: TinyBaseConfig = field(default_factory=TinyBaseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)

    def trainer_of(self, stage: str) -> TrainerConfig:
        """The trainer settings stage `stage` runs with: the run's, with what the stage sets replacing them."""
        return self.trainer.merged(self.stages[stage].trainer)

    def trainer_flag(self, stage: str, key: str) -> str:
        """The flag that sets `key` of the stage's trainer, for messages: the stage's own, or the run's."""
        return (
            f"stages.{stage}.trainer.{key}"
            if getattr(self.stages[stage].trainer, key) is not None
            else f"trainer.{key}"
        )

    def _check_same_processes(self, name: str, first: str) -> None:
        """Every stage trains on the processes the first one started: a stage on 1 device after one on 2 ran
        twice, each process training it as rank 0 into the same folder (two evaluations, one export)."""
        this, that = self.trainer_of(name), self.trainer_of(first)
        for key, count, unset in (("devices", device_count, "auto"), ("num_nodes", lambda n: n or 1, 1)):
            mine, theirs = (unset if getattr(t, key) is None else getattr(t, key) for t in (this, that))
            if count(mine) != count(theirs):
                where = f"stages.{name}.trainer.{key}" if getattr(self.stages[name].trainer, key) is not None else ""
                raise ValueError(
                    f"{where or f'stages.{first}.trainer.{key}'}: stage {name} runs with {key} {mine!r} and stage "
                    f"{first} with {theirs!r}; every stage of a run trains on the same processes (set it in trainer)"
                )

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: a curriculum needs at least one stage")
        if self.run_dir is not None and not self.run_dir.strip():  # it ran in runs/<config name>, unsaid
            raise ValueError("run_dir: empty; name a folder, or leave it unset for runs/<name of the config>")
        check_seed(self.seed, "seed")
        self.trainer.check("trainer", merged=False)  # each stage's merged trainer is checked in full below
        names = list(self.stages)
        folded = [name.lower() for name in names]
        for index, (name, spec) in enumerate(self.stages.items()):
            check_stage_name(name)
            if name.lower() in folded[:index]:
                raise ValueError(f"stages: {name!r} and an earlier stage differ only in case: one folder on macOS")
            spec.check(f"stages.{name}")
            source = spec.init_from
            if source == "previous" and index == 0:
                raise ValueError(
                    f"stages.{name}.init_from: 'previous' but {name} is the first stage; use 'base' (a config file's "
                    "`stages` replaces the whole list: to change one stage's value give --stages.<name>.<key>)"
                )
            if source not in ("previous", "base") and source not in names[:index]:
                raise ValueError(
                    f"stages.{name}.init_from: {source!r} is not 'previous', 'base' "
                    f"or an earlier stage ({names[:index]})"
                )
            upstream = upstream_stage(names, index, source)
            if upstream in self.stages and spec.max_words < self.stages[upstream].max_words:
                logging.getLogger(__name__).warning(
                    "stages.%s.max_words %d is below that of %s (%d), which it starts from: the curriculum's word "
                    "budgets are meant to grow stage by stage",
                    name,
                    spec.max_words,
                    upstream,
                    self.stages[upstream].max_words,
                )
            stage_trainer = self.trainer_of(name)
            stage_trainer.check(f"stages.{name}.trainer")
            self._check_same_processes(name, names[0])
            if stage_trainer.max_steps in (None, -1) and stage_trainer.max_epochs == -1:
                # It crashed in configure_optimizers (int(inf)) once the base models had loaded.
                raise ValueError(
                    f"stages.{name}: trainer.max_epochs -1 with no trainer.max_steps (here or in trainer) trains for "
                    "ever, and the learning-rate schedule decays over the stage's length: set trainer.max_steps or "
                    "a positive trainer.max_epochs"
                )
            if stage_trainer.max_steps in (None, -1) and stage_trainer.max_epochs is None:
                logging.getLogger(__name__).warning(
                    "stages.%s: neither trainer.max_steps nor trainer.max_epochs is set (here or in trainer), so "
                    "Lightning trains 1000 epochs (its default): set one of them",
                    name,
                )
            check_speed(self.model.speed, stage_trainer)
            if stage_trainer.strategy == "deepspeed" and self.stability.instability.enabled:
                check_action_under_deepspeed(self.stability.instability.action, f" (stage {name})")
            if stage_trainer.strategy == "deepspeed" and "inf_grad" in self.stability.faults.values():
                raise ValueError(
                    f"stability.faults: inf_grad under DeepSpeed (stage {name}): its gradients live in the engine's "
                    "partitioned buffers, not in p.grad, where the fault writes; use nan, spike or bad_batch"
                )
