"""Invariants of the training modules on micro models: what trains, what stays frozen, what carries over."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from callbacks.evaluation import generate_captions
from datamodules.caption_datamodule import CaptionDataModule
from modules.handoff import attach_lora, has_lora, load_handoff, save_handoff
from modules.loading import LoraSpec, ModelConfig, build_vlm, count_image_tokens
from modules.training_module import AlignModule, LearningRates, LoRASFTModule, OptimSpec, VLMModule, group_parameters


def _vlm(micro_base):
    return build_vlm(ModelConfig(), *micro_base)


def _fit(module, vlm, tokenizer, processor, micro_world, steps=3, max_words=8):
    data = CaptionDataModule(micro_world, max_words=max_words, batch_size=8)
    data.connect(tokenizer, processor, count_image_tokens(vlm, processor), "describe the image")
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=data)
    return data


def _snapshot(module: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.detach().numpy().tobytes() for k, v in module.state_dict().items()}


def test_align_changes_only_the_projector(micro_base, micro_world):
    vlm, tokenizer, processor = _vlm(micro_base)
    vision, lm, projector = _snapshot(vlm.vision), _snapshot(vlm.lm), _snapshot(vlm.projector)
    module = AlignModule(vlm, OptimSpec(LearningRates(projector=1e-2)))
    _fit(module, vlm, tokenizer, processor, micro_world)
    assert _snapshot(vlm.vision) == vision  # parameters and BatchNorm statistics alike
    assert _snapshot(vlm.lm) == lm
    assert _snapshot(vlm.projector) != projector


@pytest.mark.parametrize("trainable", [["projector", "lora"], ["lora"]], ids=["projector+lora", "lora-only"])
def test_trainable_set_matches_the_stage_spec(micro_base, micro_world, trainable):
    vlm, tokenizer, processor = _vlm(micro_base)
    module = LoRASFTModule(vlm, LoraSpec(r=4), OptimSpec(LearningRates()), trainable)
    groups = group_parameters(vlm)
    for name, params in groups.items():
        assert all(p.requires_grad == (name in trainable) for p in params), name
    before = {name: [p.detach().clone() for p in params] for name, params in groups.items()}
    _fit(module, vlm, tokenizer, processor, micro_world)
    for name, params in groups.items():
        changed = any(not torch.equal(a, b) for a, b in zip(before[name], params, strict=True))
        assert changed == (name in trainable), name


def test_lora_and_projector_carry_to_the_next_stage(micro_base, micro_world, tmp_path):
    vlm, tokenizer, processor = _vlm(micro_base)
    module = LoRASFTModule(vlm, LoraSpec(r=4), OptimSpec(LearningRates()), ["projector", "lora"])
    _fit(module, vlm, tokenizer, processor, micro_world)
    save_handoff(vlm, tmp_path / "export")
    trained = {k: v.clone() for k, v in vlm.state_dict().items() if "lora_" in k or k.startswith("projector.")}

    fresh, _, _ = _vlm(micro_base)
    load_handoff(fresh, tmp_path / "export")
    assert has_lora(fresh)
    loaded = fresh.state_dict()
    assert trained and all(torch.equal(loaded[k], v) for k, v in trained.items())
    # The carried adapter trains on in the next stage.
    LoRASFTModule(fresh, LoraSpec(r=4), OptimSpec(LearningRates()), ["projector", "lora"])
    assert all(p.requires_grad for p in group_parameters(fresh)["lora"])


def test_saved_and_reloaded_model_generates_the_same_tokens(micro_base, micro_world, tmp_path):
    vlm, tokenizer, processor = _vlm(micro_base)
    attach_lora(vlm, LoraSpec(r=4))
    module = LoRASFTModule(
        vlm, LoraSpec(r=4), OptimSpec(LearningRates(projector=1e-2, lora=1e-2)), ["projector", "lora"]
    )
    data = _fit(module, vlm, tokenizer, processor, micro_world, steps=6)
    save_handoff(vlm, tmp_path / "export")
    samples = data.eval_samples("test", limit=6)
    before = generate_captions(vlm.eval(), samples, data.format, processor, 4, max_new_tokens=10)

    reloaded, _, _ = _vlm(micro_base)
    load_handoff(reloaded, tmp_path / "export")
    after = generate_captions(reloaded.eval(), samples, data.format, processor, 4, max_new_tokens=10)
    assert before == after and any(before)


def test_lora_on_a_missing_module_names_it(micro_base):
    vlm, _, _ = _vlm(micro_base)
    with pytest.raises(ValueError, match="not_a_proj"):
        attach_lora(vlm, LoraSpec(target_modules=["q_proj", "not_a_proj"]))


def test_a_tower_and_lm_trained_in_full_carry_through_later_stages(micro_base, micro_world, tmp_path):
    # The handoff held only the projector and the adapter: a stage that trained "vision" or "lm" was lost to
    # the next stage and to the export (the tower's BatchNorm statistics too).
    from modules.training_module import VLMModule

    vlm, tokenizer, processor = _vlm(micro_base)
    base_lm = _snapshot(vlm.lm)
    full = VLMModule(vlm, ["projector", "vision", "lm"], OptimSpec(LearningRates(vision=1e-2, lm=1e-2)))
    _fit(full, vlm, tokenizer, processor, micro_world)
    kept = full.state_dict()
    full.on_save_checkpoint(checkpoint := {"state_dict": kept})
    assert any("running_mean" in k for k in checkpoint["state_dict"]), "a resume keeps the trained statistics"
    save_handoff(vlm, tmp_path / "full")
    vision, lm = _snapshot(vlm.vision), _snapshot(vlm.lm)
    assert lm != base_lm

    nxt, _, _ = _vlm(micro_base)
    load_handoff(nxt, tmp_path / "full")
    assert _snapshot(nxt.vision) == vision and _snapshot(nxt.lm) == lm
    sft = LoRASFTModule(nxt, LoraSpec(r=4), OptimSpec(LearningRates()), ["projector", "lora"])
    _fit(sft, nxt, tokenizer, processor, micro_world)
    save_handoff(nxt, tmp_path / "sft")  # the parts trained two stages ago, handed on

    last, _, _ = _vlm(micro_base)
    load_handoff(last, tmp_path / "sft")
    assert has_lora(last) and _snapshot(last.vision) == vision
    base = _snapshot(last.lm.get_base_model())  # under the adapter: stage 1's weights, not the base folder's
    assert {k.replace(".base_layer.", "."): v for k, v in base.items() if "lora_" not in k} == lm


def test_each_caption_is_conditioned_on_its_own_image(micro_base):
    """Logits of a sample in a batch equal those of the sample alone: the image tokens land in their own
    sequence (images swapped across a batch passed every fast test; only the slow golden curve saw it)."""
    from datamodules.captions import PromptFormat

    torch.manual_seed(0)
    vlm, tokenizer, processor = _vlm(micro_base)
    vlm.eval()
    fmt = PromptFormat(tokenizer, count_image_tokens(vlm, processor), "describe the image")
    side = processor.crop_size["height"]
    pixels = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([fmt.encode("a red circle")[0]] * 2)  # the same text: only the images differ
    with torch.no_grad():
        batch = vlm(ids, torch.ones_like(ids), pixels).logits
        alone = [vlm(ids[:1], torch.ones_like(ids[:1]), pixels[i : i + 1]).logits[0] for i in range(2)]
    assert not torch.allclose(alone[0], alone[1])  # the image matters
    assert torch.allclose(batch[0], alone[0], atol=1e-5) and torch.allclose(batch[1], alone[1], atol=1e-5)


class _ModesAtFirstBatch(L.Callback):
    """The train/eval flag of every module of the VLM when the first training batch starts."""

    def __init__(self) -> None:
        self.modes: dict[str, bool] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.modes:
            self.modes = {name: module.training for name, module in pl_module.vlm.named_modules()}


@pytest.mark.parametrize("trainable", [["projector", "lora"], ["projector", "vision"]], ids=["lora", "vision"])
def test_what_trains_is_in_train_mode_from_the_first_batch(micro_base, micro_world, trainable):
    """Models load in eval mode (from_pretrained), and Lightning 2.6 leaves modes as it finds them: the LM, its LoRA
    dropout and a trainable tower's BatchNorm ran in eval mode until the first evaluation switched the module back
    with `train()`. Checkpointing and compile act only in train mode, so with no evaluation during a stage (the
    real profiles) they did nothing, and the evaluation interval changed the trained weights."""
    vlm, tokenizer, processor = _vlm(micro_base)
    assert not vlm.lm.training  # as loaded
    lora, optim = LoraSpec(r=4, dropout=0.1), OptimSpec(LearningRates(vision=1e-4))
    if "lora" in trainable:
        module = LoRASFTModule(vlm, lora, optim, trainable)
    else:  # an adapter carried in and frozen, as the runner builds such a stage
        attach_lora(vlm, lora)
        module = VLMModule(vlm, trainable, optim)
    modes = _ModesAtFirstBatch()
    data = CaptionDataModule(micro_world, max_words=8, batch_size=8)
    data.connect(tokenizer, processor, count_image_tokens(vlm, processor), "describe the image")
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", callbacks=[modes],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    lm = {name: on for name, on in modes.modes.items() if name.startswith("lm.")}
    vision = {name: on for name, on in modes.modes.items() if name.startswith("vision.")}
    dropouts = [on for name, on in lm.items() if "lora_dropout" in name.split(".")]
    rest = {name: on for name, on in lm.items() if "lora_dropout" not in name.split(".")}
    assert dropouts and all(rest.values()), [name for name, on in rest.items() if not on][:5]
    assert all(dropouts) if "lora" in trainable else not any(dropouts)  # a frozen adapter drops nothing
    assert all(vision.values()) if "vision" in trainable else not any(vision.values())


def test_a_float64_lm_gets_a_float64_projector(micro_base, tmp_path):
    """The projector was always float32: a float64 run (the golden curves' precision) rounded the projector of
    every resume and handoff to float32 before Lightning cast the model to float64."""
    from modules.vlm import VisionLanguageModel

    vlm, _, _ = _vlm(micro_base)
    assert vlm.projector.net[0].weight.dtype == torch.float32  # a float32 or bf16 LM: float32 master weights
    double = VisionLanguageModel(vlm.vision.double(), vlm.lm.double(), vlm.vision_width, vlm.image_token_id, vlm.grid)
    assert all(p.dtype == torch.float64 for p in double.projector.parameters())
    with torch.no_grad():
        double.projector.net[0].weight.add_(1e-12)  # below float32's resolution
    save_handoff(double, tmp_path / "export")
    again = VisionLanguageModel(vlm.vision, vlm.lm, vlm.vision_width, vlm.image_token_id, vlm.grid)
    load_handoff(again, tmp_path / "export")
    assert torch.equal(again.projector.net[0].weight, double.projector.net[0].weight)
