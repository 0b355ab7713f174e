"""Caption, hallucination and VQA metrics. Pure functions, each unit-tested against hand-computed cases.

Hallucination against the synthetic world's exact ground truth. An object mention is a shape word
with the colour (and size) words just before it: "a large red circle" mentions (shape=circle,
colour=red, size=large). In this world an object is identified by its colour and shape, so:

- CHAIR-i: mentions whose (colour, shape) is not in the image / all mentions (a mention with no
  colour counts as hallucinated only if no object has that shape);
- CHAIR-s: captions with at least one such mention / all captions;
- attribute hallucination: among mentions whose shape is in the image, the share that no single
  object of that shape matches in both the colour and the size stated ("a large red circle" beside a
  small red circle and a large blue one is wrong);
- recall: ground-truth objects whose (colour, shape) some mention names / all ground-truth objects (a
  mention without a colour names none: "two stars" recalls no blue star);
- all of these also per bucket of generated caption length: CHAIR-s rises with length by
  construction, so curricula are compared at matched lengths.

POPE-style probes (`pope`) ask "is there a <colour> <shape>?" for the image's objects and for as
many absent ones, drawn three ways (random; popular: the most frequent objects of the evaluated
set; adversarial: absent objects that share a shape or colour with a present one). A captioning
model answers from its caption: "yes" when the caption names the object.

Real data: shards whose samples carry object class names (COCO-style annotations) are scored with
`chair_synonyms` (CHAIR-i / CHAIR-s and recall, by a synonym table); without annotations only the
text metrics and caption lengths are computed. `vqa_exact` (the world's questions) is exact match
after the official VQAv2 answer normalisation (`normalize_answer`); `vqa_accuracy` is the VQAv2 /
TextVQA accuracy for questions with several human answers (real data).

Text metrics, on lower-cased words with punctuation dropped (`caption_words`): BLEU-1..4 (torchmetrics,
corpus level: it returns 0 whenever one n-gram order has no match, so the lower orders are reported
too; references shortest first, so that a length tie goes to the shorter as BLEU defines), ROUGE-L
(the COCO caption definition: LCS-based F-measure with beta 1.2, best reference), CIDEr-D (the COCO
caption definition: tf-idf n-gram vectors for n = 1..4 with document frequencies over the evaluated
references, clipped, Gaussian length penalty with sigma 6, times 10; checked against pycocoevalcap 1.2
in the tests).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass

from torchmetrics.functional.text import bleu_score

from datamodules.text_stats import caption_words, word_count
from datamodules.world import BACKGROUNDS, COLOURS, EXTRA_COLOURS, SHAPES, SIZES

ALL_COLOURS = {**COLOURS, **EXTRA_COLOURS}
MENTION_COLOURS = {**ALL_COLOURS, **BACKGROUNDS}
"""The colour words a mention takes: the objects' and the backgrounds' (the model writes "gray" in every long
caption; "a gray circle" must not read as a colourless mention of a circle, and earn recall for a red one)."""
DEFAULT_BUCKETS = (8, 20, 48)
"""Caption-length bucket edges in words: the hallucination scores are also reported per bucket."""
POPE_SETTINGS = ("random", "popular", "adversarial")


@dataclass(frozen=True)
class Mention:
    shape: str
    colour: str | None
    size: str | None


def _world_shape(word: str) -> str | None:
    """The shape `word` names, singular or plural ("circles", "crosses"), or None."""
    for shape in (word, word[:-1] if word.endswith("s") else None, word[:-2] if word.endswith("es") else None):
        if shape in SHAPES:
            return shape
    return None


def mentions(caption: str) -> list[Mention]:
    """The caption's object mentions: each shape word with the colour and size words among the two words before
    it, back to the shape word before (in "a red star circle" the circle has no colour). Every colour word the
    world has counts, the backgrounds' too: "a gray circle" names a gray circle, which no image holds."""
    words = caption_words(caption)
    found = []
    for i, word in enumerate(words):
        shape = _world_shape(word)
        if shape is None:
            continue
        before = words[max(0, i - 2) : i]
        while any(_world_shape(w) for w in before):
            before = before[1:]
        colour = next((w for w in reversed(before) if w in MENTION_COLOURS), None)
        size = next((w for w in before if w in SIZES), None)
        found.append(Mention(shape, colour, size))
    return found


def _present(mention: Mention, objects: list[dict]) -> bool:
    return any(o["shape"] == mention.shape and mention.colour in (None, o["colour"]) for o in objects)


def _wrong_attribute(mention: Mention, objects: list[dict]) -> bool:
    same_shape = [o for o in objects if o["shape"] == mention.shape]
    return not any(mention.colour in (None, o["colour"]) and mention.size in (None, o["size"]) for o in same_shape)


