"""Export and eval: the merged Hugging Face folder loads in a fresh process and computes what training did."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.export import EXPORT_RECORD, evaluate_model, export_model, find_stage, load_stage_model
from stages.run import main

# Run in a fresh interpreter, outside the repository: only transformers, torch and the folder itself.
LOAD_AND_RUN = """
import json, sys, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
folder = sys.argv[1]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
images = [Image.open(p).convert("RGB") for p in sys.argv[2:]]
pixels = processor(images, return_tensors="pt")["pixel_values"]
prompt = torch.tensor([model.prompt_ids(tokenizer)] * len(images))
mask = torch.ones_like(prompt)
with torch.no_grad():
    logits = model(prompt, mask, pixels).logits[:, -1]
    tokens = model.generate(prompt, mask, pixels, max_new_tokens=12, do_sample=False,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
print(json.dumps({"tokens": tokens.tolist(), "logits": logits.tolist(), "class": type(model).__name__}))
"""


def _in_training_outputs(source, images):
    from datamodules.captions import PromptFormat
    from modules.loading import count_image_tokens

    vlm, tokenizer, processor, config = load_stage_model(source)
    vlm.eval()
    fmt = PromptFormat(tokenizer, count_image_tokens(vlm, processor), config.prompt)
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    prompt = torch.tensor([fmt.prefix()] * len(images))
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        logits = vlm(prompt, mask, pixels).logits[:, -1]
        tokens = vlm.generate(
            prompt, mask, pixels, max_new_tokens=12, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        with vlm.lm.disable_adapter():
            base_logits = vlm(prompt, mask, pixels).logits[:, -1]
    return tokens, logits, base_logits


def test_export_loads_with_transformers_in_a_fresh_process_and_matches_training(micro_run, tmp_path):
    from datamodules.caption_datamodule import CaptionDataModule

    source = find_stage(micro_run)
    assert source.stage_dir.name == "sft_long"
    out = export_model(source, tmp_path / "exported")
    assert {"config.json", "model.safetensors", "modeling_vlm_curriculum.py", "README.md", EXPORT_RECORD} <= {
        p.name for p in out.iterdir()
    }
    samples = CaptionDataModule(source.shard_dir, max_words=100).eval_samples("test", 4)
    paths = []
    for key, image, _ in samples:
        paths.append(tmp_path / f"{key}.png")
        image.decode().save(paths[-1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, str(out), *map(str, paths)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    exported = json.loads(done.stdout.strip().splitlines()[-1])
    assert exported["class"] == "VLMCurriculumForCaptioning"

    tokens, logits, base_logits = _in_training_outputs(source, [image.decode() for _, image, _ in samples])
    assert exported["tokens"] == tokens.tolist()
    assert torch.allclose(torch.tensor(exported["logits"]), logits, atol=1e-4)
    # The LoRA adapter matters here, so matching logits means it was merged, not dropped.
    assert (logits - base_logits).abs().max() > 1e-3


def test_eval_command_scores_an_exported_model_as_its_stage(micro_run, tmp_path, capsys):
    out = export_model(find_stage(micro_run, "sft_medium"), tmp_path / "exported")
    from_export = evaluate_model(out, limit=8, max_new_tokens=12)
    from_stage = evaluate_model(micro_run / "sft_medium", limit=8, max_new_tokens=12)
    assert from_export["captions"] == from_stage["captions"]
    assert from_export["metrics"]["chair_i"] == from_stage["metrics"]["chair_i"]
    assert from_export["data"]["images"] == 8

    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--limit=8", "--max_new_tokens=12", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {"chair_i", "attr_halluc", "pope_random_f1", "cider_d", "rouge_l", "by_length"} <= printed["metrics"].keys()
    assert main(["eval", "--model", str(out), "--limit=8", "--max_new_tokens=12"]) == 0
    assert "chair_i" in capsys.readouterr().out


def test_a_stages_export_folder_and_the_design_flags_name_that_stage(micro_run, tmp_path, capsys):
    # DESIGN.md's `eval --ckpt runs/tiny/sft_long/export` said "has no summary.json; has its curriculum
    # finished?" of a finished stage, and neither `--ckpt` nor export's `--run` was a flag.
    assert find_stage(micro_run / "sft_medium" / "export").stage_dir == micro_run / "sft_medium"
    args = ["--limit=2", "--max_new_tokens=4", "--json"]
    assert main(["eval", "--ckpt", str(micro_run / "sft_medium" / "export"), *args]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(micro_run / "sft_medium"), *args]) == 0
    assert json.loads(capsys.readouterr().out)["captions"] == from_export["captions"]
    assert main(["export", "--run", str(micro_run), "--stage", "align", "--out_dir", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / EXPORT_RECORD).read_text())["stage"] == "align"
    try:  # the default folder of a stage's export/ is the stage's, not one inside its handoff files
        assert main(["export", "--run", str(micro_run / "align" / "export")]) == 0
        assert (micro_run / "align" / "export_hf" / EXPORT_RECORD).is_file()
    finally:
        shutil.rmtree(micro_run / "align" / "export_hf", ignore_errors=True)


def test_an_export_interrupted_over_an_earlier_one_leaves_that_one_whole(micro_run, tmp_path, monkeypatch, capsys):
    # Written into the earlier export's folder, an export killed after its weights kept the earlier record: eval
    # named align's stage and step beside sft_long's weights.
    import stages.export

    out = tmp_path / "hf"
    export_model(find_stage(micro_run, "align"), out)
    (out / "stray.txt").write_text("from before")
    weights = (out / "model.safetensors").read_bytes()

    def killed(*args):
        raise KeyboardInterrupt("killed while the export was written")

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(stages.export.shutil, "copyfile", killed)
        export_model(find_stage(micro_run), out)
    assert json.loads((out / EXPORT_RECORD).read_text())["stage"] == "align"
    assert (out / "model.safetensors").read_bytes() == weights
    export_model(find_stage(micro_run), out)
    assert json.loads((out / EXPORT_RECORD).read_text())["stage"] == "sft_long"
    assert not (out / "stray.txt").exists() and not (tmp_path / ".hf.partial").exists()
    # A link to a folder: the folder is replaced and the link kept (the swap failed on the link, after the merge).
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    export_model(find_stage(micro_run), tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / EXPORT_RECORD).is_file()
    # A folder of other files is not taken for an earlier export and emptied.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["export", "--run_dir", str(micro_run), "--out_dir", str(mine)]) == 2
    assert "--out_dir: " in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep me"


def test_a_second_export_into_a_folder_being_exported_is_refused(micro_run, tmp_path, capsys):
    # Both wrote into one partial folder beside it and deleted each other's files.
    from stages.paths import file_lock

    out = tmp_path / "hf"
    export_model(find_stage(micro_run, "align"), out)
    record = (out / EXPORT_RECORD).read_bytes()
    with file_lock(tmp_path / ".hf.lock", f"--out_dir {out}", purpose="an export"):  # one under way
        assert main(["export", "--run_dir", str(micro_run), "--out_dir", str(out)]) == 2
    assert f"--out_dir {out} is in use by pid {os.getpid()}" in capsys.readouterr().err
    assert (out / EXPORT_RECORD).read_bytes() == record and not (tmp_path / ".hf.partial").exists()
    assert main(["export", "--run_dir", str(micro_run), "--out_dir", str(out)]) == 0, "free again"
    assert json.loads((out / EXPORT_RECORD).read_text())["stage"] == "sft_long"


def test_eval_runs_no_code_from_the_model_folder(micro_run, tmp_path):
    # eval loaded with trust_remote_code=True: a downloaded export's modeling file ran, unasked. It also loads
    # exports whose copy of the file predates pad_to_square (eval crashed on those once).
    out = export_model(find_stage(micro_run), tmp_path / "downloaded")
    marker = tmp_path / "ran"
    with (out / "modeling_vlm_curriculum.py").open("a") as modeling:
        modeling.write(f"\nopen({str(marker)!r}, 'w').write('code from the folder ran')\n")
    from_folder = evaluate_model(out, limit=2, max_new_tokens=4)
    assert not marker.exists()
    assert from_folder["captions"] == evaluate_model(micro_run / "sft_long", limit=2, max_new_tokens=4)["captions"]


def test_eval_and_export_name_what_is_missing(micro_run, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "--model:" in err, "eval has no --run_dir to name"
    assert main(["export", "--run_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--run_dir:" in err and "is not a run folder (no stages.json)" in err
    assert main(["eval", "--model", str(tmp_path / "nowhere")]) == 2
    assert f"--model: {tmp_path / 'nowhere'} is no folder" in capsys.readouterr().err
    # A misspelt stage was reported as a stage that had not finished.
    assert main(["export", "--run_dir", str(micro_run), "--stage", "sft_shrot"]) == 2
    err = capsys.readouterr().err
    assert "--stage: no folder" in err and "sft_shrot" in err and "its stages: align, sft_short" in err


def test_eval_runs_on_the_device_and_dtype_asked_for(micro_run, capsys):
    # eval always ran on the CPU, in the dtype the model loaded in: a real 7B model on a GPU machine was
    # captioned on the CPU.
    args = ["eval", "--model", str(micro_run / "sft_long"), "--limit=2", "--max_new_tokens=2", "--json"]
    assert main([*args, "--dtype", "bfloat16"]) == 0
    used = json.loads(capsys.readouterr().out)["device"]
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"  # --device auto
    assert used == {"device": expected, "dtype": "torch.bfloat16"}
    assert main([*args, "--dtype", "bf16"]) == 2
    assert "--dtype 'bf16': use one of float32, bfloat16, float16" in capsys.readouterr().err
    assert main([*args, "--device", "gpu0"]) == 2
    assert "--device 'gpu0'" in capsys.readouterr().err
    # The run's eval.length_buckets were not passed on: eval always scored 8 / 20 / 48-word buckets.
    assert main([*args, "--length_buckets", "[3, 12]"]) == 0
    assert set(json.loads(capsys.readouterr().out)["metrics"]["by_length"]) <= {"0-3", "4-12", "13+"}
    assert main([*args, "--length_buckets", "[12, 3]"]) == 2
    assert "--length_buckets must be increasing positive word counts, got [12, 3]" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA device here" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_eval_on_the_gpu_scores_as_on_the_cpu(micro_run):
    on_cpu = evaluate_model(micro_run / "sft_long", limit=8, max_new_tokens=12, device="cpu")
    on_gpu = evaluate_model(micro_run / "sft_long", limit=8, max_new_tokens=12, device="cuda")
    assert on_gpu["device"]["device"] == "cuda:0" and on_gpu["data"] == on_cpu["data"]
    same = sum(a == b for a, b in zip(on_cpu["captions"].values(), on_gpu["captions"].values(), strict=True))
    assert same >= 6, "float32 kernels differ between devices, but rarely flip a greedy token of a tiny model"


def test_an_export_pads_to_square_as_its_training_did(micro_run, tmp_path):
    from dataclasses import replace

    from stages.export import load_exported

    source = find_stage(micro_run, "sft_long")
    model = {**source.config["model"], "pad_to_square": True}
    out = export_model(replace(source, config={**source.config, "model": model}), tmp_path / "padded")
    assert json.loads((out / "config.json").read_text())["pad_to_square"] is True
    assert type(load_exported(out)[2]).__name__ == "SquareImages"
    assert type(load_exported(export_model(source, tmp_path / "plain"))[2]).__name__ != "SquareImages"


def test_a_stage_folder_given_as_dot_finds_its_run(micro_run, monkeypatch, capsys):
    # The default base models are recorded relative to the run: Path(".").parent is ".", so they were looked
    # for inside the stage folder and eval failed naming --model.vision_path, which the user never gave.
    monkeypatch.chdir(micro_run / "sft_long")
    assert main(["eval", "--model", ".", "--limit=2", "--max_new_tokens=2", "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["model"]["stage_dir"] == str((micro_run / "sft_long").resolve())


def _copied_stage(micro_run: Path, tmp_path: Path, edit) -> Path:
    """A copy of the micro run's sft_long (no checkpoints) whose config.yaml `edit(config)` changed."""
    import yaml

    from stages.paths import input_path

    stage = tmp_path / "sft_long"
    shutil.copytree(micro_run / "sft_long", stage, ignore=shutil.ignore_patterns("checkpoints"))
    config = yaml.safe_load((stage / "config.yaml").read_text())
    edit(config)
    for key in ("shard_dir", "vision_path", "lm_path"):  # recorded relative to the run, which stays behind
        config["inputs"][key] = str(input_path(config["inputs"][key], micro_run))
    (stage / "config.yaml").write_text(yaml.safe_dump(config))
    return stage


def test_a_bf16_true_stage_is_scored_in_bfloat16_from_its_folder_and_its_export(micro_run, tmp_path):
    """Its evaluations during training ran in bfloat16; `eval` ran it in float32 and got other captions."""

    def bf16_true(config):
        config["spec"]["trainer"]["precision"] = "bf16-true"

    stage = _copied_stage(micro_run, tmp_path, bf16_true)
    from_stage = evaluate_model(stage, limit=4, max_new_tokens=8)
    assert from_stage["device"]["dtype"] == "torch.bfloat16"
    out = export_model(find_stage(stage), tmp_path / "exported")
    assert json.loads((out / EXPORT_RECORD).read_text())["trained_precision"] == "bf16-true"
    assert evaluate_model(out, limit=4, max_new_tokens=8)["device"]["dtype"] == "torch.bfloat16"
    saved = evaluate_model(out, limit=4, max_new_tokens=8, dtype="float32")
    assert saved["device"]["dtype"] == "torch.float32"


def test_a_float64_stage_loads_its_handoff_unrounded(micro_run, tmp_path):
    """A 64-true stage's float64 projector was loaded into the float32 model, then cast back: its low bits lost."""
    from safetensors.torch import load_file, save_file

    from modules.handoff import PROJECTOR_FILE

    def float64(config):
        config["spec"]["trainer"]["precision"] = "64-true"

    stage = _copied_stage(micro_run, tmp_path, float64)
    path = stage / "export" / PROJECTOR_FILE
    torch.manual_seed(0)
    wide = {key: value.double() + 1e-12 * torch.randn_like(value.double()) for key, value in load_file(path).items()}
    save_file(wide, str(path))
    source = find_stage(stage)
    vlm = load_stage_model(source, as_trained=True)[0]
    for key, value in vlm.projector.state_dict().items():
        assert torch.equal(value, wide[key]), key


def test_an_export_of_a_diverged_stage_is_refused(micro_run, tmp_path, capsys):
    """With the default action `warn`, a stage trains on through NaN; its export held NaN weights and exit 0."""
    from safetensors.torch import load_file, save_file

    from modules.handoff import PROJECTOR_FILE

    stage = _copied_stage(micro_run, tmp_path, lambda config: None)
    path = stage / "export" / PROJECTOR_FILE
    save_file({key: torch.full_like(value, float("nan")) for key, value in load_file(path).items()}, str(path))
    assert main(["export", "--run_dir", str(stage), "--out_dir", str(tmp_path / "exported")]) == 2
    assert "weights hold NaN or inf" in capsys.readouterr().err
    assert not (tmp_path / "exported").exists()


def test_an_export_loads_whole_in_the_dtype_asked_for(micro_run, tmp_path):
    """from_pretrained(dtype=bfloat16) built the tower and LM from their float32 sub-configs: only the projector
    was bf16."""
    from modules.modeling_vlm_curriculum import VLMCurriculumForCaptioning

    out = export_model(find_stage(micro_run), tmp_path / "exported")
    model = VLMCurriculumForCaptioning.from_pretrained(out, local_files_only=True, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in VLMCurriculumForCaptioning.from_pretrained(out).parameters()} == {torch.float32}


def test_a_bf16_base_merges_in_float32(micro_run, tmp_path):
    # The LoRA update added to bf16-stored weights, as training computed it: base (bf16) + scale * B @ A in
    # float32. A bf16 merge rounds most of a small update away.
    import yaml
    from safetensors.torch import load_file

    stage = _copied_stage(micro_run, tmp_path, lambda config: config["model"].update(dtype="bfloat16"))
    config = yaml.safe_load((stage / "config.yaml").read_text())
    out = export_model(find_stage(stage), tmp_path / "exported")

    merged = load_file(out / "model.safetensors")
    adapter = load_file(stage / "export" / "adapter" / "adapter_model.safetensors")
    lora = config["model"]["lora"]
    name = "model.layers.0.self_attn.q_proj"
    base = load_file(Path(config["inputs"]["lm_path"]) / "model.safetensors")[f"{name}.weight"]
    a, b = (adapter[f"base_model.model.{name}.lora_{x}.weight"].float() for x in "AB")
    expected = base.to(torch.bfloat16).float() + lora["alpha"] / lora["r"] * b @ a
    assert merged[f"lm.{name}.weight"].dtype == torch.float32
    torch.testing.assert_close(merged[f"lm.{name}.weight"], expected, rtol=1e-6, atol=1e-7)


def test_a_bf16_stage_exports_its_float32_language_model_unrounded(micro_run, tmp_path):
    # A stage that trained the LM in full hands on float32 weights (lm.safetensors). The export loaded them
    # into the bf16 model before upcasting it, and so rounded them to bf16.
    import yaml
    from safetensors.torch import load_file, save_file

    stage = _copied_stage(micro_run, tmp_path, lambda config: config["model"].update(dtype="bfloat16"))
    shutil.rmtree(stage / "export" / "adapter")  # the LM as trained in full, no adapter on it
    config = yaml.safe_load((stage / "config.yaml").read_text())
    torch.manual_seed(0)
    base = load_file(Path(config["inputs"]["lm_path"]) / "model.safetensors")
    trained = {key: value + 1e-3 * torch.randn_like(value) for key, value in base.items()}  # off bf16's grid
    save_file(trained, str(stage / "export" / "lm.safetensors"))
    (stage / "export" / "handoff.json").write_text(json.dumps({"files": ["projector.safetensors", "lm.safetensors"]}))
    merged = load_file(export_model(find_stage(stage), tmp_path / "exported") / "model.safetensors")
    for key, value in trained.items():
        assert torch.equal(merged[f"lm.{key}"], value), key


def test_an_lm_folders_generation_config_does_not_change_how_captions_are_decoded(micro_run, tmp_path):
    """An instruct LM's generation_config.json (Qwen2.5-Instruct's repetition penalty) applied to the stage's
    evaluation but not to the export, which has no such file: the two captioned the same images differently."""
    run = tmp_path / "run"
    shutil.copytree(
        micro_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb", "*.ckpt"), copy_function=shutil.copy2
    )
    settings_path = run / "base" / "lm" / "generation_config.json"
    settings = json.loads(settings_path.read_text())
    settings.update(repetition_penalty=2.0, no_repeat_ngram_size=1)
    settings_path.write_text(json.dumps(settings))
    plain = evaluate_model(micro_run / "sft_long", limit=8, max_new_tokens=12)["captions"]
    assert any(len(set(c.split())) < len(c.split()) for c in plain.values()), "some caption repeats a word"
    assert evaluate_model(run / "sft_long", limit=8, max_new_tokens=12)["captions"] == plain


def test_weights_are_as_readable_as_the_other_files(micro_run, tmp_path):
    # safetensors writes its files 0600: a teammate could read an export's config and tokenizer, not its weights.
    from stages.paths import _UMASK

    out = export_model(find_stage(micro_run), tmp_path / "hf")
    for folder in (out, micro_run / "sft_long" / "export", micro_run / "base"):
        modes = {path.name: oct(path.stat().st_mode & 0o777) for path in folder.rglob("*.safetensors")}
        assert modes and set(modes.values()) == {oct(0o666 & ~_UMASK)}, (folder, modes)


def test_an_export_under_a_file_is_named(micro_run, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")  # "[Errno 17] File exists", naming no flag
    assert main(["export", "--run_dir", str(micro_run), "--out_dir", str(tmp_path / "afile" / "sub")]) == 2
    assert f"error: --out_dir: {tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err


def test_a_damaged_stage_or_an_export_is_named_not_scored(micro_run, tmp_path, capsys):
    # A LoRA stage whose adapter/ was deleted was scored and exported with the base LM (CHAIR-i 0.50 against its
    # 0.75, unsaid); a stage without its export/ was blamed on "init_from", a flag neither command has; an export
    # given to `export` was called "a model folder without vlm_export.json"; --stage beside a stage folder was
    # looked for inside it.
    run = tmp_path / "run"
    shutil.copytree(micro_run, run, copy_function=shutil.copy2, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    assert json.loads((run / "sft_long" / "export" / "handoff.json").read_text())["files"][-1] == "adapter"
    shutil.rmtree(run / "sft_long" / "export" / "adapter")
    assert main(["eval", "--model", str(run / "sft_long"), "--limit=2", "--max_new_tokens=2"]) == 2
    assert f"{run / 'sft_long'}: {run / 'sft_long' / 'export'} lacks adapter, which its stage wrote" in (
        capsys.readouterr().err
    )
    assert main(["export", "--run_dir", str(run), "--stage", "sft_long", "--out_dir", str(tmp_path / "hf")]) == 2
    assert "lacks adapter" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    shutil.rmtree(run / "sft_medium" / "export")
    assert main(["eval", "--model", str(run / "sft_medium"), "--limit=2"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'sft_medium'}: {run / 'sft_medium' / 'export'} has no projector.safetensors" in err
    assert "init_from" not in err
    assert (
        main(["export", "--run_dir", str(run / "sft_short"), "--stage", "align", "--out_dir", str(tmp_path / "a")]) == 0
    )
    assert json.loads((tmp_path / "a" / EXPORT_RECORD).read_text())["stage"] == "align"
    assert main(["export", "--run_dir", str(tmp_path / "a")]) == 2
    assert f"{tmp_path / 'a'} is an export already, not a run or stage folder; score it with eval" in (
        capsys.readouterr().err
    )


def test_eval_takes_no_other_runs_data_for_a_run_whose_own_is_gone(micro_run, tmp_path, monkeypatch, capsys):
    # Relative input paths fell back to the working folder (as runs before 2026-11-23 recorded them): with the
    # run's data/ gone, eval in another run's folder scored that run's shards and said they had been rebuilt.
    run, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(micro_run, run, copy_function=shutil.copy2, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    shutil.copytree(micro_run / "data", other / "data", copy_function=shutil.copy)  # new times: another build
    shutil.rmtree(run / "data")
    monkeypatch.chdir(other)
    assert main(["eval", "--model", str(run / "sft_long"), "--limit=2", "--max_new_tokens=2"]) == 2
    assert f"{run / 'data'}" in capsys.readouterr().err
    shutil.copytree(micro_run / "data", run / "data", copy_function=shutil.copy2)  # its own again: scored
    assert main(["eval", "--model", str(run / "sft_long"), "--limit=2", "--max_new_tokens=2"]) == 0
