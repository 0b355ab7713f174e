"""Evaluation during and at the end of a stage: captions of a held-out split, scored against ground truth.

Every `every_n_steps` optimizer steps (if set) and when the stage ends, the callback captions the
held-out images with the configured generation settings, scores them (stages/metrics.py), and logs
scalars, a text table and an image grid with the generated captions to TensorBoard. `metrics.json`
holds the final scores, the generation settings and the history of the periodic evaluations.
"""

from __future__ import annotations

import json
import logging
import statistics
import textwrap
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from typing_extensions import override

from datamodules.captions import PromptFormat
from datamodules.images import as_image
from datamodules.text_stats import longest_caption
from stages.metrics import COUNTS, DEFAULT_BUCKETS, caption_metrics, vqa_accuracy, vqa_exact
from stages.paths import write_text_atomic
from stages.tb_logger import text_writers

log = logging.getLogger(__name__)


def metrics_line(metrics: dict) -> str:
    """The scalar metrics for the log: rates to 3 decimals, counts (the rates' denominators) whole."""
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    return ", ".join(f"{k} {v:.0f}" if k in COUNTS else f"{k} {v:.3f}" for k, v in scalars.items())


_WARNED: set = set()  # said once: evaluated sets (by their first unannotated key)


class Captions(list):
    """Generated captions (a list of str), with `cut`: for each, whether it reached `max_new_tokens` before an
    end token."""

    def __init__(self, texts: list[str], cut: list[bool]) -> None:
        super().__init__(texts)
        self.cut = cut


def warn_cut(where: str, cut: int, total: int, limit: int | None) -> None:
    """Says how many captions an evaluation cut short (each final evaluation its own count: said once a process,
    it named the first evaluation's and no stage's after it)."""
    if cut:
        log.warning("%s: %d of %d captions reached max_new_tokens=%d before an end token and were cut short: raise "
                    "eval.max_new_tokens (eval: --max_new_tokens)", where, cut, total, limit)  # fmt: skip