def _named(said: list[Mention], obj: dict) -> bool:
    """Whether a mention names the object: its shape and its colour (\"a circle\" names no red circle: it earned
    recall for every circle, and answered yes to every POPE probe of a circle)."""
    return any(m.shape == obj["shape"] and m.colour == obj["colour"] for m in said)


# Each hallucination rate's denominator, recorded beside it (floats, as every metric, for TensorBoard).
DENOMINATORS = {"chair_i": "mentions", "chair_s": "images", "recall": "objects", "attr_halluc": "attr_mentions"}
COUNTS = {*DENOMINATORS.values(), "cut_short"}
"""The metrics that are counts (floats all, for TensorBoard): shown as whole numbers."""


def hallucination(predictions: list[str], objects: list[list[dict]]) -> dict[str, float]:
    """CHAIR-i, CHAIR-s, attribute hallucination, recall and mean words of captions against their objects,
    with each rate's denominator: `mentions` (CHAIR-i; captions that name no object score CHAIR-i 0.0),
    `images` (CHAIR-s), `attr_mentions` (attribute hallucination), `objects` (recall)."""
    total = bad_total = with_bad = attr_total = attr_bad = gt_total = gt_found = 0
    for caption, truth in zip(predictions, objects, strict=True):
        said = mentions(caption)
        bad = [m for m in said if not _present(m, truth)]
        total, bad_total, with_bad = total + len(said), bad_total + len(bad), with_bad + bool(bad)
        shape_present = [m for m in said if any(o["shape"] == m.shape for o in truth)]
        attr_total += len(shape_present)
        attr_bad += sum(_wrong_attribute(m, truth) for m in shape_present)
        gt_total += len(truth)
        gt_found += sum(_named(said, o) for o in truth)
    n = len(predictions)
    return {
        "chair_i": bad_total / total if total else 0.0,  # no mentions: 0.0, and `mentions` says so
        "chair_s": with_bad / n if n else 0.0,
        "mentions": float(total),
        "attr_halluc": attr_bad / attr_total if attr_total else 0.0,
        "attr_mentions": float(attr_total),
        "recall": gt_found / gt_total if gt_total else 0.0,
        "objects": float(gt_total),
        **words_and_images(predictions),
    }


def bucket_name(words: int, edges: tuple[int, ...]) -> str:
    low = 0
    for edge in edges:
        if words <= edge:
            return f"{low}-{edge}"
        low = edge + 1
    return f"{low}+"


def words_and_images(predictions: list[str], objects: list | None = None) -> dict[str, float]:
    """Mean words and image count: all that is scored of images without object annotations."""
    n = len(predictions)
    return {"mean_words": sum(map(word_count, predictions)) / n if n else 0.0, "images": float(n)}


def check_buckets(edges, flag: str) -> None:
    """Bucket edges must be increasing positive word counts; `flag` names the setting in the error."""
    if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"{flag} must be increasing positive word counts, got {list(edges)}")


def by_length(predictions: list[str], objects: list, edges=DEFAULT_BUCKETS, scorer=None) -> dict[str, dict]:
    """`scorer(predictions, objects)` (default: `hallucination`) per bucket of generated caption length
    (words), e.g. {"0-8": {...}, "9-20": {...}}."""
    scorer = scorer or hallucination
    groups: dict[str, list[int]] = {}
    for i, caption in enumerate(predictions):
        groups.setdefault(bucket_name(word_count(caption), tuple(edges)), []).append(i)
    return {
        name: scorer([predictions[i] for i in rows], [objects[i] for i in rows])
        for name, rows in sorted(groups.items(), key=lambda item: int(item[0].split("-")[0].rstrip("+")))
    }


def _pair(obj: dict) -> tuple[str, str]:
    return obj["colour"], obj["shape"]


