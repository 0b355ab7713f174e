"""Periodic evaluation and the run report, on the shared micro run."""

from __future__ import annotations

import json
import shutil

import pytest

from stages.run import main


def test_periodic_evaluation_is_logged_and_kept_in_metrics_json(micro_run):
    from tests.tensorboard import RunEvents

    for name in ("align", "sft_short", "sft_medium", "sft_long"):
        metrics = json.loads((micro_run / name / "metrics.json").read_text())
        assert [h["global_step"] for h in metrics["history"]] == [2, 3]  # every 2 steps, and the stage's end
        # VQA answers decode greedily whatever the captions' num_beams (the record said nothing of them).
        generation = {"max_new_tokens": 12, "num_beams": 1, "do_sample": False, "vqa_num_beams": 1}
        assert metrics["generation"] == generation
        assert metrics["history"][-1]["chair_i"] == metrics["chair_i"]
        assert sum(b["images"] for b in metrics["by_length"].values()) == metrics["images"] == 8
    events = RunEvents(micro_run / "tb")
    # Every 2 steps and at each stage's end (3 steps), at the index of the step each follows.
    assert [e.step for e in events.Scalars("eval/chair_i")] == [1, 2, 4, 5, 7, 8, 10, 11]
    grid = events.Images("eval/sft_long/grid")[-1]
    assert grid.width == 4 * 160 and grid.height > 2 * 160  # 8 images in 2 rows, captions below each


def test_report_is_written_from_the_runs_files(micro_run, capsys):
    report = (micro_run / "report.md").read_text()
    for section in ("## Data", "## Stages", "## Training loss", "## Alerts", "## Evaluation", "## Checkpoints"):
        assert section in report
    assert (micro_run / "loss_curves.png").stat().st_size > 1000
    assert (micro_run / "eval_history.png").stat().st_size > 1000
    sft_long = json.loads((micro_run / "sft_long" / "metrics.json").read_text())
    assert f"| sft_long | {sft_long['chair_i']:.3f} | {sft_long['chair_s']:.3f} |" in report
    # The run asked its questions too (eval.vqa): the accuracy, in metrics.json and TensorBoard, was not here.
    assert f"| {sft_long['cider_d']:.3f} | {sft_long['vqa_exact']:.3f} |" in report
    losses = json.loads((micro_run / "align" / "losses.json").read_text())["losses"]
    assert f"| align | {losses[0]:.4f} | {losses[-1]:.4f} |" in report
    done = json.loads((micro_run / "align" / "done.json").read_text())
    resources = done["resources"]
    assert resources["train_samples"] == 3 * 8 and resources["tokens_per_s"] > 0
    # Both rates over the same time: their ratio is the tokens per sample (train_s itself is rounded).
    ratio = resources["tokens_per_s"] / resources["samples_per_s"]
    assert ratio == pytest.approx(resources["train_tokens"] / resources["train_samples"], rel=2e-3)
    assert f"| align | {done['wall_s']:.3f} |" in report

    (micro_run / "report.md").unlink()
    assert main(["report", "--run_dir", str(micro_run)]) == 0
    assert (micro_run / "report.md").read_text() == report


def test_the_plots_show_every_stages_losses_and_evaluations_on_one_step_axis(micro_run, tmp_path):
    from stages.report import plot_eval_history, plot_losses

    stages = ["align", "sft_short", "sft_medium", "sft_long"]
    lines, offset = plot_losses(micro_run, stages, tmp_path / "losses.png"), 0
    for name in stages:
        losses = json.loads((micro_run / name / "losses.json").read_text())["losses"]
        assert lines[name] == (list(range(offset, offset + len(losses))), losses)  # TensorBoard's steps
        offset += len(losses)
    history = plot_eval_history(micro_run, stages, tmp_path / "eval.png")
    assert set(history) == {"chair_i", "recall"}
    sft_long = json.loads((micro_run / "sft_long" / "metrics.json").read_text())["history"]
    # At the index of the step each evaluation follows, on the run's axis (9 steps before sft_long).
    steps = [9 + h["global_step"] - 1 for h in sft_long]
    assert history["recall"]["sft_long"] == (steps, [h["recall"] for h in sft_long])
    assert (tmp_path / "losses.png").stat().st_size > 1000 and (tmp_path / "eval.png").stat().st_size > 1000


