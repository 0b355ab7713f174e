"""`stages.run export` and `stages.run eval`: a merged Hugging Face folder, and scoring any model.

Export layout (one folder, loadable with transformers alone):

    config.json                     VLMCurriculumConfig: the tower's and LM's configs, prompt layout, auto_map
    model.safetensors               vision.*, projector.*, lm.* (LoRA merged into the LM weights)
    modeling_vlm_curriculum.py      the model code (a copy of modules/modeling_vlm_curriculum.py)
    tokenizer files, preprocessor_config.json
    vlm_export.json                 where it came from: run, stage, step, shards
    README.md                       a loading snippet
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from modules import modeling_vlm_curriculum
from modules.handoff import check_handoff, full_parts, has_lora, load_handoff
from modules.loading import LoraSpec, ModelConfig, build_vlm, count_image_tokens, is_model_folder
from modules.modeling_vlm_curriculum import VLMCurriculumConfig, VLMCurriculumForCaptioning
from stages.config import EvalConfig, cast_as_trained, float32_masters, trained_dtype
from stages.metrics import COUNTS, DEFAULT_BUCKETS, check_buckets
from stages.paths import file_lock, follow_umask, input_path, make_folder
from stages.report import STAGES_FILE, listed_stages, read_json, stage_configs, stage_problems

log = logging.getLogger(__name__)

EXPORT_RECORD = "vlm_export.json"
# What an export cannot load without (the tokenizer's other files depend on its kind; the weights may be sharded).
EXPORT_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
README = """# {name}

A vision-language model trained with vlm-curriculum (run `{run}`, stage `{stage}`, step {step}):
{vision} vision tower, an MLP projector, and {lm} with its LoRA adapter merged in.

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

folder = "{folder}"
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
processor = model.image_processor(AutoImageProcessor.from_pretrained(folder, trust_remote_code=True))