def pope_probes(
    key: str, objects: list[dict], setting: str, popularity: list[tuple[str, str]], per_image: int = 3
) -> list[tuple[tuple[str, str], bool]]:
    """((colour, shape), present?) probes for one image: up to `per_image` present objects, drawn at random
    as POPE draws them (the first by name favoured some colours), and as many absent ones."""
    present = sorted({_pair(o) for o in objects})
    present = random.Random(f"pope/{key}").sample(present, min(per_image, len(present)))
    everything = set(popularity) | {(c, s) for c in COLOURS for s in SHAPES} | set(present)
    truth = {_pair(o) for o in objects}
    absent = sorted(everything - truth)
    rng = random.Random(f"pope/{setting}/{key}")
    if setting == "random":
        negatives = rng.sample(absent, min(len(present), len(absent)))
    elif setting == "popular":
        ranked = [pair for pair in popularity if pair not in truth] + [p for p in absent if p not in popularity]
        negatives = ranked[: len(present)]  # the most frequent absent objects, then the rest in order
    elif setting == "adversarial":
        shapes, colours = {s for _, s in truth}, {c for c, _ in truth}
        confusable = [p for p in absent if p[1] in shapes or p[0] in colours]
        rng.shuffle(confusable)
        confusable.sort(key=lambda p: p[1] not in shapes)  # same shape, other colour first
        negatives = confusable[: len(present)]
    else:
        raise ValueError(f"unknown POPE setting {setting!r}; expected one of {POPE_SETTINGS}")
    return [(pair, True) for pair in present] + [(pair, False) for pair in negatives]


