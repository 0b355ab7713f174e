"""Deliberate faults at chosen optimizer steps, to check that the stability alerts fire (chaos testing).

Set `stability.faults` to a mapping from optimizer step to fault kind, for example
`--stability.faults '{80: spike}'`. Faults change the batch in place before the forward pass, or a
gradient after the backward pass, so the alerts see exactly what a real fault would produce:

- nan: the images become NaN, and so do the loss and the gradients;
- spike: the caption targets are replaced by random tokens, so the loss jumps several-fold;
- bad_batch: the images are scaled 1000x (a broken decoder or normalisation), so gradients explode;
- inf_grad: one gradient entry becomes Inf after the backward pass.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from typing_extensions import override

FAULTS = ("nan", "spike", "bad_batch", "inf_grad")


def check_faults(faults: dict[int, str]) -> None:
    unknown = sorted(set(faults.values()) - set(FAULTS))
    if unknown:
        raise ValueError(f"stability.faults: unknown fault kinds {unknown}; expected {FAULTS}")
    negative = sorted(int(step) for step in faults if int(step) < 0)
    if negative:  # steps count from 0: a negative one never comes
        raise ValueError(f"stability.faults: steps must not be negative, got {negative}")


class FaultInjection(L.Callback):
    def __init__(self, faults: dict[int, str], seed: int = 0) -> None:
        check_faults(faults)
        self.faults = {int(step): kind for step, kind in faults.items()}
        self.seed = seed
        self._noise: tuple[int, torch.Generator] | None = None  # (step, its generator)

    def _generator(self, step: int) -> torch.Generator:
        """The random tokens' generator of `step`, seeded by the seed and the step: one seeded once per fit drew
        other tokens after a resume than the uninterrupted run (it is in no checkpoint), and the losses parted."""
        if self._noise is None or self._noise[0] != step:
            self._noise = (step, torch.Generator().manual_seed(self.seed * 1_000_003 + step))
        return self._noise[1]

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        self._noise = None  # a second fit's first spike at the step of the first fit's last starts afresh

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        kind = self.faults.get(trainer.global_step)
        if kind == "nan":
            batch["pixel_values"].fill_(math.nan)
        elif kind == "bad_batch":
            batch["pixel_values"].mul_(1000.0)
        elif kind == "spike":
            labels = batch["labels"]
            targets = labels != -100
            vocab = pl_module.vlm.lm.get_input_embeddings().num_embeddings
            generator = self._generator(trainer.global_step)
            noise = torch.randint(0, vocab, (int(targets.sum()),), generator=generator).to(labels.device)
            labels[targets] = noise

    @override
    def on_after_backward(self, trainer, pl_module) -> None:
        if self.faults.get(trainer.global_step) == "inf_grad":
            # Not next(...): a StopIteration raised in a hook ended Lightning's batch loop as if the data had run
            # out, and the run looped on the same step (under DeepSpeed, where p.grad is None; refused in config).
            param = next((p for p in pl_module.parameters() if p.grad is not None), None)
            if param is None:
                raise RuntimeError("stability.faults inf_grad: no parameter holds a gradient to corrupt")
            param.grad.view(-1)[0] = math.inf
