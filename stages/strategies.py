"""Lightning's DeepSpeed strategy from a config file, and its CPU variant for tests; how checkpoints are written.

`trainer.strategy: deepspeed` with `trainer.deepspeed_config: configs/deepspeed/zero2.json` (or
zero3.json, zero2_offload.json) trains under `lightning.pytorch.strategies.DeepSpeedStrategy`.
Lightning refuses DeepSpeed on a non-CUDA accelerator, while DeepSpeed itself runs on CPU over
gloo; `CPUDeepSpeedStrategy` lifts only that check, so that CI exercises ZeRO-2/3 training, saving,
resuming and exporting without a GPU. It is chosen when the accelerator is "cpu", or "auto" on a
machine without CUDA.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from typing_extensions import override

from stages.paths import durable, project_file, sync_path


class CurriculumDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy without the double division of the loss under gradient accumulation.

    Lightning divides every micro-batch loss by `accumulate_grad_batches` before backward, and hands
    DeepSpeed the same number as `gradient_accumulation_steps`, whose engine divides the loss again:
    every gradient (and the norm that clipping and the stability alerts see) came out N times too
    small. The engine is told not to scale (`scale_wrt_gas=False`), so updates equal the plain run's.
    """

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer, *args, **kwargs) -> torch.Tensor:
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Writes into a fresh folder, then swaps the `filepath` link to it: a process killed while saving
        leaves the previous checkpoint whole.

        Lightning's version rewrites one folder in place (the files of tag "checkpoint" in last.ckpt/), so a
        kill during a save left a half-written last.ckpt that the rerun could not resume from. Here
        last.ckpt is a relative symbolic link to last.ckpt.a or last.ckpt.b; the save goes to the one it
        does not point to, `os.replace` moves the link atomically, and the older folder is then deleted.
        Rank 0 picks the folder for every rank; all ranks must see one shared file system, as DeepSpeed's
        own sharded checkpoints already require.
        """
        final = Path(self.broadcast(str(filepath)))
        current = _linked_folder(final) if self.is_global_zero else None
        slot = ".b" if current is not None and current.name == final.name + ".a" else ".a"
        target = final.with_name(final.name + slot)
        target = Path(self.broadcast(str(target)))
        if self.is_global_zero:
            shutil.rmtree(target, ignore_errors=True)  # a save that was killed half-way
        self.barrier("checkpoint_folder_clear")
        super().save_checkpoint(checkpoint, target, storage_options)
        self.barrier("checkpoint_written")
        if self.is_global_zero:
            if final.is_dir() and not final.is_symlink():  # a folder written in place by Lightning's own save
                shutil.rmtree(final)
            link = final.with_name(final.name + ".link")
            link.unlink(missing_ok=True)
            os.symlink(target.name, link)
            os.replace(link, final)
            if current is not None:
                shutil.rmtree(current, ignore_errors=True)
        self.barrier("checkpoint_linked")

    @override
    def remove_checkpoint(self, filepath) -> None:
        """Removes the folder that a checkpoint link points to; Lightning's removal takes only the link."""
        folder = _linked_folder(Path(filepath)) if self.is_global_zero else None
        super().remove_checkpoint(filepath)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _linked_folder(link: Path) -> Path | None:
    """The a/b folder beside `link` that it points to, or None (no link, or a link to anything else)."""
    if not link.is_symlink():
        return None
    folder = Path(os.path.realpath(link))
    beside = folder.parent == Path(os.path.realpath(link.parent))
    if beside and folder.name in (link.name + ".a", link.name + ".b"):
        return folder
    return None


class BesideCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with each save staged beside its target, not in the system's temp folder.

    Lightning writes a checkpoint through an fsspec transaction, which stages the file with
    `tempfile.mkstemp()` (in /tmp) and moves it over: every save needed room for a whole checkpoint in /tmp
    (often a small tmpfs), the move was a copy, not an atomic rename, when /tmp is another file system, and a
    process killed in between left the file in /tmp for good. Here the save goes to `.<name>.partial` beside
    the target, then `os.replace`: a kill leaves the previous checkpoint whole, and the next save overwrites
    the partial file. For local run folders, which the curriculum's are; DeepSpeed saves its own way.
    """

    @override
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        try:
            with partial.open("wb") as out:
                torch.save(checkpoint, out)
                durable(out)
        except OSError:  # a full disk: the partial file would keep it full
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, target)
        sync_path(target.parent)


class CPUDeepSpeedStrategy(CurriculumDeepSpeedStrategy):
    """DeepSpeed over gloo on CPU: for tests only (no fused kernels, fp32)."""

    @override
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

    @property
    @override
    def root_device(self) -> torch.device:
        # DeepSpeed reads the device index as the rank's device; a bare "cpu" device has none.
        return torch.device("cpu", self.local_rank)

    @override
    def setup_distributed(self) -> None:
        # DeepSpeedStrategy's version first checks CUDA device indices, which CPU devices do not have.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


def resolve_config_path(path: str) -> Path:
    candidate = project_file(path)
    if not candidate.is_file():
        raise FileNotFoundError(f"--trainer.deepspeed_config: {path} does not exist")
    return candidate


# DeepSpeed keys that Lightning fills from the trainer's flags only when the JSON leaves them out: set there,
# they silently win over the flags (clipping, precision) or clash with them at fit start (accumulation).
TRAINER_OWNED = {
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches",
    "gradient_clipping": "trainer.gradient_clip_val",
    "fp16": "trainer.precision",
    "bf16": "trainer.precision",
    "amp": "trainer.precision",
    "train_batch_size": "data.batch_size",
    "train_micro_batch_size_per_gpu": "data.batch_size",
}


# DeepSpeed keys that replace what a stage's own settings decide: an "optimizer" block trained with its rate and
# no warm-up or decay, the stage's lr.<group>, warmup_steps and min_lr_ratio unused, unsaid; a "scheduler" block
# was ignored (Lightning steps the stage's schedule), unsaid.
STAGE_OWNED = {
    "optimizer": "the stage's AdamW: stages.<name>.lr.<group>",
    "scheduler": "the stage's schedule: stages.<name>.warmup_steps and min_lr_ratio",
}


def read_config(path: str) -> dict:
    """The DeepSpeed JSON config at `path`; a ValueError naming the file when it is no JSON object or sets a
    key that the trainer's flags own."""
    file = resolve_config_path(path)
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} holds a JSON {type(config).__name__}, not an object of DeepSpeed settings")
    owned = [f"{key} (use --{TRAINER_OWNED[key]})" for key in config if key in TRAINER_OWNED]
    owned += [f"{key} ({STAGE_OWNED[key]})" for key in config if key in STAGE_OWNED]
    if owned:
        raise ValueError(f"{file} sets {', '.join(owned)}: the run's flags and stages decide these")
    return config


def zero_stage(config_path: str) -> int:
    """The ZeRO stage that a DeepSpeed JSON config asks for (0 when it names none)."""
    return int(read_config(config_path).get("zero_optimization", {}).get("stage", 0))


def deepspeed_strategy(config_path: str, accelerator: str | None) -> CurriculumDeepSpeedStrategy:
    """The DeepSpeed strategy for a JSON config; on CPU (asked for, or "auto" on a machine without CUDA)
    the gloo variant that CI runs."""
    config = read_config(config_path)
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    cls = CPUDeepSpeedStrategy if on_cpu else CurriculumDeepSpeedStrategy
    return cls(config=config, exclude_frozen_parameters=True)
