"""Lightning's DeepSpeed strategy on CPU (gloo), through the curriculum as users run it.

The known traps, each pinned: the loss divided twice under gradient accumulation, ZeRO-3
partitions saved as empty tensors, gradient norms read from `p.grad` (None under DeepSpeed), and a
resume that silently restarts. The micro curriculum's first two stages are enough for each.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.run import main
from tests.conftest import MICRO_ARGS, fresh_launch_env, run_fresh

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TWO_STAGES = [a for a in MICRO_ARGS if "sft_medium" not in a and "sft_long" not in a]
ZERO3_TINY = {  # threshold 0: tiny parameters are partitioned too, as a 7B model's are
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
    "zero_force_ds_cpu_optimizer": False,
}


def _two_stage_config(tmp_path: Path) -> str:
    import yaml

    stages = {
        "align": {"trainable": ["projector"], "max_words": 8, "init_from": "base", "trainer": {"max_steps": 3}},
        "sft_short": {"trainable": ["projector", "lora"], "max_words": 8, "trainer": {"max_steps": 3}},
    }
    path = tmp_path / "two_stages.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    return str(path)


def _deepspeed_args(tmp_path: Path, zero: str) -> list[str]:
    if zero == "plain":
        return []
    config = REPO / "configs" / "deepspeed" / "zero2.json"
    if zero == "zero3":
        config = tmp_path / "zero3_tiny.json"
        config.write_text(json.dumps(ZERO3_TINY))
    return ["--trainer.accelerator=cpu", "--trainer.strategy=deepspeed", f"--trainer.deepspeed_config={config}"]


def _grad_norms(run_dir: Path) -> list[float]:
    from tests.tensorboard import RunEvents

    return [e.value for e in RunEvents(run_dir / "tb").Scalars("train/grad_norm")]


def _shared_args(tmp: Path, micro_world: Path, micro_base: tuple[Path, Path]) -> list[str]:
    return [
        "--config", _two_stage_config(tmp), *TWO_STAGES, f"--data.shard_dir={micro_world}",
        f"--model.vision_path={micro_base[0]}", f"--model.lm_path={micro_base[1]}",
        "--trainer.accumulate_grad_batches=2", "--trainer.log_every_n_steps=1", "--model.lora.dropout=0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_world, micro_base) -> dict[str, Path]:
    """The same two stages with accumulate_grad_batches=2: plain, ZeRO-2, ZeRO-3 (tiny threshold)."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    shared = _shared_args(tmp, micro_world, micro_base)
    result = {}
    for zero in ("plain", "zero2", "zero3"):
        run_dir = tmp / zero
        assert main(["curriculum", f"--run_dir={run_dir}", *shared, *_deepspeed_args(tmp, zero)]) == 0
        result[zero] = run_dir
    return result


def _losses(run_dir: Path, stage: str) -> torch.Tensor:
    return torch.tensor(json.loads((run_dir / stage / "losses.json").read_text())["losses"])


