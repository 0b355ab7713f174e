"""Caption metrics against the synthetic world's exact ground truth.

An object mention is a shape word with the colour (and size) words just before it: "a large red
circle" mentions (shape=circle, colour=red, size=large). In this world an object is identified by
its colour and shape, so:

- CHAIR-i: mentions whose (colour, shape) is not in the image / all mentions (a mention with no
  colour counts as hallucinated only if no object has that shape);
- CHAIR-s: captions with at least one such mention / all captions;
- recall: ground-truth objects whose (colour, shape) some mention names / all ground-truth objects;
- mean_words: mean caption length in words (CHAIR-s rises with length: compare at matched length);
- bleu1, bleu4: corpus BLEU (torchmetrics) against all of the scene's caption variants. torchmetrics'
  BLEU is 0 when any n-gram order has no match, so BLEU-1 is reported beside BLEU-4.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchmetrics.functional.text import bleu_score

from datamodules.world import COLOURS, SHAPES, SIZES


@dataclass(frozen=True)
class Mention:
    shape: str
    colour: str | None
    size: str | None


def mentions(caption: str) -> list[Mention]:
    words = caption.split()
    found = []
    for i, word in enumerate(words):
        shape = word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word
        if shape not in SHAPES:
            continue
        before = words[max(0, i - 2) : i]
        colour = next((w for w in reversed(before) if w in COLOURS), None)
        size = next((w for w in before if w in SIZES), None)
        found.append(Mention(shape, colour, size))
    return found


def _present(mention: Mention, objects: list[dict]) -> bool:
    return any(o["shape"] == mention.shape and mention.colour in (None, o["colour"]) for o in objects)


def caption_metrics(predictions: list[str], objects: list[list[dict]], references: list[list[str]]) -> dict[str, float]:
    """Hallucination, recall, length and BLEU of `predictions`, one per image, against its ground truth."""
    if not predictions or not (len(predictions) == len(objects) == len(references)):
        raise ValueError("caption_metrics needs equally many (>0) predictions, object lists and references")
    total_mentions = hallucinated = captions_with = gt_total = gt_found = 0
    for caption, truth in zip(predictions, objects, strict=True):
        said = mentions(caption)
        bad = [m for m in said if not _present(m, truth)]
        total_mentions += len(said)
        hallucinated += len(bad)
        captions_with += bool(bad)
        named = {(m.colour, m.shape) for m in said}
        gt_total += len(truth)
        gt_found += sum((o["colour"], o["shape"]) in named for o in truth)
    return {
        "chair_i": hallucinated / total_mentions if total_mentions else 0.0,
        "chair_s": captions_with / len(predictions),
        "recall": gt_found / gt_total if gt_total else 0.0,
        "mean_words": sum(len(p.split()) for p in predictions) / len(predictions),
        "bleu1": float(bleu_score(predictions, references, n_gram=1)),
        "bleu4": float(bleu_score(predictions, references, n_gram=4, smooth=True)),
        "images": float(len(predictions)),
    }