def test_report_lists_a_non_finite_alert(micro_run, tmp_path):
    from callbacks.alerts import Alert, AlertSinks

    run = tmp_path / "run"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb", "base", "export", "*.ckpt"))
    AlertSinks("sft_long", run / "sft_long" / "alerts.jsonl").emit(
        Alert("sft_long", 2, 0, "non_finite", float("nan"), float("inf"), "stop", ["k1"])
    )
    assert main(["report", "--run_dir", str(run)]) == 0
    assert "| sft_long | 2 | non_finite | nan | inf | stop |" in (run / "report.md").read_text()


def test_vqa_at_each_stage_end_and_from_the_eval_command(micro_run):
    from callbacks.evaluation import vqa_scores
    from stages.export import evaluate_model

    metrics = json.loads((micro_run / "sft_long" / "metrics.json").read_text())
    assert metrics["vqa_questions"] == 4 * 8  # the world asks 4 questions per image
    assert {"vqa_exact", "vqa_exact_yes_no", "vqa_exact_count"} <= metrics.keys()
    from tests.tensorboard import RunEvents

    # The stage-end scores reach TensorBoard too (they were added only after the logging).
    logged = RunEvents(micro_run / "tb").Scalars("eval/vqa_exact")
    assert [e.step for e in logged] == [2, 5, 8, 11] and logged[-1].value == pytest.approx(metrics["vqa_exact"])
    result = evaluate_model(micro_run / "sft_long", limit=8, max_new_tokens=12, vqa=True)
    assert result["metrics"]["vqa_exact"] == metrics["vqa_exact"]
    # (key, type, answer, generated, human answers): 2 of 3 right overall, yes/no 1 of 2
    answers = [
        ("a", "yes_no", "yes", "yes", ["yes"]), ("a", "yes_no", "no", "yes", ["no"]), ("b", "count", "two", "2", ["2"]),
    ]  # fmt: skip
    assert vqa_scores(answers) == {
        "vqa_exact": 2 / 3, "vqa_questions": 3, "vqa_exact_count": 1.0, "vqa_exact_yes_no": 0.5,
    }  # fmt: skip
    # Real VQA data: ten human answers a question, and VQAv2's accuracy beside exact match (on the most given).
    answers = [("a", "yes_no", "no", "yes", ["yes"] * 2 + ["no"] * 8), ("b", "count", "2", "2", ["2"] * 10)]
    scores = vqa_scores(answers)
    assert scores["vqa_exact"] == 0.5 and scores["vqa_accuracy"] == pytest.approx((0.6 + 1.0) / 2)
    assert scores["vqa_accuracy_yes_no"] == pytest.approx(0.6) and scores["vqa_accuracy_count"] == 1.0