pixels = processor([Image.open("image.png").convert("RGB")], return_tensors="pt")["pixel_values"]
prompt = torch.tensor([model.prompt_ids(tokenizer)])
tokens = model.generate(prompt, torch.ones_like(prompt), pixels, max_new_tokens=64, do_sample=False,
                        eos_token_id=model.stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
print(tokenizer.batch_decode(tokens, skip_special_tokens=True)[0])
```

Or score it on WebDataset shards: `python -m stages.run eval --model {folder} --data <shard dir>`.
"""


@dataclass
class StageSource:
    """A finished stage of a run: its folder, resolved config, and the step it ended at."""

    stage_dir: Path
    config: dict
    global_step: int

    @property
    def shard_dir(self) -> Path:
        return self.input_folder("shard_dir")

    def input_folder(self, key: str) -> Path:
        """An input folder the stage recorded (`shard_dir`, `vision_path`, `lm_path`). A relative one is the run's
        own; runs before 2026-11-23 recorded it relative to the working folder, whose folder of that name is taken
        only if it is the one the stage trained on (its digest, where recorded): with the run's data/ gone, eval
        in another run's folder scored that run's shards and called them rebuilt."""
        from stages.curriculum import folder_digest, shards_digest

        stored, run_dir = self.config["inputs"][key], self.stage_dir.parent
        path, inside = input_path(stored, run_dir), run_dir / stored
        if Path(stored).is_absolute() or path == inside:
            return path
        name = {"shard_dir": "shards", "vision_path": "vision", "lm_path": "lm"}[key]
        recorded = self.config["inputs"].get("digests", {}).get(name)
        if recorded is None:
            return path
        if key == "shard_dir":
            now = shards_digest(path) if (path / "index.json").is_file() else None
        else:
            now = folder_digest(path)
        return path if now == recorded else inside  # the run's own, missing: named as such where it is used


def find_stage(run_or_stage: str | Path, stage: str | None = None, flag: str = "--run_dir") -> StageSource:
    """The stage folder named by a run folder (its last stage, or `stage`) or by a stage folder itself;
    `flag` is the command's option that named it, for the errors. A stage whose run has moved on since it
    trained (a rerun changed a stage it starts from) is refused when the run folder chose it, said when named."""
    path = Path(run_or_stage).resolve()  # "." inside a stage folder: its run is the parent folder
    if not path.is_dir():
        raise FileNotFoundError(f"{flag}: {path} is no folder")
    if path.name == "export" and (path.parent / "config.yaml").is_file():  # a stage's export/: that stage
        path = path.parent
    if stage is not None and (path / "config.yaml").is_file():  # --stage beside a stage folder: its run's stage
        path = path.parent
    if (path / EXPORT_RECORD).is_file():  # it said "a model folder without vlm_export.json" of an export
        if not (path / EXPORT_RECORD).read_text().strip("{} \n"):  # eval reads a whole record before this
            raise ValueError(f"{flag}: {path / EXPORT_RECORD} is empty; export the stage again")
        raise FileNotFoundError(
            f"{flag}: {path} is an export already, not a run or stage folder; score it with eval --model {path}"
        )
    chosen = stage is None and not (path / "config.yaml").is_file()  # not a stage folder: the run's last stage
    if stage is None and not chosen:
        stage_dir = path
    else:
        named = listed_stages(path)
        if stage is None and not named:
            kind = "a model folder without vlm_export.json, " if (path / "config.json").is_file() else ""
            raise FileNotFoundError(
                f"{flag}: {path} is {kind}not a run folder (no {STAGES_FILE}), a stage folder (no config.yaml) or "
                "an export (no vlm_export.json)"
            )
        stage_dir = path / (stage or named[-1])
        if not stage_dir.is_dir():
            listed = f" (its stages: {', '.join(named)})" if named else ""
            raise FileNotFoundError(f"{'--stage' if stage else flag}: no folder {stage_dir}{listed}")
    done = read_json(stage_dir / "done.json")
    if done is None:
        stopped = (stage_dir / "checkpoints" / "stopped.ckpt").exists()
        why = "was stopped by a stability alert (its alerts.jsonl)" if stopped else "has not finished"
        raise FileNotFoundError(f"{stage_dir}: no done.json there; that stage {why}")
    run_dir = stage_dir.parent
    configs = stage_configs(run_dir) if (run_dir / STAGES_FILE).is_file() else {}
    problem = stage_problems(run_dir, configs).get(stage_dir.name) if stage_dir.name in configs else None
    if problem and chosen:
        raise ValueError(
            f"{flag}: {path}'s last stage, {stage_dir.name}, is out of date: {problem}. Rerun the curriculum to "
            f"train it again, or name {stage_dir} itself (export: --stage) to take it as it is"
        )
    if problem:
        log.warning("%s is out of date: %s", stage_dir, problem)
    config = configs.get(stage_dir.name) or yaml.safe_load((stage_dir / "config.yaml").read_text())
    return StageSource(stage_dir, config, done["global_steps"])


def load_stage_model(source: StageSource, dtype: torch.dtype | None = None, as_trained: bool = False):
    """(VisionLanguageModel with the stage's projector and adapter, tokenizer, processor, ModelConfig);
    `dtype`: cast to it before the stage's weights are loaded, which a model of a narrower dtype would round;
    `as_trained`: cast as the stage's training did (`cast_as_trained`; float64 before the weights load)."""
    trainer = source.config["spec"]["trainer"]
    precision, strategy = trainer.get("precision"), trainer.get("strategy")
    if as_trained and trained_dtype(precision, strategy) == torch.float64:
        dtype = torch.float64
    model = dict(source.config["model"])
    model_config = ModelConfig(**{**model, "lora": LoraSpec(**model["lora"])})
    vision, lm = (source.input_folder(key) for key in ("vision_path", "lm_path"))
    for folder, key in ((vision, "vision_path"), (lm, "lm_path")):
        if not is_model_folder(folder):  # named as the stage recorded it: eval and export have no such flag
            raise FileNotFoundError(f"{source.stage_dir}: the {key} it trained on, {folder}, is no model folder")
    changed = changed_base_models(source, vision, lm)
    if changed:  # a rebuilt tiny base (another base.*) under the same run: other weights, scored without a word
        log.warning("%s: %s changed since the stage trained on it: its projector and adapter are loaded on other "
                    "base weights (or the same ones, copied without their files' times)", source.stage_dir,
                    " and ".join(str(folder) for folder in changed))  # fmt: skip
    check_handoff(source.stage_dir / "export", str(source.stage_dir))  # before the base models load
    vlm, tokenizer, processor = build_vlm(model_config, vision, lm)
    vlm.to(dtype=dtype)
    if as_trained:
        full = set(source.config["spec"]["trainable"]) | full_parts(source.stage_dir / "export")
        float32_masters(vlm, full, precision, strategy)
    load_handoff(vlm, source.stage_dir / "export", str(source.stage_dir))
    if as_trained:
        cast_as_trained(vlm, precision, strategy)
    return vlm, tokenizer, processor, model_config


def changed_base_models(source: StageSource, vision: Path, lm: Path) -> list[Path]:
    """The base model folders whose digest (files' names, sizes, times) differs from the one the stage
    recorded when it trained (runs before the digests were recorded: none)."""
    from stages.curriculum import folder_digest

    recorded = source.config["inputs"].get("digests", {})
    return [
        folder
        for folder, key in ((vision, "vision"), (lm, "lm"))
        if recorded.get(key) and recorded[key] != folder_digest(folder)
    ]


def export_model(source: StageSource, out_dir: Path) -> Path:
    """Writes the stage's model, LoRA merged, as one Hugging Face folder; returns `out_dir`."""
    out_dir = Path(os.path.realpath(out_dir))  # a link: the folder it names is replaced, beside it on its disk
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out_dir: {out_dir} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / EXPORT_RECORD).is_file():
        raise FileExistsError(f"--out_dir: {out_dir} holds files and no earlier export; name a new or empty folder")
    # Merged in float32 whatever the base models' dtype (the base weights as training saw them, then upcast;
    # the stage's float32 weights loaded as they are): a LoRA update is mostly below bf16's resolution of the
    # weights it is added to, so a bf16 merge would lose much of what training learned.
    vlm, tokenizer, processor, model_config = load_stage_model(source, torch.float32)
    vlm.eval()
    diverged = [name for name, t in vlm.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if diverged:  # a run whose alerts only warned (`stability.instability.action: warn`) trains on through NaN
        raise ValueError(
            f"{source.stage_dir}: {len(diverged)} of its weights hold NaN or inf ({', '.join(diverged[:3])}, ...): "
            "the stage diverged (its alerts are in the run's report.md); nothing exported"
        )
    num_image_tokens = count_image_tokens(vlm, processor)
    if has_lora(vlm):
        vlm.lm = vlm.lm.merge_and_unload()
    for part in (vlm.vision, vlm.lm):  # from_config builds in the config's dtype: float32 now
        part.config.dtype = torch.float32
    config = VLMCurriculumConfig(
        vision_config=vlm.vision.config,
        text_config=vlm.lm.config,
        vision_width=vlm.vision_width,
        image_token_id=vlm.image_token_id,
        grid=model_config.grid,
        vision_layer=model_config.vision_layer,
        num_image_tokens=num_image_tokens,
        prompt=model_config.prompt,
        chat_template=model_config.chat_template,
        pad_to_square=model_config.pad_to_square,
        auto_map={
            "AutoConfig": "modeling_vlm_curriculum.VLMCurriculumConfig",
            "AutoModel": "modeling_vlm_curriculum.VLMCurriculumForCaptioning",
        },
    )
    merged = VLMCurriculumForCaptioning(config)
    merged.load_state_dict(vlm.state_dict(), strict=True)
    # Written beside it, then put in its place: an export interrupted midway into the folder of an earlier one
    # left that one's record (stage, step) beside the new weights, and `eval` reported the wrong stage. One
    # export at a time into a folder: two shared the partial folder and deleted each other's files.
    make_folder(out_dir.parent, "--out_dir")
    with file_lock(out_dir.with_name(f".{out_dir.name}.lock"), f"--out_dir {out_dir}", purpose="an export"):
        partial = out_dir.with_name(f".{out_dir.name}.partial")
        try:
            _write_export(merged, tokenizer, processor, source, out_dir, partial)
        except BaseException:  # a full disk (the partial folder would keep it full), Ctrl-C, SIGTERM
            shutil.rmtree(partial, ignore_errors=True)
            raise
        shutil.rmtree(out_dir, ignore_errors=True)  # the earlier one: a kill now keeps the new one whole in `partial`
        partial.rename(out_dir)
    return out_dir


def _write_export(merged, tokenizer, processor, source: StageSource, out_dir: Path, partial: Path) -> None:
    """The export for `out_dir`, written whole into `partial`."""
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    merged.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    processor.save_pretrained(partial)
    shutil.copyfile(modeling_vlm_curriculum.__file__, partial / "modeling_vlm_curriculum.py")
    record = {
        "run_dir": str(source.stage_dir.parent),
        "stage": source.stage_dir.name,
        "global_step": source.global_step,
        "shard_dir": str(source.shard_dir.resolve()),
        "fingerprint": source.config.get("fingerprint"),  # the stage's training, to tell a later one from it
        "shards_digest": source.config["inputs"].get("digests", {}).get("shards"),  # the shards it trained on
        # Saved in float32; `eval` casts it as training did (bf16-true: to bfloat16) to score as training scored.
        "trained_precision": source.config["spec"]["trainer"].get("precision"),
        "trained_strategy": source.config["spec"]["trainer"].get("strategy"),
    }
    (partial / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
    (partial / "README.md").write_text(
        README.format(
            name=out_dir.name,
            run=record["run_dir"],
            stage=record["stage"],
            step=record["global_step"],
            vision=type(merged.vision).__name__,
            lm=type(merged.lm).__name__,
            folder=out_dir,
        ),
        encoding="utf-8",  # a folder or run named in any script
    )
    follow_umask(partial)


def stale_export(record: dict) -> str | None:
    """Why an export's stage no longer holds what was exported (trained again since, or training), else None.
    Exports before the record held the stage's fingerprint, and those whose run is gone, are not judged."""
    config = Path(record["run_dir"]) / record["stage"] / "config.yaml"
    if not record.get("fingerprint") or not config.is_file():
        return None
    if not (config.parent / "done.json").is_file():
        return f"its stage {config.parent} is being trained again (no done.json)"
    if yaml.safe_load(config.read_text()).get("fingerprint") != record["fingerprint"]:
        return f"its stage {config.parent} has been trained again since; export it again"
    return None


def load_exported(folder: Path):
    """(model, tokenizer, processor) of an exported folder, with this project's own model class: the copy of
    modeling_vlm_curriculum.py in the folder (for users without this project) is not run, so that scoring a
    downloaded export runs no code from it (`trust_remote_code=True` did). Exports of every version load: those
    before pad_to_square have no such key and never padded."""
    if not (folder / EXPORT_RECORD).is_file():
        raise FileNotFoundError(f"--model: {folder} is not an exported model (no {EXPORT_RECORD})")
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    missing += [] if any((folder / name).is_file() for name in WEIGHT_FILES) else [WEIGHT_FILES[0]]
    if missing:  # a traceback, or transformers' list of every config class, named none
        raise FileNotFoundError(f"--model: {folder} is an incomplete export, without {', '.join(missing)}")
    # The tokenizer and image processor read config.json too: without the type registered, transformers asked
    # on stdin whether to run the folder's code.
    AutoConfig.register(VLMCurriculumConfig.model_type, VLMCurriculumConfig, exist_ok=True)
    model = VLMCurriculumForCaptioning.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    return model, tokenizer, model.image_processor(processor)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def eval_device(name: str) -> torch.device:
    """The device `eval --device` names ("auto": the first GPU if there is one, else the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here (use cpu or auto)")
    return device


@dataclass
class EvalTarget:
    """A model loaded to be scored, how it prompts, and what it trained on."""

    model: torch.nn.Module
    tokenizer: object
    processor: object
    num_image_tokens: int
    prompt: str
    chat_template: bool
    source: dict
    """Where it came from, for the result: an export's record, or a stage folder and its step."""
    trained_on: str | None
    """The digest of the shards it trained on, when recorded."""


def _load_exported_target(path: Path, record: dict, dtype: str | None) -> EvalTarget:
    model, tokenizer, processor = load_exported(path)
    source = {"exported": str(path), **record}
    stale = stale_export(record)
    if stale:
        log.warning("%s is out of date: %s", path, stale)
        source["stale"] = stale
    precision, strategy = record.get("trained_precision"), record.get("trained_strategy")
    # Saved in float32: scored as training scored it, but not upcast (a float64 stage's export is rounded).
    if dtype is None and trained_dtype(precision, strategy) != torch.float64:
        cast_as_trained(model, precision, strategy)
        if next(model.parameters()).dtype != torch.float32:
            log.info("%s: scored in %s, as it trained (--dtype float32 scores the saved weights)",
                     path, next(model.parameters()).dtype)  # fmt: skip
    chat_template = getattr(model.config, "chat_template", False)  # exports before it was a field: off
    return EvalTarget(model, tokenizer, processor, model.config.num_image_tokens, model.config.prompt,
                      chat_template, source, record.get("shards_digest"))  # fmt: skip


def _load_stage_target(stage: StageSource, dtype: str | None) -> EvalTarget:
    model, tokenizer, processor, model_config = load_stage_model(stage, DTYPES.get(dtype), as_trained=not dtype)
    model.eval()
    source = {"stage_dir": str(stage.stage_dir), "global_step": stage.global_step}
    trained_on = stage.config["inputs"].get("digests", {}).get("shards")
    return EvalTarget(model, tokenizer, processor, count_image_tokens(model, processor), model_config.prompt,
                      model_config.chat_template, source, trained_on)  # fmt: skip


def _note_rebuilt_shards(target: EvalTarget, shards: Path) -> None:
    """Says so, in the result and the log, when the shards the model trained on were rebuilt since."""
    from datamodules.shards import index_digest
    from stages.curriculum import shards_digest

    # Runs before the digest took in the files recorded the index's digest alone.
    if target.trained_on and target.trained_on not in (shards_digest(shards), index_digest(shards)):
        target.source["shards_changed"] = f"{shards} was rebuilt after the model trained on it"
        log.warning("%s: scoring on shards other than those it trained on", target.source["shards_changed"])


def evaluate_model(
    model_path: str | Path,
    shard_dir: str | Path | None = None,
    split: str = EvalConfig.split,
    limit: int | None = None,
    max_new_tokens: int = EvalConfig.max_new_tokens,
    num_beams: int = EvalConfig.num_beams,
    batch_size: int = EvalConfig.batch_size,
    buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    vqa: bool = False,
    synonyms: str | Path | None = None,
    device: str = "auto",
    dtype: str | None = None,
) -> dict:
    """Captions the held-out `split` of the shards with an exported folder or a finished stage, on `device`
    ("auto": the GPU if there is one) and, if given, cast to `dtype`; the scores."""
    from callbacks.evaluation import (
        answer_questions,
        class_table,
        generate_captions,
        load_synonyms,
        score,
        vqa_scores,
        warn_cut,
    )
    from datamodules.caption_datamodule import CaptionDataModule
    from datamodules.captions import PromptFormat
    from datamodules.shards import INDEX_NAME

    on = eval_device(device)  # bad flags fail before the model loads
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    check_buckets(buckets, "--length_buckets")
    synonym_table = load_synonyms(synonyms, "--synonyms")
    path = Path(model_path)
    record = read_json(path / EXPORT_RECORD) if (path / EXPORT_RECORD).is_file() else None
    stage = None if record else find_stage(path, flag="--model")
    trained_shards = Path(record["shard_dir"]) if record else stage.shard_dir
    shards = Path(shard_dir) if shard_dir else trained_shards
    if not (shards / INDEX_NAME).is_file():  # before the model loads (minutes for a real one)
        raise FileNotFoundError(
            f"--data: {shards} has no {INDEX_NAME}"
            if shard_dir
            else f"{shards}, the shards {path} trained on, has no {INDEX_NAME} (moved or deleted?); give --data"
        )
    target = _load_exported_target(path, record, dtype) if record else _load_stage_target(stage, dtype)
    model = target.model.to(device=on, dtype=None if dtype is None else DTYPES[dtype])
    if not shard_dir and trained_shards.is_dir():
        _note_rebuilt_shards(target, trained_shards)
    data = CaptionDataModule(shards, max_words=10**6)
    samples = data.eval_samples(split, limit)
    if not samples:
        raise ValueError(f"--data: {shards} has no {split!r} samples")
    fmt = PromptFormat(target.tokenizer, target.num_image_tokens, target.prompt, target.chat_template)
    captions = generate_captions(
        model, samples, fmt, target.processor, batch_size, max_new_tokens=max_new_tokens, num_beams=num_beams
    )
    results = [(key, meta, text) for (key, _, meta), text in zip(samples, captions, strict=True)]
    table = class_table(synonym_table, data.index, samples, shards)
    metrics = score(sorted(results, key=lambda r: r[0]), buckets, table, sum(captions.cut))
    warn_cut("eval", sum(captions.cut), len(samples), max_new_tokens)
    if vqa:
        answers = answer_questions(model, samples, fmt, target.processor, batch_size)
        if not answers:
            raise ValueError(f"--vqa: {shards} holds no questions (rebuild the shards with the data stage)")
        metrics.update(vqa_scores(answers))
    return {
        "model": target.source,
        "data": {"shard_dir": str(shards), "split": split, "images": len(samples)},
        "generation": {
            "max_new_tokens": max_new_tokens,
            "num_beams": num_beams,
            "do_sample": False,
            **({"vqa_num_beams": 1} if vqa else {}),  # answer_questions decodes greedily
        },
        "device": {"device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype)},
        "metrics": metrics,
        "captions": {key: text for key, _, text in results},
    }


def metrics_table(metrics: dict) -> str:
    """A plain-text table of the flat metrics, then the per-length buckets (their columns as scored)."""
    lines = [
        f"{name:<28} {value:8.0f}" if name in COUNTS else f"{name:<28} {value:8.4f}"
        for name, value in metrics.items()
        if not isinstance(value, dict)
    ]
    buckets = metrics.get("by_length", {})
    if buckets:
        columns = [
            c
            for c in ("chair_i", "chair_s", "recall", "attr_halluc", "mean_words")
            if c in next(iter(buckets.values()))
        ]
        lines.append(f"\n{'length bucket':<14}{'images':>8}" + "".join(f"{c:>12}" for c in columns))
        for name, m in buckets.items():
            lines.append(f"{name:<14}{int(m['images']):>8}" + "".join(f"{m[c]:>12.3f}" for c in columns))
    return "\n".join(lines)
