"""Speed and memory levers for training the language model, set with `--model.speed.*`.

- `loss_chunk_tokens`: the cross-entropy over caption tokens only, a chunk at a time. The LM's own
  loss computes logits for every position, image tokens included (576 of 832 per sample in the
  MGM-2B shape), and holds them all, upcast to float32, with their gradient: for a 256k vocabulary
  that is several GiB per batch. Here only the positions that have a label reach the output layer,
  and each chunk's logits are recomputed in backward instead of kept.
- `checkpoint_every`: activation checkpointing of every n-th decoder layer (transformers'
  checkpointing, turned on for the model, then kept on every n-th layer's flag only): 1 recomputes every
  layer in backward, larger values trade memory back for speed.
- `compile`: `torch.compile` of each decoder layer (regional compilation: one graph reused by every
  layer, so compiling takes seconds, not minutes). Only the training forward is compiled; generation
  in evaluation runs eagerly, where every new sequence length would otherwise compile again.

None of them changes what is computed beyond float rounding (tests/modules/test_speed.py checks losses
and gradients against the plain path); `stages.run bench train` measures what each
one buys.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from datamodules.captions import IGNORE_INDEX


@dataclass
class SpeedSpec:
    """Training-speed levers; the defaults are the language model's plain training path."""

    loss_chunk_tokens: int | None = None
    """Cross-entropy over labelled positions only, this many tokens' logits at a time; unset: the LM's own loss."""
    checkpoint_every: int = 0
    """Activation checkpointing of every n-th decoder layer of the LM (1: every layer); 0: off."""
    compile: str | None = None
    """torch.compile backend for each decoder layer's training forward ("inductor"); unset: eager."""

    def __post_init__(self) -> None:
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 1:
            raise ValueError(f"model.speed.loss_chunk_tokens must be positive or null, got {self.loss_chunk_tokens}")
        if self.checkpoint_every < 0:
            raise ValueError(f"model.speed.checkpoint_every must be 0 (off) or positive, got {self.checkpoint_every}")
        if isinstance(self.compile, str):  # checked here, not when the first stage compiles
            import torch._dynamo

            if self.compile not in torch._dynamo.list_backends(exclude_tags=()):
                raise ValueError(
                    f"model.speed.compile: no torch.compile backend {self.compile!r} "
                    f"(common ones: {', '.join(torch._dynamo.list_backends())})"
                )


def base_lm(lm: nn.Module) -> nn.Module:
    """The transformers causal LM, under a PEFT wrapper if there is one."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    decoder = base_lm(lm).get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(decoder).__name__} keeps no `layers` list: model.speed cannot find its decoder layers")
    return layers


def set_checkpointing(lm: nn.Module, every: int) -> None:
    """Checkpoint every `every`-th decoder layer (non-reentrant, so frozen inputs need no grad hooks)."""
    model = base_lm(lm)
    # transformers 5.23 renamed gradient_checkpointing_enable to activation_checkpointing_enable.
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{prefix}_checkpointing_enable")(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
    for index, layer in enumerate(decoder_layers(lm)):  # every n-th layer, as in any transformers version
        layer.gradient_checkpointing = index % every == 0


def checkpointed_layers(lm: nn.Module) -> list[int]:
    """Indices of the decoder layers that recompute their activations in backward."""
    return [i for i, layer in enumerate(decoder_layers(lm)) if getattr(layer, "gradient_checkpointing", False)]


def _checkpointing_wrapped(layer: nn.Module):
    """The class's forward inside transformers' checkpointing wrapper (transformers >= 5.2x wraps every
    decoder layer class's forward in `forward_with_checkpointing`), bound to `layer`; None if unwrapped."""
    forward = type(layer).forward
    if getattr(getattr(forward, "__code__", None), "co_name", None) != "forward_with_checkpointing":
        return None
    return forward.__wrapped__.__get__(layer)


def set_compile(lm: nn.Module, backend: str | None) -> None:
    """Route each decoder layer's training forward through `torch.compile(backend)`; None: back to eager.

    A checkpointed layer is checkpointed outside the compiled code: transformers checkpoints inside the class's
    forward, and a checkpoint within a compiled region makes dynamo give up on the layer, which then ran
    eagerly with no word but a graph-break count."""
    for layer in decoder_layers(lm):
        layer.__dict__.pop("forward", None)  # the class's forward again
        if backend is None:
            continue
        eager, inner = layer.forward, _checkpointing_wrapped(layer)
        # Inductor draws its own dropout masks unless told to take eager's: LoRA's dropout (on in every profile)
        # then dropped other inputs than the eager run (the loss 6e-3 off, gradients 1.8x, as far as another seed).
        options = {"fallback_random": True} if backend == "inductor" else None
        compiled = torch.compile(inner or eager, backend=backend, options=options)

        def forward(*args, _layer=layer, _eager=eager, _compiled=compiled, _ours=inner is not None, **kwargs):
            if not _layer.training:
                return _eager(*args, **kwargs)
            if _ours and _layer.gradient_checkpointing and torch.is_grad_enabled():
                if kwargs.get("use_cache") or kwargs.get("past_key_values") is not None:
                    return _eager(*args, **kwargs)  # a cache in training: transformers' own handling
                return _layer._gradient_checkpointing_func(partial(_compiled, **kwargs), *args)
            return _compiled(*args, **kwargs)

        layer.forward = forward


def apply_speed(lm: nn.Module, spec: SpeedSpec) -> None:
    """Sets the checkpointing and compile levers of `spec` on `lm` (the loss lever is read per step).
    With both off the model is left untouched."""
    if spec.checkpoint_every:
        set_checkpointing(lm, spec.checkpoint_every)
    if spec.compile:
        set_compile(lm, spec.compile)


def _output_transform(lm: nn.Module):
    """What the LM applies to the output layer's logits: nothing, or Gemma-2-style tanh soft-capping."""
    config = base_lm(lm).config
    for name in ("logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(
                f"{type(config).__name__} scales its logits ({name}); model.speed.loss_chunk_tokens "
                "does not reproduce that: leave it unset for this language model"
            )
    cap = getattr(config, "final_logit_softcapping", None)
    return (lambda logits: torch.tanh(logits / cap) * cap) if cap else (lambda logits: logits)


def caption_loss(lm: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, chunk: int):
    """The LM's next-token loss (mean over labelled positions), computed on the labelled positions only,
    `chunk` of them at a time, each chunk's logits recomputed in backward rather than stored. A batch without
    a labelled position (a validation padding batch) has loss 0.

    Under ZeRO-3 every call of the output layer gathers its partitioned weight from every rank, so every rank
    makes as many calls: as many chunks as the rank with the most labelled positions (the others' extra
    chunks are empty). Ranks with different numbers of chunks waited for each other's gathers for ever."""
    model = base_lm(lm)
    decoder = model.get_decoder()
    hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][keep], targets[keep]
    head, transform = model.get_output_embeddings(), _output_transform(lm)

    def chunk_loss(states: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(transform(head(states)).float(), chunk_targets, reduction="sum")

    chunks = -(-targets.numel() // chunk)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        most = torch.tensor(chunks, device=hidden.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        chunks = int(most)
    total = hidden.sum().float() * 0  # 0, on the graph: a batch without labels still has a gradient (zero)
    for start in range(0, chunks * chunk, chunk):
        part = slice(start, start + chunk)  # past this rank's positions: empty, a call that adds 0
        total = total + checkpoint(chunk_loss, hidden[part], targets[part], use_reentrant=False)
    return total / max(targets.numel(), 1)
