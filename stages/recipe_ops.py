"""A recipe's Data-Juicer ops: checked before any work, set up before an earlier build is deleted, run one at a time.

Data-Juicer fetches what an op lacks when the op is set up or first used: packages (pip), word lists (its own
server, without a timeout) and model files (wget). The data stage installs and downloads nothing: each is refused,
naming what is missing and where it goes. An op that fails to set up fails the stage with its name before the
earlier build's shards are deleted.

Filters first compute their stats for every sample (written to `stats/<op>.jsonl`, `stats/<op>-2.jsonl` for its
second use), then filter. The stats go once a mapper has run, as they describe the samples before it changed them:
Data-Juicer's filters keep a stat already in the sample, so a filter used again after a caption op judged the old
caption. Ops between two mappers (a selector on `__dj__stats__.perplexity`) read the stats of the filters before.

Data-Juicer's own `skip_op_error` is forced off: a failing op fails the stage with its name, instead of dropping a
batch with one log line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def quiet_data_juicer() -> None:
    """Data-Juicer logs every op's worker count at INFO through loguru; keep its warnings and errors. This replaces
    loguru's sinks process-wide (this project logs through `logging`, not loguru)."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


# The project's caption ops: they write `caption_variants`, which the shards take their captions from, and
# set `text` to the longest variant without Data-Juicer's `<__dj__image>` token (so that text filters judge
# the caption alone).
CAPTION_OPS = ("oracle_caption_mapper", "blip2_caption_mapper")
# Data-Juicer ops that find a sample's image through that token in its text: after a caption op they see none.
IMAGE_TOKEN_OPS = (
    "image_text_matching_filter", "image_text_similarity_filter", "phrase_grounding_recall_filter",
    "image_captioning_mapper", "image_diffusion_mapper", "detect_character_locations_mapper",
)  # fmt: skip


def check_stock_captioner(args: dict) -> None:
    """Data-Juicer's image_captioning_mapper takes a local folder or a hub id (its default, Salesforce/blip2-opt-2.7b).
    Offline (stages.run sets HF_HUB_OFFLINE=1 unless the caller set it), a hub id works only from the Hugging Face
    cache; otherwise transformers failed at the op's first batch with "couldn't connect to huggingface.co", even for a
    misspelt local folder."""
    from huggingface_hub import constants, try_to_load_from_cache

    name = args.get("hf_img2seq", "Salesforce/blip2-opt-2.7b")
    if (Path(name) / "config.json").is_file() or not constants.HF_HUB_OFFLINE:
        return
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a repository id: a path
        cached = False
    if not cached:
        given = "" if "hf_img2seq" in args else " (Data-Juicer's default)"
        raise ValueError(
            f"recipe process: image_captioning_mapper.hf_img2seq {name}{given} is no model folder (no config.json "
            "there) and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 downloads nothing: give a local folder "
            "saved with save_pretrained (relative paths from the working folder)"
        )


def forbid_installs() -> None:
    """Data-Juicer pip- or uv-installs a package an op lacks when the op first needs it: a recipe with
    image_deduplicator put a torchvision that did not match torch into the environment mid-build, and every
    later command failed at import. Installing is refused, naming the package."""
    from data_juicer.utils.lazy_loader import LazyLoader

    def refuse(cls, package_spec, pip_args=None):
        raise ImportError(
            f"an op needs {package_spec}, which is not installed, and Data-Juicer would install it "
            f"now; nothing is installed at run time: pip install {package_spec}, or leave the op out"
        )

    LazyLoader._install_package = classmethod(refuse)


