"""The command line as a user runs it: a micro curriculum end to end, rerun, interrupt, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stages.run import main
from tests.conftest import MICRO_ARGS

STAGES = ["align", "sft_short", "sft_medium", "sft_long"]
REPO = Path(__file__).resolve().parents[2]


def _assert_tensorboard_spans_the_curriculum(tb_dir: Path) -> None:
    """One log for all stages: the loss's steps keep rising across stages; eval scalars and tables per stage."""
    from tests.tensorboard import RunEvents

    events = RunEvents(tb_dir)
    assert len(events.Scalars("eval/chair_i")) == len(STAGES)
    eval_steps = [e.step for e in events.Scalars("eval/recall")]
    # 3 optimizer steps per stage, offset by the stages before; an evaluation at the step it follows, as
    # Lightning logs val/loss, so a stage's final scores do not share the next stage's first step.
    assert eval_steps == [2, 5, 8, 11]
    text_tags = [tag for tag in events.Tags()["tensors"] if tag.endswith("captions/text_summary")]
    assert len(text_tags) == len(STAGES)
    data = RunEvents(tb_dir / "data")  # its own run: a stage's start at step 0 would hide it in the stages' log
    assert "data/report/text_summary" in data.Tags()["tensors"]
    assert data.Scalars("data/skipped_at_input")[0].value == 0