def generate_captions(vlm, samples: list, fmt: PromptFormat, processor, batch_size: int, **generate_kwargs) -> Captions:
    """Captions for (key, image, metadata) samples. Every prompt has the same length, so no padding. Each caption
    that reaches `max_new_tokens` before an end token is flagged (`Captions.cut`; budgets are in words, limits in
    tokens: a subword tokenizer's 48-word caption took 187); the evaluations count them (`cut_short`)."""
    device = next(vlm.parameters()).device
    prefix = torch.tensor(fmt.prefix(), device=device)
    tokenizer = fmt.tokenizer
    captions: list[str] = []
    limit, cut = generate_kwargs.get("max_new_tokens"), []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        pixels = processor([as_image(image) for _, image, _ in chunk], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(device)
        input_ids = prefix.expand(len(chunk), -1)
        tokens = vlm.generate(
            input_ids,
            torch.ones_like(input_ids),
            pixels,
            do_sample=False,
            eos_token_id=fmt.stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            **generate_kwargs,
        )
        captions += [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        full = limit is not None and tokens.shape[1] >= limit
        cut += [full and not set(row) & set(fmt.stop_ids) for row in tokens.tolist()]
    return Captions(captions, cut)


@contextmanager
def eval_mode(module: torch.nn.Module):
    """`module` in eval mode inside the block, then back in its own train mode (a LightningModule's
    `train` keeps a frozen tower's batch norm in eval mode, which the inner VLM's would not)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _gather(items: list) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return items
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def rank_share(items: list, rank: int, world_size: int) -> tuple[list, int]:
    """(this rank's items, how many of them are real): every rank gets the same number, ceil(n / world_size),
    the short ones padded with copies of the first item. Under ZeRO-3 each forward pass gathers parameters
    from every rank, so every rank must make the same calls."""
    mine = items[rank::world_size]
    size = -(-len(items) // world_size)
    return mine + items[:1] * (size - len(mine)), len(mine)


def answer_questions(
    vlm,
    samples: list,
    fmt: PromptFormat,
    processor,
    batch_size: int,
    max_new_tokens: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    **generate_kwargs,
):
    """(key, question type, answer, generated answer, human answers) for every question the samples' metadata
    holds, or for this rank's share of them (each rank holds every sample; gather the shares). The synthetic
    world's questions have one answer; a real data set's may have several (`answer` the most given one).

    Each question replaces the captioning prompt after the image tokens; prompts of equal token length
    are batched together, so no padding is needed. `max_new_tokens` unset: as many as the longest reference
    answer takes with its end token, and one more, so that an answer cut there is longer than every reference
    and matches none ("a red circle" cut to "a red" matched "red"); a fixed 3 cut "yellow" short with a subword
    tokenizer, 7 tokens.
    """
    device = next(vlm.parameters()).device
    tokenizer = fmt.tokenizer
    groups: dict[int, list[tuple]] = {}
    longest, unasked = 0, 0
    for key, image, meta in samples:
        for q in meta.get("questions", []):
            asked = fmt.asking(q["question"])
            if not asked.prompt.strip():  # nothing but special-token strings: a caption scored as its answer
                unasked += 1
                continue
            prompt = asked.prefix()
            groups.setdefault(len(prompt), []).append((key, q, image, prompt))
            for answer in q.get("answers", [q["answer"]]):
                longest = max(longest, len(asked.encode(answer)[0]) - len(prompt))
    if unasked:
        log.warning("%d question(s) hold nothing but the tokenizer's special tokens: not asked", unasked)
    results = []
    for length in sorted(groups):  # the same groups, in the same order, on every rank
        rows, real = rank_share(groups[length], rank, world_size)
        answered = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            images = [as_image(image) for _, _, image, _ in chunk]
            pixels = processor(images, return_tensors="pt")["pixel_values"].to(device)
            input_ids = torch.tensor([prompt for *_, prompt in chunk], device=device)
            tokens = vlm.generate(
                input_ids,
                torch.ones_like(input_ids),
                pixels,
                do_sample=False,
                max_new_tokens=max_new_tokens or longest + 1,
                eos_token_id=fmt.stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                **generate_kwargs,
            )
            answers = tokenizer.batch_decode(tokens, skip_special_tokens=True)
            answered += [
                (key, q["type"], q["answer"], a.strip(), q.get("answers", [q["answer"]]))
                for (key, q, _, _), a in zip(chunk, answers, strict=True)
            ]
        results += answered[:real]
    return results


def vqa_scores(answers: list[tuple[str, str, str, str, list[str]]]) -> dict[str, float]:
    """Exact-match VQA accuracy overall and per question type, and the number of questions; where some question
    has several human answers (real VQA data), also the VQAv2 accuracy (`vqa_accuracy`) overall and per type."""
    scores = {"vqa_exact": vqa_exact([a[3] for a in answers], [a[2] for a in answers]), "vqa_questions": len(answers)}
    several = any(len(a[4]) > 1 for a in answers)
    if several:
        scores["vqa_accuracy"] = statistics.fmean(vqa_accuracy(a[3], a[4]) for a in answers)
    for kind in sorted({a[1] for a in answers}):
        rows = [a for a in answers if a[1] == kind]
        scores[f"vqa_exact_{kind}"] = vqa_exact([a[3] for a in rows], [a[2] for a in rows])
        if several:
            scores[f"vqa_accuracy_{kind}"] = statistics.fmean(vqa_accuracy(a[3], a[4]) for a in rows)
    return scores


def score(
    results: list[tuple[str, dict, str]],
    buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    synonyms: dict | None = None,
    cut_short: int | None = None,
) -> dict:
    """Metrics of (key, metadata, generated caption) triples; references are the sample's caption variants,
    object annotations its `objects` (the world's, or class names of real data, scored with `synonyms`); with
    `cut_short`, how many of the captions reached `max_new_tokens` before an end token."""
    objects = [meta.get("objects") for _, meta, _ in results]
    missing = sum(truth is None for truth in objects)
    first = next((key for (key, _, _), truth in zip(results, objects, strict=True) if truth is None), None)
    if missing and first not in _WARNED:  # once, not at every periodic evaluation
        _WARNED.add(first)
        log.warning(
            "%d of %d evaluated images carry no object annotations (e.g. %s): no CHAIR, recall or POPE, "
            "only text metrics",
            missing,
            len(objects),
            first,
        )
    metrics = caption_metrics(
        [text for _, _, text in results],
        objects,
        [list(meta["captions"].values()) for _, meta, _ in results],
        keys=[key for key, _, _ in results],
        buckets=buckets,
        synonyms=synonyms,
    )
    return metrics if cut_short is None else {**metrics, "cut_short": float(cut_short)}


def reference(meta: dict) -> str:
    """The sample's longest caption variant with a word: the ground truth shown beside a generated caption."""
    return longest_caption(meta["captions"].values())


def load_synonyms(path: str | Path | None, flag: str = "eval.synonyms") -> dict[str, list[str]] | None:
    """A CHAIR synonym table, {class: [words naming it]}, from a JSON file (None: unset)."""
    if path is None:
        return None
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # a byte-order mark was refused
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:  # the last named no file
        raise ValueError(f"{flag} {path}: not a readable JSON file ({error})") from error
    if not isinstance(table, dict) or not all(
        isinstance(words, list) and all(isinstance(w, str) for w in words) for words in table.values()
    ):
        raise ValueError(f'{flag} {path}: expected {{"class": ["word", ...], ...}}')
    return table


def class_table(
    synonyms: dict[str, list[str]] | None, index: dict, samples: list = (), where: str | Path = "the shards"
) -> dict[str, list[str]] | None:
    """The CHAIR table to score with: the synonym table if given, else every class annotated anywhere in the
    data set (index.json's `object_classes`, written by the data stage), each naming only itself. Built from
    the evaluated images' classes alone, a class none of them showed was never counted as hallucinated, and
    the scores changed with `limit`. Shards built before the index held the classes: None (the evaluated
    images' classes), with a warning when `samples` (the evaluated ones) name classes."""
    if synonyms is not None:
        return synonyms
    if index.get("object_classes"):
        return {name: [] for name in index["object_classes"]}
    if any(isinstance(o, str) for _, _, meta in samples for o in meta.get("objects") or []):
        log.warning(
            "%s were built before index.json listed the data set's object classes: CHAIR counts only the classes "
            "of the evaluated images, and its scores differ from newer shards'; rebuild them (stages.run data)",
            where,
        )
    return None


RECORD_KEYS = ("stage", "global_step", "generation", "history", "eval_fingerprint", "budget")
"""What metrics.json holds beside the scores."""


def scores_of_record(record: dict) -> dict:
    """The scores of a metrics.json record, the same keys as the final evaluation's `metrics` (what a stage
    skipped or resumed on a rerun reports, as a trained one does)."""
    return {k: v for k, v in record.items() if k not in RECORD_KEYS}


def scalars(metrics: dict, prefix: str = "eval") -> dict[str, float]:
    """The flat scalars of `metrics`, with the per-length buckets as `<prefix>_length/<bucket>/<name>`."""
    flat = {f"{prefix}/{k}": float(v) for k, v in metrics.items() if not isinstance(v, dict)}
    for bucket, values in metrics.get("by_length", {}).items():
        flat.update({f"{prefix}_length/{bucket}/{k}": float(v) for k, v in values.items()})
    return flat


def caption_grid(images: list, captions: list[str], cell: int = 160, columns: int = 4) -> np.ndarray:
    """An (H, W, 3) uint8 grid: each image scaled to `cell` pixels with its generated caption below."""
    from PIL import Image, ImageDraw

    line_height, chars = 11, cell // 6
    wrapped = [textwrap.wrap(text, chars)[:6] or ["(empty)"] for text in captions]
    text_height = line_height * max(len(lines) for lines in wrapped) + 4
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_height)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, wrapped, strict=True)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_height)
        grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 2, y + cell + 2 + j * line_height), line, fill=(0, 0, 0))
    return np.asarray(grid)


