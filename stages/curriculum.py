"""The curriculum loop: base models, data, then every stage in order, each handing off to the next."""

from __future__ import annotations

import gc
import json
import logging
from contextlib import ExitStack
from dataclasses import asdict, fields
from pathlib import Path

import torch
from jsonargparse import ArgumentError
from lightning.pytorch.utilities import rank_zero_only

from callbacks.evaluation import reference
from callbacks.preemption import signals_held
from datamodules.caption_datamodule import CaptionDataModule
from datamodules.shards import (
    INDEX_NAME,
    ShardError,
    budget_counts,
    check_shards_serve,
    epoch_batches,
    index_digest,
    read_index,
)
from datamodules.world import vocabulary_corpus
from modules.base_models import pretrain_lm, pretrain_vision
from modules.loading import (
    check_lora_targets,
    check_prompt,
    check_token_rows,
    check_vision_layer,
    is_model_folder,
    load_tokenizer,
    random_init_parts,
    write_config_folders,
)
from stages.config import RESERVED_STAGE_NAMES, CurriculumConfig, TrainerConfig, device_count, upstream_stage
from stages.data import IMAGE_FILES_NAME, load_recipe, run_data_stage
from stages.launch import check_shared_folder, join_launched_ranks, rank_zero_first, rank_zero_verdict
from stages.paths import (
    LOCK_NAME,
    check_own_folder,
    folder_lock,
    follow_umask,
    make_folder,
    project_file,
    write_text_atomic,
)
from stages.recipe_ops import check_process
from stages.report import REPORT_PLOTS, STAGES_FILE, write_report
from stages.stage import RunInputs, StageResult, StageStopped, fingerprint, run_stage
from stages.tb_logger import purge_events

log = logging.getLogger(__name__)


# Bumped when what the shards hold changes (2: the world's questions), so older shards are rebuilt.
SHARD_FORMAT = 2


def shard_format(recipe, cfg: CurriculumConfig) -> int:
    """`SHARD_FORMAT`, or 3 for the inputs whose shards changed on 2026-12-07 (LLaVA and Data-Juicer inputs: a
    sample names its image, so that the records of one image are evaluated together; Data-Juicer's: LLaVA's
    <image> left the captions, conversations without a gpt turn are skipped; a world with `overlap`: objects stay
    in their cells and in view, and its base models are pretrained again too): theirs are rebuilt. Other builds
    keep their stamps, and their stages are not retrained (a synthetic build whose ops copy samples, as the stock
    captioner does, names the copies' image only once it is rebuilt)."""
    if recipe.input.format in ("llava", "dj_jsonl") or (recipe.input.format == "synthetic" and cfg.world.overlap > 0):
        return 3
    return SHARD_FORMAT


# An op argument whose name says it holds a path (stopwords_dir, mapping_file, model_path) and that names a file or
# folder is an input of the build, unless its name says the op writes there (an image mapper's save_dir: every build
# changes it). Other arguments are no paths even when a folder has their name (remove_specific_chars_mapper's
# chars_to_remove "." is the working folder, which a run's log file changes).
PATH_ARGS = ("dir", "path", "file", "model", "hf_")
OUTPUT_ARGS = ("save", "output", "export", "cache")


def _data_inputs(recipe, cfg: CurriculumConfig) -> dict:
    """What the shards are made from besides the recipe: the synthetic world and seed, or the input file
    (its path, size and modification time: an edited file rebuilds the shards; a changed world does not),
    and the files and folders the recipe's ops read (a retrained captioner, an edited word list rebuild them).
    The image files the input names are checked apart, against the build's stamp (`_changed_images`)."""
    models = {}  # (named for the model folders it held first: the name is in every run's stamp)
    for item in recipe.process:
        for op, args in item.items():
            for arg, value in (args or {}).items():
                path = Path(value) if isinstance(value, str) and value else None
                if path is None:
                    continue
                if (path / "config.json").is_file():  # a model folder
                    models[f"{op}.{arg}"] = folder_digest(path)
                elif not any(word in arg for word in PATH_ARGS) or any(word in arg for word in OUTPUT_ARGS):
                    continue
                elif path.is_file():
                    models[f"{op}.{arg}"] = [path.stat().st_size, path.stat().st_mtime_ns]
                elif path.is_dir():
                    models[f"{op}.{arg}"] = folder_digest(path)
    if recipe.input.format == "synthetic":
        return {"world": cfg.world, "seed": cfg.seed, "models": models}
    path = Path(recipe.input.path)
    stat = path.stat() if path.is_file() else None
    return {
        "input": str(path.resolve()), "size": stat and stat.st_size, "mtime_ns": stat and stat.st_mtime_ns,
        "models": models,
    }  # fmt: skip


