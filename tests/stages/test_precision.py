"""Precision across stages: a stage's handoff is loaded in the dtype it trains in, and a model is cast as its
training cast it when it is scored again (`eval`, a rescore)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages.run import main
from tests.conftest import MICRO_ARGS


class Killed(BaseException):
    """Stops the run where the test has seen what it needs (Lightning re-raises it)."""


def _run(run_dir: Path, *extra: str) -> int:
    return main(["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS, *extra])


def test_a_float64_stage_starts_from_its_float64_handoff_unrounded(tmp_path, monkeypatch):
    """Under 64-true with float32 base models, the next stage loaded the float64 handoff into the float32 model
    and Lightning cast it back to float64 only when the fit started: its low bits were lost."""
    import stages.stage
    from modules.handoff import load_handoff

    loaded = {}

    def load_and_stop(vlm, from_dir):
        load_handoff(vlm, from_dir)
        loaded["projector"] = {k: v.clone() for k, v in vlm.projector.state_dict().items()}
        loaded["from"] = from_dir
        raise Killed

    monkeypatch.setattr(stages.stage, "load_handoff", load_and_stop)
    with pytest.raises(Killed):
        _run(
            tmp_path / "run",
            "--trainer.precision=64-true",
            "--base.dtype=float32",
            "--stages.align.trainer.max_steps=4",
        )
    from safetensors.torch import load_file

    saved = load_file(loaded["from"] / "projector.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float64}
    assert all(torch.equal(loaded["projector"][k], v) for k, v in saved.items())


def test_a_model_is_cast_as_its_training_cast_it():
    """DeepSpeed's bf16 casts parameters only: RoPE's inv_freq stays float32 (rounded, its angles drift by
    radians over a long sequence); a "-true" precision casts buffers too; BatchNorm statistics follow weights."""
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.config import cast_as_trained

    def model():
        lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=64))  # fmt: skip
        return nn.ModuleDict({"lm": lm, "norm": nn.BatchNorm2d(4)})

    def dtypes(module, kind):
        return {str(t.dtype) for n, t in getattr(module, f"named_{kind}")() if t.is_floating_point() and "inv" in n}

    deepspeed = model()
    cast_as_trained(deepspeed, "bf16-mixed", "deepspeed")
    assert {p.dtype for p in deepspeed.parameters()} == {torch.bfloat16}
    assert dtypes(deepspeed, "buffers") == {"torch.float32"}
    assert deepspeed["norm"].running_mean.dtype == torch.bfloat16
    for strategy in (None, "deepspeed"):  # Lightning casts the whole module for a "-true" precision, first
        true = model()
        cast_as_trained(true, "bf16-true", strategy)
        assert dtypes(true, "buffers") == {"torch.bfloat16"}
        assert {p.dtype for p in true.parameters()} == {torch.bfloat16}
    mixed = model()
    cast_as_trained(mixed, "bf16", "ddp")
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}


def test_an_lm_trained_in_full_from_bf16_storage_keeps_float32_masters(tmp_path, monkeypatch):
    """With `model.dtype: bfloat16` and no DeepSpeed, AdamW wrote its updates into the bf16 LM itself, where most
    rounded away: 3 steps moved 12% of the LM's weights (95% with float32 storage). Then the next stage loaded
    the float32 handoff into bf16 (23% of the weights still moved), trained its LoRA there, and handed on the
    float32 file, onto which the export merged that LoRA."""
    from safetensors.torch import load_file

    import stages.stage
    from modules.handoff import _full_state, load_handoff

    loaded = {}

    def load_and_look(vlm, from_dir):
        load_handoff(vlm, from_dir)
        loaded[Path(from_dir).parent.name] = _full_state(vlm, "lm")

    monkeypatch.setattr(stages.stage, "load_handoff", load_and_look)
    run = tmp_path / "run"
    assert _run(run, "--model.dtype=bfloat16", "--stages.sft_short.trainable=[projector, lm]") == 0
    base, trained = load_file(run / "base/lm/model.safetensors"), load_file(run / "sft_short/export/lm.safetensors")
    # The base is float32 on disk; model.dtype rounds it to bf16 when it loads, before the stage trains.
    moved = sum((v.float() != base[k].to(torch.bfloat16).float()).sum().item() for k, v in trained.items())
    assert moved / sum(v.numel() for v in trained.values()) > 0.8
    assert {v.dtype for v in trained.values()} == {torch.float32}
    # Scored again (`eval`), the stage is built as it trained: the float32 LM, not its weights rounded to bf16.
    from stages.export import find_stage, load_stage_model

    vlm = load_stage_model(find_stage(run, "sft_short"), as_trained=True)[0]
    state = vlm.lm.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    # The next stage (LoRA on the carried LM) trains on the float32 LM it is handed, as the export merges it.
    assert all(torch.equal(loaded["sft_short"][k], v) for k, v in trained.items())
    assert load_file(run / "sft_medium/export/lm.safetensors").keys() == trained.keys()
    vlm = load_stage_model(find_stage(run, "sft_medium"), as_trained=True)[0]
    assert all(torch.equal(_full_state(vlm, "lm")[k], v) for k, v in trained.items())
