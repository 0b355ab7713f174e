import math
from collections import Counter

import pytest

from stages.metrics import (
    binary_scores,
    by_length,
    caption_metrics,
    chair_synonyms,
    cider_d,
    hallucination,
    mentions,
    normalize_answer,
    noun_forms,
    pope,
    pope_probes,
    rouge_l,
    text_metrics,
    vqa_accuracy,
    vqa_exact,
)

RED_CIRCLE = {"shape": "circle", "colour": "red", "size": "large", "place": "top"}
BLUE_STAR = {"shape": "star", "colour": "blue", "size": "small", "place": "center"}


def test_mentions_read_colour_size_and_plural():
    assert [(m.shape, m.colour, m.size) for m in mentions("a large red circle and two stars")] == [
        ("circle", "red", "large"),
        ("star", None, None),
    ]
    # Case, punctuation and the -es plural: "square." and "crosses" were no mentions at all.
    found = mentions("A Red circle, a green square. Two blue crosses!")
    assert [(m.shape, m.colour) for m in found] == [("circle", "red"), ("square", "green"), ("cross", "blue")]
    scores = hallucination(["A red circle and a green square."], [[RED_CIRCLE]])
    assert (scores["chair_i"], scores["chair_s"], scores["recall"]) == (0.5, 1.0, 1.0)
    assert scores["mentions"] == 2.0


def test_captions_that_name_nothing_score_chair_zero_with_zero_mentions():
    """CHAIR-i has no mentions to divide by: it reads 0.0, and `mentions` 0 shows that it means nothing."""
    scores = hallucination(["there is nothing here", ""], [[RED_CIRCLE], [BLUE_STAR]])
    assert (scores["chair_i"], scores["mentions"], scores["recall"]) == (0.0, 0.0, 0.0)
    real = chair_synonyms(["nothing at all"], [["dog"]], {"dog": ["puppy"]})
    assert (real["chair_i"], real["mentions"], real["recall"]) == (0.0, 0.0, 0.0)


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
    # Corpus BLEU with add-one smoothing for n >= 2 (torchmetrics' smooth=True), no brevity penalty (14
    # words against 14): n-grams matched 12/14, (6+4)+1 / 12+1, (5+3)+1 / 10+1, (4+2)+1 / 8+1.
    precisions = [12 / 14, 11 / 13, 9 / 11, 7 / 9]
    for n in range(1, 5):
        assert m[f"bleu{n}"] == pytest.approx(math.prod(precisions[:n]) ** (1 / n), rel=1e-6), n
    assert {"bleu2", "bleu3", "rouge_l", "cider_d", "pope_adversarial_f1", "by_length"} <= m.keys()


def test_wrong_colour_is_a_hallucination_and_not_a_recall():
    m = caption_metrics(["a blue circle"], [[RED_CIRCLE]], [["a red circle"]])
    assert m["chair_i"] == 1.0 and m["recall"] == 0.0


def test_attribute_hallucination_is_right_shape_wrong_colour_or_size():
    # wrong colour; wrong size (but the object is there: no CHAIR-i); right; absent shape (not counted)
    captions = ["a blue circle", "a small red circle", "a large red circle", "a green square"]
    m = hallucination(captions, [[RED_CIRCLE]] * 4)
    assert m["attr_halluc"] == pytest.approx(2 / 3)
    assert m["chair_i"] == pytest.approx(2 / 4)


def test_an_attribute_is_right_only_when_one_object_has_both_colour_and_size():
    # A small red circle and a large blue one: "a large red circle" names a colour and a size that circles
    # have, but no one circle has both.
    objects = [{**RED_CIRCLE, "size": "small"}, {**RED_CIRCLE, "colour": "blue"}]
    m = hallucination(["a large red circle", "a small red circle", "a large blue circle"], [objects] * 3)
    assert m["attr_halluc"] == pytest.approx(1 / 3)
    assert m["chair_i"] == 0.0


def test_by_length_buckets_split_on_generated_words():
    captions = ["a blue circle", "a large red circle at the top on a gray background"]  # 3 and 11 words
    buckets = by_length(captions, [[RED_CIRCLE]] * 2, (8, 20))
    assert list(buckets) == ["0-8", "9-20"]
    assert buckets["0-8"]["chair_i"] == 1.0 and buckets["9-20"]["chair_i"] == 0.0
    assert buckets["9-20"]["mean_words"] == 11
    # Past the last edge: an open bucket, listed last whatever the captions' order.
    long = " ".join(["a red circle"] * 8)  # 24 words
    assert list(by_length([long, *captions], [[RED_CIRCLE]] * 3, (8, 20))) == ["0-8", "9-20", "21+"]