def markdown_table(rows: list[tuple[str, str, str]]) -> str:
    """The rows as a Markdown table: a "|" in a caption escaped and a line break made a space (either split
    the row)."""
    lines = ["| key | ground truth | generated |", "|---|---|---|"]
    lines += ["| " + " | ".join(" ".join(str(cell).split()).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _zero3(trainer: L.Trainer) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    return isinstance(strategy, DeepSpeedStrategy) and strategy.config.get("zero_optimization", {}).get("stage") == 3


class CaptionEvaluation(L.Callback):
    """Captions `samples`, scores them, writes `metrics.json` and logs to TensorBoard.

    Runs every `every_n_steps` optimizer steps (None: only at the end) and when training ends. Each
    rank captions an equal share of the samples (`rank_share`; under DeepSpeed ZeRO-3 every forward pass
    needs every rank, so generation also runs in step across ranks, `synced_gpus`); rank 0 scores the
    gathered results.
    """

    def __init__(
        self,
        stage: str,
        samples: list,
        fmt: PromptFormat,
        processor,
        out_path: Path,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        batch_size: int = 128,
        table_rows: int = 8,
        every_n_steps: int | None = None,
        grid_images: int = 8,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
        vqa: bool = False,
        extra: dict | None = None,
        synonyms: dict[str, list[str]] | None = None,
    ) -> None:
        if not samples:
            raise ValueError("CaptionEvaluation needs at least one held-out sample")
        if max_new_tokens < 1 or num_beams < 1 or batch_size < 1:
            raise ValueError("eval.max_new_tokens, eval.num_beams and eval.batch_size must be positive")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"eval.every_n_steps must be positive or null, got {every_n_steps}")
        self.stage, self.samples, self.fmt, self.processor = stage, samples, fmt, processor
        self.out_path, self.table_rows, self.batch_size = Path(out_path), table_rows, batch_size
        self.every_n_steps, self.grid_images, self.buckets = every_n_steps, grid_images, tuple(buckets)
        self.vqa, self.synonyms = vqa, synonyms
        if vqa and not any(meta.get("questions") for _, _, meta in samples):  # before training, on every rank
            raise ValueError("eval.vqa: the evaluated shards hold no questions (rebuild them with the data stage)")
        if fmt is None:  # found after the whole fit, at the first evaluation
            raise ValueError("CaptionEvaluation: fmt is None; call data.connect(...) before passing data.format")
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
        self.extra = extra or {}
        self.metrics: dict | None = None
        self.final_done = False  # on every rank (only rank 0 scores and holds `metrics`)
        self.history: list[dict] = []
        self._last_step: int | None = None
        self._final_step: float = float("inf")
        # The step of this fit's last evaluation during training, and (rank 0) its scores and captions: a stage
        # that stops on that step (an alert, max_time) makes them its final ones, not captioned and logged twice.
        self._scored_step: int | None = None
        self._scored: tuple[dict, list] | None = None

    @override
    def state_dict(self) -> dict:
        return {"history": self.history, "eval_fingerprint": self.extra.get("eval_fingerprint")}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        """The evaluations before the checkpoint, unless they were made with other evaluation settings (a stage
        resumed after those changed): the history would mix two kinds of scores."""
        if state_dict.get("eval_fingerprint") != self.extra.get("eval_fingerprint"):
            log.info(
                "%s: evaluation settings changed since the checkpoint; its evaluation history is dropped", self.stage
            )
            self.history = []
            return
        self.history = list(state_dict.get("history", []))

    def caption(
        self, vlm, rank: int = 0, world_size: int = 1, owner=None, **generate_kwargs
    ) -> tuple[list[tuple[str, dict, str]], int]:
        """(key, metadata, caption) for every sample, sorted by key, gathered from all ranks, and how many of the
        captions reached max_new_tokens before an end token; `owner` (the LightningModule, if any) is the module
        whose train mode is switched off meanwhile (see `eval_mode`); `generate_kwargs` add to the configured
        generation settings."""
        mine, real = rank_share(self.samples, rank, world_size)
        kwargs = {**self.generate_kwargs, **generate_kwargs}
        with eval_mode(owner if owner is not None else vlm):
            captions = generate_captions(vlm, mine, self.fmt, self.processor, self.batch_size, **kwargs)
        flagged = list(zip(mine, captions, captions.cut, strict=True))[:real]  # not the padding copies
        results = [(key, meta, text, cut) for (key, _, meta), text, cut in flagged]
        # One process's own call (a stage scored again on rank 0 alone) gathers nothing, even in a process group.
        results = _gather(results) if world_size > 1 else results
        cut_short = sum(cut for *_, cut in results)  # every rank's, counted once
        return sorted(((key, meta, text) for key, meta, text, _ in results), key=lambda r: r[0]), cut_short

    def _warn_cut(self, metrics: dict) -> None:
        limit = self.generate_kwargs["max_new_tokens"]
        warn_cut(f"{self.stage} evaluation", int(metrics["cut_short"]), int(metrics["images"]), limit)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool, again: bool = False) -> None:
        """Captions the held-out images (each rank a share) and, on rank 0, scores them, logs the scores, a table
        and a grid at this step, and writes metrics.json when `final`. `again`: this step's evaluation during
        training becomes the final one (a stage stopped on it): its captions and scores are reused, and only the
        VQA scores a final evaluation adds are new (captioned and logged once more, every value stood twice)."""
        synced = {"synced_gpus": True} if _zero3(trainer) and trainer.world_size > 1 else {}  # ranks in step
        if not again:
            results, cut = self.caption(pl_module.vlm, trainer.global_rank, trainer.world_size, pl_module, **synced)
        answers = self._answers(trainer, pl_module, **synced) if final and self.vqa else None  # every rank: ZeRO-3
        if not trainer.is_global_zero:
            return
        metrics, results = self._scored if again else (score(results, self.buckets, self.synonyms, cut), results)
        vqa = vqa_scores(answers) if answers is not None else {}  # before logging: they belong in TensorBoard too
        metrics.update(vqa)
        new = vqa if again else metrics  # what this call adds to the log
        step = trainer.global_step
        self._scored = (metrics, results)
        if self.history and self.history[-1]["global_step"] == step:  # a fit resumed from its last step scores it
            self.history.pop()  # again (Lightning ends it at once), or a stopped step's becomes final: one entry
        self.history.append({"global_step": step, **{k: v for k, v in metrics.items() if k != "by_length"}})
        for logger in trainer.loggers if new else []:  # at the index of the step it follows, as Lightning's val/loss
            logger.log_metrics(scalars(new), step=step - 1)
        for _, writer, run_step in [] if again else text_writers(trainer.loggers):
            rows = [(key, reference(meta), text) for key, meta, text in results[: self.table_rows]]
            writer.add_text(f"eval/{self.stage}/captions", markdown_table(rows), global_step=run_step(step - 1))
            if self.grid_images:
                by_key = {key: image for key, image, _ in self.samples}
                shown = results[: self.grid_images]
                grid = caption_grid([as_image(by_key[key]) for key, _, _ in shown], [text for _, _, text in shown])
                writer.add_image(f"eval/{self.stage}/grid", grid, run_step(step - 1), dataformats="HWC")
        if final:
            self._warn_cut(metrics)
            self._write_final(step, metrics, results)

    def _write_final(self, step: int, metrics: dict, results: list[tuple[str, dict, str]]) -> None:
        """metrics.json (with the history of the evaluations during training) and captions.jsonl."""
        self.metrics = metrics
        generation = {**self.generate_kwargs, "do_sample": False}  # generate_captions decodes greedily or by beam
        if "vqa_exact" in metrics:
            generation["vqa_num_beams"] = 1  # answer_questions decodes greedily, whatever the captions' num_beams
        record = {"stage": self.stage, "global_step": step, "generation": generation}
        record.update(metrics, **self.extra, history=self.history)
        self.out_path.parent.mkdir(parents=True, exist_ok=True)  # the runner makes it; a plain Trainer may not
        write_text_atomic(self.out_path, json.dumps(record, indent=2))
        samples_path = self.out_path.with_name("captions.jsonl")
        write_text_atomic(samples_path, "".join(json.dumps({"key": k, "caption": t}) + "\n" for k, _, t in results))
        log.info("%s evaluation: %s", self.stage, metrics_line(metrics))

    def rescore(self, vlm, step: int) -> dict:
        """The final evaluation of a stage's trained model outside its training (its evaluation settings
        changed after it finished): scores, VQA if asked, metrics.json and captions.jsonl; the metrics.

        One process; the record's `history` is empty, this callback being new (the evaluations during
        training, made with other settings, are not repeated)."""
        results, cut = self.caption(vlm)
        metrics = score(results, self.buckets, self.synonyms, cut)
        self._warn_cut(metrics)
        if self.vqa:
            with eval_mode(vlm):
                answers = answer_questions(vlm, self.samples, self.fmt, self.processor, self.batch_size)
            metrics.update(vqa_scores(sorted(answers)))
        self._write_final(step, metrics, results)
        return metrics

    def _answers(self, trainer, pl_module, **generate_kwargs) -> list:
        """This rank's share of the questions answered, gathered from every rank."""
        with eval_mode(pl_module):
            answers = answer_questions(
                pl_module.vlm, self.samples, self.fmt, self.processor, self.batch_size,
                rank=trainer.global_rank, world_size=trainer.world_size, **generate_kwargs,
            )  # fmt: skip
        return sorted(_gather(answers))

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # resumed at an evaluated step: not evaluated again
        self._final_step = trainer.estimated_stepping_batches  # max_steps, or what the epochs hold

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # with gradient accumulation, the micro-batches after a step share its number
            return
        # The stage's last step (max_steps, or the epochs' estimate) is evaluated here, before the checkpoint of
        # that step is written (ModelCheckpoint runs after every other callback): a run killed during this
        # evaluation resumes from an earlier checkpoint and evaluates again. Were the checkpoint written first,
        # Lightning would resume at the last step and train no further, and no hook would evaluate the stage.
        if step >= self._final_step:
            self._last_step, self.final_done = step, True
            self._run(trainer, pl_module, final=True)
        elif self.every_n_steps and step and step % self.every_n_steps == 0:
            self._last_step = self._scored_step = step
            self._run(trainer, pl_module, final=False)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.final_done:  # training ended before its last step: a stop alert, max_time
            self.final_done = True
            self._run(trainer, pl_module, final=True, again=self._scored_step == trainer.global_step)