def binary_scores(answers: list[bool], truth: list[bool]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no answers ("yes" = True)."""
    tp = sum(a and t for a, t in zip(answers, truth, strict=True))
    fp = sum(a and not t for a, t in zip(answers, truth, strict=True))
    fn = sum(t and not a for a, t in zip(answers, truth, strict=True))
    n = len(answers)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": sum(a == t for a, t in zip(answers, truth, strict=True)) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(answers) / n if n else 0.0,
    }


def pope(keys: list[str], predictions: list[str], objects: list[list[dict]], per_image: int = 3) -> dict[str, dict]:
    """POPE scores per setting, each probe answered "yes" when the caption names the object."""
    frequency = Counter(_pair(o) for truth in objects for o in truth)
    popularity = sorted(frequency, key=lambda pair: (-frequency[pair], pair))
    results = {}
    for setting in POPE_SETTINGS:
        answers, truth = [], []
        for key, caption, objs in zip(keys, predictions, objects, strict=True):
            said = mentions(caption)
            for (colour, shape), present in pope_probes(key, objs, setting, popularity, per_image):
                answers.append(_named(said, {"colour": colour, "shape": shape}))
                truth.append(present)
        results[setting] = binary_scores(answers, truth)
    return results


_IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice", "foot": "feet",
    "tooth": "teeth", "goose": "geese", "ox": "oxen", "sheep": "sheep", "deer": "deer", "fish": "fish",
}  # fmt: skip


def noun_forms(noun: str) -> set[str]:
    """`noun` and its plurals by the English rules: -s; -es after s, x, z, ch, sh, o ("buses", but not
    "skies" for ski); a consonant's -y to -ies ("puppies"); -f / -fe to -ves ("knives"); and irregulars."""
    forms = {noun, noun + "s"}
    if noun.endswith(("s", "x", "z", "ch", "sh", "o")):
        forms.add(noun + "es")
    if noun.endswith("y") and len(noun) > 1 and noun[-2] not in "aeiou":
        forms.add(noun[:-1] + "ies")
    if noun.endswith("fe"):
        forms.add(noun[:-2] + "ves")
    elif noun.endswith("f"):
        forms.add(noun[:-1] + "ves")
    if noun in _IRREGULAR_PLURALS:
        forms.add(_IRREGULAR_PLURALS[noun])
    return forms


def chair_synonyms(predictions: list[str], objects: list[list[str]], synonyms: dict[str, list[str]]) -> dict:
    """CHAIR-i / CHAIR-s and recall for real data: `synonyms` maps each object class to the words that name
    it (multi-word phrases allowed, longest match first, the last word also in its plurals: `noun_forms`);
    `objects` are each image's annotated classes; classes compare lower-cased. As in Rohrbach et al.'s
    CHAIR, every mention counts: CHAIR-i is hallucinated mentions over all mentions, CHAIR-s the share of
    captions with one; recall is the share of an image's annotated classes that its caption names."""
    phrases = [(caption_words(w), cls.lower()) for cls, words in synonyms.items() for w in [cls, *words]]
    phrases = [(phrase, cls) for phrase, cls in phrases if phrase]  # a class name of punctuation alone names nothing
    phrases = [(phrase[:-1], phrase[-1], noun_forms(phrase[-1]), cls) for phrase, cls in phrases]
    # The phrases by their first word: trying every phrase at every word cost words x classes, 41 s for 256 captions
    # against the 10,000 classes of an open-vocabulary data set (0.3 s now, same scores).
    by_first: dict[str, list] = {}
    for head, noun, forms, cls in phrases:
        for first in head[:1] or sorted(forms):
            by_first.setdefault(first, []).append((head, noun, forms, cls))
    total = bad = with_bad = gt_total = gt_found = 0
    for caption, truth in zip(predictions, objects, strict=True):
        words = caption_words(caption)
        said, i = [], 0
        while i < len(words):
            # The longest phrase that matches; of equally long ones, a class's own word before another's plural
            # ("shorts" is the class shorts, not the plural of short; which won followed the table's order).
            matches = [
                (len(head) + 1, window[-1] == noun, cls)
                for head, noun, forms, cls in by_first.get(words[i], ())
                if len(window := words[i : i + len(head) + 1]) == len(head) + 1
                and window[:-1] == head
                and window[-1] in forms
            ]
            if matches:
                length, _, cls = max(matches, key=lambda match: match[:2])
                said.append(cls)
                i += length
            else:
                i += 1
        annotated = {cls.lower() for cls in truth}
        wrong = [cls for cls in said if cls not in annotated]
        total, bad, with_bad = total + len(said), bad + len(wrong), with_bad + bool(wrong)
        gt_total, gt_found = gt_total + len(annotated), gt_found + len(annotated & set(said))
    return {
        "chair_i": bad / total if total else 0.0,  # no mentions: 0.0, and `mentions` says so
        "chair_s": with_bad / len(predictions) if predictions else 0.0,
        "mentions": float(total),
        "recall": gt_found / gt_total if gt_total else 0.0,
        "objects": float(gt_total),
    }


# The VQA evaluation's answer normalisation (VQAv2 / TextVQA evaluation code, vqaEval.py), with its whole
# contractions table as it is: its capitalised keys ("Im", "Ive") never match the lower-cased words, so "im"
# stays "im" there as here, and "somebody'd" maps to "somebodyd".
_CONTRACTION_PAIRS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't|havent haven't
hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm
Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|neednt needn't|notve not've
oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|shed've she'd've
she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've
somebody'd somebodyd|somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's
somethingd something'd|somethingd've something'd've|something'dve something'd've|somethingll something'll|thats that's
thered there'd|thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd|theyd've they'd've
they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've
weve we've|werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's|whered where'd
wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've
whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've
wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've
y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've
"""
_CONTRACTIONS = dict(pair.split(" ") for line in _CONTRACTION_PAIRS.strip().splitlines() for pair in line.split("|"))
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'


def normalize_answer(answer: str) -> str:
    original = text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCT:  # whether a mark is dropped or spaced is read off the answer as given, not as edited
        if (p + " " in original or " " + p in original) or re.search(r"(\d)(\,)(\d)", original):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = re.sub(r"(?!<=\d)(\.)(?!\d)", "", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_exact(predictions: list[str], answers: list[str]) -> float:
    """Exact-match accuracy after normalisation (the synthetic world has one right answer)."""
    hits = [normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers, strict=True)]
    return sum(hits) / len(hits) if hits else 0.0


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The VQAv2 / TextVQA accuracy of one answer against the human answers (ten in VQAv2): min(#matches / 3, 1)
    over the answers less one, averaged over which one is left out ("yes" against two "yes" of ten: 0.6).
    Both sides normalised (`normalize_answer`); the official script normalises only where the human answers
    disagree, so an answer that differs from unanimous references in case or articles alone scores 1 here."""
    if not answers:
        raise ValueError("vqa_accuracy: no reference answers")
    guess = normalize_answer(prediction)
    matches = [normalize_answer(answer) == guess for answer in answers]
    hits = sum(matches)
    if len(answers) == 1:  # nothing to leave out: one reference is exact match
        return float(hits)
    return sum(min((hits - match) / 3, 1.0) for match in matches) / len(answers)


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], previous + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, references: list[str], beta: float = 1.2) -> float:
    """COCO caption ROUGE-L of one caption: F-measure from the best precision and best recall over references."""
    cand = prediction.split()
    if not cand or not references:
        return 0.0
    lcs = [_lcs(ref.split(), cand) for ref in references]
    precision = max(m / len(cand) for m in lcs)
    recall = max(m / len(ref.split()) for m, ref in zip(lcs, references, strict=True) if ref.split())
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def _ngrams(text: str, n: int = 4) -> Counter:
    words = text.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(predictions: list[str], references: list[list[str]], sigma: float = 6.0) -> list[float]:
    """CIDEr-D of each caption (the corpus score is their mean), as pycocoevalcap computes it."""
    refs = [[_ngrams(r) for r in rs] for rs in references]
    document_frequency = Counter(g for rs in refs for g in {g for r in rs for g in r})
    log_images = math.log(float(len(refs)))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(4)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, document_frequency[gram])))
        norms = [math.sqrt(sum(v * v for v in part.values())) for part in vec]
        bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)  # pycocoevalcap's "length"
        return vec, norms, bigrams

    scores = []
    for prediction, rs in zip(predictions, refs, strict=True):
        vec, norms, length = vector(_ngrams(prediction))
        total = [0.0] * 4
        for ref in rs:
            rvec, rnorms, rlength = vector(ref)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * sigma**2))
            for n in range(4):
                value = sum(min(w, rvec[n].get(g, 0.0)) * rvec[n].get(g, 0.0) for g, w in vec[n].items())
                if norms[n] and rnorms[n]:
                    value /= norms[n] * rnorms[n]
                total[n] += value * penalty
        scores.append(sum(total) / 4 / len(rs) * 10.0)
    return scores