def data_fingerprints(recipe, cfg: CurriculumConfig) -> tuple[str, str]:
    """What the shards are built from: the recipe as a mapping (its repr kept an op's arguments in the order
    written: reordered, they rebuilt the shards and retrained every stage), its inputs, the shard format; and the
    same with the recipe's repr, as builds before 2026-12-07 were stamped, which stay valid."""
    inputs = {**_data_inputs(recipe, cfg), "format": shard_format(recipe, cfg)}
    return fingerprint({"recipe": asdict(recipe), **inputs}), fingerprint({"recipe": str(recipe), **inputs})


def prepare_data(cfg: CurriculumConfig, run_dir: Path) -> Path:
    """The shard folder: `data.shard_dir` if given, else built (once) by the `data.recipe` in <run_dir>/data."""
    if cfg.data.shard_dir is not None:
        shard_dir = Path(cfg.data.shard_dir)
        if not (shard_dir / INDEX_NAME).is_file():
            raise FileNotFoundError(f"--data.shard_dir: {shard_dir} has no {INDEX_NAME}; build it with the data stage")
        return shard_dir
    recipe_path = project_file(cfg.data.recipe)
    if not recipe_path.is_file():
        raise FileNotFoundError(f"--data.recipe: {recipe_path} does not exist")
    recipe = load_recipe(recipe_path)
    shard_dir = run_dir / "data"
    wanted, as_before = data_fingerprints(recipe, cfg)
    stamp = shard_dir / "recipe.json"
    if stamp.is_file():
        built = json.loads(stamp.read_text())
        if built["fingerprint"] in (wanted, as_before):
            changed = _changed_images(built)
            if not changed:
                return shard_dir
            log.info("rebuilding the shards: %d image file(s) changed since they were built, first %s",
                     len(changed), changed[:3])  # fmt: skip
    log.info("building the shards with the data recipe %s in %s", recipe_path, shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    # The lock before the stamp goes: a refused build leaves the folder as it was.
    with folder_lock(shard_dir, "data", purpose="a data build"):
        stamp.unlink(missing_ok=True)  # a build killed midway must not leave the old stamp vouching for its files
        try:
            report = run_data_stage(recipe, shard_dir, cfg.world, cfg.seed, in_run=True)
        except ValueError as error:  # a recipe or input that cannot build shards: said as the data command says it
            raise ShardError(f"--data.recipe {recipe_path}: {error}") from error
        images = json.loads((shard_dir / IMAGE_FILES_NAME).read_text())  # as each was when read, not as it is now
        write_text_atomic(stamp, json.dumps({"fingerprint": wanted, "recipe": str(recipe_path), "images": images}))
    log_data_report(run_dir, report, (shard_dir / "report.md").read_text(encoding="utf-8"))
    return shard_dir


def _image_stats(paths: list[str]) -> dict[str, list[int] | None]:
    """Each image file's size and modification time (None: missing), as the shards were built from them. Only
    a file that is not there counts as missing: one failed stat (an I/O error, a stale NFS handle) rebuilt
    the shards and retrained every finished stage."""
    stats = {}
    for path in paths:
        try:
            stat = Path(path).stat()
            stats[path] = [stat.st_size, stat.st_mtime_ns]
        except (FileNotFoundError, NotADirectoryError):
            stats[path] = None
    return stats


def _changed_images(built: dict) -> list[str]:
    """The image files of the input that changed or vanished since the shards were built (a missing one that
    appeared), by the build's stamp: a replaced image rebuilds the shards as an edited input file does. One
    `stat` per image: 1.0 s per 100,000 images on a local disk with the page cache warm (measured), so about
    6 s for LLaVA-558K; the stamp holds about 60 bytes per image."""
    if "images" not in built:
        return ["(none listed: the shards were built before image files were checked)"]
    now = _image_stats(list(built["images"]))
    return sorted(path for path, stat in now.items() if stat != built["images"][path])


def log_data_report(run_dir: Path, report: dict, markdown: str) -> None:
    """The data report in the run's TensorBoard, as its own run `data` (tb/data): the Markdown table, and
    kept/dropped counts per op. In the stages' log, a stage's start at step 0 would hide it (tb_logger.py)."""
    from torch.utils.tensorboard import SummaryWriter

    # purge_step 0: a rebuild replaces the report of the build before. Closed: each build left a writer thread.
    with SummaryWriter(str(run_dir / "tb" / "data"), purge_step=0) as writer:
        writer.add_text("data/report", markdown, global_step=0)
        for position, op in enumerate(report["ops"]):
            writer.add_scalar(f"data/kept_after_op/{position:02d}_{op['op']}", op["out"], 0)
        writer.add_scalar("data/skipped_at_input", report["samples"]["skipped_at_input"], 0)


def _files(folder: Path) -> list[tuple[str, int, int]]:
    files = (p for p in folder.iterdir() if p.is_file() and p.name != LOCK_NAME)
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def folder_digest(folder: Path) -> str:
    """Cheap identity of a model folder: its config, and every file's name, size and modification time (a
    retrained or replaced checkpoint of the same shapes has the same sizes)."""
    config = (folder / "config.json").read_text() if (folder / "config.json").is_file() else ""
    return fingerprint({"files": _files(folder), "config": config})


def shards_digest(shard_dir: Path) -> str:
    """Identity of a shard folder: its index, and every file's name, size and modification time. The index
    alone holds counts and caption lengths, which rebuilt shards (another world, other captions) can share."""
    return fingerprint({"index": index_digest(shard_dir), "files": _files(shard_dir)})


def input_digests(shard_dir: Path, vision: Path, lm: Path) -> dict[str, str]:
    """The digests of a run's inputs, as its stages' fingerprints record them ("missing": no such folder)."""
    return {
        "shards": shards_digest(shard_dir) if (shard_dir / INDEX_NAME).is_file() else "missing",
        "vision": folder_digest(vision) if vision.is_dir() else "missing",
        "lm": folder_digest(lm) if lm.is_dir() else "missing",
    }


def check_model_folders(cfg: CurriculumConfig) -> None:
    """Fails naming every configured model folder that is not one; under `random_init` with architectures, a
    part without a folder needs its architecture (`vision_arch` / `lm_arch`)."""
    model = cfg.model
    if model.random_init and (model.vision_arch or model.lm_arch):
        random_init_parts(model)  # a part without a folder or an architecture: found after the data, before
        return
    flags = (("--model.vision_path", model.vision_path), ("--model.lm_path", model.lm_path))
    missing = [f"{flag} {path}" for flag, path in flags if path is not None and not is_model_folder(path)]
    if missing:
        raise FileNotFoundError(
            f"not model folders (no config.json): {'; '.join(missing)}. Give local folders saved with "
            "save_pretrained (nothing is downloaded at run time), or add --model.random_init true to build "
            "the profile's architecture with random weights."
        )


def check_inputs(cfg: CurriculumConfig) -> None:
    """What a run can check before any work (the tiny base models take minutes to pretrain): the model
    folders, the machine's accelerator and devices, a given shard folder."""
    check_model_folders(cfg)
    check_accelerator(cfg)
    if cfg.data.shard_dir is not None and not (Path(cfg.data.shard_dir) / INDEX_NAME).is_file():
        raise FileNotFoundError(
            f"--data.shard_dir: {cfg.data.shard_dir} has no {INDEX_NAME}; build it with the data stage"
        )
    if cfg.data.shard_dir is None:  # a recipe's bad value or misspelt key was found after the base models
        recipe_path = project_file(cfg.data.recipe)
        try:
            check_process(load_recipe(recipe_path).process)
        except (ValueError, TypeError, ArgumentError) as error:
            raise ShardError(f"--data.recipe {recipe_path}: {error}") from error
    warn_shadowed_trainer_keys(cfg)


def warn_unknown_caption_tokens(tokenizer, shard_dir: Path, lm: Path, samples: int = 64) -> None:
    """Says when most caption tokens of the first training samples are the tokenizer's unknown token: the tiny
    base's word-level tokenizer, made from the synthetic world's words, read each Chinese caption as one <unk>,
    and a run trained on <unk> to the end (empty captions, BLEU 0) without a word."""
    if tokenizer.unk_token_id is None:  # byte-level: every text has tokens
        return
    held = CaptionDataModule(shard_dir, max_words=1 << 30).eval_samples("train", limit=samples)
    texts = [reference(meta) for _, _, meta in held]
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    unknown = sum(i == tokenizer.unk_token_id for i in ids) / len(ids) if ids else 0.0
    if unknown > 0.5:
        log.warning("%.0f%% of the caption tokens of %s's first %d training images are unknown to %s's tokenizer: "
                    "the model cannot learn them; use a language model whose tokenizer covers their words",
                    100 * unknown, shard_dir, len(texts), lm)  # fmt: skip


def warn_shadowed_trainer_keys(cfg: CurriculumConfig) -> None:
    """Says which of the run's trainer keys no stage uses, every stage setting its own: `--trainer.max_steps 10`
    for a quick run was silently ignored, each stage of every profile setting max_steps."""
    for key in (f.name for f in fields(TrainerConfig)):
        value = getattr(cfg.trainer, key)
        if value is not None and all(getattr(spec.trainer, key) is not None for spec in cfg.stages.values()):
            log.warning("trainer.%s=%r is not used: every stage sets its own (--stages.<name>.trainer.%s)",
                        key, value, key)  # fmt: skip


def prepare_base_models(cfg: CurriculumConfig, run_dir: Path) -> tuple[Path, Path]:
    """(vision folder, LM folder): the configured ones, or the tiny pair built (once) under <run_dir>/base."""
    model = cfg.model
    check_model_folders(cfg)
    if model.random_init and (model.vision_arch or model.lm_arch):
        # A profile's architectures with random weights: config-only folders, read by the usual loaders.
        # A configured folder that exists wins (its config.json is used); missing ones are not an error here.
        written = write_config_folders(model, run_dir / "base" / "random_init", vocabulary_corpus(cfg.world))
        paths, archs = (model.vision_path, model.lm_path), (model.vision_arch, model.lm_arch)
        chosen = []
        for part, path, arch, default in zip(("vision", "lm"), paths, archs, written, strict=True):
            chosen.append(default or Path(path))
            if arch and default is None:  # a smaller arch for a memory run built the full model, unsaid
                log.warning("model.%s_arch is not used: model.%s_path %s exists, and its config.json is",
                            part, part, path)  # fmt: skip
        return chosen[0], chosen[1]
    if model.vision_path is not None and model.lm_path is not None:
        return Path(model.vision_path), Path(model.lm_path)
    base = run_dir / "base"
    # A world with `overlap` is drawn otherwise since 2026-12-07 (`shard_format`): its tower is pretrained again too.
    drawing = {"render": 2} if cfg.world.overlap > 0 else {}
    wanted = fingerprint({"base": cfg.base, "world": cfg.world, "seed": cfg.seed, **drawing})
    stamp = base / "build.json"
    if not (stamp.is_file() and json.loads(stamp.read_text())["fingerprint"] == wanted):
        base.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)  # a build killed midway must not leave the old stamp vouching for its files
        log.info("pretraining the tiny vision tower and language model under %s", base)
        accuracy = pretrain_vision(cfg.base, cfg.world, cfg.seed, base / "vision")
        loss = pretrain_lm(cfg.base, cfg.world, cfg.seed, base / "lm")
        follow_umask(base)
        write_text_atomic(stamp, json.dumps({"fingerprint": wanted, "vision_cell_accuracy": accuracy, "lm_loss": loss}))
    vision = Path(cfg.model.vision_path) if cfg.model.vision_path else base / "vision"
    lm = Path(cfg.model.lm_path) if cfg.model.lm_path else base / "lm"
    return vision, lm