def forbid_downloads() -> None:
    """Data-Juicer downloads a word list an op lacks (stopwords_filter, flagged_words_filter) from its own server
    with no timeout (behind a proxy that never answered, the build hung), and model files (fasttext, kenlm,
    sentencepiece, ...) with wget. Both are refused, naming the file and the folder it goes in."""
    from data_juicer.utils import asset_utils, model_utils

    class NoDownload:
        @staticmethod
        def get(url: str, *args, **kwargs):
            name = url.rsplit("/", 1)[-1]
            raise ValueError(
                f"an op needs the word list {name}, which Data-Juicer would download now; nothing is "
                f"downloaded at run time: put {name} in the op's words folder (its stopwords_dir or flagged_words_dir, "
                f"by default {asset_utils.ASSET_DIR})"
            )

    asset_utils.requests = NoDownload  # the module's own name for requests, looked up when a download starts
    if getattr(model_utils.check_model, "local_only", False):
        return
    downloading = model_utils.check_model

    def check_model(model_name, force=False):
        homes = [p.strip() for p in (model_utils.DJEMH or "").split(os.pathsep) if p.strip()]
        places = [model_name, os.path.join(model_utils.DJMC, model_name), *(os.path.join(h, model_name) for h in homes)]
        if force or not any(os.path.exists(place) for place in places):
            why = "could not be loaded from" if force else "is not in"
            raise ValueError(
                f"an op needs the model file {model_name}, which {why} {model_utils.DJMC} "
                "(Data-Juicer's model cache, or DATA_JUICER_EXTERNAL_MODELS_HOME); Data-Juicer would download it "
                "now, and nothing is downloaded at run time: put the file there"
            )
        return downloading(model_name)

    check_model.local_only = True
    model_utils.check_model = check_model  # its loaders look it up in the module when they run
    import data_juicer.ops  # noqa: F401  (every op module: some import check_model by name)

    for name, module in list(sys.modules.items()):
        if name.startswith("data_juicer.") and getattr(module, "check_model", None) is downloading:
            module.check_model = check_model


def check_op_shapes(process: list[dict]) -> None:
    """Each op as `{name: {argument: value}}` (or no arguments), and none that merges samples: a list of
    arguments failed with a TypeError traceback, and a grouper alone with "unhashable type: 'list'"."""
    from data_juicer.ops.base_op import OPERATORS, Aggregator, Filter, Grouper, Mapper
    from data_juicer.utils.constant import Fields

    has_stats, last_mapper = False, None  # whether a filter ran since the last mapper: the samples hold its stats
    for position, item in enumerate(process):
        if not isinstance(item, dict) or not item:
            raise ValueError(f"recipe process[{position}]: an op is a mapping {{op_name: {{argument: value}}}}, "
                             f"got {item!r}")  # fmt: skip
        for name, args in item.items():
            if args is not None and not isinstance(args, dict):
                raise ValueError(
                    f"recipe process[{position}]: {name}'s arguments are a mapping (argument: value), got "
                    f"{type(args).__name__} {args!r}"
                )
            op = OPERATORS.modules.get(name)
            if isinstance(op, type) and issubclass(op, (Grouper, Aggregator)):
                raise ValueError(
                    f"recipe process[{position}]: {name} merges samples into groups, which no shard sample can "
                    "hold (one image and its captions each); leave it out"
                )
            reads = [v for k, v in (args or {}).items() if k.endswith("field_key") and str(v).startswith(Fields.stats)]
            if reads and not has_stats:  # it failed at its first sample with a bare AssertionError
                where = f"after {last_mapper} (the stats go once a mapper changed the samples)" if last_mapper else ""
                raise ValueError(
                    f"recipe process[{position}]: {name} reads {reads[0]}, which no filter {where or 'before it'} "
                    f"computed; put the filter that computes it {'after ' + last_mapper if last_mapper else 'first'}"
                )
            if isinstance(op, type) and issubclass(op, Filter):
                has_stats = True
            elif isinstance(op, type) and issubclass(op, Mapper):
                has_stats, last_mapper = False, name


