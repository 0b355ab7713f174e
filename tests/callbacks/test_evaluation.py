"""When the evaluation callback runs, and how ranks share the evaluated images."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.evaluation import CaptionEvaluation, rank_share
from tests.callbacks.toy import KeyedRegression, ToyRegression, loader

FORMAT = object()  # stands for a PromptFormat where no caption is generated


class Schedule(CaptionEvaluation):
    """The callback's scheduling, with each evaluation recorded instead of run."""

    def __init__(self, tmp_path, every_n_steps: int = 4) -> None:
        # A stand-in prompt format: never used, _run is replaced.
        super().__init__("toy", [("k", None, {})], FORMAT, None, tmp_path / "metrics.json", every_n_steps=every_n_steps)
        self.calls: list[tuple[int, bool]] = []

    def _run(self, trainer, pl_module, final: bool, again: bool = False) -> None:
        self.calls.append((trainer.global_step, "again" if again else final))


def _fit(callbacks: list, ckpt=None, **kwargs) -> None:
    trainer = L.Trainer(
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **kwargs,
    )
    trainer.fit(ToyRegression(), loader(KeyedRegression(size=1280), 32), ckpt_path=ckpt)


def test_rank_share_gives_every_rank_as_many_images_and_loses_none():
    items = list(range(5))
    shares = [rank_share(items, rank, 2) for rank in (0, 1)]
    assert shares == [([0, 2, 4], 3), ([1, 3, 0], 2)]  # rank 1 padded with a copy, which its count leaves out
    assert sorted(x for share, real in shares for x in share[:real]) == items
    assert rank_share([7], 1, 4) == ([7], 0)


def test_periodic_evaluation_also_runs_in_an_epoch_based_stage(tmp_path):
    by_epochs = Schedule(tmp_path)
    _fit([by_epochs], max_steps=-1, max_epochs=1, limit_train_batches=12)
    assert by_epochs.calls == [(4, False), (8, False), (12, True)]
    by_steps = Schedule(tmp_path)
    _fit([by_steps], max_steps=12)
    assert by_steps.calls == [(4, False), (8, False), (12, True)], "the last step is the final evaluation's"


@pytest.mark.parametrize(
    ("stop", "calls"),
    [
        (6, [(4, False), (6, True)]),
        # Stopped on a step evaluated during training, that evaluation becomes the final one: it was captioned
        # and logged once more (tests/test_tensorboard.py checks what reaches the log).
        (4, [(4, False), (4, "again")]),
    ],
)
def test_a_stage_stopped_early_is_evaluated_where_it_stopped(tmp_path, stop, calls):
    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            trainer.should_stop |= trainer.global_step == stop

    schedule = Schedule(tmp_path)
    _fit([schedule, StopAt()], max_steps=12)
    assert schedule.calls == calls


def test_a_resumed_stage_does_not_repeat_the_evaluation_it_stopped_at(tmp_path):
    def checkpoint():
        return ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=4)

    _fit([Schedule(tmp_path), checkpoint()], max_steps=10, accumulate_grad_batches=2)
    resumed = Schedule(tmp_path)
    _fit([resumed, checkpoint()], tmp_path / "ckpt" / "last.ckpt", max_steps=12, accumulate_grad_batches=2)
    assert resumed.calls == [(12, True)], "step 8 was evaluated before the checkpoint"


def test_vqa_on_shards_without_questions_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="eval.vqa: the evaluated shards hold no questions"):
        CaptionEvaluation("toy", [("k", None, {"captions": {}})], None, None, tmp_path / "m.json", vqa=True)


def test_the_evaluation_log_line_shows_counts_whole():
    from callbacks.evaluation import metrics_line

    metrics = {"chair_i": 0.01495, "mentions": 669.0, "recall": 1.0, "images": 256.0, "buckets": {"8": {}}}
    assert metrics_line(metrics) == "chair_i 0.015, mentions 669, recall 1.000, images 256"


def test_a_resume_under_other_evaluation_settings_drops_the_earlier_history(tmp_path):
    # A stage resumed after its evaluation settings changed mixed scores of both settings in its history.
    samples = [("k", None, {"captions": {}})]

    def evaluation(eval_hash: str) -> CaptionEvaluation:
        return CaptionEvaluation(
            "toy", samples, FORMAT, None, tmp_path / "m.json", extra={"eval_fingerprint": eval_hash}
        )

    before = evaluation("a")
    before.history = [{"global_step": 2, "chair_i": 0.5}]
    same, other = evaluation("a"), evaluation("b")
    same.load_state_dict(before.state_dict())
    other.load_state_dict(before.state_dict())
    assert same.history == before.history and other.history == []


def test_shards_built_before_the_index_listed_object_classes_are_named(caplog):
    # Their CHAIR counts only the evaluated images' classes: the same model scored CHAIR-i 0.0 on them and 1.0
    # on the same data rebuilt, both silently.
    from callbacks.evaluation import class_table

    samples = [("k", None, {"objects": ["dog", "cat"]})]
    assert class_table(None, {"object_classes": ["cat", "dog", "kite"]}, samples) == {"cat": [], "dog": [], "kite": []}
    assert not caplog.records
    with caplog.at_level("WARNING"):
        assert class_table(None, {}, samples, "/data/old") is None
    assert "/data/old were built before index.json listed" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # the synthetic world's objects are records, not class names: no table to miss
        assert class_table(None, {}, [("k", None, {"objects": [{"shape": "circle"}]})]) is None
    assert not caplog.records


def test_the_captions_table_keeps_a_row_per_caption():
    # A "|" or a line break in a caption split its row in TensorBoard's table.
    import re

    from callbacks.evaluation import markdown_table

    table = markdown_table([("k1", "a cat | a dog", "a cat\non a mat"), ("k2", "x", "y")]).splitlines()
    assert len(table) == 4 and all(len(re.findall(r"(?<!\\)\|", line)) == 4 for line in table)
    assert table[2] == "| k1 | a cat \\| a dog | a cat on a mat |"


def test_a_synonym_table_with_a_byte_order_mark_is_read_and_one_not_utf8_is_named(tmp_path):
    # "Unexpected UTF-8 BOM" refused a table saved by a Windows editor; a Latin-1 one failed naming no file.
    from callbacks.evaluation import load_synonyms

    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf{"dog": ["puppy"]}')
    assert load_synonyms(tmp_path / "bom.json") == {"dog": ["puppy"]}
    (tmp_path / "latin1.json").write_bytes(b'{"caf\xe9": ["bar"]}')
    with pytest.raises(ValueError, match=f"eval.synonyms {tmp_path / 'latin1.json'}: not a readable JSON file"):
        load_synonyms(tmp_path / "latin1.json")
