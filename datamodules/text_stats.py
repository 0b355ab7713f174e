"""Statistics of a caption corpus for the data report: length, vocabulary and lexical diversity.

Type-token ratio falls as a corpus grows, so corpora are compared on MTLD and MATTR, which do not
depend on corpus size, and on TTR only over equally many tokens.
- MTLD (McCarthy and Jarvis, 2010): the mean length of runs of tokens whose running TTR stays
  above 0.72, averaged over a forward and a backward pass.
- MATTR (Covington and McFall, 2010): the mean TTR of every window of `window` consecutive tokens.
"""

from __future__ import annotations

import math
import re
import unicodedata
from array import array

# Scripts written without spaces between words (kana, CJK ideographs): each character counts as a word, as
# character-level scoring of Chinese and Japanese captions does. Counted as one word, a whole Chinese sentence
# fitted every stage's word budget.
# Letters only: the kana blocks also hold punctuation ("・", "゠") and sound marks ("゛", which NFKC makes a
# combining mark), which made "・・・" a caption of three words.
_UNSPACED_CHAR = re.compile(
    "[\u3041-\u3096\u309d-\u309f\u30a1-\u30fa\u30fc-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufa6d\ufa70-\ufad9]"
)


def caption_words(caption: str) -> list[str]:
    """The caption's words as the metrics compare them: case-folded (after NFKC), runs of letters, digits and
    combining marks (Hindi's vowel signs) of every script, kana and CJK ideographs one word each, punctuation
    and symbols dropped: "A red circle." -> a, red, circle. Matching only [a-z0-9] made "café" "caf" and a
    Russian or Chinese reference no words at all."""
    words, word = [], ""
    for char in unicodedata.normalize("NFKC", caption).casefold():
        if _UNSPACED_CHAR.match(char):
            words += [word, char] if word else [char]
            word = ""
        elif unicodedata.category(char)[0] in "LN" or (word and unicodedata.category(char)[0] == "M"):
            word += char  # a mark continues a word; alone ("゛", a combining mark after NFKC) it is none
        elif word:
            words.append(word)
            word = ""
    return words + [word] if word else words


def word_count(text: str) -> int:
    """Words as word budgets count them: whitespace-separated tokens (a lone "-" too, as the indexes of shards
    built before this count has always counted), each kana or CJK ideograph one word."""
    count = 0
    for token in unicodedata.normalize("NFKC", text).split():  # as `caption_words` reads it: half-width kana too
        unspaced = len(_UNSPACED_CHAR.findall(token))
        rest = _UNSPACED_CHAR.sub("", token)
        count += unspaced + (1 if rest and (not unspaced or any(c.isalnum() for c in rest)) else 0)
    return count


def longest_caption(texts) -> str:
    """The longest of a sample's caption variants that has a word (the longest of all when none has): its
    recaptioned text, which Data-Juicer's later filters read and the data report measures. By words alone,
    a random captioner's "? ? ? ? ?" (5 by `word_count`) beat its "a dog" and was measured as the new text."""
    return max(texts, key=lambda text: (bool(caption_words(text)), word_count(text)))


def tokens(text: str) -> list[str]:
    """Lower-cased words, without the punctuation around them: "Dog," and "dog" are one word type (raw
    captions are punctuated, generated ones mostly not; counted apart, raw text would look more diverse)."""
    words = []  # after NFKC, as `caption_words` and `word_count` read text (half-width kana, ligatures)
    for word in (_strip_punctuation(word) for word in unicodedata.normalize("NFKC", text).lower().split()):
        if _UNSPACED_CHAR.search(word):  # a Chinese sentence was one word type: its characters are
            words += caption_words(word)
        elif word:
            words.append(word)
    return words


def _strip_punctuation(word: str) -> str:
    """`word` without the punctuation around it, Unicode's too (curly quotes, an ellipsis, dashes)."""
    start, end = 0, len(word)
    while start < end and unicodedata.category(word[start]).startswith(("P", "S")):
        start += 1
    while end > start and unicodedata.category(word[end - 1]).startswith(("P", "S")):
        end -= 1
    return word[start:end]


def _mtld_pass(words: list[str], threshold: float) -> float:
    factors, types, count = 0.0, set(), 0
    for word in words:
        types.add(word)
        count += 1
        if len(types) / count <= threshold:
            factors += 1
            types, count = set(), 0
    if count:  # the partial factor at the end
        ttr = len(types) / count
        factors += (1 - ttr) / (1 - threshold) if ttr < 1 else 0.0
    return len(words) / factors if factors else float(len(words))


def mtld(words: list[str], threshold: float = 0.72) -> float:
    if not words:
        return 0.0
    return (_mtld_pass(words, threshold) + _mtld_pass(words[::-1], threshold)) / 2


def mattr(words: list[str], window: int = 50) -> float:
    if not words:
        return 0.0
    if len(words) <= window:
        return len(set(words)) / len(words)
    counts: dict[str, int] = {}
    for word in words[:window]:
        counts[word] = counts.get(word, 0) + 1
    types, windows = len(counts), 1
    for i in range(window, len(words)):
        out, new = words[i - window], words[i]
        counts[out] -= 1
        if counts[out] == 0:
            del counts[out]
        counts[new] = counts.get(new, 0) + 1
        types, windows = types + len(counts), windows + 1
    return types / (windows * window)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)])


def corpus_stats(texts: list[str], ttr_tokens: int | None = None) -> dict[str, float]:
    """Words per text as word budgets count them (mean, p50, p95), vocabulary, MTLD, MATTR, and TTR over the first
    `ttr_tokens` tokens."""
    if not texts:
        return {"texts": 0}
    # The token stream as word ids, 4 bytes a token: as a list of strings, 70 bytes (4 GB for a million
    # captions of 60 words).
    ids: dict[str, int] = {}
    lengths, stream = array("L"), array("L")
    for text in texts:
        lengths.append(word_count(text))  # as word budgets count, which the report's lengths are for
        stream.extend(ids.setdefault(word, len(ids)) for word in tokens(text))
    head = stream if ttr_tokens is None else stream[:ttr_tokens]  # 0 is a count (raw text had no tokens)
    return {
        "texts": len(texts),
        "mean_words": sum(lengths) / len(lengths),
        "p50_words": percentile(lengths, 50),
        "p95_words": percentile(lengths, 95),
        "vocabulary": len(ids),
        "mtld": mtld(stream),
        "mattr": mattr(stream),
        "ttr_equal_tokens": len(set(head)) / len(head) if head else 0.0,
        "ttr_tokens": len(head),
    }