def _losses(stage_dir: Path) -> list[float]:
    path = stage_dir / "losses.json"
    losses = json.loads(path.read_text())["losses"] if path.is_file() else []
    return [value for value in losses if value is not None]  # null: a non-finite step


def boundary_tail(cfg: CurriculumConfig, name: str, source: str | None, run_dir: Path) -> list[float]:
    """The losses the stage-boundary check compares stage `name`'s first losses with: those of the stage it
    starts from (`source`; none when it starts from the base models), if both train on the same word budget."""
    if source is None:
        return []
    if cfg.stages[source].max_words != cfg.stages[name].max_words:
        # Longer captions raise the loss by construction; the check is for a broken handoff.
        log.info("stage %s: caption budget changed from %s, the stage-boundary loss check is off", name, source)
        return []
    return _losses(run_dir / source)


def ranks(trainer: TrainerConfig) -> int:
    """The processes a stage trains on, as Lightning reads `devices` and `num_nodes` ("auto" and -1: every
    visible GPU, or one process on the CPU; "2": two devices; "0,3": those two)."""
    count = device_count(trainer.devices)
    if count == "all":
        count = torch.cuda.device_count() if trainer.accelerator != "cpu" else 0
    return max(count, 1) * (trainer.num_nodes or 1)


def free_stage_memory() -> None:
    """Frees the finished stage's model before the next stage builds its own. Lightning's trainer and
    module refer to each other, so the model outlives the stage until the garbage collector's next full
    pass, which tensor memory does not trigger: without this, a real LM's weights piled up stage by stage
    (Qwen2.5-0.5B's shape, fp32 on CPU: peak RSS 3.8, 5.7, 8.8, 11.1 GiB over the four stages; freed
    here, 3.7, 5.1, 5.9, 5.9 GiB)."""
    with signals_held():
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class NoGPU(RuntimeError):
    """A stage asks for a GPU on a machine without one."""