def test_a_class_named_exactly_beats_another_class_plural():
    # "shorts" is a class of its own beside "short"; "glasses" beside "glass": the plural of the first in the table
    # won (CHAIR-i 1.0 and recall 0 for "a man in shorts" annotated shorts), and the table's order decided.
    for table in ({"short": [], "shorts": []}, {"shorts": [], "short": []}):
        scores = chair_synonyms(["a man in shorts"], [["shorts"]], table)
        assert (scores["chair_i"], scores["recall"]) == (0.0, 1.0)
    scores = chair_synonyms(["two glass vases"], [["glass"]], {"glass": [], "glasses": []})
    assert (scores["chair_i"], scores["recall"]) == (0.0, 1.0)
    # A plural still names its class when no class has that name.
    assert chair_synonyms(["two dogs"], [["dog"]], {"dog": [], "glasses": []})["recall"] == 1.0


def test_a_mention_without_colour_is_judged_by_its_shape():
    # "a circle" beside the red circle is no hallucination, but names no red circle: it is not recalled (it was,
    # so a caption without a colour word had recall 1.0); "a square" names nothing there.
    scores = hallucination(["a circle", "a square"], [[RED_CIRCLE], [RED_CIRCLE]])
    assert (scores["chair_i"], scores["chair_s"], scores["recall"]) == (0.5, 0.5, 0.0)
    assert hallucination(["two stars"], [[BLUE_STAR]])["recall"] == 0.0
    assert hallucination(["two blue stars"], [[BLUE_STAR]])["recall"] == 1.0
    # Nor does it answer yes to "is there a green circle?": adversarial POPE answered yes to every probe.
    adversarial = pope(["k"], ["a circle and a star"], [[RED_CIRCLE, BLUE_STAR]])["adversarial"]
    assert adversarial["yes_ratio"] == 0.0


def test_background_colours_and_the_shape_before_bound_a_mention():
    # "gray" is a background's colour: "a gray circle" named a colourless circle, recalled the red one.
    gray = hallucination(["a gray circle"], [[RED_CIRCLE]])
    assert (gray["chair_i"], gray["recall"], gray["attr_halluc"]) == (1.0, 0.0, 1.0)
    # The red of "a red star circle" is the star's: the circle has no colour word (it read as a red circle).
    assert [(m.shape, m.colour) for m in mentions("a red star circle")] == [("star", "red"), ("circle", None)]
    blue_circle = {**RED_CIRCLE, "colour": "blue"}
    assert hallucination(["a red star circle"], [[{**BLUE_STAR, "colour": "red"}, blue_circle]])["chair_i"] == 0.0


def test_binary_scores_hand_computed():
    scores = binary_scores([True, True, False, False], [True, False, True, False])
    assert scores == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}


def test_pope_negatives_per_setting():
    objects = [RED_CIRCLE, BLUE_STAR]
    popularity = [("red", "circle"), ("green", "square"), ("white", "cross"), ("blue", "star")]
    popular = pope_probes("k", objects, "popular", popularity)
    assert sorted(popular[:2]) == [(("blue", "star"), True), (("red", "circle"), True)]
    assert popular[2:] == [(("green", "square"), False), (("white", "cross"), False)]
    adversarial = [pair for pair, present in pope_probes("k", objects, "adversarial", popularity) if not present]
    assert len(adversarial) == 2 and all(shape in {"circle", "star"} for _, shape in adversarial)
    assert all(pair not in {("red", "circle"), ("blue", "star")} for pair in adversarial)
    randoms = pope_probes("k", objects, "random", popularity)
    assert randoms == pope_probes("k", objects, "random", popularity)  # seeded by the key
    # ... and so drawn afresh for each image: absent objects, as many as the present ones.
    probes = [pope_probes(f"k{i}", objects, "random", popularity) for i in range(50)]
    draws = [[pair for pair, present in image if not present] for image in probes]
    assert all(len(d) == 2 and not {("red", "circle"), ("blue", "star")} & set(d) for d in draws)
    assert len({tuple(sorted(d)) for d in draws}) > 25


