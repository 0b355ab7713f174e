"""The speed levers compute what the plain path computes: same loss, same gradients, on micro models."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from datamodules.captions import PromptFormat, collate_captions
from modules.handoff import attach_lora
from modules.loading import LoraSpec, ModelConfig, build_vlm, count_image_tokens
from modules.speed import SpeedSpec, caption_loss, checkpointed_layers, decoder_layers, set_compile
from modules.training_module import LearningRates, LoRASFTModule, OptimSpec, VLMModule

CAPTIONS = ["a red circle", "two small blue squares on the left", "a big green triangle at the top right"]


def _module(
    micro_base, speed: SpeedSpec, dropout: float = 0.0, trainable=("projector", "lora")
) -> tuple[VLMModule, dict]:
    torch.manual_seed(0)
    vlm, tokenizer, processor = build_vlm(ModelConfig(), *micro_base)
    lora, optim = LoraSpec(r=4, dropout=dropout), OptimSpec(LearningRates())
    if "lora" in trainable:
        module = LoRASFTModule(vlm, lora, optim, list(trainable), speed)
    else:  # a carried adapter, frozen: what the runner builds for such a stage
        attach_lora(vlm, lora)
        module = VLMModule(vlm, list(trainable), optim, speed)
    # LoRA's B starts at zero; nonzero values make the adapter's gradients depend on the whole path.
    with torch.no_grad():
        for name, param in vlm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    fmt = PromptFormat(tokenizer, count_image_tokens(vlm, processor), "describe the image")
    side = processor.crop_size["height"]
    pixels = torch.rand(len(CAPTIONS), 3, side, side, generator=torch.Generator().manual_seed(1))
    batch = collate_captions(
        [str(i) for i in range(len(CAPTIONS))], pixels, [fmt.encode(c) for c in CAPTIONS], tokenizer.pad_token_id
    )
    assert batch["attention_mask"].min() == 0, "the batch should hold padding"
    module.train()
    return module, batch


def _loss_and_grads(module: LoRASFTModule, batch: dict, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    loss = module._loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    module.zero_grad()
    return loss.item(), grads


def _assert_same(reference, other, rtol=1e-5, atol=1e-7) -> None:
    assert other[0] == pytest.approx(reference[0], rel=rtol)
    assert reference[1].keys() == other[1].keys()
    for name, grad in reference[1].items():
        torch.testing.assert_close(other[1][name], grad, rtol=rtol * 10, atol=atol, msg=name)


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_label_only_chunked_loss_matches_the_lm_loss(micro_base, chunk):
    module, batch = _module(micro_base, SpeedSpec())
    reference = _loss_and_grads(module, batch)
    module.speed = SpeedSpec(loss_chunk_tokens=chunk)
    _assert_same(reference, _loss_and_grads(module, batch))


def test_chunked_loss_never_builds_logits_for_unlabelled_positions(micro_base):
    module, batch = _module(micro_base, SpeedSpec(loss_chunk_tokens=4))
    head = module.vlm.lm.get_base_model().get_output_embeddings()
    rows = []
    handle = head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    module._loss(batch).backward()
    handle.remove()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    # Each 4-token chunk once in forward and once more when backward recomputes it.
    assert sum(rows) == 2 * labelled
    assert max(rows) == 4
    assert labelled < batch["input_ids"].numel() / 2  # image tokens, prompt and padding are the majority


@pytest.mark.parametrize("every, expected", [(1, [0, 1]), (2, [0])])
def test_checkpointing_recomputes_the_chosen_layers_with_the_same_gradients(micro_base, every, expected):
    module, batch = _module(micro_base, SpeedSpec(), dropout=0.1)
    reference = _loss_and_grads(module, batch)
    module, batch = _module(micro_base, SpeedSpec(checkpoint_every=every), dropout=0.1)
    assert checkpointed_layers(module.vlm.lm) == expected
    calls = [0] * len(decoder_layers(module.vlm.lm))
    for i, layer in enumerate(decoder_layers(module.vlm.lm)):
        layer.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    # LoRA dropout draws the same masks in the recompute: gradients equal the unchecked run's.
    _assert_same(reference, _loss_and_grads(module, batch))
    assert calls == [2 if i in expected else 1 for i in range(len(calls))]


def test_a_frozen_adapter_drops_nothing(micro_base):
    # A stage that carries a LoRA adapter but does not train it: the adapter is part of the fixed model, as a
    # frozen tower is (eval mode). Its dropout still drew new masks every step.
    losses = {}
    for trainable in (("projector", "lora"), ("projector",)):
        module, batch = _module(micro_base, SpeedSpec(), dropout=0.5, trainable=trainable)
        losses[trainable] = [_loss_and_grads(module, batch, seed)[0] for seed in (0, 1)]
    assert losses[("projector", "lora")][0] != losses[("projector", "lora")][1], "a trained adapter drops"
    assert losses[("projector",)][0] == losses[("projector",)][1]


def test_compiled_layers_train_through_one_graph_and_generate_eagerly(micro_base):
    graphs, runs = [], []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return lambda *args: (runs.append(1), graph_module.forward(*args))[1]

    module, batch = _module(micro_base, SpeedSpec())
    reference = _loss_and_grads(module, batch)
    torch._dynamo.reset()
    set_compile(module.vlm.lm, counting_backend)
    _assert_same(reference, _loss_and_grads(module, batch))
    layers = len(decoder_layers(module.vlm.lm))
    assert len(runs) == layers, "every decoder layer should run compiled"
    # One graph serves every layer. A KV cache in training made each layer its own graph, and past
    # torch's recompile limit (8) the remaining layers of a real LM ran eagerly.
    assert len(graphs) == 1, f"{len(graphs)} graphs for {layers} identical layers"
    module.eval()
    prompt = batch["input_ids"][:1, :-1], batch["attention_mask"][:1, :-1], batch["pixel_values"][:1]
    module.vlm.generate(*prompt, max_new_tokens=3, do_sample=False)
    assert len(runs) == layers, "generation should run the layers eagerly"
    set_compile(module.vlm.lm, None)
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(module.vlm.lm))


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointed_layers_run_compiled_too(micro_base, every):
    # transformers checkpoints inside each layer class's forward: compiling that forward put the checkpoint
    # in the compiled region, dynamo gave up on it (a graph break) and every checkpointed layer ran eagerly.
    from torch._dynamo.utils import counters

    graphs, runs = [], []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return lambda *args: (runs.append(1), graph_module.forward(*args))[1]

    module, batch = _module(micro_base, SpeedSpec(), dropout=0.1)
    reference = _loss_and_grads(module, batch)
    torch._dynamo.reset()
    counters.clear()
    module, batch = _module(micro_base, SpeedSpec(checkpoint_every=every), dropout=0.1)
    set_compile(module.vlm.lm, counting_backend)
    _assert_same(reference, _loss_and_grads(module, batch))
    layers, checkpointed = len(decoder_layers(module.vlm.lm)), len(checkpointed_layers(module.vlm.lm))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(runs) == layers + checkpointed, "each layer runs compiled, a checkpointed one again in backward"


def test_compile_with_aot_autograd_matches_eager(micro_base):
    module, batch = _module(micro_base, SpeedSpec(), dropout=0.0)
    reference = _loss_and_grads(module, batch)
    torch._dynamo.reset()
    module, batch = _module(micro_base, SpeedSpec(compile="aot_eager", checkpoint_every=1, loss_chunk_tokens=8))
    _assert_same(reference, _loss_and_grads(module, batch))


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="inductor builds C++ kernels on the CPU")
def test_inductor_drops_what_eager_drops(micro_base):
    # Inductor drew its own dropout masks: with LoRA dropout 0.1 its loss was 6e-3 off eager's and its gradients
    # up to 1.8x apart, as far as eager's with another seed.
    module, batch = _module(micro_base, SpeedSpec(), dropout=0.1)
    reference = _loss_and_grads(module, batch)
    torch._dynamo.reset()
    module, batch = _module(micro_base, SpeedSpec(compile="inductor"), dropout=0.1)
    _assert_same(reference, _loss_and_grads(module, batch), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"loss_chunk_tokens": 0}, "loss_chunk_tokens"),
        ({"checkpoint_every": -1}, "checkpoint_every"),
        ({"compile": "inductr"}, "compile"),
    ],
)
def test_bad_speed_values_name_their_flag(kwargs, flag):
    with pytest.raises(ValueError, match=f"model.speed.{flag}"):
        SpeedSpec(**kwargs)


def _tiny_lm(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).train()


def test_chunked_loss_applies_gemma2_logit_softcapping():
    lm = _tiny_lm("gemma2", final_logit_softcapping=0.1, attn_implementation="eager")
    embeds = torch.randn(2, 7, 32)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    labels = torch.tensor([[-100, -100, 3, 4, 5, 6, 7], [-100, -100, 8, 9, 10, -100, -100]])
    expected = lm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss
    assert caption_loss(lm, embeds, mask, labels, chunk=3).item() == pytest.approx(expected.item(), rel=1e-5)
    lm.config.final_logit_softcapping = None  # without the cap the loss differs: the test sees it
    assert caption_loss(lm, embeds, mask, labels, chunk=3).item() != pytest.approx(expected.item(), rel=1e-3)


def test_chunked_loss_refuses_scaled_logits():
    lm = _tiny_lm("cohere", logit_scale=0.5)
    with pytest.raises(ValueError, match="logit_scale"):
        caption_loss(lm, torch.randn(1, 4, 32), torch.ones(1, 4), torch.tensor([[-100, 1, 2, 3]]), chunk=2)


def test_a_batch_without_labelled_tokens_has_loss_zero_with_the_chunked_loss(micro_base):
    # The validation padding batches (pad_batches) score no token: the chunked loss raised on them, and every
    # real profile (loss_chunk_tokens 1024) crashed at its first multi-rank validation.
    from datamodules.captions import pad_batches

    module, batch = _module(micro_base, SpeedSpec(loss_chunk_tokens=4))
    padding = list(pad_batches(iter([batch]), 2))[1]
    assert float(module._loss(padding)) == 0.0
    module.on_validation_epoch_start()
    module.validation_step(padding, 0)
    assert float(module._val_tokens) == 0.0


def _head_calls_on_two_ranks(rank: int, port: int, micro_base, out: str) -> None:
    import json
    from pathlib import Path

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    module, batch = _module(micro_base, SpeedSpec(loss_chunk_tokens=4))
    if rank == 1:  # one caption of three: fewer labelled tokens, fewer chunks of its own
        batch["labels"][1:] = -100
    head = module.vlm.lm.get_base_model().get_output_embeddings()
    calls = []
    head.register_forward_hook(lambda mod, args, output: calls.append(args[0].shape[0]))
    module._loss(batch).backward()
    Path(out, f"rank{rank}.json").write_text(json.dumps(calls))
    dist.destroy_process_group()


def test_every_rank_calls_the_output_layer_as_often_with_the_chunked_loss(micro_base, tmp_path):
    # Under ZeRO-3 each call of the output layer gathers its weight from every rank: ranks with different
    # numbers of labelled tokens made different numbers of calls and waited for each other for ever.
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_head_calls_on_two_ranks, args=(port, micro_base, str(tmp_path)), nprocs=2)
    calls = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(calls[0]) == len(calls[1]) and sum(calls[1]) < sum(calls[0])
    assert 0 in calls[1]  # rank 1's extra chunks are empty
