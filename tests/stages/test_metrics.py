import pytest

from stages.metrics import caption_metrics, mentions

RED_CIRCLE = {"shape": "circle", "colour": "red", "size": "large", "place": "top"}
BLUE_STAR = {"shape": "star", "colour": "blue", "size": "small", "place": "center"}


def test_mentions_read_colour_size_and_plural():
    assert [(m.shape, m.colour, m.size) for m in mentions("a large red circle and two stars")] == [
        ("circle", "red", "large"),
        ("star", None, None),
    ]


def test_hand_computed_chair_and_recall():
    predictions = [
        "a red circle and a blue star",  # both right
        "a red circle and a green square",  # one of two mentions hallucinated
    ]
    objects = [[RED_CIRCLE, BLUE_STAR], [RED_CIRCLE, BLUE_STAR]]
    refs = [["a red circle and a blue star"]] * 2
    m = caption_metrics(predictions, objects, refs)
    assert m["chair_i"] == pytest.approx(1 / 4)
    assert m["chair_s"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["mean_words"] == pytest.approx(7)
    assert m["bleu1"] == pytest.approx(1.0, abs=0.3) and 0 < m["bleu4"] <= 1


def test_wrong_colour_is_a_hallucination_and_not_a_recall():
    m = caption_metrics(["a blue circle"], [[RED_CIRCLE]], [["a red circle"]])
    assert m["chair_i"] == 1.0 and m["recall"] == 0.0


def test_mismatched_lengths_fail():
    with pytest.raises(ValueError):
        caption_metrics(["a"], [], [])