def test_pope_draws_the_present_objects_at_random():
    """With more objects than probes, the first three by name were always the ones asked about: a yellow
    object (last in name order) was never probed in a four-object image."""
    objects = [{"shape": "circle", "colour": c, "size": "small", "place": "top"} for c in ("blue", "red", "white")]
    objects.append({"shape": "star", "colour": "yellow", "size": "small", "place": "top"})
    asked = Counter(
        pair for i in range(200) for pair, present in pope_probes(f"k{i}", objects, "random", []) if present
    )
    assert len(asked) == 4 and all(100 < n < 200 for n in asked.values())  # 150 each expected
    assert pope_probes("k1", objects, "random", []) == pope_probes("k1", objects, "random", [])


def test_pope_answers_from_the_caption():
    scores = pope(["k"], ["a red circle"], [[RED_CIRCLE]])
    for setting in ("random", "popular", "adversarial"):
        assert scores[setting] == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5}
    # Naming every circle colour says "yes" to the adversarial (same shape) negative.
    greedy = pope(
        ["k"],
        [" and ".join(f"a {c} circle" for c in ("red", "green", "blue", "yellow", "purple", "orange", "white"))],
        [[RED_CIRCLE]],
    )
    assert greedy["adversarial"]["yes_ratio"] == 1.0 and greedy["adversarial"]["precision"] == 0.5


def test_vqa_accuracy_counts_the_human_answers_that_agree_leaving_each_out_in_turn():
    # min(#matches / 3, 1) over the ten answers less one, averaged: worked by hand.
    assert vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_accuracy("Two.", ["2"] * 4 + ["3"] * 6) == 1.0  # normalised; four matches leave at least three
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    assert vqa_accuracy("a dog", ["dog"]) == 1.0  # one reference: exact match after normalisation
    with pytest.raises(ValueError, match="no reference answers"):
        vqa_accuracy("dog", [])


def test_vqa_exact_match_after_the_official_normalisation():
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("the Dog") == "dog"
    assert normalize_answer("isnt it") == "isn't it"
    assert vqa_exact(["Yes", "three"], ["yes", "3"]) == 1.0
    assert vqa_exact(["no"], ["yes"]) == 0.0
    assert vqa_exact(["none"], ["0"]) == 1.0  # the official number map has "none" too
    # Whether a mark is spaced or dropped is read off the answer as given, as the official code does.
    assert normalize_answer("x;-y-z") == "x y z"
    # The official contractions table whole (a subset of it left "couldnt've" and "oclock" unmatched), quirks
    # included: its keys "Im" and "Ive" never match lower-cased words, and "somebody'd" maps to "somebodyd".
    assert normalize_answer("couldnt've, oclock") == "couldn't've o'clock"
    assert normalize_answer("Im sure ive seen it") == "im sure ive seen it"
    assert normalize_answer("somebody'd") == "somebodyd"


def test_chair_with_a_synonym_table():
    synonyms = {"dog": ["puppy"], "dining table": ["table"], "person": ["man", "woman"]}
    scores = chair_synonyms(["A puppy on a table.", "a man and dogs"], [{"dog"}, {"dog", "person"}], synonyms)
    assert scores["chair_i"] == pytest.approx(1 / 4) and scores["chair_s"] == pytest.approx(1 / 2)
    assert scores["recall"] == 1.0  # dog; dog and person: all 3 annotated classes named
    assert chair_synonyms(["a cat"], [["dog"]], {"dog": [], "Cat": []}) == {
        "chair_i": 1.0,
        "chair_s": 1.0,
        "mentions": 1.0,
        "recall": 0.0,
        "objects": 1.0,
    }
    assert scores["mentions"] == 4.0  # puppy, table; man, dogs
    # Plurals of the last word only: "tennis" is not a plural of "tenni".
    table = {"tennis racket": [], "bus": []}
    plurals = chair_synonyms(["two tennis rackets", "three buses"], [["tennis racket"], ["bus"]], table)
    assert plurals["recall"] == 1.0 and plurals["chair_i"] == 0.0


def test_chair_counts_every_mention_as_rohrbach_does():
    # Mentions dog, cat, cat | dog: 2 of 4 hallucinated (a set per caption made it 1 of 3).
    captions = ["a dog chasing a cat while another cat sleeps", "a dog on grass"]
    scores = chair_synonyms(captions, [["dog"], ["dog"]], {"dog": [], "cat": []})
    assert (scores["chair_i"], scores["chair_s"], scores["recall"]) == (0.5, 0.5, 1.0)