def text_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-1..4 (corpus, smoothed), ROUGE-L and CIDEr-D (means over captions), on lower-cased words with
    punctuation dropped (as COCO's evaluation tokenises first: "A dog." matches "a dog")."""
    predictions = [" ".join(caption_words(p)) for p in predictions]
    # Shortest first: BLEU's brevity penalty takes the reference closest in length, and torchmetrics breaks
    # a tie by list order where BLEU's definition (nltk, sacrebleu) takes the shorter one.
    # A reference without a word (an emoji-only caption variant of shards built before the data stage left those
    # out) is none: as "" it gave BLEU's brevity penalty a length of 0 (BLEU-1 1.0 for 3 words of a 6-word
    # reference) and counted in CIDEr-D's mean over references.
    references = [
        sorted((" ".join(words) for r in rs if (words := caption_words(r))), key=lambda r: len(r.split()))
        for rs in references
    ]
    scores = {f"bleu{n}": float(bleu_score(predictions, references, n_gram=n, smooth=True)) for n in range(1, 5)}
    scores["rouge_l"] = sum(rouge_l(p, r) for p, r in zip(predictions, references, strict=True)) / len(predictions)
    scores["cider_d"] = sum(cider_d(predictions, references)) / len(predictions)
    return scores


def object_kind(objects: list) -> str | None:
    """What the images' object annotations are: "world" (the synthetic world's colour/shape/size dicts),
    "classes" (class names, as COCO-style annotations of real data), or None when an image has none."""
    if any(truth is None for truth in objects):
        return None
    items = [item for truth in objects for item in truth]
    if items and all(isinstance(item, dict) for item in items):
        return "world"
    if all(isinstance(item, str) for item in items):  # also: every list empty (annotated, nothing in them)
        return "classes"
    raise ValueError("object annotations mix the world's object dicts and class names")


def caption_metrics(
    predictions: list[str],
    objects: list,
    references: list[list[str]],
    keys: list[str] | None = None,
    buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    synonyms: dict[str, list[str]] | None = None,
) -> dict:
    """Every caption metric of `predictions` (one per image) against its ground truth.

    `objects` holds each image's annotations (see `object_kind`): with the synthetic world's objects,
    the exact hallucination scores and POPE; with class names, CHAIR-i / CHAIR-s and recall by
    `synonyms` (unset: every annotated class names itself); with any image unannotated (None), no
    object metric. Always: mean words, BLEU-1..4, ROUGE-L and CIDEr-D against `references`. Flat
    scalars plus `by_length`: the object metrics (or the words) per caption-length bucket.
    """
    if not predictions or not (len(predictions) == len(objects) == len(references)):
        raise ValueError("caption_metrics needs equally many (>0) predictions, object lists and references")
    keys = keys or [str(i) for i in range(len(predictions))]
    unreferenced = [key for key, refs in zip(keys, references, strict=True) if not any(map(caption_words, refs))]
    if unreferenced:
        raise ValueError(
            f"{len(unreferenced)} evaluated samples have no reference caption with a word (no `captions` text, or "
            f"emoji or punctuation alone), e.g. {unreferenced[:3]}: BLEU, ROUGE-L and CIDEr need one; rebuild "
            "their shards with the data stage, which leaves such samples out (counted as empty_caption)"
        )
    kind = object_kind(objects)
    if kind == "world":
        scorer = hallucination
    elif kind == "classes":
        table = synonyms if synonyms is not None else {cls: [] for truth in objects for cls in truth}

        def scorer(p: list[str], o: list) -> dict:
            return {**chair_synonyms(p, o, table), **words_and_images(p)}
    else:
        scorer = words_and_images
    result: dict = scorer(predictions, objects)
    result.update(text_metrics(predictions, references))
    if kind == "world":
        for setting, scores in pope(keys, predictions, objects).items():
            result.update({f"pope_{setting}_{name}": value for name, value in scores.items()})
    result["by_length"] = by_length(predictions, objects, buckets, scorer)
    return result