def check_accelerator(cfg: CurriculumConfig) -> None:
    """Fails before any work when a stage asks for an accelerator that this machine lacks, naming the key:
    Lightning said "No supported gpu backend found!" (or, for tpu, raised torch_xla's ModuleNotFoundError)
    once the first stage built its Trainer, after the data stage."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    for name in cfg.stages:
        trainer = cfg.trainer_of(name)
        accelerator, devices = trainer.accelerator, trainer.devices
        gpu_here = torch.cuda.is_available() or torch.backends.mps.is_available()  # what "auto" would pick
        on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not gpu_here)
        if on_cpu and (isinstance(devices, list) or (isinstance(devices, str) and "," in devices)):
            key = cfg.trainer_flag(name, "devices")
            raise NoGPU(f"{key} {devices!r}: device indices name GPUs; on the CPU give a number of processes (2)")
        if on_cpu and str(trainer.precision) in ("16-mixed", "16"):
            key = cfg.trainer_flag(name, "precision")
            raise NoGPU(f"{key} {trainer.precision}: float16 autocast needs a GPU (on CPU, Lightning ran bf16-mixed)")
        if accelerator in (None, "auto", "cpu"):
            continue
        key = cfg.trainer_flag(name, "accelerator")
        if accelerator in ("gpu", "cuda"):
            if torch.cuda.is_available():
                continue
            raise NoGPU(
                f"{key} asks for a GPU and this machine has none (no CUDA device); on CPU use "
                "--trainer.accelerator cpu (with a DeepSpeed profile also --trainer.strategy auto "
                "--trainer.deepspeed_config null)"
            )
        if not AcceleratorRegistry[accelerator]["accelerator"].is_available():
            raise NoGPU(f"{key} {accelerator}: this machine has no such device (or torch lacks its backend)")


def run_curriculum(cfg: CurriculumConfig, run_dir: Path) -> list[StageResult]:
    first = cfg.trainer_of(next(iter(cfg.stages)))  # every stage trains on the same processes
    join_launched_ranks(first.num_nodes or 1, ranks(first), gpu=first.accelerator != "cpu")
    with ExitStack() as held:
        with rank_zero_first("to start the run"):
            make_folder(run_dir, "--run_dir")
            if rank_zero_only.rank == 0:  # one run at a time in a folder (the other ranks of this run belong to it)
                held.enter_context(folder_lock(run_dir, "--run_dir", purpose="a curriculum run"))
                writes = (*RESERVED_STAGE_NAMES, *cfg.stages, "summary.json", "report.md", *REPORT_PLOTS)
                check_own_folder(run_dir, "--run_dir", (STAGES_FILE, "summary.json"), writes)  # summary: old runs
        check_shared_folder(run_dir, "--run_dir")
        with rank_zero_first("to prepare the run"):  # the others find what it built
            inputs = _prepare_run(cfg, run_dir, held)
        return _run_stages(cfg, inputs)


class InputChanged(RuntimeError):
    """A folder the run trains from changed while it ran (another process rebuilt it)."""


def check_inputs_unchanged(inputs: RunInputs, stage: str) -> None:
    """Fails when the shards or base models differ from what the run started with: a rebuild by another run
    (models in another run's base/, which this run cannot lock) gave later stages other inputs, silently."""

    def changed_inputs() -> list[str]:
        now = input_digests(inputs.shard_dir, inputs.vision_path, inputs.lm_path)
        return [key for key, digest in now.items() if digest != inputs.digests[key]]

    changed = rank_zero_verdict(changed_inputs, f"to check the inputs before stage {stage}")  # one verdict
    if changed:
        folders = {"shards": inputs.shard_dir, "vision": inputs.vision_path, "lm": inputs.lm_path}
        raise InputChanged(
            f"before stage {stage}: {', '.join(str(folders[key]) for key in changed)} changed while this run used "
            "it (another process rebuilt it?); rerun to train every stage on the new one"
        )


def _prepare_run(cfg: CurriculumConfig, run_dir: Path, held: ExitStack) -> RunInputs:
    """The run's base models and shards, built unless built before, and checked."""
    if rank_zero_only.rank == 0:  # the stage order, for a report of a run that has not finished
        write_text_atomic(run_dir / STAGES_FILE, json.dumps({"stages": list(cfg.stages)}, indent=2))
        former = sorted(p.parent.name for p in run_dir.glob("*/config.yaml") if p.parent.name not in cfg.stages)
        if former:  # a renamed or removed stage: its checkpoints and export stay, and nothing lists them
            log.warning(
                "%s holds stages this curriculum has not (%s): left as they are, and out of report.md, "
                "summary.json and TensorBoard; delete their folders to free the space",
                run_dir, ", ".join(former),
            )  # fmt: skip
    check_inputs(cfg)
    vision, lm = prepare_base_models(cfg, run_dir)
    check_vision_layer(vision, cfg.model.vision_layer)
    # Before the data: a tokenizer without an image token, or without the chat template asked for
    tokenizer = load_tokenizer(lm, cfg.model.image_token)
    check_prompt(tokenizer, cfg.model)
    check_token_rows(lm, tokenizer)
    if any("lora" in spec.trainable for spec in cfg.stages.values()):
        check_lora_targets(lm, cfg.model.lora)
    shard_dir = prepare_data(cfg, run_dir)
    if rank_zero_only.rank == 0:  # no data build into it while the stages read it
        held.enter_context(folder_lock(shard_dir, "--data.shard_dir" if cfg.data.shard_dir else "data", shared=True))
    budgets = {}
    for name, spec in cfg.stages.items():
        trainer = cfg.trainer_of(name)
        budgets[name] = (spec.max_words, ranks(trainer), trainer.accumulate_grad_batches or 1)
    index = read_index(shard_dir)
    check_shards_serve(index, shard_dir, budgets, cfg.data.batch_size, cfg.eval.split)
    check_epochs(cfg, index)
    if rank_zero_only.rank == 0:
        warn_unknown_caption_tokens(tokenizer, shard_dir, lm)
    return RunInputs(run_dir, shard_dir, vision, lm, input_digests(shard_dir, vision, lm))


def check_epochs(cfg: CurriculumConfig, index: dict) -> None:
    """What a stage's epoch length decides, from the index as the loader counts an epoch (whole optimizer steps
    per rank): an integer `val_check_interval` past the epoch's batches, which Lightning refused once the stage
    had started (after the stage's folder was emptied), and a `max_epochs` that `max_steps` cuts short, unsaid."""
    for name, spec in cfg.stages.items():
        trainer = cfg.trainer_of(name)
        accumulate = trainer.accumulate_grad_batches or 1
        kept = budget_counts(index, "train", spec.max_words)[0]
        batches = epoch_batches(kept, cfg.data.batch_size, ranks(trainer), accumulate)
        limit = trainer.limit_val_batches
        if isinstance(limit, float) and 0 < limit < 1 and ranks(trainer) == 1:  # Lightning refused it at the start
            raise ShardError(
                f"{cfg.trainer_flag(name, 'limit_val_batches')} {limit}: a share needs the validation set's length in "
                "batches, which a stream of shards has only on several devices; give a count of batches (0: none)"
            )
        interval = trainer.val_check_interval
        if isinstance(interval, int) and interval > batches:
            raise ShardError(
                f"{cfg.trainer_flag(name, 'val_check_interval')} {interval}: more than the {batches} training batches "
                f"of an epoch of stage {name} (Lightning validates within each epoch); give at most {batches}, or a "
                "share (0.5)"
            )
        epochs, steps = trainer.max_epochs, trainer.max_steps
        if epochs not in (None, -1) and steps not in (None, -1) and steps < epochs * (batches // accumulate):
            log.warning("stages.%s: max_steps %d ends it before its max_epochs %d (%d optimizer steps each): set "
                        "max_steps -1 to train by epochs", name, steps, epochs, batches // accumulate)  # fmt: skip


def _run_stages(cfg: CurriculumConfig, inputs: RunInputs) -> list[StageResult]:
    run_dir = inputs.run_dir
    results: list[StageResult] = []
    names = list(cfg.stages)
    step_offset = 0
    if rank_zero_only.rank == 0:  # the final metrics of a run that has finished; removed once the checks passed
        (run_dir / "summary.json").unlink(missing_ok=True)
    for index, name in enumerate(names):
        source = upstream_stage(names, index, cfg.stages[name].init_from)
        init = None if source == "base" else next(r for r in results if r.name == source)
        init_dir = None if init is None else run_dir / init.name / "export"
        tail = boundary_tail(cfg, name, None if init is None else init.name, run_dir)
        check_inputs_unchanged(inputs, name)
        try:
            result = run_stage(
                cfg, name, inputs, init_dir, None if init is None else init.fingerprint, step_offset, tail
            )
        except StageStopped:
            if rank_zero_only.rank == 0:  # the alerts that stopped it, and the stages before, in report.md
                log.info("report of the stopped run: %s", write_report(run_dir))
            raise
        free_stage_memory()
        results.append(result)
        step_offset += result.global_steps
    if rank_zero_only.rank != 0:  # the other ranks of a multi-device run trained; rank 0 scores and reports
        return []
    summary = {r.name: r.metrics for r in results}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    if (run_dir / "tb").is_dir():  # the curves of stages removed from the end of the curriculum since they ran
        purge_events(run_dir / "tb", None, step_offset)
    log.info("report: %s", write_report(run_dir))
    return results