def test_chair_plurals_follow_english_rules():
    table = {"dog": ["puppy"], "knife": [], "horse": ["pony"], "ski": [], "hat": [], "person": ["man"]}
    assert noun_forms("puppy") == {"puppy", "puppys", "puppies"} and "knives" in noun_forms("knife")
    assert "skies" not in noun_forms("ski") and noun_forms("man") == {"man", "mans", "men"}
    named = chair_synonyms(["two puppies and some knives", "three ponies", "two men"], [["dog"], [], []], table)
    assert (named["chair_i"], named["recall"]) == (pytest.approx(3 / 4), 1.0)  # knives, ponies, men
    # Words that only look like plurals: skies (not skis), hates (not hats).
    none = chair_synonyms(["a man skating under blue skies", "a man who hates the rain"], [["person"]] * 2, table)
    assert (none["chair_i"], none["chair_s"]) == (0.0, 0.0)


def test_chair_classes_compare_lower_cased():
    scores = chair_synonyms(["a puppy on grass"], [["dog"]], {"Dog": ["puppy"]})
    assert (scores["chair_i"], scores["recall"]) == (0.0, 1.0)
    assert chair_synonyms(["a dog"], [["Dog"]], {"dog": []})["recall"] == 1.0


def test_caption_metrics_on_class_annotations_and_on_none():
    predictions, refs = ["a dog and a cat", "a frisbee"], [["a dog"], ["a dog with a frisbee"]]
    objects = [["dog"], ["frisbee", "dog"]]
    # Default table: the annotated classes name themselves; "cat" is no class, so not counted.
    m = caption_metrics(predictions, objects, refs)
    assert (m["chair_i"], m["chair_s"], m["recall"]) == (0.0, 0.0, pytest.approx(2 / 3))
    assert "pope_random_f1" not in m and "attr_halluc" not in m and m["mean_words"] == 3.5  # 5 and 2 words
    m = caption_metrics(predictions, objects, refs, synonyms={"dog": [], "cat": ["kitten"], "frisbee": []})
    assert (m["chair_i"], m["chair_s"]) == (pytest.approx(1 / 3), 0.5)  # the cat is hallucinated
    assert m["by_length"]["0-8"]["chair_i"] == pytest.approx(1 / 3)
    # One image without annotations: no object metric at all, text metrics and lengths only.
    m = caption_metrics(predictions, [["dog"], None], refs)
    assert "chair_i" not in m and "recall" not in m and m["bleu1"] > 0 and m["images"] == 2.0
    assert m["by_length"] == {"0-8": {"mean_words": 3.5, "images": 2.0}}
    # Annotated, but nothing in any image: no object may be named, and no synthetic-world scoring.
    m = caption_metrics(["a red square sign"], [[]], [["a sign"]])
    assert m["chair_i"] == 0.0 and "pope_random_f1" not in m
    with pytest.raises(ValueError, match="mix"):
        caption_metrics(predictions, [["dog"], [RED_CIRCLE]], refs)


def test_rouge_l_hand_computed():
    # LCS 3: precision 3/3, recall 3/4, F with beta 1.2
    expected = (1 + 1.44) * 1 * 0.75 / (0.75 + 1.44 * 1)
    assert rouge_l("a red circle", ["a red big circle", "green"]) == pytest.approx(expected)
    assert rouge_l("", ["a"]) == 0.0


# Reference values from pycocoevalcap 1.2 (Cider().compute_score and Rouge().compute_score on
# these three images), computed once with that package; it is not a dependency of the project.
GTS = [
    [
        "a red circle and a blue star on a gray background",
        "a red circle and a blue star",
        "a large red circle at the top and a small blue star at the center on a gray background",
    ],
    [
        "a green square on a black background",
        "a green square",
        "a small green square at the left on a black background",
    ],
    [
        "a yellow triangle and a white cross and a purple diamond on a brown background",
        "a yellow triangle and a white cross",
        "a large yellow triangle at the top left and a small white cross at the right and a large purple diamond at "
        "the bottom on a brown background",
    ],
]
RES = [
    "a red circle and a green star on a gray background",
    "a green square",
    "a yellow triangle and a white cross and a purple diamond and a red circle on a brown background",
]


def test_cider_d_and_rouge_l_match_pycocoevalcap():
    assert cider_d(RES, GTS) == pytest.approx([4.03113430760653, 4.130422129290199, 2.6143403967577634], rel=1e-12)
    rouge = [rouge_l(r, g) for r, g in zip(RES, GTS, strict=True)]
    assert rouge == pytest.approx([0.9090909090909091, 1.0, 0.9014778325123153], rel=1e-12)


