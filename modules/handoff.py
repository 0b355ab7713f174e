"""What one stage hands to the next: the projector weights, the LoRA adapter, and fully trained parts.

A stage's `export/` folder holds `projector.safetensors`; once LoRA is in play, `adapter/` (PEFT's
`save_pretrained` format); and once a stage has trained the vision tower or the language model in full
(`trainable` "vision" / "lm"), `vision.safetensors` / `lm.safetensors` with their weights and buffers
(BatchNorm statistics), carried by every later stage. The next stage's `init_from` names the folder to
start from. Under DeepSpeed bf16/fp16 the trained weights are the optimizer's float32 master copies, and a
part (the adapter too) carried but frozen in a stage is handed on as the file it came from: DeepSpeed casts
frozen weights to bf16 too, which would round them for every later stage.
"""

from __future__ import annotations

import errno
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from modules.loading import TIED, LoraSpec, ModelFolderError, tied_embedding_targets
from modules.vlm import VisionLanguageModel

PROJECTOR_FILE = "projector.safetensors"
ADAPTER_DIR = "adapter"
FULL_FILES = {"vision": "vision.safetensors", "lm": "lm.safetensors"}
# What the handoff holds, written with it: a part found missing later (an adapter/ deleted by hand) is an error,
# not a model loaded without it (scored and exported with the base LM's weights in its LoRA's place, unsaid).
MANIFEST = "handoff.json"


def full_parts(folder: Path) -> set[str]:
    """The parts ("vision", "lm") a handoff folder carries in full: trained in full by its stage or an earlier one."""
    return {group for group, name in FULL_FILES.items() if (folder / name).is_file()}


def has_lora(vlm: VisionLanguageModel) -> bool:
    return isinstance(vlm.lm, PeftModel)


def attach_lora(vlm: VisionLanguageModel, spec: LoraSpec) -> None:
    """Wraps the language model with a fresh LoRA adapter on `spec.target_modules`."""
    names = {name.rsplit(".", 1)[-1] for name, _ in vlm.lm.named_modules()}
    missing = sorted(set(spec.target_modules) - names)
    if missing:
        raise ValueError(f"model.lora.target_modules: {missing} are not modules of the language model")
    tied = tied_embedding_targets(vlm.lm, spec.target_modules)
    if tied:
        raise ValueError(f"model.lora.target_modules: {tied}: {TIED}")
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules)
    vlm.lm = get_peft_model(vlm.lm, config)


