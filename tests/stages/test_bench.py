"""The BLIP-2 captioning benchmark runs both ops end to end and accounts for its time (no timing asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from stages.run import main
from tests.conftest import TOY_PROFILE_ARGS


def test_blip2_bench_runs_both_ops_and_splits_the_time(tmp_path, capsys):
    argv = ["bench", "blip2", "--shape=tiny", "--images=8", "--stock_images=4", "--batch_size=4", "--max_new_tokens=6"]
    assert main([*argv, f"--root={tmp_path}"]) == 0
    assert "images/s" in capsys.readouterr().out
    result = json.loads((tmp_path / "blip2_bench.json").read_text())
    ours, stock = result["runs"]["blip2_caption_mapper"], result["runs"]["image_captioning_mapper"]
    # The stock op's random-weight captions are "? ? ?": no word, so left out (counted as empty_caption).
    assert (ours["images"], ours["kept"], stock["images"], stock["kept"]) == (8, 8, 4, 0)
    assert set(ours["op_phases_s"]) == {"load_model", "read_images", "preprocess", "generate", "decode"}
    assert ours["op_s"] <= ours["wall_s"] and result["speedup"] > 0
    seconds = ours["wall_s"] - ours["op_phases_s"]["load_model"]  # rounded to 10 ms and 1 ms
    assert ours["images_per_s_after_load"] == pytest.approx(8 / seconds, rel=0.1)
    assert ours["images_per_s_after_load"] > ours["images_per_s"]
    # Each op ran on a few images untimed, then on the first half of its images: the marginal rate is the
    # second half's images over the difference, or None where timing noise made the whole run no slower.
    for name, run, images in (("image_captioning_mapper", stock, 4), ("blip2_caption_mapper", ours, 8)):
        half = json.loads((tmp_path / f"out-{name}-half" / "report.json").read_text())
        warmup = json.loads((tmp_path / f"out-{name}-warmup" / "report.json").read_text())
        kept = (images // 2, 4) if run is ours else (0, 0)
        assert (half["samples"]["kept"], warmup["samples"]["kept"]) == kept
        assert half["samples"]["processed"] == images // 2
        # From the times as written (4 decimals, so the difference within 1e-4 of the one the bench divided by:
        # 1.3% of a difference of 4 ms on a fast machine) and the rate's own rounding.
        gained = run["wall_s"] - run["half_wall_s"]
        marginal = run["marginal_images_per_s"]
        if marginal is None:  # a loaded machine ran the whole no slower than the half: no marginal rate
            assert gained <= 1e-4
        else:
            low = images // 2 / (gained + 1e-4) - 0.005
            high = images // 2 / (gained - 1e-4) + 0.005 if gained > 1e-4 else float("inf")
            assert low <= marginal <= high, (marginal, gained)
    if ours["marginal_images_per_s"] and stock["marginal_images_per_s"]:
        assert result["marginal_speedup"] == round(ours["marginal_images_per_s"] / stock["marginal_images_per_s"], 2)
    shard = json.loads((tmp_path / "out-blip2_caption_mapper" / "report.json").read_text())
    assert all(len(e["captions"]["short"].split()) >= 1 for e in shard["examples"])


def test_train_bench_measures_each_variant_for_both_step_kinds(tmp_path, capsys):
    argv = ["bench", "train", *TOY_PROFILE_ARGS, "--trainer.accelerator=cpu", f"--run_dir={tmp_path}"]
    argv += ["--steps=3", "--warmup=1", "--batch=2", "--text_tokens=16"]
    argv += ['--variants=["plain", "plain+ckpt", "none", "chunked_ce+ckpt2", "no_dropout"]']
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "chunked_ce+ckpt2" in out and "vs plain" in out
    report = json.loads((tmp_path / "bench_train.json").read_text())
    for kind in ("align", "sft"):
        row = report[kind]
        assert row["image_tokens"] == 16 and row["tokens_per_sample"] >= row["image_tokens"] + 16  # + the prompt
        expected = ["plain", "plain+ckpt", "none", "chunked_ce+ckpt2"] + (["no_dropout"] if kind == "sft" else [])
        assert list(row["variants"]) == expected  # LoRA dropout has no align variant
        plain = row["variants"]["plain"]
        for result in row["variants"].values():
            assert 0 < result["mfu"] and result["tokens_per_s"] > 0
            assert result["vs_plain"] == pytest.approx(result["tokens_per_s"] / plain["tokens_per_s"], abs=1e-3)
            # The same FLOPs per sample for every variant: MFU orders them as tokens/s does (3 digits kept).
            per_token = plain["mfu"] / plain["tokens_per_s"]
            assert result["mfu"] / result["tokens_per_s"] == pytest.approx(per_token, rel=0.01)
        levers = row["variants"]["chunked_ce+ckpt2"]["levers"]
        assert levers["loss_chunk_tokens"] == 1024 and levers["checkpoint_every"] == 2 and levers["compile"] is None
        assert row["variants"]["none"]["levers"]["loss_chunk_tokens"] is None
    assert report["sft"]["variants"]["no_dropout"]["levers"]["lora_dropout"] == 0.0


def test_train_bench_reports_a_refused_variant_and_goes_on(tmp_path, capsys):
    argv = ["bench", "train", *TOY_PROFILE_ARGS, "--trainer.accelerator=cpu", f"--run_dir={tmp_path}"]
    argv += ["--trainer.strategy=deepspeed", "--trainer.deepspeed_config=configs/deepspeed/zero3.json"]
    argv += ["--steps=2", "--warmup=1", "--batch=2", "--text_tokens=8", '--variants=["compile"]', '--kinds=["sft"]']
    assert main(argv) == 0
    report = json.loads((tmp_path / "bench_train.json").read_text())
    assert "align" not in report
    assert "refused" in report["sft"]["variants"]["compile"]["error"]
    assert "ZeRO-3" in capsys.readouterr().out


def test_train_bench_records_a_failed_variant_measures_the_rest_and_exits_nonzero(tmp_path, capsys, monkeypatch):
    """A variant that breaks (here inductor without a C++ compiler, as Triton without gcc would on a GPU
    machine) is reported with its error; the variants after it are still measured and saved."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", (None, str(tmp_path / "no-such-compiler")))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)  # a cached kernel would need no compiler
    argv = ["bench", "train", *TOY_PROFILE_ARGS, "--trainer.accelerator=cpu", f"--run_dir={tmp_path}"]
    argv += ["--steps=2", "--warmup=1", "--batch=2", "--text_tokens=8", '--variants=["compile", "none"]']
    assert main([*argv, '--kinds=["sft"]']) == 1
    assert "variants failed" in capsys.readouterr().err
    variants = json.loads((tmp_path / "bench_train.json").read_text())["sft"]["variants"]
    assert variants["compile"]["error"].startswith("failed: ") and variants["compile"]["levers"]["compile"]
    assert variants["none"]["tokens_per_s"] > 0


