"""What one stage hands to the next: the projector weights and the LoRA adapter.

A stage's `export/` folder holds `projector.safetensors` and, once LoRA is in play, `adapter/`
(PEFT's `save_pretrained` format). The next stage's `init_from` names the folder to start from.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from modules.loading import LoraSpec
from modules.vlm import VisionLanguageModel

PROJECTOR_FILE = "projector.safetensors"
ADAPTER_DIR = "adapter"


def has_lora(vlm: VisionLanguageModel) -> bool:
    return isinstance(vlm.lm, PeftModel)


def attach_lora(vlm: VisionLanguageModel, spec: LoraSpec) -> None:
    """Wraps the language model with a fresh LoRA adapter on `spec.target_modules`."""
    names = {name.rsplit(".", 1)[-1] for name, _ in vlm.lm.named_modules()}
    missing = sorted(set(spec.target_modules) - names)
    if missing:
        raise ValueError(f"model.lora.target_modules: {missing} are not modules of the language model")
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


def save_handoff(vlm: VisionLanguageModel, out_dir: Path, write: bool = True) -> None:
    """Writes the projector and the adapter. Under ZeRO-3 every rank calls it (`write` on rank 0 only):
    their weights are gathered first, or the files would hold empty partitions."""
    handed = [*vlm.projector.parameters(), *(p for n, p in vlm.lm.named_parameters() if "lora_" in n)]
    with gathered(handed):
        if not write:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone().contiguous() for k, v in vlm.projector.state_dict().items()}
        save_file(state, str(out_dir / PROJECTOR_FILE))
        if has_lora(vlm):
            vlm.lm.save_pretrained(out_dir / ADAPTER_DIR)


def load_handoff(vlm: VisionLanguageModel, from_dir: Path) -> None:
    """Loads the projector and, if the folder has one, the LoRA adapter (trainable) into `vlm`."""
    projector = from_dir / PROJECTOR_FILE
    if not projector.is_file():
        raise FileNotFoundError(f"init_from: {from_dir} has no {PROJECTOR_FILE}; did that stage finish?")
    vlm.projector.load_state_dict(load_file(str(projector)))
    if (from_dir / ADAPTER_DIR).is_dir():
        if has_lora(vlm):
            raise RuntimeError("load_handoff expects a language model without an adapter")
        vlm.lm = PeftModel.from_pretrained(vlm.lm, from_dir / ADAPTER_DIR, is_trainable=True)