def test_each_question_is_answered_from_its_own_prompt(micro_run):
    """The stage's answers are the greedy decodes of each question in place of the captioning prompt: the
    VQA test above checked keys and counts, which held with the question left out or the answer ignored."""
    import torch

    from callbacks.evaluation import answer_questions, as_image
    from datamodules.caption_datamodule import CaptionDataModule
    from datamodules.captions import PromptFormat
    from modules.loading import count_image_tokens
    from stages.export import find_stage, load_stage_model

    stage = find_stage(micro_run / "sft_long")
    vlm, tokenizer, processor, config = load_stage_model(stage)
    vlm.eval()
    fmt = PromptFormat(tokenizer, count_image_tokens(vlm, processor), config.prompt, config.chat_template)
    samples = CaptionDataModule(stage.shard_dir, max_words=10**6).eval_samples("test", 2)
    answers = answer_questions(vlm, samples, fmt, processor, batch_size=3, max_new_tokens=6)
    expected = []
    for key, image, meta in samples:
        pixels = processor([as_image(image)], return_tensors="pt")["pixel_values"]
        for q in meta["questions"]:
            prompt = fmt.asking(q["question"]).prefix()
            asked = tokenizer(q["question"], add_special_tokens=False)["input_ids"]
            assert prompt[-len(asked) :] == asked  # the question follows the image tokens
            ids = torch.tensor([prompt])
            with torch.no_grad():
                tokens = vlm.generate(
                    ids, torch.ones_like(ids), pixels, do_sample=False, max_new_tokens=6,
                    eos_token_id=fmt.stop_ids, pad_token_id=tokenizer.pad_token_id,
                )  # fmt: skip
            answer = tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
            expected.append((key, q["type"], q["answer"], answer, [q["answer"]]))
    assert sorted(answers) == sorted(expected) and len(answers) == 8
    # A question of special tokens alone (LLaVA's "<image>\n" with its text lost) is not asked: asked nothing, the
    # model captioned the image and the caption was scored as its answer.
    key, image, meta = samples[0]
    blank = [(key, image, {**meta, "questions": [{**meta["questions"][0], "question": "<image>\n"}]})]
    assert answer_questions(vlm, blank, fmt, processor, batch_size=3, max_new_tokens=6) == []


def test_a_moved_run_is_still_finished_and_reports_and_exports_from_anywhere(micro_run, tmp_path, monkeypatch, capsys):
    # Inputs inside the run (shards, tiny base models) are recorded relative to it: before, a moved run
    # retrained every stage, and report / export looked for the shards relative to the working folder.
    from stages.export import export_model, find_stage
    from tests.conftest import MICRO_ARGS

    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(micro_run, moved, copy_function=shutil.copy2)  # as `mv` or `cp -p`: times kept
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    args = ["curriculum", f"--run_dir={moved}", *MICRO_ARGS, "--eval.every_n_steps=2", "--eval.vqa=true"]
    assert main(args) == 0
    assert capsys.readouterr().out.count("skipped: done before") == 4
    assert main(["report", "--run_dir", str(moved)]) == 0
    report = (moved / "report.md").read_text()
    assert "No data report beside the shards" not in report and str(moved / "data") in report
    assert (export_model(find_stage(moved), tmp_path / "exported") / "model.safetensors").is_file()