def test_train_bench_counts_the_graphs_of_a_compiled_variant(tmp_path, monkeypatch):
    """One graph serves every decoder layer; the count is in the report so that a GPU run shows it too."""
    from stages import bench_train

    monkeypatch.setitem(bench_train.LEVERS, "compile", {"compile": "aot_eager"})  # inductor: 25 s on CPU
    argv = ["bench", "train", *TOY_PROFILE_ARGS, "--trainer.accelerator=cpu", f"--run_dir={tmp_path}"]
    argv += ["--steps=2", "--warmup=1", "--batch=2", "--text_tokens=8", '--variants=["compile", "none"]']
    assert main([*argv, '--kinds=["sft"]']) == 0
    variants = json.loads((tmp_path / "bench_train.json").read_text())["sft"]["variants"]
    assert (variants["compile"]["compiled_graphs"], variants["compile"]["recompile_limit_hits"]) == (1, 0)
    assert "compiled_graphs" not in variants["none"]


@pytest.mark.parametrize("variant", ["fast", "plain+compile", "none+ckpt3"])
def test_train_bench_refuses_unknown_variants(tmp_path, capsys, variant):
    argv = ["bench", "train", *TOY_PROFILE_ARGS, "--trainer.accelerator=cpu", f"--run_dir={tmp_path}"]
    assert main([*argv, f'--variants=["{variant}"]']) == 2
    assert f"--variants: {variant!r} is not a variant" in capsys.readouterr().err