def test_deepspeed_updates_equal_the_plain_run_under_gradient_accumulation(runs):
    plain_norms = _grad_norms(runs["plain"])
    assert len(plain_norms) == 6  # 3 optimizer steps per stage (MICRO_ARGS), each logged
    for zero in ("zero2", "zero3"):
        # The engine's norms (p.grad is None there): equal, not halved by a second division by the accumulation.
        torch.testing.assert_close(torch.tensor(_grad_norms(runs[zero])), torch.tensor(plain_norms), rtol=1e-3, atol=0)
        for stage in ("align", "sft_short"):
            torch.testing.assert_close(_losses(runs[zero], stage), _losses(runs["plain"], stage), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "zero, levers",
    [
        ("zero3", ["--model.speed.loss_chunk_tokens=5", "--model.speed.checkpoint_every=1"]),
        ("zero2", ["--model.speed.loss_chunk_tokens=5", "--model.speed.compile=aot_eager"]),
    ],
)
def test_speed_levers_under_deepspeed_train_as_the_plain_run(runs, tmp_path, micro_world, micro_base, zero, levers):
    """The chunked loss calls the (under ZeRO-3 partitioned) output layer once per chunk and again in backward;
    checkpointed layers gather their partitioned weights again when recomputed; compiled layers run inside
    the engine."""
    run_dir = tmp_path / "levers"
    argv = ["curriculum", f"--run_dir={run_dir}", *_shared_args(tmp_path, micro_world, micro_base)]
    assert main([*argv, *_deepspeed_args(tmp_path, zero), *levers]) == 0
    plain_norms = torch.tensor(_grad_norms(runs["plain"]))
    torch.testing.assert_close(torch.tensor(_grad_norms(run_dir)), plain_norms, rtol=1e-3, atol=0)
    for stage in ("align", "sft_short"):
        torch.testing.assert_close(_losses(run_dir, stage), _losses(runs["plain"], stage), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shipped", ["zero3.json", "zero2_offload.json"])
def test_shipped_deepspeed_configs_train_as_the_plain_run(runs, tmp_path, micro_world, micro_base, shipped):
    """zero2_offload.json failed at engine start: DeepSpeed refuses a client optimizer under offload unless
    zero_force_ds_cpu_optimizer is false (its DeepSpeedCPUAdam needs compiled ops)."""
    config = REPO / "configs" / "deepspeed" / shipped
    argv = ["curriculum", f"--run_dir={tmp_path / 'run'}", *_shared_args(tmp_path, micro_world, micro_base)]
    argv += ["--trainer.accelerator=cpu", "--trainer.strategy=deepspeed", f"--trainer.deepspeed_config={config}"]
    assert main(argv) == 0
    for stage in ("align", "sft_short"):
        expected = _losses(runs["plain"], stage)
        torch.testing.assert_close(_losses(tmp_path / "run", stage), expected, rtol=1e-4, atol=1e-6)


def test_bf16_under_deepspeed_trains_as_lightnings_bf16_mixed(tmp_path, micro_world, micro_base):
    """DeepSpeed's bf16 casts parameters and keeps buffers in fp32: the micro tower's BatchNorm then met bf16
    weights with fp32 running statistics and the first step failed. Now its statistics follow its weights,
    and ZeRO-2 / ZeRO-3 bf16 train as Lightning's autocast bf16-mixed does (fp32 master weights in both)."""
    losses = {}
    for zero in ("plain", "zero2", "zero3"):
        argv = ["curriculum", f"--run_dir={tmp_path / zero}", *_shared_args(tmp_path, micro_world, micro_base)]
        assert main([*argv, *_deepspeed_args(tmp_path, zero), "--trainer.precision=bf16-mixed"]) == 0
        losses[zero] = torch.cat([_losses(tmp_path / zero, stage) for stage in ("align", "sft_short")])
    for zero in ("zero2", "zero3"):
        torch.testing.assert_close(losses[zero], losses["plain"], rtol=1e-3, atol=0)
        # The handoff holds the optimizer's float32 masters, as Lightning's bf16-mixed (whose weights are
        # float32) does, not DeepSpeed's bf16-rounded parameters.
        for part in ("align/export/projector.safetensors", "sft_short/export/adapter/adapter_model.safetensors"):
            plain, deep = load_file(str(tmp_path / "plain" / part)), load_file(str(tmp_path / zero / part))
            assert {v.dtype for v in deep.values()} == {torch.float32}, (zero, part)
            rounded = [torch.equal(v, v.to(torch.bfloat16).float()) for v in deep.values()]
            assert not any(rounded), (zero, part, "bf16 values in a float32 file")
            for key in plain:  # bf16 compute of both kinds (and Adam's normalised steps): close on average
                assert (deep[key] - plain[key]).abs().mean() <= 0.05 * plain[key].abs().mean(), (zero, key)


def test_bf16_handoff_keeps_float32_weights_of_tied_and_frozen_parts(tmp_path, micro_world, micro_base):
    """align trains the projector and a tied-embedding LM in full; sft_short trains LoRA only. DeepSpeed's bf16
    casts every parameter, frozen ones too: sft_short handed on the frozen projector and LM rounded to bf16,
    and the tied lm_head (left out of named_parameters()) overwrote the embedding's float32 master with its
    rounded copy. Now the tied weights are masters and a frozen carried part is the file it came from."""
    import shutil

    import yaml

    lm = tmp_path / "tied_lm"
    shutil.copytree(micro_base[1], lm)
    config = json.loads((lm / "config.json").read_text())
    (lm / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    untied = load_file(str(lm / "model.safetensors"))  # transformers ties only a checkpoint without lm_head
    save_file({k: v for k, v in untied.items() if k != "lm_head.weight"}, str(lm / "model.safetensors"))
    stages = {
        "align": {"trainable": ["projector", "lm"], "max_words": 8, "init_from": "base", "trainer": {"max_steps": 3}},
        "sft_short": {"trainable": ["lora"], "max_words": 8, "trainer": {"max_steps": 3}},
        "projector_again": {"trainable": ["projector"], "max_words": 8, "trainer": {"max_steps": 2}},
    }
    (tmp_path / "stages.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    argv = [
        "curriculum", f"--run_dir={tmp_path / 'run'}", "--config", str(tmp_path / "stages.yaml"), *TWO_STAGES,
        f"--data.shard_dir={micro_world}", f"--model.vision_path={micro_base[0]}", f"--model.lm_path={lm}",
        *_deepspeed_args(tmp_path, "zero2"), "--trainer.precision=bf16-mixed",
    ]  # fmt: skip
    assert main(argv) == 0
    align, sft = tmp_path / "run" / "align" / "export", tmp_path / "run" / "sft_short" / "export"
    weights = load_file(str(align / "lm.safetensors"))
    embedding = weights["model.embed_tokens.weight"]
    assert embedding.dtype == torch.float32 and not torch.equal(embedding, embedding.bfloat16().float())
    assert torch.equal(weights["lm_head.weight"], embedding), "the tied lm_head holds the master too"
    for name in ("projector.safetensors", "lm.safetensors"):  # frozen in sft_short: handed on as they came
        assert (sft / name).read_bytes() == (align / name).read_bytes(), name
    # The adapter frozen in projector_again: it was saved from its bf16-cast parameters (4.8e-4 off).
    again = tmp_path / "run" / "projector_again" / "export" / "adapter" / "adapter_model.safetensors"
    assert again.read_bytes() == (sft / "adapter" / "adapter_model.safetensors").read_bytes()


def test_compile_under_zero3_is_refused_with_the_flags(tmp_path, capsys, micro_world, micro_base):
    argv = ["curriculum", f"--run_dir={tmp_path / 'run'}", *_shared_args(tmp_path, micro_world, micro_base)]
    with pytest.raises(SystemExit):
        main([*argv, *_deepspeed_args(tmp_path, "zero3"), "--model.speed.compile=inductor"])
    assert "--model.speed.compile inductor with ZeRO-3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused while parsing the flags


def test_zero3_saves_whole_projector_and_adapter(runs):
    for stage in ("align", "sft_short"):
        plain = load_file(str(runs["plain"] / stage / "export" / "projector.safetensors"))
        zero3 = load_file(str(runs["zero3"] / stage / "export" / "projector.safetensors"))
        assert {k: v.shape for k, v in zero3.items()} == {k: v.shape for k, v in plain.items()}
        for key in plain:
            torch.testing.assert_close(zero3[key], plain[key], rtol=1e-4, atol=1e-5)
    adapter = "sft_short/export/adapter/adapter_model.safetensors"
    plain, zero3 = load_file(str(runs["plain"] / adapter)), load_file(str(runs["zero3"] / adapter))
    assert plain.keys() == zero3.keys() and all(zero3[k].numel() == plain[k].numel() > 0 for k in plain)
    for key in plain:
        torch.testing.assert_close(zero3[key], plain[key], rtol=1e-4, atol=1e-5)


def test_zero3_export_matches_the_plain_runs(runs, tmp_path):
    from stages.export import evaluate_model, export_model, find_stage

    exported = {zero: export_model(find_stage(runs[zero]), tmp_path / zero) for zero in ("plain", "zero3")}
    captions = {
        zero: evaluate_model(folder, limit=8, max_new_tokens=12)["captions"] for zero, folder in exported.items()
    }
    assert captions["zero3"] == captions["plain"]


def test_skip_and_rewind_are_refused_under_deepspeed(tmp_path, capsys, micro_world, micro_base):
    """Refused when the config is read (it was at the first stage's fit start, after the data and base models)."""
    argv = [
        "curriculum", f"--run_dir={tmp_path / 'run'}", "--config", _two_stage_config(tmp_path), *TWO_STAGES,
        f"--data.shard_dir={micro_world}", f"--model.vision_path={micro_base[0]}", f"--model.lm_path={micro_base[1]}",
        "--stability.instability.action=rewind", *_deepspeed_args(tmp_path, "zero2"),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "action 'rewind' is not available under DeepSpeed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_under_deepspeed_a_nan_step_is_not_applied_and_the_run_goes_on_under_warn(
    tmp_path, capsys, micro_world, micro_base
):
    """DeepSpeed's engine skips an update whose gradients are not finite, in fp32 too (as fp16's loss
    scaler does): under warn the weights stay finite, the weights check finds them so (on ZeRO-3's
    partitions), and the stage trains on."""
    argv = [
        "curriculum", f"--run_dir={tmp_path / 'run'}", *_shared_args(tmp_path, micro_world, micro_base),
        *_deepspeed_args(tmp_path, "zero3"), "--stability.faults={1: nan}", "--stability.instability.action=warn",
        "--stability.instability.max_in_a_row=1",
    ]  # fmt: skip
    assert main(argv) == 0
    for stage in ("align", "sft_short"):
        alerts = [json.loads(line) for line in (tmp_path / "run" / stage / "alerts.jsonl").read_text().splitlines()]
        assert [(a["kind"], a["step"], a["action"]) for a in alerts] == [("non_finite", 1, "warn")], stage
        losses = json.loads((tmp_path / "run" / stage / "losses.json").read_text())["losses"]
        assert losses[1] is None and all(math.isfinite(loss) for loss in losses[2:]), (stage, losses)


def test_the_weights_check_reads_zero3_partitions(tmp_path):
    """Under ZeRO-3 a parameter outside the forward pass is an empty placeholder: the check read those and
    found nothing lost whatever the partitions held."""
    from callbacks.instability import weights_lost
    from stages.strategies import CPUDeepSpeedStrategy
    from tests.callbacks.toy import KeyedRegression, ToyRegression, loader, trainer

    found = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            weight = pl_module.net.weight
            assert weight.numel() == 0 and weight.ds_tensor.numel() > 0  # partitioned, as the check meets it
            found.append(weights_lost(trainer, pl_module))
            if trainer.global_step == 2:
                weight.ds_tensor.view(-1)[0] = math.nan

    strategy = CPUDeepSpeedStrategy(config=json.loads(json.dumps(ZERO3_TINY)))  # Lightning fills in the one given
    trainer([Probe()], max_steps=4, strategy=strategy, default_root_dir=tmp_path).fit(
        ToyRegression(), loader(KeyedRegression())
    )
    assert found == [False, False, True, True]


def test_deepspeed_runs_on_a_machine_without_cuda_when_the_accelerator_is_auto():
    """`--trainer.strategy deepspeed` alone, as the README shows it, failed on CPU: Lightning's strategy
    is CUDA-only, and the gloo variant was chosen only for `--trainer.accelerator cpu`."""
    from stages.strategies import CPUDeepSpeedStrategy, deepspeed_strategy

    for accelerator in (None, "auto"):
        strategy = deepspeed_strategy("configs/deepspeed/zero2.json", accelerator)
        assert isinstance(strategy, CPUDeepSpeedStrategy) != torch.cuda.is_available()
    assert isinstance(deepspeed_strategy("configs/deepspeed/zero2.json", "cpu"), CPUDeepSpeedStrategy)


def kill_mid_stage_and_rerun(command: list[str], env: dict, stage_dir: Path, timeout: int) -> None:
    """Starts `command`, SIGKILLs it once the stage's DeepSpeed checkpoint exists (no graceful shutdown: as a
    crash or a preempted node), reruns it to the end, and checks that the rerun resumed."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = stage_dir / "checkpoints" / "last.ckpt" / "latest"
    deadline = time.monotonic() + timeout
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (stage_dir / "done.json").exists(), "the kill came too late to test a resume"
    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stderr


def test_zero3_run_killed_mid_stage_resumes_where_it_stopped(runs, tmp_path, micro_world, micro_base):
    run_dir = tmp_path / "run"
    args = [
        "curriculum", f"--run_dir={run_dir}", "--config", _two_stage_config(tmp_path), *TWO_STAGES,
        f"--data.shard_dir={micro_world}", f"--model.vision_path={micro_base[0]}", f"--model.lm_path={micro_base[1]}",
        "--trainer.accumulate_grad_batches=2", "--trainer.log_every_n_steps=1", "--model.lora.dropout=0",
        *_deepspeed_args(tmp_path, "zero3"),
    ]  # fmt: skip
    # The ZeRO-3 config written by _deepspeed_args must be the one of the fixture's run (same fingerprint inputs).
    command = [sys.executable, "-c", f"import sys; from stages.run import main; sys.exit(main({args!r}))"]
    # Not the port of the process group that this test process still holds from the in-process runs.
    kill_mid_stage_and_rerun(command, fresh_launch_env(), run_dir / "sft_short", timeout=600)
    torch.testing.assert_close(_losses(run_dir, "sft_short"), _losses(runs["zero3"], "sft_short"), rtol=1e-4, atol=1e-6)


def test_a_save_that_dies_half_way_leaves_the_previous_checkpoint_to_resume_from(
    runs, tmp_path, monkeypatch, caplog, micro_world, micro_base
):
    """Lightning wrote DeepSpeed's last.ckpt in place: a process dying while it saved left a checkpoint half
    old, half new. Here the second save of sft_short writes a torn file and fails, as a kill would leave it;
    last.ckpt still points at the first save, and the rerun resumes from it to the uninterrupted losses."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    run_dir = tmp_path / "run"
    argv = ["curriculum", f"--run_dir={run_dir}", *_shared_args(tmp_path, micro_world, micro_base)]
    argv += [*_deepspeed_args(tmp_path, "zero2"), "--checkpoint.every_n_train_steps=1"]
    save, files = TorchCheckpointEngine.save, []

    def torn_save(self, state_dict, path):
        files.append(path)
        if sum("sft_short" in f for f in files) == 3:  # 2 files a save (model, optimizer): the second save
            Path(path).write_bytes(b"torn")
            raise RuntimeError("killed while saving")
        save(self, state_dict, path)

    monkeypatch.setattr(TorchCheckpointEngine, "save", torn_save)
    with pytest.raises(RuntimeError, match="killed while saving"):
        main(argv)
    monkeypatch.setattr(TorchCheckpointEngine, "save", save)
    last = run_dir / "sft_short" / "checkpoints" / "last.ckpt"
    assert (last / "latest").is_file()
    with caplog.at_level(logging.INFO, logger="stages.stage"):
        assert main(argv) == 0
    assert "stage sft_short: resuming from" in caplog.text
    # last.ckpt links to the newest of two folders; the other one was deleted after the link moved.
    assert last.is_symlink() and sorted(p.name for p in last.parent.iterdir()) == [
        "last.ckpt",
        f"last.ckpt.{os.readlink(last)[-1]}",
    ]
    torch.testing.assert_close(_losses(run_dir, "sft_short"), _losses(runs["zero2"], "sft_short"), rtol=1e-4, atol=1e-6)


def test_removing_a_linked_checkpoint_removes_its_folder(tmp_path):
    """Lightning removes stale checkpoints (save_top_k, save_last="link") by path: for a link that left the
    folder behind."""
    from stages.strategies import CPUDeepSpeedStrategy

    (tmp_path / "epoch=1.ckpt.b").mkdir()
    (tmp_path / "epoch=1.ckpt.b" / "latest").write_text("checkpoint")
    os.symlink("epoch=1.ckpt.b", tmp_path / "epoch=1.ckpt")
    (tmp_path / "kept.ckpt.a").mkdir()
    CPUDeepSpeedStrategy(config={"zero_optimization": {"stage": 2}}).remove_checkpoint(tmp_path / "epoch=1.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["kept.ckpt.a"]


def _two_rank_run(run_dir: Path, tmp_path: Path, strategy: list[str]) -> subprocess.CompletedProcess:
    # Lightning starts rank 1 by running the same command again, so this goes through the CLI as users run it.
    # The micro world's default recipe writes a single training shard: fewer shards than ranks.
    args = [
        sys.executable, "-m", "stages.run", "curriculum", f"--run_dir={run_dir}",
        "--config", _two_stage_config(tmp_path), *TWO_STAGES, "--trainer.accelerator=cpu", "--trainer.devices=2",
        *strategy,
    ]  # fmt: skip
    return run_fresh(args, timeout=400)


def _errors(done: subprocess.CompletedProcess) -> str:
    """The lines that say what failed, from both ranks, then the tail."""
    lines = [line for line in done.stderr.splitlines() if "Error" in line or "error:" in line]
    return "\n".join(lines[-20:]) + "\n---\n" + done.stderr[-2000:]


def test_two_ranks_under_zero3_train_the_same_model_as_two_ranks_under_ddp(tmp_path):
    # 5 evaluated images in batches of 2 split 3 / 2: unequal batch counts hung ZeRO-3, whose every forward
    # pass needs both ranks; the VQA questions too.
    evaluation = ["--eval.limit=5", "--eval.batch_size=2", "--eval.vqa=true"]
    ddp = _two_rank_run(tmp_path / "ddp", tmp_path, ["--trainer.strategy=ddp", *evaluation])
    assert ddp.returncode == 0, _errors(ddp)
    zero3 = _two_rank_run(tmp_path / "zero3", tmp_path, [*_deepspeed_args(tmp_path, "zero3"), *evaluation])
    assert zero3.returncode == 0, _errors(zero3)
    resources = [
        json.loads((tmp_path / run / "align" / "done.json").read_text())["resources"] for run in ("ddp", "zero3")
    ]
    assert resources[0]["ranks"] == resources[1]["ranks"] == 2, "every rank's batches counted, under DeepSpeed too"
    assert resources[0]["train_samples"] == resources[1]["train_samples"]
    for stage in ("align", "sft_short"):
        torch.testing.assert_close(
            _losses(tmp_path / "zero3", stage), _losses(tmp_path / "ddp", stage), rtol=1e-4, atol=1e-6
        )
        keys = [json.loads(line)["key"] for line in (tmp_path / "zero3" / stage / "captions.jsonl").open()]
        assert len(keys) == len(set(keys)) == 5, "every image captioned once, the padding dropped"
        metrics = json.loads((tmp_path / "zero3" / stage / "metrics.json").read_text())
        assert metrics["vqa_questions"] > 0
        # Each rank holds half of every partition: the handoff must gather them into whole tensors.
        ddp_projector = load_file(str(tmp_path / "ddp" / stage / "export" / "projector.safetensors"))
        zero3_projector = load_file(str(tmp_path / "zero3" / stage / "export" / "projector.safetensors"))
        for key, value in ddp_projector.items():
            torch.testing.assert_close(zero3_projector[key], value, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "zero3" / "summary.json").read_text()).keys() == {"align", "sft_short"}
    # Rerun with a change that retrains both stages: rank 1, alive since align, found sft_short's old last.ckpt
    # before rank 0 deleted the stale folder, resumed from it, and the run failed (3 times of 3).
    changed = _two_rank_run(
        tmp_path / "ddp", tmp_path, ["--trainer.strategy=ddp", *evaluation, "--stages.align.lr.projector=0.003"]
    )
    assert changed.returncode == 0, _errors(changed)
    assert "resuming from" not in changed.stderr