def _run(run_dir: Path, *extra: str) -> int:
    return main(["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS, *extra])


def _models_alive() -> int:
    import gc

    from modules.vlm import VisionLanguageModel

    return sum(isinstance(o, VisionLanguageModel) for o in gc.get_objects())


@pytest.mark.slow
def test_micro_curriculum_end_to_end_then_rerun_trains_nothing(tmp_path, capsys, monkeypatch):
    import gc

    import stages.curriculum

    # Every stage's model is freed before the next one is built: Lightning's trainer and module refer to
    # each other, and the garbage collector alone left a model (a real LM's gigabytes) per stage.
    gc.collect()
    before = _models_alive()  # held by other tests of this session, if any
    alive, run_stage = [], stages.curriculum.run_stage
    monkeypatch.setattr(
        stages.curriculum, "run_stage", lambda *a, **k: alive.append(_models_alive()) or run_stage(*a, **k)
    )
    run_dir = tmp_path / "run"
    assert _run(run_dir) == 0
    assert alive == [before] * 4 and _models_alive() == before
    steps = 0
    for name in STAGES:
        stage = run_dir / name
        metrics = json.loads((stage / "metrics.json").read_text())
        assert {"chair_i", "chair_s", "recall", "mean_words", "bleu4"} <= metrics.keys()
        assert (stage / "config.yaml").is_file() and (stage / "checkpoints" / "last.ckpt").is_file()
        assert (stage / "export" / "projector.safetensors").is_file()
        assert (stage / "export" / "adapter").is_dir() == (name != "align")
        steps += json.loads((stage / "done.json").read_text())["global_steps"]
    assert steps == 12
    _assert_tensorboard_spans_the_curriculum(run_dir / "tb")
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.ckpt")}

    capsys.readouterr()
    assert _run(run_dir) == 0
    assert capsys.readouterr().out.count("skipped: done before") == 4
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.ckpt")} == mtimes


@pytest.mark.slow
def test_a_changed_stage_config_reruns_that_stage_and_the_ones_after(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _run(run_dir) == 0
    capsys.readouterr()
    assert _run(run_dir, "--stages.sft_medium.max_words=18") == 0
    out = capsys.readouterr().out
    skipped = [line.split()[0] for line in out.splitlines() if "skipped: done before" in line]
    assert skipped == ["align", "sft_short"]
    # Another world rebuilds the shards and the tiny base models, whose index and file sizes may well stay
    # the same: every stage reruns.
    assert _run(run_dir, "--stages.sft_medium.max_words=18", "--world.texture=0.3") == 0
    assert "skipped" not in capsys.readouterr().out


def test_model_folder_and_shard_digests_see_a_rebuild_of_the_same_sizes(tmp_path):
    import os

    from stages.curriculum import folder_digest, shards_digest

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "index.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    before = folder_digest(tmp_path), shards_digest(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"5678")  # retrained: same shapes, same size
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))
    after = folder_digest(tmp_path), shards_digest(tmp_path)
    assert before[0] != after[0] and before[1] != after[1]


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--stages.sft_long.trainer.max_steps=0", "stages.sft_long.trainer.max_steps must be at least 1"),
        ("--trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be at least 1"),
        ("--trainer.devices=0", "trainer.devices must name at least one device"),
        ("--stages.sft_long.lr.lora=-1", "stages.sft_long.lr.lora must be positive"),
        ("--stages.align.warmup_steps=-1", "stages.align.warmup_steps must not be negative"),
        ("--stages.sft_short.max_words=0", "stages.sft_short.max_words must be positive"),
        ("--data.batch_size=0", "data.batch_size must be at least 1"),
        ("--eval.limit=0", "eval.limit must be at least 1"),
        ("--eval.every_n_steps=0", "eval.every_n_steps must be at least 1"),
        ("--eval.length_buckets=[48, 20]", "eval.length_buckets must be increasing"),
        ("--checkpoint.every_n_train_steps=0", "checkpoint.every_n_train_steps must be at least 1"),
        ("--stability.faults={2: spik}", "unknown fault kinds ['spik']"),
        ("--trainer.strategy=deepspeed", "trainer.strategy deepspeed needs trainer.deepspeed_config"),
        ("--stages.align.trainer.strategy=deepspeed", "stages.align.trainer.strategy deepspeed needs"),
        # A missing DeepSpeed file failed only when its stage started, after the data and base models.
        (("--trainer.strategy=deepspeed", "--trainer.deepspeed_config=zero9.json"), "zero9.json is no file"),
        # Misspelt Lightning names failed inside lightning.Trainer(...) once their stage started, naming no key.
        ("--stages.sft_long.trainer.precision=bf16-mixd", "stages.sft_long.trainer.precision 'bf16-mixd' is none of"),
        ("--trainer.strategy=dpp", "trainer.strategy 'dpp' is no Lightning strategy"),
        # Lightning's spawn/fork launcher keeps the callbacks' results in its child processes: every stage "ended"
        # at step 0, unscored (and the webhook's thread could not be pickled for spawn).
        ("--trainer.strategy=ddp_spawn", "trainer.strategy ddp_spawn: stages need their ranks launched as scripts"),
        ("--stages.align.trainer.strategy=ddp_fork", "stages.align.trainer.strategy ddp_fork: stages need"),
        ("--trainer.accelerator=gpux", "trainer.accelerator 'gpux' is none of auto, gpu, cpu"),
        ("--model.dtype=bf16", "model.dtype must be bfloat16, float16, float32 or null, got 'bf16'"),
        # Under DeepSpeed p.grad is None: the fault's next(...) raised StopIteration, which Lightning's loop took
        # for the end of the data, and the run repeated the same step until killed.
        (
            (
                "--trainer.strategy=deepspeed",
                "--trainer.deepspeed_config=configs/deepspeed/zero2.json",
                "--stability.faults={2: inf_grad}",
            ),
            "stability.faults: inf_grad under DeepSpeed (stage align)",
        ),
        # A misspelt backend failed when the first stage compiled, naming no flag.
        ("--model.speed.compile=inductr", "model.speed.compile: no torch.compile backend 'inductr'"),
        # Accepted before: alpha 0 trained an adapter whose output is scaled by 0 (every lora_B stayed 0), and
        # the rest failed after the base models (minutes), most with a traceback naming no flag.
        ("--model.lora.alpha=0", "model.lora.alpha must be positive, got 0"),
        ("--model.lora.target_modules=[]", "model.lora.target_modules must name at least one module"),
        ("--trainer.val_check_interval=-1", "trainer.val_check_interval must be training batches >= 1"),
        ("--stages.align.trainer.limit_val_batches=1.5", "stages.align.trainer.limit_val_batches must be a count"),
        ("--trainer.devices=x", "trainer.devices must be a count, a list of indices"),
        ("--stability.instability.divergence_ratio=0.5", "divergence_ratio must be 0 (off) or at least 1, got 0.5"),
        ("--stability.faults={-3: nan}", "stability.faults: steps must not be negative, got [-3]"),
        ("--base.lm_hidden_size=30", "base.lm_hidden_size must be a positive multiple of base.lm_heads (4), got 30"),
        ("--base.vision_hidden_sizes=[]", "base.vision_hidden_sizes must be one or more positive widths"),
        ("--base.lr=-1", "base.lr must be positive"),
        ("--model.grid=0", "model.grid must be at least 1, or null"),
        ("--world.max_objects=0", "world.max_objects must be in 1..9, got 0"),  # it named min_objects
        ("--world.raw_hallucination_rate=2", "world.raw_hallucination_rate must be in [0, 1]"),
        ("--data.recipe=nope.yaml", "data.recipe: nope.yaml is no file"),
        ("--eval.split=banana", "eval.split must be train, val or test, got 'banana'"),
        # "functools.partial(<function call_without_instantiate_context ...>) argument after ** must be a mapping"
        ("--stages.align.trainer=[1]", "stages.align.trainer must be a mapping of its keys, got [1]"),
    ],
)
def test_a_bad_value_fails_before_any_work_naming_its_field(tmp_path, capsys, flag, message):
    # Checked when the config is read: before, some failed only once a stage had started, after its folder
    # (a finished stage's checkpoints and results) had been emptied.
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path / "run", *((flag,) if isinstance(flag, str) else flag))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"zero_optimization": {"stage": 2},}', "is not valid JSON"),
        ('[{"zero_optimization": {"stage": 2}}]', "holds a JSON list"),
        # Lightning fills these from the flags only when the JSON leaves them out: set there, clipping and
        # precision silently beat the flags, and accumulation failed at fit start naming neither.
        ('{"gradient_clipping": 1.0}', "gradient_clipping (use --trainer.gradient_clip_val)"),
        ('{"bf16": {"enabled": true}}', "bf16 (use --trainer.precision)"),
        ('{"gradient_accumulation_steps": 4}', "gradient_accumulation_steps (use --trainer.accumulate_grad_batches)"),
    ],
)
def test_a_deepspeed_config_is_read_before_any_work(tmp_path, capsys, content, message):
    config = tmp_path / "ds.json"
    config.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path / "run", "--trainer.strategy=deepspeed", f"--trainer.deepspeed_config={config}")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "trainer.deepspeed_config:" in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_a_shipped_config_is_found_from_any_folder_and_only_a_shipped_one(tmp_path, monkeypatch):
    from stages.run import CONFIG_DIR, project_config, with_project_configs

    monkeypatch.chdir(tmp_path)
    shipped = "configs/curriculum/mgm_2b.yaml"
    argv = ("curriculum", "--config", shipped, f"--config={shipped}", "--config", "{seed: 3}", "--config", "../x.yaml")
    assert with_project_configs(argv) == (
        "curriculum", "--config", str(CONFIG_DIR / "curriculum" / "mgm_2b.yaml"),
        f"--config={CONFIG_DIR / 'curriculum' / 'mgm_2b.yaml'}", "--config", "{seed: 3}", "--config", "../x.yaml",
    )  # fmt: skip
    (tmp_path / shipped).parent.mkdir(parents=True)
    (tmp_path / shipped).write_text("seed: 1\n")
    assert project_config(shipped) == shipped, "a file of that name in the working folder is the user's own"