def check_process(process: list[dict]) -> None:
    """Fails before any op runs on what the recipe's `process` would get silently wrong: unknown ops and
    misspelt op arguments (Data-Juicer's preflight check), and ops that cannot follow a caption op."""
    from data_juicer.core.preflight import PipelineConfigError, pre_instantiation_check

    import datamodules.recaption_ops  # noqa: F401  (registers the project's ops)

    forbid_installs()
    forbid_downloads()
    check_op_shapes(process)
    try:
        pre_instantiation_check(process)
    except PipelineConfigError as error:  # its hint to set strict_preflight is for Data-Juicer's own runner
        message = "\n".join(line for line in str(error).splitlines() if "strict_preflight" not in line)
        raise ValueError(f"recipe process: {message}") from error
    except Exception as error:  # the check itself failed on a value the op accepts (max_num: .inf)
        log.warning("recipe process: Data-Juicer's preflight check could not run (%r); op arguments unchecked", error)
    for item in process:
        path = (item.get("blip2_caption_mapper") or {}).get("model_path")
        if path and not (Path(path) / "config.json").is_file():
            # Found only at the first batch before, after every image was read, as a hub id error or an OSError.
            raise ValueError(
                f"recipe process: blip2_caption_mapper.model_path {path} is no model folder (no config.json there; "
                "a local folder saved with save_pretrained, relative paths from the working folder)"
            )
        if "image_captioning_mapper" in item:
            check_stock_captioner(item["image_captioning_mapper"] or {})
    names = [name for item in process for name in item]
    first = next((name for name in names if name in CAPTION_OPS), None)
    if first is not None:
        after = [name for name in names[names.index(first) + 1 :] if name in IMAGE_TOKEN_OPS]
        if after:
            raise ValueError(
                f"recipe process: {', '.join(after)} after {first} would judge no image (they find images through "
                f"Data-Juicer's <__dj__image> token, which {first} leaves out of the new caption); run them before it"
            )


# The ops' arguments that the stage sets: in this process unless the recipe sets num_proc (a forked worker that
# runs torch after this process started its OpenMP threads can hang, seen in CI with the BLIP-2 op), so model ops'
# workers start fresh (`run_ops`). Data-Juicer picks a worker count itself unless auto_op_parallelism is off, and
# `datasets` forks a pool for any num_proc >= 1, so the in-process default is num_proc None with auto parallelism
# off. skip_op_error off: a failing op fails the stage, named.
IN_PROCESS = {"auto_op_parallelism": False, "num_proc": None}
# Data-Juicer's per-sample hashes (HashKeys), computed by its deduplicators: stale once a mapper changed the sample.
HASHES = ("hash", "minhash", "simhash", "line_hashes", "imagehash", "videohash", "is_unique")
FORCED = {"skip_op_error": False}


def setup_ops(process: list[dict]) -> list:
    """The recipe's ops, built one at a time: an op that fails to set up (a package, word list or model file it
    lacks) fails here, named, before the data stage deletes an earlier build."""
    from data_juicer.ops import load_ops

    import datamodules.recaption_ops  # noqa: F401  (registers the project's ops)

    forbid_installs()
    forbid_downloads()
    ops = []
    for item in process:
        for name, args in item.items():
            try:
                ops += load_ops([{name: {**IN_PROCESS, **(args or {}), **FORCED}}])
            except (ValueError, ImportError, OSError, RuntimeError, TypeError) as error:
                raise ValueError(f"recipe process: {name} could not be set up: {error}") from error
    return ops