def test_the_report_names_unfinished_and_stale_stages(micro_run, tmp_path):
    import yaml

    run = tmp_path / "run"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb", "*.ckpt"))
    assert "Not every stage's results are current" not in (micro_run / "report.md").read_text()
    # A rerun with a changed sft_short, interrupted in sft_medium: sft_short done anew (a new fingerprint),
    # sft_medium unfinished; then sft_medium's new config written too: sft_long is from the old sft_medium.
    path = run / "sft_short" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["fingerprint"] = "rerun"
    path.write_text(yaml.safe_dump(config))
    (run / "sft_short" / "done.json").write_text(json.dumps({"fingerprint": "rerun", "global_steps": 3}))
    (run / "sft_medium" / "done.json").unlink()
    assert main(["report", "--run_dir", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "- sft_short:" not in report and "- align:" not in report
    assert "- sft_medium: unfinished (no done.json)" in report
    assert "- sft_long: trained from an earlier sft_medium" not in report  # sft_medium's config is unchanged
    path = run / "sft_medium" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["fingerprint"] = "rerun"
    path.write_text(yaml.safe_dump(config))
    assert main(["report", "--run_dir", str(run)]) == 0
    assert (
        "- sft_long: trained from an earlier sft_medium, which has been rerun since" in (run / "report.md").read_text()
    )


def test_the_report_of_an_interrupted_run_shows_what_was_evaluated(micro_run, tmp_path):
    # The last stage unfinished: the report read its (missing) metrics and said "Held-out images: 0;
    # generation: {}", and its steps cell "None"; the warn-only monitor showed as "instability: null".
    run = tmp_path / "run"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb", "*.ckpt"))
    (run / "sft_long" / "done.json").unlink()
    (run / "sft_long" / "metrics.json").unlink()
    assert main(["report", "--run_dir", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "Held-out images: 8; generation: `{" in report and "generation: `{}`" not in report
    assert "| sft_long | projector, lora | 48 | - |" in report and "| None |" not in report
    assert "instability: null" not in report and "action warn" in report


def test_the_report_names_stages_trained_on_inputs_rebuilt_since(micro_run, tmp_path):
    """A rerun that rebuilt the shards (another world) and stopped before the first stage: every stage read as
    current, their scores those of the old shards under the new shards' data report."""
    import os

    run = tmp_path / "run"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb", "*.ckpt"))
    assert main(["report", "--run_dir", str(run)]) == 0
    assert "Not every stage's results are current" not in (run / "report.md").read_text()
    shard = next((run / "data").glob("*.tar"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # rewritten, same size
    assert main(["report", "--run_dir", str(run)]) == 0
    report = (run / "report.md").read_text()
    for name in ("align", "sft_short", "sft_medium", "sft_long"):
        assert f"- {name}: its shards changed since it trained (rebuilt, or copied without" in report
    from stages.export import export_model, find_stage

    export_model(find_stage(run), run / "exported")  # the trained model is as it was: export takes it
    shutil.rmtree(run / "base")
    assert main(["report", "--run_dir", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert (
        f"its shards changed since it trained (rebuilt, or copied without their file times); its vision tower "
        f"({run / 'base'}" in report
    )


def test_the_report_names_stages_scored_with_other_evaluation_settings(micro_run, tmp_path):
    """A rerun with new evaluation settings, stopped while it rescored sft_medium: align and sft_short scored
    with 3 new tokens, the others with 12, and the report showed one generation setting and no problem."""
    run = tmp_path / "run"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb", "*.ckpt"))
    for name in ("align", "sft_short"):
        done = json.loads((run / name / "done.json").read_text())
        (run / name / "done.json").write_text(json.dumps({**done, "eval_fingerprint": "rescored"}))
        metrics = json.loads((run / name / "metrics.json").read_text())
        metrics["generation"]["max_new_tokens"] = 3
        (run / name / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", "--run_dir", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "- align:" not in report and "- sft_short:" not in report
    for name in ("sft_medium", "sft_long"):
        assert f"- {name}: scored with other evaluation settings than align" in report
    assert 'generation: align `{"max_new_tokens": 3,' in report and 'sft_long `{"max_new_tokens": 12,' in report


def test_report_names_a_folder_that_is_no_run_or_has_no_started_stage(tmp_path, capsys):
    assert main(["report", "--run_dir", str(tmp_path)]) == 2
    assert f"{tmp_path} has no stages.json" in capsys.readouterr().err
    (tmp_path / "stages.json").write_text(json.dumps({"stages": ["align"]}))
    assert main(["report", "--run_dir", str(tmp_path)]) == 2
    assert "no stage of" in capsys.readouterr().err


def test_a_run_finished_before_stages_json_existed_still_reports(micro_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb", "base", "*.ckpt", "stages.json"))
    assert main(["report", "--run_dir", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "| sft_long |" in report and "| cut short |" in report  # the micro run's captions reach max_new_tokens


def test_vqa_answers_get_the_tokens_their_references_take_and_cut_captions_are_said(micro_run, tmp_path, caplog):
    """VQA answers were cut at a fixed 3 tokens ("yellow" takes 7 with a subword tokenizer: no exact match
    whatever the model); captions cut at max_new_tokens were scored with nothing said, then said once a process
    (the first evaluation's count; no later stage's), and counted nowhere."""
    from callbacks.evaluation import CaptionEvaluation, answer_questions, generate_captions
    from datamodules.caption_datamodule import CaptionDataModule
    from datamodules.captions import PromptFormat
    from modules.loading import count_image_tokens
    from stages.export import find_stage, load_stage_model

    stage = find_stage(micro_run / "sft_long")
    vlm, tokenizer, processor, config = load_stage_model(stage)
    vlm.eval()
    fmt = PromptFormat(tokenizer, count_image_tokens(vlm, processor), config.prompt, config.chat_template)
    samples = CaptionDataModule(stage.shard_dir, max_words=10**6).eval_samples("test", 2)
    question = samples[0][2]["questions"][0]
    samples[0][2]["questions"][0] = {**question, "answer": "a red circle above a blue square"}  # 7 words + end
    budgets = []
    generate = vlm.generate
    vlm.generate = lambda *args, **kwargs: budgets.append(kwargs["max_new_tokens"]) or generate(*args, **kwargs)
    answer_questions(vlm, samples, fmt, processor, batch_size=8)
    assert set(budgets) == {9}, "its 7 words and end token, and one more: an answer cut there is no match"
    assert generate_captions(vlm, samples, fmt, processor, 8, max_new_tokens=1).cut == [True, True]
    with caplog.at_level("WARNING"):
        for name in ("first", "second"):  # each stage's final evaluation says its own
            evaluation = CaptionEvaluation(name, samples, fmt, processor, tmp_path / name / "metrics.json", 1)
            assert evaluation.rescore(vlm, 3)["cut_short"] == 2.0
            assert json.loads((tmp_path / name / "metrics.json").read_text())["cut_short"] == 2.0
    for name in ("first", "second"):
        assert f"{name} evaluation: 2 of 2 captions reached max_new_tokens=1 before an end token" in caplog.text


def test_a_stage_scored_again_keeps_its_point_in_the_evaluation_plot(micro_run, tmp_path):
    """A rescore empties a stage's history (its evaluations during training are not redone): eval_history.png
    showed no point for it, though metrics.json held its new scores."""
    from stages.report import plot_eval_history

    run = tmp_path / "run"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb", "base", "export", "*.ckpt"))
    metrics = json.loads((run / "align" / "metrics.json").read_text())
    (run / "align" / "metrics.json").write_text(json.dumps({**metrics, "history": []}))
    lines = plot_eval_history(run, ["align", "sft_short"], tmp_path / "plot.png")
    assert lines["chair_i"]["align"] == ([metrics["global_step"] - 1], [metrics["chair_i"]])
    assert len(lines["chair_i"]["sft_short"][0]) > 1  # its history, the final scores at its end once


def test_a_stage_stopped_by_an_alert_has_its_loss_curve_in_the_report(tmp_path):
    """The stop was raised before losses.json was written: report.md's loss table and plot had no line for it."""
    from tests.conftest import MICRO_ARGS

    run = tmp_path / "run"
    stop = ["--stability.faults={2: nan}", "--stability.instability.action=stop"]
    assert main(["curriculum", f"--run_dir={run}", *MICRO_ARGS, *stop]) == 3
    losses = json.loads((run / "align" / "losses.json").read_text())["losses"]
    assert len(losses) == 3 and f"| align | {losses[0]:.4f} |" in (run / "report.md").read_text()


def test_a_stage_trained_on_through_nan_says_its_scores_mean_nothing(tmp_path, capsys):
    # Under `action: warn` a NaN at step 1 left every stage's weights NaN: their captions named no object, and
    # the summary and report showed CHAIR 0.000, the best scores of any run, without a word.
    from tests.conftest import MICRO_ARGS

    run = tmp_path / "run"
    assert main(["curriculum", f"--run_dir={run}", *MICRO_ARGS, "--stability.faults={1: nan}"]) == 0
    summary = [line for line in capsys.readouterr().out.splitlines() if "steps" in line]
    assert len(summary) == 4 and all("trained tensors hold NaN or inf: these scores mean nothing" in s for s in summary)
    assert json.loads((run / "sft_long" / "done.json").read_text())["non_finite_weights"] > 0
    assert "- sft_long: " in (report := (run / "report.md").read_text()) and "hold NaN or inf: its scores" in report
    assert main(["curriculum", f"--run_dir={run}", *MICRO_ARGS, "--stability.faults={1: nan}"]) == 0  # skipped
    assert "skipped: done before)  (" in capsys.readouterr().out