def test_16_true_is_refused_outside_deepspeed(tmp_path, capsys):
    """float16 weights and AdamW state: eps (1e-8) is 0 in float16, and the first step turned every weight NaN,
    while the run exited 0 and exported NaN."""
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path / "run", "--stages.sft_long.trainer.precision=16-true")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "stages.sft_long.trainer.precision 16-true keeps the optimizer" in err, err
    assert not (tmp_path / "run").exists()


def test_precision_aliases_are_lightnings_mixed_precisions():
    """`bf16` and `16` are Lightning's bf16-mixed and 16-mixed: a rescore cast a `bf16` stage's model to bfloat16,
    which its evaluations during training never saw, and its scores changed."""
    from stages.config import trained_dtype

    assert trained_dtype("bf16", None) is None and trained_dtype("16", "ddp") is None
    assert trained_dtype("bf16-true", None) == torch.bfloat16 and trained_dtype("64", None) == torch.float64
    assert trained_dtype("bf16", "deepspeed") == torch.bfloat16
    assert trained_dtype("16-mixed", "deepspeed") == torch.float16
    assert trained_dtype(None, None) is None and trained_dtype("32", "deepspeed") is None


def test_deepspeed_not_installed_is_named_before_any_work(tmp_path, capsys, monkeypatch):
    """Without the deepspeed package, Lightning failed when the first stage's Trainer was built: after the data
    build and the base models' pretraining, with a traceback."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a)
    )
    with pytest.raises(SystemExit) as exit_info:
        _run(
            tmp_path / "run",
            "--stages.sft_long.trainer.strategy=deepspeed",
            "--stages.sft_long.trainer.deepspeed_config=configs/deepspeed/zero2.json",
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "stages.sft_long.trainer.strategy deepspeed: deepspeed is not installed" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_only_rank_zero_touches_a_stage_folder(tmp_path):
    """Two ranks both rewrote config.yaml: one read the other's half-written (empty) file, got None from
    yaml and failed (seen once in CI's two-rank ZeRO-3 run)."""
    from stages.stage import prepare_stage_folder

    stage_dir = tmp_path / "sft_short"
    stage_dir.mkdir()
    (stage_dir / "config.yaml").write_text("")  # rank 0 is writing it
    (stage_dir / "checkpoints").mkdir()
    prepare_stage_folder(stage_dir, "new", {"lr": 1}, rank_zero=False)
    assert (stage_dir / "config.yaml").read_text() == "" and (stage_dir / "checkpoints").is_dir()
    (stage_dir / "config.yaml").write_text("fingerprint: old\n")
    prepare_stage_folder(stage_dir, "new", {"lr": 1}, rank_zero=True)
    assert not (stage_dir / "checkpoints").exists()  # a changed config starts the stage afresh
    assert (stage_dir / "config.yaml").read_text() == "fingerprint: new\nlr: 1\n"


def test_interrupted_curriculum_resumes_from_its_last_checkpoint(tmp_path):
    """SIGINT during sft_short (after align finished), then the same command again."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "stages.run", "curriculum", f"--run_dir={run_dir}", *MICRO_ARGS]
    args += ["--stages.sft_short.trainer.max_steps=400"]  # long enough to be caught in the middle
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A shell that starts jobs in the background makes them ignore SIGINT, and Python then installs
    # no KeyboardInterrupt handler: restore the default so the test sees what a terminal user sees.
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    ckpt = run_dir / "sft_short" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before sft_short wrote a checkpoint"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert (run_dir / "align" / "done.json").is_file()
    assert not (run_dir / "sft_short" / "done.json").exists()

    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = [line.split() for line in result.stdout.splitlines() if "steps" in line and "recall" in line]
    assert [row[0] for row in summary] == STAGES
    assert "skipped: done before" in " ".join(summary[0]) and "skipped" not in " ".join(summary[1])
    assert "resuming from" in result.stderr
    assert json.loads((run_dir / "sft_short" / "done.json").read_text())["global_steps"] == 400
    assert (run_dir / "sft_long" / "done.json").is_file()


def test_unknown_override_names_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path / "run", "--stages.align.no_such_key=1")
    assert "no_such_key" in capsys.readouterr().err


def test_print_config_checks_the_values_before_it_prints(capsys):
    # jsonargparse prints before any check: a config that would fail at once was printed as if it were fine.
    with pytest.raises(SystemExit) as exit_info:
        main(["curriculum", "--eval.limit=0", "--print_config"])
    assert exit_info.value.code == 2 and "eval.limit must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["curriculum", "--eval.limit=5", "--print_config"])
    assert exit_info.value.code == 0 and "  limit: 5" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flag",
    ["--stages.sft_lng.trainer.max_steps=3", "--stages.sft_lng.max_words=30", "--stages.sft_lng.trainable=[lora]"],
)
def test_a_misspelt_stage_name_in_a_flag_is_named(tmp_path, capsys, flag):
    # jsonargparse's own message only says that a StageSpec lacks trainable and/or max_words; a flag that
    # set one of them got no hint at all.
    with pytest.raises(SystemExit):
        _run(tmp_path / "run", flag)
    err = capsys.readouterr().err
    assert "--stages.sft_lng.*" in err and "is a stage name misspelt?" in err


def test_an_inline_config_names_no_run_folder():
    # jsonargparse records an inline --config as None: the run folder became runs/None.
    from stages.run import build_parser, checked_curriculum, default_run_dir

    parser = build_parser()
    args = parser.parse_args(["curriculum", "--config", "configs/curriculum/tiny.yaml", "--config", "{seed: 3}"])
    cfg, files = checked_curriculum(parser, args)
    assert cfg.seed == 3 and files == ["configs/curriculum/tiny.yaml"]
    assert default_run_dir(files) == Path("runs/tiny")


def test_a_stage_can_leave_a_deepspeed_run(tmp_path):
    # The run's deepspeed_config followed a stage that set another strategy, and the check then refused a
    # stages.align.trainer.deepspeed_config the user never set.
    from stages.run import build_parser, checked_curriculum

    parser = build_parser()
    argv = ["curriculum", "--trainer.strategy=deepspeed", "--trainer.deepspeed_config=configs/deepspeed/zero2.json"]
    cfg, _ = checked_curriculum(parser, parser.parse_args([*argv, "--stages.align.trainer.strategy=auto"]))
    align = cfg.trainer_of("align")
    assert align.strategy == "auto" and align.deepspeed_config is None
    assert cfg.trainer_of("sft_long").deepspeed_config == "configs/deepspeed/zero2.json"


def test_missing_model_folder_names_the_flag(tmp_path, capsys):
    code = _run(tmp_path / "run", f"--model.vision_path={tmp_path / 'nowhere'}", f"--model.lm_path={tmp_path}")
    assert code == 2
    err = capsys.readouterr().err
    assert "--model.vision_path" in err and "nowhere" in err


def test_init_from_an_unknown_stage_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path / "run", "--stages.sft_long.init_from=sft_huge")
    assert "sft_huge" in capsys.readouterr().err


def test_the_command_line_puts_the_hub_offline_before_it_is_imported():
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: setting it in main() came too late."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = "import stages.run, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stderr[-2000:]
    # Only the command line: importing stages.* set the variable for the whole process, so a user's own script
    # that builds shards with stages.data could no longer download anything from the hub.
    code = "import os, stages.data, stages.stage; print(os.environ.get('HF_HUB_OFFLINE'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "None", done.stderr[-2000:]


@pytest.mark.parametrize(("flag", "value"), [("warn", "warn"), ("true", True), ("false", False)])
def test_deterministic_takes_lightnings_warn(flag, value):
    # The GPU test runs "warn": a CUDA op without a deterministic kernel must not end the run.
    from stages.run import build_parser, curriculum_config

    parser = build_parser()
    args = parser.parse_args(["curriculum", f"--trainer.deterministic={flag}"])
    args.curriculum.pop("config", None)
    cfg = curriculum_config(parser.instantiate(args).curriculum)
    assert cfg.trainer.kwargs()["deterministic"] == value and type(cfg.trainer.deterministic) is type(value)


def test_help_explains_the_stage_keys(capsys):
    with pytest.raises(SystemExit):
        main(["curriculum", "--help"])
    out = capsys.readouterr().out
    assert "--stages" in out and "--trainer.max_epochs" in out and "--print_config" in out
    # Each field's docstring is its help text.
    assert "Also evaluate every this many optimizer steps" in " ".join(out.split())
    # Every section has a title: a dataclass without a docstring showed its generated signature there.
    assert "Config(" not in out and "The shards every stage reads" in out


def test_an_injected_nan_is_alerted_in_every_stage_and_skipped(tmp_path):
    run_dir = tmp_path / "run"
    assert _run(run_dir, "--stability.faults={1: nan}", "--stability.instability.action=skip") == 0
    for name in STAGES:
        alerts = [json.loads(line) for line in (run_dir / name / "alerts.jsonl").read_text().splitlines()]
        assert [(a["kind"], a["step"], a["action"]) for a in alerts] == [("non_finite", 1, "skip")]
        assert len(alerts[0]["keys"]) == 8 and alerts[0]["stage"] == name
    losses = json.loads((run_dir / "sft_long" / "losses.json").read_text())["losses"]
    assert len(losses) == 3


def test_action_stop_ends_the_run_with_a_checkpoint_and_a_nonzero_exit(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _run(run_dir, "--stability.faults={1: nan}", "--stability.instability.action=stop") == 3
    assert "stopped by a stability alert at step 1;" in capsys.readouterr().err  # alerts.jsonl's step (it said 2)
    assert (run_dir / "align" / "checkpoints" / "stopped.ckpt").is_file()
    assert not (run_dir / "align" / "done.json").exists()
    # The stopped run has its report: the alert that stopped it, and the stage named as stopped.
    report = (run_dir / "report.md").read_text()
    assert "| align | 1 | non_finite |" in report and "| stop |" in report
    assert "- align: stopped by a stability alert" in report
    assert "sft_short" not in report, "a stage that never started is not reported"
    assert main(["report", f"--run_dir={run_dir}"]) == 0


def test_a_shrinking_word_budget_is_warned_about(caplog):
    from stages.config import CurriculumConfig, StageSpec

    growing = {"a": StageSpec(["projector"], 8, init_from="base"), "b": StageSpec(["projector", "lora"], 20)}
    CurriculumConfig(stages=growing)
    assert "max_words" not in caplog.text
    shrinking = {**growing, "c": StageSpec(["projector", "lora"], 12)}
    CurriculumConfig(stages=shrinking)
    assert "stages.c.max_words 12 is below that of b (20), which it starts from" in caplog.text


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--split", "validation"], 'key "split"'), (["--limit", "0"], 'key "limit"')],
)
def test_eval_refuses_an_unknown_split_and_a_limit_below_one(flags, message, capsys):
    """An unknown split crashed with a KeyError; --limit 0 or -3 evaluated one image."""
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "any", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # A stage's folder is emptied when its config changes: "data" emptied the shards, "../x" a folder
        # outside the run; "" ran in the run folder itself.
        (
            "stages: {data: {trainable: [projector], max_words: 8, init_from: base, trainer: {max_steps: 2}}}",
            "stage name 'data' is taken",
        ),
        (
            "stages: {'../x': {trainable: [projector], max_words: 8, init_from: base, trainer: {max_steps: 2}}}",
            "stage name '../x' must be",
        ),
        (
            "stages: {'': {trainable: [projector], max_words: 8, init_from: base, trainer: {max_steps: 2}}}",
            "stage name '' must be",
        ),
        ("stages: {Data: {trainable: [projector], max_words: 8, init_from: base}}", "stage name 'Data' is taken"),
        (
            "stages: {a: {trainable: [projector], max_words: 8, init_from: base}, A: {trainable: [projector], "
            "max_words: 8}}",
            "'A' and an earlier stage differ only in case",
        ),
        ("world: 5", "world must be a mapping of its keys, got 5"),
        ("stages: {a: {trainable: [projector], max_words: 8, init_from: base, trainer: [1]}}", "stages.a.trainer must"),
        ("seed: 1\nstages: {a: [\n", "not valid YAML"),  # jsonargparse named "<unicode string>", not the file
        ("- 1\n- 2\n", "holds a list, not a mapping of config keys"),
    ],
)
def test_a_bad_config_file_fails_naming_its_key_or_itself(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path / "run", "--config", str(path))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err
    if "YAML" in message or "list" in message:
        assert str(path) in err
    assert not (tmp_path / "run").exists()


def test_the_data_command_names_a_bad_value_without_a_traceback(tmp_path, capsys):
    args = ["data", "--config", "configs/data/synthetic.yaml", "--out_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--world.max_objects=0"])
    assert exit_info.value.code == 2 and "world.max_objects must be in 1..9" in capsys.readouterr().err
    from stages.data import RecipeConfig

    with pytest.raises(ValueError, match="shard_size must be at least 1"):
        RecipeConfig(shard_size=0)  # wrote one sample per tar
    with pytest.raises(ValueError, match="val_share and test_share must not be negative"):
        RecipeConfig(val_share=-0.5, test_share=0.6)  # passed the check on their sum


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals are for machines without the device")
@pytest.mark.parametrize(
    ("flag", "message"),
    [
        # A ModuleNotFoundError for torch_xla once the first stage built its Trainer, after the data.
        ("--trainer.accelerator=tpu", "trainer.accelerator tpu: this machine has no such device"),
        # int("[0]") failed in a traceback; now a list parses, and is refused on the CPU, as Lightning does late.
        ("--trainer.devices=[0]", "trainer.devices [0]: device indices name GPUs"),
        ("--trainer.devices=0,1", "trainer.devices '0,1': device indices name GPUs"),
        # Lightning ran bf16-mixed instead, while config.yaml and the report said 16-mixed.
        ("--trainer.precision=16-mixed", "trainer.precision 16-mixed: float16 autocast needs a GPU"),
        ("--stages.sft_long.trainer.precision=16", "stages.sft_long.trainer.precision 16: float16 autocast needs"),
    ],
)
def test_a_device_this_machine_lacks_is_named_before_the_data(tmp_path, capsys, flag, message):
    assert _run(tmp_path / "run", flag) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "base").exists(), "checked before the base models are pretrained"


def test_a_shard_folder_without_an_index_is_named_before_the_base_models(tmp_path, capsys):
    # It failed after the tiny base models' pretraining (minutes with the default config).
    assert _run(tmp_path / "run", "--data.shard_dir=/nonexistent") == 2
    assert "--data.shard_dir: /nonexistent has no index.json" in capsys.readouterr().err
    assert not (tmp_path / "run" / "base").exists()


def test_a_long_inline_config_is_read_as_yaml(capsys):
    # Path(...).is_file() raised "File name too long" for an inline config over 255 characters: a traceback.
    inline = "{seed: 3, " + ", ".join(f"world: {{train_size: {100 + i}}}" for i in range(20)) + "}"
    assert len(inline) > 255
    with pytest.raises(SystemExit) as exit_info:
        main(["curriculum", "--config", inline, "--print_config"])
    assert exit_info.value.code == 0 and "seed: 3" in capsys.readouterr().out


def test_transformers_5_17_without_torchvision_is_named_before_any_work(monkeypatch, capsys):
    """transformers 5.17 (the GPU machine's) loads image processors only with torchvision: without it every command
    failed at its first image processor, inside transformers. pyproject allows 5.17, so the CLI names the fix."""
    from stages.run import image_processor_problem

    assert "install torchvision" in image_processor_problem("5.17.0", has_torchvision=False)
    assert image_processor_problem("5.17.0", has_torchvision=True) is None
    assert image_processor_problem("5.18.0.dev0", has_torchvision=False) is None
    assert image_processor_problem("5.25.0", has_torchvision=False) is None
    import importlib.metadata
    import importlib.util

    real_version, real_find_spec = importlib.metadata.version, importlib.util.find_spec
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "5.17.0" if name == "transformers" else real_version(name)
    )
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real_find_spec(name, *a)
    )
    assert main(["curriculum", "--run_dir", "/nonexistent/never-written"]) == 2
    assert (
        "error: transformers 5.17.0 loads image processors only with torchvision installed" in capsys.readouterr().err
    )
    # A command that loads no model is not stopped: report goes on to its own error.
    assert main(["report", "--run_dir", "/nonexistent/never-written"]) == 2
    assert "torchvision" not in capsys.readouterr().err


def test_a_run_trainer_key_that_every_stage_sets_is_said_to_be_unused(caplog):
    # `--trainer.max_steps 10` for a quick run was silently ignored: every stage of every profile sets its own.
    from stages.curriculum import warn_shadowed_trainer_keys
    from stages.run import build_parser, curriculum_config

    parser = build_parser()
    flags = ["--trainer.max_steps=10", "--stages.align.trainer.accumulate_grad_batches=2"]  # only align: used
    args = parser.parse_args(["curriculum", *flags])
    args.curriculum.pop("config", None)
    warn_shadowed_trainer_keys(curriculum_config(parser.instantiate(args).curriculum))
    said = [record.getMessage() for record in caplog.records]
    assert said == ["trainer.max_steps=10 is not used: every stage sets its own (--stages.<name>.trainer.max_steps)"]