def test_mismatched_lengths_fail():
    with pytest.raises(ValueError, match="equally many"):
        caption_metrics(["a"], [], [])


def test_bleu_takes_the_shorter_of_two_equally_close_references():
    """The shards list caption variants long, medium, short; torchmetrics broke a length tie by that order,
    so a 5-word caption between references of 7 and 3 words got the brevity penalty of 11."""
    pred = ["a red circle on a"]
    refs = ["a large red circle at the top on a gray background", "a red circle on a gray background", "a red circle"]
    shard_order, shortest_first = text_metrics(pred, [refs]), text_metrics(pred, [refs[::-1]])
    assert shard_order["bleu1"] == 1.0  # every word matches and the caption is not shorter than 3: no penalty
    assert shard_order == shortest_first


def test_a_reference_without_a_word_is_none():
    # An emoji-only caption variant (in shards built before the data stage left those out) became the reference
    # "", whose length 0 took BLEU's brevity penalty away: BLEU-1 1.0 for 3 words against a 6-word caption.
    real = ["a dog runs on the grass"]
    alone, with_emoji = text_metrics(["a dog runs"], [real]), text_metrics(["a dog runs"], [[*real, "🔥🔥"]])
    assert alone["bleu1"] == pytest.approx(math.exp(1 - 6 / 3))
    assert with_emoji == pytest.approx(alone)


def test_text_metrics_ignore_case_and_punctuation():
    scores = text_metrics(["A red circle."], [["a red circle"]])
    assert scores["bleu1"] == 1.0 and scores["rouge_l"] == pytest.approx(1.0)


def test_an_image_without_a_reference_caption_is_named():
    with pytest.raises(ValueError, match=r"1 evaluated samples have no reference caption .*\['k2'\]"):
        caption_metrics(["a dog", "a cat"], [None, None], [["a dog"], ["", "..."]], keys=["k1", "k2"])


def test_words_of_every_script_are_compared_and_cjk_counts_by_character():
    # Matching [a-z0-9] only, "café" was "caf", and a Russian or Chinese reference had no words: the run
    # stopped after its first stage ("no reference caption"). A Chinese sentence was one word for budgets.
    from datamodules.text_stats import caption_words, word_count

    assert caption_words("Un chien à côté du CANAPÉ.") == ["un", "chien", "à", "côté", "du", "canapé"]
    assert caption_words("Кошка на диване") == ["кошка", "на", "диване"]
    assert caption_words("बिल्ली सोफे पर है") == ["बिल्ली", "सोफे", "पर", "है"], "vowel signs are in the word"
    assert caption_words("一只猫。") == ["一", "只", "猫"] and word_count("一只猫坐在沙发上。") == 8
    assert word_count("ｶﾒﾗ") == len(caption_words("ｶﾒﾗ")) == 3, "half-width kana, NFKC in both"
    # The kana blocks' punctuation and sound marks are no words: "・・・" was a caption of 3 words, kept and trained.
    assert caption_words("・・・") == caption_words("゛゛") == [] and caption_words("猫・犬") == ["猫", "犬"]
    assert word_count("猫・犬") == 2
    assert word_count("a red circle - left-most.") == len("a red circle - left-most.".split()), "as indexes count"
    # A Latin word run into CJK characters stays a word (report statistics split the same way).
    from datamodules.text_stats import corpus_stats, tokens

    assert caption_words("iPhone手机") == tokens("iPhone手机") == ["iphone", "手", "机"]
    assert corpus_stats(["一只猫", "a cat"])["mean_words"] == 2.5
    scores = caption_metrics(["кошка на диване"], [None], [["Кошка на диване."]])
    assert scores["bleu1"] == pytest.approx(1.0) and scores["mean_words"] == 3
    assert text_metrics(["一只猫"], [["一只猫。"]])["bleu1"] == pytest.approx(1.0)


def test_class_names_are_split_into_words_as_captions_are():
    # "hot-dog" and "café" never matched a caption: the class names split on spaces only, captions on [a-z0-9].
    table = {"hot-dog": [], "café": []}
    scores = chair_synonyms(["a hot-dog on a plate", "a café table"], [["hot-dog"], ["café"]], table)
    assert scores["recall"] == 1.0 and scores["chair_i"] == 0.0
