"""The injected faults (callbacks/fault_injection.py): what a resumed run draws."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

from callbacks.fault_injection import FaultInjection


def test_a_spike_draws_the_same_tokens_after_a_resume(micro_base):
    # The random targets came from a generator seeded once per fit and kept in no checkpoint: resumed at step 3,
    # the run drew step 2's tokens for step 3, and its losses parted from the uninterrupted run's.
    module = SimpleNamespace(vlm=SimpleNamespace(lm=AutoModelForCausalLM.from_pretrained(micro_base[1])))

    def targets(fault: FaultInjection, step: int) -> torch.Tensor:
        labels = torch.full((2, 8), -100)
        labels[:, 4:] = 1  # the caption tokens; the image and prompt positions are not scored
        fault.on_train_batch_start(SimpleNamespace(global_step=step), module, {"labels": labels}, 0)
        assert (labels[:, :4] == -100).all()
        return labels[:, 4:]

    faults = {2: "spike", 3: "spike"}
    uninterrupted = FaultInjection(faults, seed=0)
    at_2, at_3 = targets(uninterrupted, 2), targets(uninterrupted, 3)
    assert torch.equal(targets(FaultInjection(faults, seed=0), 3), at_3), "resumed at step 3"
    uninterrupted.on_fit_start(None, None)  # a second fit with the same callback: step 3 first again
    assert torch.equal(targets(uninterrupted, 3), at_3)
    assert not torch.equal(at_2, at_3) and not torch.equal(targets(FaultInjection(faults, seed=1), 3), at_3)