@contextmanager
def gathered(params: list[torch.nn.Parameter]):
    """Full tensors of DeepSpeed ZeRO-3 partitioned `params` inside the block (a collective: every rank
    must enter it); a no-op for ordinary parameters."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def _master(param: torch.nn.Parameter) -> torch.Tensor:
    """The parameter as the optimizer keeps it: DeepSpeed's float32 master copy of a trained parameter in a
    bf16/fp16 run (the parameter itself is rounded), else the parameter. A collective under DeepSpeed."""
    if param.requires_grad and (hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")):
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(param)
        if master is not None:
            return master
    return param


def _cpu(named) -> dict[str, torch.Tensor]:
    return {name: _master(tensor).detach().cpu().clone().contiguous() for name, tensor in named}


def _part(vlm: VisionLanguageModel, part: str) -> torch.nn.Module:
    return {"projector": vlm.projector, "vision": vlm.vision, "lm": vlm.lm}[part]


def _full_state(vlm: VisionLanguageModel, group: str) -> dict[str, torch.Tensor]:
    """A fully trained part's parameters and buffers, under the plain model's names (no PEFT wrapping)."""
    module = _part(vlm, group)
    params = dict(module.named_parameters(remove_duplicate=False))  # a tied lm_head too: else its rounded copy
    state = {}
    for name, tensor in module.state_dict().items():
        if "lora_" in name:
            continue
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        state[plain] = (_master(params[name]) if name in params else tensor).detach().cpu().clone().contiguous()
    return state


def _carried(vlm: VisionLanguageModel, part: str) -> Path | None:
    """The file `part` was loaded from, when this stage did not train it: handed on as it came."""
    frozen = not any(p.requires_grad for name, p in _part(vlm, part).named_parameters() if "lora_" not in name)
    return vlm.handed_from.get(part) if frozen else None


def save_handoff(vlm: VisionLanguageModel, out_dir: Path, write: bool = True) -> list[str]:
    """Writes the projector, the adapter, and the parts in `vlm.full_groups`. Every rank calls it under
    DeepSpeed (`write` on rank 0 only): ZeRO-3 weights are gathered first, or the files would hold empty
    partitions, and master copies are assembled across ranks. A part carried but frozen here is copied from
    its file, neither gathered nor assembled. Returns the names of the trained tensors that hold NaN or inf
    (rank 0; a run whose alerts only warn trains on through them)."""
    files = {"projector": PROJECTOR_FILE, **{group: FULL_FILES[group] for group in sorted(vlm.full_groups)}}
    carried = {part: _carried(vlm, part) for part in files}
    trained = [part for part in files if carried[part] is None]
    lora = [(n, p) for n, p in vlm.lm.named_parameters() if "lora_" in n]
    # An adapter carried but frozen here is copied as it came too (DeepSpeed bf16 had it rounded for later stages).
    adapter_source = vlm.handed_from.get("adapter") if lora and not any(p.requires_grad for _, p in lora) else None
    lora = lora if adapter_source is None else []
    with gathered([*(p for _, p in lora), *(p for part in trained for p in _part(vlm, part).parameters())]):
        states = {
            part: _cpu(vlm.projector.named_parameters()) if part == "projector" else _full_state(vlm, part)
            for part in trained
        }
        adapter = _cpu(lora)
        if not write:
            return []
        out_dir.mkdir(parents=True, exist_ok=True)
        for part, source in carried.items():
            if source is not None:
                shutil.copyfile(source, out_dir / files[part])
        for part, state in states.items():
            save_file(state, str(out_dir / files[part]))
        if adapter_source is not None:
            shutil.rmtree(out_dir / ADAPTER_DIR, ignore_errors=True)
            shutil.copytree(adapter_source, out_dir / ADAPTER_DIR)
        elif has_lora(vlm):
            vlm.lm.save_pretrained(out_dir / ADAPTER_DIR, state_dict=adapter)
        held = [*files.values(), *([ADAPTER_DIR] if has_lora(vlm) else [])]
        (out_dir / MANIFEST).write_text(json.dumps({"files": held}))
    tensors = {**adapter, **{f"{part}.{name}": t for part, state in states.items() for name, t in state.items()}}
    return [name for name, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()]


def _read(path: Path) -> dict:
    """A handoff file's tensors; a damaged file fails naming itself (safetensors' own error names no file)."""
    try:  # opened here first: safetensors reports every failure to open as FileNotFoundError, without errno
        path.open("rb").close()
    except OSError as error:
        if error.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise  # the disk's error (EIO, EACCES), naming the file: the stage is whole, not to be deleted
    try:
        return load_file(str(path))
    except Exception as error:
        raise ModelFolderError(
            f"{path} cannot be read ({error}); delete its stage folder ({path.parent.parent}) to train that stage again"
        ) from error


def check_handoff(from_dir: Path, label: str) -> None:
    """Fails, `label` first (the flag or key that named the stage), when the handoff folder lacks the projector
    or a part its manifest lists (handoffs written before the manifest: the projector only)."""
    if not (from_dir / PROJECTOR_FILE).is_file():
        raise FileNotFoundError(f"{label}: {from_dir} has no {PROJECTOR_FILE}; did that stage finish?")
    manifest = from_dir / MANIFEST
    listed = json.loads(manifest.read_text())["files"] if manifest.is_file() else []
    missing = [name for name in listed if not (from_dir / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{label}: {from_dir} lacks {', '.join(missing)}, which its stage wrote ({MANIFEST}); loaded without it, "
            f"the stage's weights would be lost unsaid. Restore it, or delete {from_dir.parent} to train that stage "
            "again"
        )


def load_handoff(vlm: VisionLanguageModel, from_dir: Path, label: str = "init_from") -> None:
    """Loads the projector, fully trained parts and, if the folder has one, the LoRA adapter (trainable)."""
    check_handoff(from_dir, label)
    projector = from_dir / PROJECTOR_FILE
    vlm.projector.load_state_dict(_read(projector))
    vlm.handed_from["projector"] = projector
    for group, name in FULL_FILES.items():  # before the adapter, which wraps the language model
        if (from_dir / name).is_file():
            if has_lora(vlm):
                raise RuntimeError("load_handoff expects a language model without an adapter")
            _part(vlm, group).load_state_dict(_read(from_dir / name))
            vlm.full_groups.add(group)
            vlm.handed_from[group] = from_dir / name
    if (from_dir / ADAPTER_DIR).is_dir():
        if has_lora(vlm):
            raise RuntimeError("load_handoff expects a language model without an adapter")
        vlm.lm = PeftModel.from_pretrained(vlm.lm, from_dir / ADAPTER_DIR, is_trainable=True)
        vlm.handed_from["adapter"] = from_dir / ADAPTER_DIR