def test_train_bench_with_an_inline_config_names_its_folder_after_the_default(tmp_path, monkeypatch, capsys):
    """An inline --config '{seed: 1}' is recorded as None: the bench's folder was runs/bench-train-None."""
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "train", "--config", "{seed: 1}", *TOY_PROFILE_ARGS, "--trainer.accelerator=cpu"]
    assert main([*argv, '--variants=["fast"]']) == 2  # refused once the folder is made
    assert "is not a variant" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["bench-train-tiny"]


def test_train_bench_runs_under_deepspeed(tmp_path):
    """Lightning's DeepSpeed strategy read `batch_sampler.batch_size` of the bench's loader, which an
    unbatched loader does not have; and several engines are started one after another in one process."""
    pytest.importorskip("deepspeed")
    argv = ["bench", "train", *TOY_PROFILE_ARGS, "--trainer.accelerator=cpu", f"--run_dir={tmp_path}"]
    argv += ["--trainer.strategy=deepspeed", "--trainer.deepspeed_config=configs/deepspeed/zero2.json"]
    argv += ["--steps=3", "--warmup=1", "--batch=2", "--text_tokens=8", '--variants=["none", "chunked_ce+ckpt"]']
    assert main([*argv, '--kinds=["sft"]']) == 0
    variants = json.loads((tmp_path / "bench_train.json").read_text())["sft"]["variants"]
    assert all(variants[name]["tokens_per_s"] > 0 for name in ("none", "chunked_ce+ckpt"))


def test_sft_targets_judge_speed_within_the_plain_memory_and_the_budget():
    from stages.bench_train import sft_targets

    def row(tokens, gib, reserved=None):
        reserved = gib + 0.5 if reserved is None else reserved
        return {"tokens_per_s": tokens, "peak_gpu_gib": gib, "peak_reserved_gib": reserved, "vs_plain": tokens / 100}

    report = {"batch": 8, "cuda_overhead_gib": 0.5, "sft": {"variants": {"plain": row(100, 25.0)}}}
    report["sft"]["variants"] |= {"plain+ckpt": row(80, 20.0), "none": row(300, 60.0)}
    report["sft"]["variants"] |= {"chunked_ce+ckpt": row(210, 19.0), "ckpt": row(90, 22.0)}
    speed, memory = sft_targets(report)
    # 300 tokens/s needs more memory than plain: the 2.1x variant within 25.5 GiB reserved decides.
    assert speed.startswith("target 2.0x plain tokens/s at no more memory: met (best chunked_ce+ckpt: 2.1x")
    assert "19.5 GiB vs plain 25.5 GiB reserved" in speed
    assert memory.startswith("target batch 8 within 24.0 GiB: met (lowest chunked_ce+ckpt: 20.0 GiB = 19.5 reserved")
    report["sft"]["variants"]["chunked_ce+ckpt"] = row(150, 26.0)
    speed, memory = sft_targets(report)
    assert "not met (best ckpt: 0.9x" in speed and "met (lowest ckpt: 23.0 GiB" in memory
    # Reserved memory and the CUDA context decide, not the live tensors alone: 22 GiB allocated is not within 24.
    report["sft"]["variants"]["ckpt"] = row(90, 22.0, reserved=23.7)
    assert "not met (lowest ckpt: 24.2 GiB = 23.7 reserved + 0.5 CUDA context" in sft_targets(report)[1]
    assert sft_targets({"batch": 2, "sft": {"variants": {"plain": {"tokens_per_s": 1, "peak_rss_gib": 1}}}}) == []


