"""Command-line entry: `python -m stages.run curriculum [--config FILE ...] [--key.sub value ...]`.

Lightning CLI conventions (jsonargparse underneath): `--config` files stack in the order given, on
top of configs/curriculum/tiny.yaml; dotted flags override any key; `--print_config` prints the
fully merged configuration, once its values pass their checks, and exits. Unknown keys fail with the key named.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import locale
import logging
import os
import sys
import typing
from pathlib import Path

# Nothing is downloaded at run time: the command line sets the hub offline, before anything imports
# huggingface_hub (it reads HF_HUB_OFFLINE once, at import), unless the caller set it. Here, not in the
# package: a script that imports the project's modules keeps its own hub settings.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Files are UTF-8 whatever the locale: under a non-UTF-8 one (LANG=en_US.ISO-8859-1, or C with locale coercion
# off), Python read and wrote text in the locale's encoding, and a data build of Russian captions failed on
# report.md ("'ascii' codec can't encode"), while jsonargparse and Data-Juicer misread a config or recipe. The
# command restarts itself in Python's UTF-8 mode, with its interpreter options; its ranks and workers inherit it.
# Once: a caller's own `-X utf8=0` wins over the restart's, and the command then goes on as it is.
if (
    __name__ == "__main__"
    and not (sys.flags.utf8_mode or os.environ.get("PYTHONUTF8") == "1")
    and locale.getpreferredencoding(False).upper().replace("-", "") != "UTF8"
):
    os.environ["PYTHONUTF8"] = "1"
    os.execv(sys.executable, [sys.executable, "-X", "utf8", *sys.orig_argv[1:]])

# `python -m` puts the working folder first on sys.path, so a `modules/` package or a `callbacks.py` of the user's
# own project there was imported in place of this project's. That entry gives way to the project's root (the
# repository), or goes where the root is on the path already (site-packages, after the standard library).
if __name__ == "__main__" and sys.path and Path(sys.path[0] or ".").resolve() == Path.cwd().resolve():
    root = Path(__file__).resolve().parents[1]
    if any(Path(entry or ".").resolve() == root for entry in sys.path[1:]):
        del sys.path[0]
    elif Path.cwd().resolve() != root:  # run from the repository, the working folder is the root
        sys.path[0] = str(root)

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings
from jsonargparse.typing import NonNegativeInt, PositiveInt

from callbacks.preemption import sigterm_raises, stop_on_sigusr1
from stages.config import CurriculumConfig, EvalConfig, check_seed
from stages.config_checks import CommandParser, check_config_files, mapping_error, not_a_mapping
from stages.exits import exit_code
from stages.launch import LaunchError, watch_started_ranks
from stages.metrics import DEFAULT_BUCKETS
from stages.paths import project_file

# `--help` shows each config field's docstring (the text under it in stages/config.py and the dataclasses).
set_parsing_settings(docstring_parse_attribute_docstrings=True)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CURRICULUM = CONFIG_DIR / "curriculum" / "tiny.yaml"


def curriculum_parser() -> ArgumentParser:
    parser = CommandParser(
        description="Run a training curriculum: data, base models, then each stage (align, LoRA SFT, ...) "
        "with evaluation after each. Rerunning the same command skips finished stages and resumes "
        "an interrupted one from its last checkpoint.",
        default_config_files=[str(DEFAULT_CURRICULUM)],
        exit_on_error=True,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file(s); later ones override earlier.")
    parser.add_class_arguments(CurriculumConfig, fail_untyped=True, sub_configs=True)
    parser.default_configs = (str(DEFAULT_CURRICULUM),)
    return parser


def stability_bench_parser() -> ArgumentParser:
    parser = ArgumentParser(description="False-alarm and detection rates of the stability alerts.")
    parser.add_argument("--seeds", type=int, default=20, help="clean runs of the shortened tiny curriculum")
    parser.add_argument("--fault_seeds", type=int, default=5, help="runs per injected fault kind")
    parser.add_argument("--root", type=str, default="runs/bench-stability", help="where the runs go")
    return parser


def blip2_bench_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Images/s of BLIP-2 recaptioning through Data-Juicer: ours vs the stock op.")
    parser.add_argument("--images", type=PositiveInt, default=512, help="images for blip2_caption_mapper")
    parser.add_argument(
        "--stock_images",
        type=NonNegativeInt,
        default=64,
        help="images for the (slow) stock op, at most --images; 0 skips it",
    )
    parser.add_argument(
        "--shape", type=str, default="opt-2.7b", choices=["opt-2.7b", "tiny"], help="opt-2.7b (Salesforce's) or tiny"
    )
    parser.add_argument("--batch_size", type=PositiveInt, default=64, help="batch of blip2_caption_mapper")
    parser.add_argument("--max_new_tokens", type=PositiveInt, default=32)
    parser.add_argument("--root", type=str, default="runs/bench-blip2", help="model, images and shards go here")
    return parser


def data_parser() -> ArgumentParser:
    from datamodules.world import WorldConfig
    from stages.data import RecipeConfig

    parser = ArgumentParser(
        description="Build WebDataset shards with a Data-Juicer recipe (recaptioning + filters) and write a "
        "data report (report.md / report.json) beside them.",
        exit_on_error=True,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="the recipe YAML (configs/data/*.yaml)")
    parser.add_class_arguments(RecipeConfig, fail_untyped=True, sub_configs=True)
    parser.add_argument("--out_dir", type=str, required=True, help="where the shards and the report go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic world")
    parser.add_class_arguments(WorldConfig, "world", help="the synthetic world (synthetic input only)")
    return parser


def export_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Write a run's model (LoRA merged) as a Hugging Face folder.")
    parser.add_argument(
        "--run_dir", "--run", type=str, required=True, help="a run folder (its last stage) or a stage folder"
    )
    parser.add_argument("--stage", type=str, default=None, help="export this stage of the run instead of the last")
    parser.add_argument("--out_dir", type=str, default=None, help="default: <run_dir>/export_hf")
    return parser


def eval_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Caption a held-out split with a model and print its scores.")
    model_help = "an exported folder, or a finished stage's folder (or its export/)"
    parser.add_argument("--model", "--ckpt", type=str, required=True, help=model_help)
    parser.add_argument("--data", type=str, default=None, help="shard folder; default: the shards it trained on")
    # The defaults of the evaluation after every stage (EvalConfig): the same scores for the same model.
    # A Literal, not choices: jsonargparse's help showed choices' type as "<function <locals>.<lambda> at 0x...>".
    parser.add_argument("--split", type=typing.Literal["train", "val", "test"], default=EvalConfig.split)
    parser.add_argument("--limit", type=PositiveInt, default=EvalConfig.limit, help="images (the split's first)")
    parser.add_argument("--max_new_tokens", type=PositiveInt, default=EvalConfig.max_new_tokens)
    parser.add_argument("--num_beams", type=PositiveInt, default=EvalConfig.num_beams)
    parser.add_argument("--batch_size", type=PositiveInt, default=EvalConfig.batch_size)
    parser.add_argument(
        "--vqa",
        action="store_true",
        help="also ask the images' questions: exact match, and VQAv2 accuracy where there are several answers",
    )
    parser.add_argument(
        "--length_buckets",
        type=list[int],
        default=list(DEFAULT_BUCKETS),
        help="caption-length buckets (words) of the scores",
    )
    parser.add_argument("--synonyms", type=str, default=None, help="CHAIR synonym table (JSON) for real data")
    parser.add_argument("--device", type=str, default="auto", help="auto (the GPU if there is one), cpu, cuda, cuda:1")
    parser.add_argument(
        "--dtype", type=str, default=None, help="cast the model: float32, bfloat16, float16 (default: as it trained)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON (with every caption)")
    return parser


def build_parser() -> ArgumentParser:
    parser = CommandParser(prog="python -m stages.run", description="vlm-curriculum: curriculum training for VLMs.")
    commands = parser.add_subcommands(dest="command")
    commands.add_subcommand("curriculum", curriculum_parser(), help="run the whole curriculum (the default: tiny.yaml)")
    commands.add_subcommand("data", data_parser(), help="build shards with a Data-Juicer recipe")
    commands.add_subcommand("export", export_parser(), help="merged Hugging Face folder of a run's model")
    commands.add_subcommand("eval", eval_parser(), help="score an exported model or a finished stage")
    compare = ArgumentParser(description="The curriculum against its align stage and one SFT stage, in as many steps.")
    compare.add_argument("--profile", type=str, default=str(CONFIG_DIR / "curriculum" / "compare.yaml"))
    compare.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, each running both arms")
    compare.add_argument("--root", type=str, default="runs/compare", help="where the runs and compare.md go")
    compare.add_argument("--override", type=list[str], default=[], help='curriculum flags, e.g. ["--eval.limit=64"]')
    commands.add_subcommand("compare", compare, help="curriculum vs one-SFT-stage baseline over seeds")
    report = ArgumentParser(description="Rewrite <run_dir>/report.md and its plots from the run's files.")
    report.add_argument("--run_dir", type=str, required=True)
    commands.add_subcommand("report", report, help="rewrite a run's report.md")
    bench = ArgumentParser(description="Benchmarks that print figures.")
    commands.add_subcommand("bench", bench, help="benchmarks that print figures")
    benches = bench.add_subcommands(dest="bench")
    benches.add_subcommand("stability", stability_bench_parser())
    benches.add_subcommand("blip2", blip2_bench_parser())
    train = curriculum_parser()
    train.description = "Training tokens/s, MFU and peak memory of a profile: our Lightning path vs a plain loop."
    train.add_argument("--steps", type=PositiveInt, default=20, help="optimizer steps per path and step kind")
    train.add_argument(
        "--warmup", type=NonNegativeInt, default=5, help="steps not timed (compilation, allocator warm-up)"
    )
    train.add_argument("--batch", type=PositiveInt, default=8, help="samples per step")
    train.add_argument(
        "--text_tokens", type=PositiveInt, default=256, help="text tokens per sample, after the image tokens"
    )
    train.add_argument(
        "--variants",
        type=list[str],
        default=None,
        help="what to measure (default: plain, plain+ckpt, none, each lever alone, profile); levers: "
        "chunked_ce, ckpt, ckpt2, compile, no_dropout, joined with '+', e.g. chunked_ce+ckpt2+compile",
    )
    train.add_argument("--kinds", type=list[str], default=["align", "sft"], help="step kinds to measure")
    benches.add_subcommand("train", train)
    return parser


def run_data_command(parser: ArgumentParser, args) -> int:
    from stages.data import RecipeConfig, run_data_stage
    from stages.paths import FolderBusy

    try:
        values = parser.instantiate(args).data
        check_seed(values.seed, "--seed")
    except (ValueError, TypeError) as error:  # a value's own check (world, input format): named, no traceback
        parser.error(str(error))
    if not values.out_dir.strip():  # the working folder
        parser.error("--out_dir: empty; name the folder the shards go to")
    fields = {k: v for k, v in vars(values).items() if k in RecipeConfig.__dataclass_fields__}
    try:
        recipe = RecipeConfig(**fields)
        report = run_data_stage(recipe, Path(values.out_dir), values.world, values.seed)
    except (FileNotFoundError, FileExistsError, ValueError, FolderBusy) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    samples = report["samples"]
    print(f"{samples['kept']} samples kept from {samples['input']} input; shards and report.md in {values.out_dir}")
    for op in report["ops"]:
        print(f"  {op['op']:>28}: {op['in']} in, {op['out']} out")
    return 0


def run_export_command(parser: ArgumentParser, args) -> int:
    from stages.export import export_model, find_stage
    from stages.paths import FolderBusy

    options = args.export
    try:
        source = find_stage(options.run_dir, options.stage)
        given = Path(options.run_dir)  # a stage's export/ folder stands for its stage folder
        folder = source.stage_dir if given.resolve() == source.stage_dir / "export" else given
        out = Path(options.out_dir) if options.out_dir else folder / "export_hf"
        export_model(source, out)
    except (FileNotFoundError, FileExistsError, ValueError, FolderBusy) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {source.stage_dir} (step {source.global_step}) to {out}; see {out / 'README.md'}")
    return 0


def run_eval_command(parser: ArgumentParser, args) -> int:
    import json

    from stages.export import evaluate_model, metrics_table
    from stages.paths import FolderBusy

    options = args.eval
    try:
        result = evaluate_model(
            options.model,
            options.data,
            options.split,
            options.limit,
            options.max_new_tokens,
            options.num_beams,
            options.batch_size,
            buckets=tuple(options.length_buckets),
            vqa=options.vqa,
            synonyms=options.synonyms,
            device=options.device,
            dtype=options.dtype,
        )
    except (FileNotFoundError, FileExistsError, ValueError, FolderBusy) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if options.json:
        print(json.dumps(result, indent=2))
    else:
        data = result["data"]
        print(f"{options.model}: {data['images']} {data['split']} images of {data['shard_dir']}")
        print(metrics_table(result["metrics"]))
    return 0


def curriculum_config(values) -> CurriculumConfig:
    """The CurriculumConfig of an instantiated curriculum namespace (jsonargparse's own keys dropped)."""
    return CurriculumConfig(**{k: v for k, v in vars(values).items() if not k.startswith("__") and k != "config"})


def popped_config_files(section) -> list[str]:
    """The --config files of a parsed command's `section`, taken out of it (the CurriculumConfig has no such
    key). An inline --config '{seed: 3}' is recorded as None: no file, so it names no run folder."""
    return [str(p) for p in (section.pop("config", None) or []) if p is not None]


def checked_curriculum(parser: ArgumentParser, args) -> tuple[CurriculumConfig, list[str]]:
    """(the checked CurriculumConfig, the --config files given) of parsed `curriculum` arguments; a value
    that fails its check ends the command with the field named."""
    config_files = popped_config_files(args.curriculum)
    misplaced = not_a_mapping(CurriculumConfig, args.curriculum)
    if misplaced:  # jsonargparse would fail with "functools.partial(...) argument after ** must be a mapping"
        parser.error(mapping_error(misplaced))
    try:
        return curriculum_config(parser.instantiate(args).curriculum), config_files
    except (ValueError, TypeError) as error:
        parser.error(str(error))


def default_run_dir(config_files: list) -> Path:
    """runs/<stem of the last --config file>, or runs/tiny for the default config."""
    name = Path(str(config_files[-1])).stem if config_files else DEFAULT_CURRICULUM.stem
    return Path("runs") / name


def project_config(name: str) -> str:
    """A shipped config named from the repository's root (`configs/curriculum/mgm_2b.yaml`), from any working
    folder: the project's file (the repository's, or where a wheel installed configs/) when there is no such
    file here, as `data.recipe` and `trainer.deepspeed_config` are found."""
    found = project_file(name)
    return str(found) if name.startswith("configs/") and found.is_file() else name


def with_project_configs(argv: tuple[str, ...]) -> tuple[str, ...]:
    """The command line with each `--config configs/...` found by `project_config`."""
    out = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            out[i + 1] = project_config(argv[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + project_config(arg.split("=", 1)[1])
    return tuple(out)


def run_curriculum_command(parser: ArgumentParser, args) -> int:
    from lightning.pytorch.utilities import rank_zero_only

    from datamodules.shards import ShardError
    from modules.loading import ModelFolderError
    from stages.curriculum import InputChanged, NoGPU, run_curriculum
    from stages.paths import FolderBusy
    from stages.stage import StageStopped

    cfg, config_files = checked_curriculum(parser, args)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(config_files)
    try:
        results = run_curriculum(cfg, run_dir)
    except (
        FileNotFoundError,
        FileExistsError,
        ModelFolderError,
        ShardError,
        FolderBusy,
        InputChanged,
        NoGPU,
        LaunchError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StageStopped as error:
        if rank_zero_only.rank == 0:  # every rank stops; one says so
            print(f"stopped: {error}; the run so far: {run_dir / 'report.md'}", file=sys.stderr)
        return 3
    if rank_zero_only.rank != 0:  # the summary is rank 0's (the others' lacks the stages rank 0 alone rescored)
        return 0
    for result in results:
        m = result.metrics
        keys = [k for k in ("recall", "chair_i", "chair_s", "mean_words", "bleu4") if k in m]
        scores = "  ".join(f"{k} {m[k]:.3f}" for k in keys)
        note = "  (scored again: evaluation settings changed)" if result.rescored else ""
        note = note or ("  (skipped: done before)" if result.skipped else "")
        if result.non_finite_weights:  # CHAIR 0 of captions with no objects read as the best of runs
            note += f"  ({result.non_finite_weights} trained tensors hold NaN or inf: these scores mean nothing)"
        print(f"{result.name:>12}  steps {result.global_steps:5d}  {scores}{note}")
    print(f"run folder: {run_dir}   TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    return 0


def run_compare_command(parser: ArgumentParser, args) -> int:
    from stages.compare import CompareFailed, markdown, run_compare
    from stages.curriculum import NoGPU
    from stages.paths import FolderBusy

    options = args.compare
    if options.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {options.seeds}")
    seeds = list(range(options.seeds))
    try:
        result = run_compare(Path(project_config(options.profile)), seeds, Path(options.root), list(options.override))
    except (FileNotFoundError, ValueError, FolderBusy, NoGPU, CompareFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(result, seeds))
    print(f"compare.md, compare.json and compare.png in {options.root}")
    return 0


def run_report_command(parser: ArgumentParser, args) -> int:
    from stages.report import write_report

    try:
        print(f"wrote {write_report(Path(args.report.run_dir))}")
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run_bench_train(parser: ArgumentParser, args) -> int:
    from stages.bench_train import bench_train, failed_variants, print_train_report
    from stages.curriculum import NoGPU

    sub = args.bench.train
    config_files = popped_config_files(sub)
    options = {k: sub.pop(k) for k in ("steps", "warmup", "batch", "text_tokens", "variants", "kinds")}
    if options["variants"] == []:  # measured every default variant
        parser.error("--variants: name at least one variant, or leave it out for the default ones")
    try:
        cfg = curriculum_config(parser.instantiate(args).bench.train)
        run_dir = (
            Path(cfg.run_dir) if cfg.run_dir else Path("runs") / f"bench-train-{default_run_dir(config_files).name}"
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        report = bench_train(
            cfg,
            run_dir,
            options["steps"],
            options["warmup"],
            options["batch"],
            options["text_tokens"],
            options["variants"],
            tuple(options["kinds"]),
        )
    except (FileNotFoundError, ValueError, NoGPU) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_train_report(report)
    failed = failed_variants(report)
    if failed:
        print(f"error: variants failed (their tracebacks are in the log above): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run_bench_command(parser: ArgumentParser, args) -> int:
    if args.bench.bench == "train":
        return run_bench_train(parser, args)
    if args.bench.bench == "stability":
        from stages.bench import bench_stability, print_report

        options = args.bench.stability
        if not 1 <= options.fault_seeds <= options.seeds:
            # each fault run starts from the data and base models of the clean run of its seed
            parser.error(f"--fault_seeds must be within 1 and --seeds ({options.seeds}), got {options.fault_seeds}")
        print_report(bench_stability(Path(options.root), options.seeds, options.fault_seeds))
        return 0
    from stages.bench import bench_blip2, print_blip2_report

    o = args.bench.blip2
    if o.stock_images > o.images:  # the stock op read the --images rendered and reported --stock_images of them
        parser.error(f"--stock_images must be at most --images ({o.images}), got {o.stock_images}")
    print_blip2_report(bench_blip2(Path(o.root), o.images, o.shape, o.batch_size, o.stock_images, o.max_new_tokens))
    return 0


def image_processor_problem(transformers_version: str | None = None, has_torchvision: bool | None = None) -> str | None:
    """What keeps transformers from loading image processors, if anything: 5.17 needs torchvision (5.18 and later
    fall back to PIL). Without this, every command failed at its first image processor, deep in transformers.
    Unset arguments are this environment's (`.ci/gpu setup` asks too)."""
    if transformers_version is None:
        transformers_version = importlib.metadata.version("transformers")
    if has_torchvision is None:
        has_torchvision = importlib.util.find_spec("torchvision") is not None
    if tuple(int(part) for part in transformers_version.split(".")[:2]) < (5, 18) and not has_torchvision:
        return (
            f"transformers {transformers_version} loads image processors only with torchvision installed: "
            "install torchvision (matching your torch), or transformers>=5.18"
        )
    return None


def run_command(argv: list[str] | None = None) -> int:
    """The command `argv` names, run; what stops it (a signal, a full disk) is raised, for `main` to end on.
    A command that runs others in its process (`compare`, `bench stability`) runs them with this."""
    parser = build_parser()
    # Every CommandParser's: a subcommand's parser reports its own errors (the command line: see `stage_culprits`).
    CommandParser.argv = with_project_configs(tuple(sys.argv[1:] if argv is None else argv))
    CommandParser.cwd = os.getcwd()
    loads_models = parser.argv[:1] in (("curriculum",), ("eval",), ("export",), ("bench",))
    problem = image_processor_problem() if loads_models else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    check_config_files(parser, parser.argv)
    printing = [arg for arg in parser.argv if arg == "--print_config" or arg.startswith("--print_config=")]
    if printing and parser.argv[:1] == ("curriculum",):
        # jsonargparse prints before any value is checked: check first, then let it print and exit.
        checked_curriculum(parser, parser.parse_args([arg for arg in parser.argv if arg not in printing]))
    args = parser.parse_args(list(parser.argv))
    handlers = {
        "curriculum": run_curriculum_command,
        "data": run_data_command,
        "compare": run_compare_command,
        "report": run_report_command,
        "bench": run_bench_command,
        "export": run_export_command,
        "eval": run_eval_command,
    }
    return handlers[args.command](parser, args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    stop_on_sigusr1()
    watch_started_ranks()
    try:
        with sigterm_raises():
            return run_command(argv)
    except BaseException as error:
        code = exit_code(error)  # prints how to go on
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