def run_ops(
    rows: list[dict], ops: list, stats_dir: Path, produced_dir: Path, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """(surviving rows, per-op accounting) after running the ops one at a time. Images an op writes (an image
    mapper's blurred copy) go to `produced_dir` unless DJ_PRODUCED_DATA_DIR says where: Data-Juicer's default put
    them beside the input images, in the user's data folder, a new set for every change of the op's arguments."""
    import datasets
    import multiprocess
    from data_juicer.core.data import NestedDataset
    from data_juicer.ops.base_op import UNFORKABLE, Filter
    from data_juicer.utils.process_utils import setup_mp
    from transformers import set_seed

    quiet_data_juicer()
    datasets.disable_progress_bars()
    dataset = NestedDataset.from_list(rows)
    accounting = []
    stats_dir.mkdir(parents=True, exist_ok=True)
    uses: dict[str, int] = {}
    start_method = multiprocess.get_start_method(allow_none=True)  # put back after the ops, also when one fails
    given_dir = os.environ.get("DJ_PRODUCED_DATA_DIR")
    os.environ["DJ_PRODUCED_DATA_DIR"] = given_dir or str(produced_dir)
    try:
        for op in ops:
            set_seed(seed)  # an op that samples (the stock captioner does) writes the same shards on every run
            workers = op.runtime_np()  # None: in this process
            if workers:  # workers of model ops start fresh, not forked (as Data-Juicer's own executor does)
                setup_mp(["forkserver", "spawn"] if op.use_cuda() or op._name in UNFORKABLE.modules else None)
                # Forked from a server that imported the guard first: they refuse installs and downloads too
                # (workers that Python spawns, the start method where forkserver is missing, do not).
                multiprocess.set_forkserver_preload(["__main__", "stages.fetch_guard"])
            before, started = len(dataset), time.perf_counter()
            uses[op._name] = uses.get(op._name, 0) + 1
            stats = None
            if isinstance(op, Filter):
                stats = f"{op._name}.jsonl" if uses[op._name] == 1 else f"{op._name}-{uses[op._name]}.jsonl"
            try:
                dataset = _run_op(op, dataset, workers, stats_dir / stats if stats else None)
            except (ValueError, ImportError) as error:  # a refused download or install, at the op's first use
                raise ValueError(f"recipe process: {op._name}: {error}") from error
            except Exception:
                log.error("data op %s failed", op._name)
                raise
            args = {k: v for k, v in op._op_cfg[op._name].items() if k not in (*FORCED, *IN_PROCESS)}
            timed = hasattr(op, "seconds") and not workers
            accounting.append(
                {
                    "op": op._name,
                    "args": args,
                    "in": before,
                    "out": len(dataset),
                    "dropped": max(before - len(dataset), 0),
                    **({"added": len(dataset) - before} if len(dataset) > before else {}),
                    **({"stats": f"stats/{stats}"} if stats else {}),
                    "seconds": round(time.perf_counter() - started, 3),
                    # An op's own phase timings are kept in this process; worker processes (num_proc) keep theirs.
                    **({"phases": {k: round(v, 3) for k, v in op.seconds.items()}} if timed else {}),
                    **({"workers": workers} if workers else {}),
                }
            )
            log.info("data op %s: %d in, %d out", op._name, before, len(dataset))
    finally:
        multiprocess.set_start_method(start_method, force=True)
        if given_dir is None:
            del os.environ["DJ_PRODUCED_DATA_DIR"]
        else:
            os.environ["DJ_PRODUCED_DATA_DIR"] = given_dir
        _stop_forkserver()
    return dataset.to_list(), accounting


def _run_op(op, dataset, workers: int | None, stats_file: Path | None):
    """The dataset after one op; a filter writes the stats of every sample it judged to `stats_file` first."""
    from data_juicer.ops.base_op import Filter, Mapper
    from data_juicer.utils.constant import Fields, HashKeys

    if isinstance(op, Filter):
        dataset = op.run(dataset, reduce=False)
        with stats_file.open("w") as sink:
            for key, sample_stats in zip(dataset["__key__"], dataset[Fields.stats], strict=True):
                sink.write(json.dumps({"key": key, **sample_stats}) + "\n")
        dataset = dataset.filter(op.process, num_proc=workers, batch_size=op.batch_size)
    else:
        dataset = op.run(dataset)
    stale = [Fields.stats, *(getattr(HashKeys, key) for key in HASHES)]
    if isinstance(op, Mapper) and set(stale) & set(dataset.column_names):
        # The stats and hashes describe the samples before the mapper changed them, and Data-Juicer's filters and
        # deduplicators keep one already there: a filter used again after a caption op judged the old caption, a
        # deduplicator kept the duplicates that a text mapper made.
        dataset = dataset.remove_columns([name for name in stale if name in dataset.column_names])
    return dataset


def _stop_forkserver() -> None:
    """Stops the forkserver the ops' workers came from: it keeps the environment it started with, and the next
    build's workers wrote their images (DJ_PRODUCED_DATA_DIR) into the build before's work/. (A private call of
    multiprocess's, as its own tests make; none if no server runs.)"""
    from multiprocess import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if server is not None and getattr(server, "_forkserver_pid", None) is not None:
        server._stop()