def test_the_memory_target_is_judged_when_plain_runs_out_of_memory():
    """No verdict at all was printed when the plain loop failed, the memory target's included."""
    from stages.bench_train import sft_targets

    variants = {"plain": {"error": "out of GPU memory"}}
    variants["ckpt"] = {"tokens_per_s": 90, "peak_gpu_gib": 22.5, "peak_reserved_gib": 23.0}
    speed, memory = sft_targets({"batch": 8, "sft": {"variants": variants}})
    assert speed.endswith("not judged (plain: out of GPU memory)")
    assert memory.startswith("target batch 8 within 24.0 GiB: met (lowest ckpt: 23.0 GiB")


def test_bench_train_needs_a_warmup_step(tmp_path, capsys):
    # With --warmup 0 every Lightning variant failed: its timer starts at the end of the last warm-up step.
    argv = ["bench", "train", *TOY_PROFILE_ARGS, "--trainer.accelerator=cpu", f"--run_dir={tmp_path}"]
    assert main([*argv, "--steps=2", "--warmup=0"]) == 2
    assert "--warmup (0) must be at least 1" in capsys.readouterr().err


def test_bench_train_measures_one_device(tmp_path, capsys):
    # Lightning's launcher ran the whole bench again on the second rank: the report twice, and each rank's plain
    # loop timed while the other rank's Lightning variant ran (its ratio moved with the variants' order).
    argv = ["bench", "train", *TOY_PROFILE_ARGS, "--trainer.accelerator=cpu", f"--run_dir={tmp_path}"]
    assert main([*argv, "--trainer.devices=2"]) == 2
    assert "bench train measures one device; set --trainer.devices 1" in capsys.readouterr().err
    # 16-mixed on the CPU: Lightning ran its variants in bf16 beside an fp16 plain loop.
    assert main([*argv, "--trainer.precision=16-mixed"]) == 2
    assert "trainer.precision 16-mixed: float16 autocast needs a GPU" in capsys.readouterr().err
    assert not (tmp_path / "bench_train.json").exists()


def test_the_plain_loop_computes_in_the_profiles_precision(tmp_path, monkeypatch):
    # It autocast to bf16 on CUDA only: a bf16-mixed profile on the CPU was timed against a float32 plain loop.
    from modules.vlm import VisionLanguageModel
    from stages.bench_train import plain_autocast

    assert [plain_autocast(p) for p in ("bf16-mixed", "bf16-true", "bf16", "16-mixed", "16")] == [
        torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float16, torch.float16
    ]  # fmt: skip
    assert {plain_autocast(p) for p in ("32-true", "32", "64-true", None)} == {None}
    forward, seen = VisionLanguageModel.forward, []

    def recorded(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(VisionLanguageModel, "forward", recorded)
    argv = ["bench", "train", *TOY_PROFILE_ARGS, "--trainer.accelerator=cpu", f"--run_dir={tmp_path}"]
    argv += ["--steps=2", "--warmup=1", "--batch=2", "--text_tokens=8", "--kinds=[align]", "--variants=[plain, none]"]
    for precision, expected in (("bf16-mixed", torch.bfloat16), ("32-true", False)):
        seen.clear()
        assert main([*argv, f"--trainer.precision={precision}"]) == 0
        assert len(seen) == 4 and set(seen) == {expected}, precision  # 2 plain steps, 2 of the Lightning module


def test_mfu_flops_match_torch_flop_counter():
    """The MFU numerator's formulas against torch's FLOP counter on small CLIP and Qwen2 models (eager
    attention, whose matmuls the counter sees). They left attention out before: 2.4% of the FLOPs of an
    MGM-2B sample (576 image + 256 text tokens), by these formulas on that profile's configs."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    from stages.bench_train import lm_forward_flops, tower_forward_flops

    torch.manual_seed(0)
    arch = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    tower = CLIPVisionModel(CLIPVisionConfig(**arch, image_size=64, patch_size=8, attn_implementation="eager"))
    lm = Qwen2ForCausalLM(Qwen2Config(**arch, num_key_value_heads=2, vocab_size=256, attn_implementation="eager"))
    lm.requires_grad_(False)

    def counted(run) -> int:
        with FlopCounterMode(display=False) as counter:
            run()
        return counter.get_total_flops()

    dense, attention = tower_forward_flops(tower, 64)
    assert attention == 4 * 2 * 64**2 * 64  # layers x patches^2 x width
    # Within 5%: the counter also sees the class token's position; the formula counts the position
    # embeddings and norms as parameters applied to every patch.
    assert counted(lambda: tower(pixel_values=torch.rand(1, 3, 64, 64))) == pytest.approx(dense + attention, rel=0.05)
    tokens = 96
    dense, attention, head = lm_forward_flops(lm, tokens, labelled=10, causal=False)
    assert head == 2 * 256 * 64 * 10 and lm_forward_flops(lm, tokens, 10)[1] == attention / 2
    embeds = torch.rand(1, tokens, 64, requires_grad=True)
    forward = counted(lambda: lm.get_decoder()(inputs_embeds=embeds))
    assert forward == pytest.approx(dense + attention, rel=0.01)
    # Back to the inputs only (frozen weights): dense matmuls once more, attention's twice (both operands).
    both = counted(lambda: lm.get_decoder()(inputs_embeds=embeds).last_hidden_state.sum().backward())
    assert both == pytest.approx(2 * dense + 3 * attention, rel=0.01)


def test_bench_stability_needs_a_clean_run_for_every_fault_seed(tmp_path, capsys):
    # Each fault run reuses the data and base models of the clean run of its seed: --seeds 3 (fewer than the
    # default 5 fault seeds) ended in a traceback once every clean run had finished.
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "stability", "--seeds=3", f"--root={tmp_path}"])
    assert exit_info.value.code == 2 and not any(tmp_path.iterdir())
    assert "--fault_seeds must be within 1 and --seeds (3), got 5" in capsys.readouterr().err


def test_blip2_bench_keeps_what_it_measured_when_a_later_op_dies(tmp_path, monkeypatch):
    """On the GPU machine a time limit can kill the stock op's run: our op's figures must already be on disk."""
    import stages.data
    from stages.bench import bench_blip2

    real = stages.data.run_data_stage

    def dies_on_the_stock_op(recipe, out, **kwargs):
        if "image_captioning_mapper" in recipe.process[0]:
            raise TimeoutError("killed by the device's time limit")
        return real(recipe, out, **kwargs)

    monkeypatch.setattr(stages.data, "run_data_stage", dies_on_the_stock_op)
    with pytest.raises(TimeoutError):
        bench_blip2(tmp_path, images=4, shape="tiny", batch_size=4, stock_images=2, max_new_tokens=4)
    result = json.loads((tmp_path / "blip2_bench.json").read_text())
    assert list(result["runs"]) == ["blip2_caption_mapper"] and result["runs"]["blip2_caption_mapper"]["kept"] == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # The stock op read only the --images rendered and reported --stock_images of them: a wrong rate.
        (["blip2", "--images=4", "--stock_images=8"], "--stock_images must be at most --images (4), got 8"),
        (["blip2", "--shape=foo"], "--shape"),
        (["blip2", "--max_new_tokens=0"], "--max_new_tokens"),
        (["blip2", "--batch_size=0"], "--batch_size"),
        (["train", "--text_tokens=0"], "--text_tokens"),
        (["train", "--variants=[]"], "--variants: name at least one variant"),  # it ran every default one
    ],
)
def test_bench_flags_are_checked_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv, f"--root={tmp_path}"] if argv[0] == "blip2" else ["bench", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
