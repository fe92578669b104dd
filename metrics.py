"""Evaluation metrics: accuracy, F1, ROUGE-1/2/L and perplexity, in plain Python.

Nothing here imports sklearn, nltk, rouge-score or `evaluate`; tests/test_metrics.py checks the
numbers against them.

Classification
--------------
For each class c, over single-label predictions:

    TP_c = #{i: pred_i = c and label_i = c},  FP_c = #{i: pred_i = c != label_i},
    FN_c = #{i: label_i = c != pred_i}
    precision_c = TP_c / (TP_c + FP_c),  recall_c = TP_c / (TP_c + FN_c)
    F1_c = 2 precision_c recall_c / (precision_c + recall_c) = 2 TP_c / (2 TP_c + FP_c + FN_c)

Zero division: a class that is never predicted has precision 0/0, one that is absent from both
labels and predictions has F1 0/0. Both count as 0.0, which is sklearn's default
(`zero_division="warn"` returns 0.0 and warns; we return 0.0 silently). Averages, as in sklearn:

    binary: F1 of the positive class only (needs at most 2 classes)
    macro:  unweighted mean of F1_c over the classes seen in labels or predictions
    micro:  2 ΣTP / (2 ΣTP + ΣFP + ΣFN) over all classes; for single-label data this is accuracy

ROUGE (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries")
--------------------------------------------------------------------------
Reproduces google-research's `rouge-score` package, i.e.
`rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(ref, pred)`:

* Tokens: lowercase, replace every run of characters outside [a-z0-9] by a space, split, and
  Porter-stem tokens longer than 3 characters (shorter ones are left alone).
* ROUGE-N: with Count(g) the number of times n-gram g occurs, overlaps are clipped,
      hits = Σ_g min(Count_pred(g), Count_ref(g)),
      precision = hits / #pred n-grams,  recall = hits / #ref n-grams
  (a zero n-gram count gives 0, not 0/0).
* ROUGE-L (sentence level, the package's "rougeL", not "rougeLsum"): hits = length of the longest
  common subsequence of the two token lists; precision = hits / len(pred), recall = hits / len(ref).
* F-measure = 2 P R / (P + R) (Lin's F with beta = 1), 0 when P + R = 0.

Porter stemmer (Porter 1980, "An algorithm for suffix stripping", Program 14(3): 130-137)
-----------------------------------------------------------------------------------------
rouge-score stems with `nltk.stem.porter.PorterStemmer()`, whose default mode is NLTK_EXTENSIONS:
the 1980 algorithm plus Martin Porter's later tweaks and a few of NLTK's own. `porter_stem`
implements exactly that mode; the departures from the paper are marked "NLTK:" below.

Perplexity
----------
exp(mean negative log-likelihood per token), with the mean taken over all tokens (token-weighted),
not over batches: exp(Σ nll / Σ tokens).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache
from typing import Iterable, Sequence

__all__ = [
    "accuracy", "f1", "f1_scores",
    "porter_stem", "rouge_tokenize", "rouge", "rouge_corpus",
    "perplexity",
]


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------

def _as_lists(predictions, labels) -> tuple[list, list]:
    """Both inputs as equal-length, non-empty Python lists (tensors/arrays via .tolist())."""
    preds = predictions.tolist() if hasattr(predictions, "tolist") else list(predictions)
    gold = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    if len(preds) != len(gold):
        raise ValueError(f"{len(preds)} predictions but {len(gold)} labels")
    if not gold:
        raise ValueError("no examples to score")
    return preds, gold


def accuracy(predictions: Iterable, labels: Iterable) -> float:
    """Fraction of examples whose prediction equals the label."""
    preds, gold = _as_lists(predictions, labels)
    return sum(p == y for p, y in zip(preds, gold)) / len(gold)


def _f1_from_counts(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0  # zero division -> 0.0, as sklearn


def _per_class_counts(preds: list, gold: list) -> dict:
    """class -> [TP, FP, FN], over the classes seen in labels or predictions."""
    counts = {c: [0, 0, 0] for c in set(preds) | set(gold)}
    for p, y in zip(preds, gold):
        if p == y:
            counts[y][0] += 1
        else:
            counts[p][1] += 1
            counts[y][2] += 1
    return counts


def f1(predictions: Iterable, labels: Iterable, average: str = "macro", positive_label=1) -> float:
    """F1 score with sklearn's `average` semantics ("macro", "binary" or "micro").

    "binary" is the F1 of `positive_label` and, like sklearn, refuses data with more than two
    classes, or two classes neither of which is `positive_label`.
    """
    preds, gold = _as_lists(predictions, labels)
    counts = _per_class_counts(preds, gold)
    if average == "macro":
        return sum(_f1_from_counts(*c) for c in counts.values()) / len(counts)
    if average == "micro":
        tp, fp, fn = (sum(c[k] for c in counts.values()) for k in range(3))
        return _f1_from_counts(tp, fp, fn)
    if average == "binary":
        if len(counts) > 2 or (len(counts) == 2 and positive_label not in counts):
            raise ValueError(f"average='binary' needs 2 classes including positive_label="
                             f"{positive_label!r}; got classes {sorted(counts)}")
        return _f1_from_counts(*counts.get(positive_label, (0, 0, 0)))
    raise ValueError(f"average must be 'macro', 'binary' or 'micro', not {average!r}")


def f1_scores(predictions: Iterable, labels: Iterable, num_classes: int | None = None) -> dict[str, float]:
    """{"accuracy", "f1" (macro)}, plus "f1_binary" (positive label 1) for a two-class task.

    num_classes: the classifier's; without it the task counts as binary when every label and
    prediction is 0 or 1 (the GLUE-style convention), so a 3-class model whose predictions on a
    split happen to be 0 and 1 only would get the key too: pass it when known.
    """
    preds, gold = _as_lists(predictions, labels)
    scores = {"accuracy": accuracy(preds, gold), "f1": f1(preds, gold, "macro")}
    binary = set(preds) | set(gold) <= {0, 1} if num_classes is None else num_classes == 2
    if binary:
        scores["f1_binary"] = f1(preds, gold, "binary", positive_label=1)
    return scores


# --------------------------------------------------------------------------------------------
# Porter stemmer, nltk's NLTK_EXTENSIONS mode (the one rouge-score uses)
# --------------------------------------------------------------------------------------------

# NLTK: whole words looked up before any rule runs.
_IRREGULAR = {
    "sky": "sky", "skies": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
    "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
    "cannings": "canning", "canning": "canning", "howe": "howe",
    "proceed": "proceed", "exceed": "exceed", "succeed": "succeed",
}


def _consonant_flags(word: str) -> list[bool]:
    """Porter's consonant test per letter: not a/e/i/o/u, and 'y' only after a vowel (or first)."""
    flags = []
    for i, ch in enumerate(word):
        if ch in "aeiou":
            flags.append(False)
        elif ch == "y":
            flags.append(i == 0 or not flags[i - 1])
        else:
            flags.append(True)
    return flags


def _measure(stem: str) -> int:
    """m in the form [C](VC)^m[V]: the number of vowel->consonant transitions."""
    return "".join("c" if c else "v" for c in _consonant_flags(stem)).count("vc")


def _has_vowel(stem: str) -> bool:  # Porter's *v*
    return not all(_consonant_flags(stem))


def _ends_double_consonant(word: str) -> bool:  # Porter's *d
    return len(word) >= 2 and word[-1] == word[-2] and _consonant_flags(word)[-1]


def _ends_cvc(word: str) -> bool:
    """Porter's *o: ends consonant-vowel-consonant, the last not w, x or y.
    NLTK: a two-letter vowel-consonant word counts too."""
    f = _consonant_flags(word)
    if len(word) >= 3:
        return f[-3] and not f[-2] and f[-1] and word[-1] not in "wxy"
    return len(word) == 2 and not f[0] and f[1]


def _m_positive(stem: str) -> bool:
    return _measure(stem) > 0


def _m_above_1(stem: str) -> bool:
    return _measure(stem) > 1


def _first_rule(word: str, rules) -> str:
    """Apply the rule with the first matching suffix; if its condition fails, stop anyway
    (Porter: only the longest matching suffix of a step is considered)."""
    for suffix, replacement, condition in rules:
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            return stem + replacement if condition(stem) else word
    return word


def _always(stem: str) -> bool:
    return True


_STEP1A = [("sses", "ss", _always), ("ies", "i", _always), ("ss", "ss", _always), ("s", "", _always)]

_STEP2 = [(suffix, replacement, _m_positive) for suffix, replacement in [
    ("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
    ("bli", "ble"),  # Porter's later fix; the paper has abli -> able
    ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"),
    ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"),
    ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"),
    ("fulli", "ful"),  # NLTK
]] + [("logi", "log", lambda stem: _measure(stem + "l") > 0)]  # NLTK: m counted with the "l"

_STEP3 = [(suffix, replacement, _m_positive) for suffix, replacement in [
    ("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"),
    ("ful", ""), ("ness", ""),
]]

_STEP4 = [(suffix, "", _m_above_1) for suffix in [
    "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent",
]] + [("ion", "", lambda stem: _m_above_1(stem) and stem[-1] in "st")] + [
    (suffix, "", _m_above_1) for suffix in ["ou", "ism", "ate", "iti", "ous", "ive", "ize"]]


def _step1a(word: str) -> str:
    if word.endswith("ies") and len(word) == 4:  # NLTK: ties -> tie, not ti
        return word[:-3] + "ie"
    return _first_rule(word, _STEP1A)


def _step1b(word: str) -> str:
    if word.endswith("ied"):  # NLTK: tied -> tie, cried -> cri (then treated like "cries")
        return word[:-3] + ("ie" if len(word) == 4 else "i")
    if word.endswith("eed"):
        return word[:-1] if _measure(word[:-3]) > 0 else word  # agreed -> agree, feed -> feed
    for suffix in ("ed", "ing"):
        if word.endswith(suffix) and _has_vowel(word[: -len(suffix)]):
            stem = word[: -len(suffix)]
            break
    else:
        return word
    # Tidy the stem so that later steps see a word again.
    if stem.endswith(("at", "bl", "iz")):  # conflat(ed) -> conflate
        return stem + "e"
    if _ends_double_consonant(stem):  # hopp(ing) -> hop, but fall(ing) -> fall
        return stem if stem[-1] in "lsz" else stem[:-1]
    if _measure(stem) == 1 and _ends_cvc(stem):  # fil(ing) -> file
        return stem + "e"
    return stem


def _step1c(word: str) -> str:
    # NLTK: y -> i when the letter before it is a consonant other than the first letter
    # (happy -> happi, spy -> spi, enjoy stays); the paper's condition is "the stem contains a
    # vowel" (so spy stayed, and enjoy became enjoi).
    if word.endswith("y") and len(word) > 2 and _consonant_flags(word[:-1])[-1]:
        return word[:-1] + "i"
    return word


def _step2(word: str) -> str:
    if word.endswith("alli") and _m_positive(word[:-4]):  # NLTK: ...alli -> ...al, then again
        return _step2(word[:-4] + "al")
    return _first_rule(word, _STEP2)


def _step5(word: str) -> str:
    if word.endswith("e"):  # 5a: probate -> probat, cease -> ceas, but rate stays
        stem = word[:-1]
        m = _measure(stem)
        if m > 1 or (m == 1 and not _ends_cvc(stem)):
            word = stem
    if word.endswith("ll") and _measure(word[:-1]) > 1:  # 5b: controll -> control
        word = word[:-1]
    return word


@lru_cache(maxsize=1 << 16)
def porter_stem(word: str) -> str:
    """Porter stem of `word` (lowercased), matching nltk's PorterStemmer() default mode."""
    word = word.lower()
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 2:  # NLTK: too short to have a suffix
        return word
    word = _step1c(_step1b(_step1a(word)))
    word = _first_rule(_first_rule(_step2(word), _STEP3), _STEP4)
    return _step5(word)


# --------------------------------------------------------------------------------------------
# ROUGE
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokenize(text: str, stem: bool = True) -> list[str]:
    """rouge-score's tokenizer: lowercase, [a-z0-9] runs, Porter-stem tokens of 4+ characters.

    Lowercasing comes first and is Python's (Unicode) str.lower, as in rouge-score, so e.g. the
    Kelvin sign lowercases to "k" and is kept, while "é" is a separator.
    """
    tokens = _TOKEN.findall(text.lower())
    if stem:
        tokens = [porter_stem(t) if len(t) > 3 else t for t in tokens]
    return tokens


def _precision_recall_f(hits: int, prediction_count: int, reference_count: int) -> dict[str, float]:
    # max(count, 1): an empty side scores 0 instead of dividing by zero (as rouge-score).
    precision = hits / max(prediction_count, 1)
    recall = hits / max(reference_count, 1)
    fmeasure = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "fmeasure": fmeasure}


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _rouge_n(prediction: Sequence[str], reference: Sequence[str], n: int) -> dict[str, float]:
    pred, ref = _ngram_counts(prediction, n), _ngram_counts(reference, n)
    hits = sum((pred & ref).values())  # Counter & keeps min(count_pred, count_ref): clipping
    return _precision_recall_f(hits, sum(pred.values()), sum(ref.values()))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, dynamic programming one row at a time."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge(prediction: str, reference: str, stem: bool = True) -> dict[str, dict[str, float]]:
    """{"rouge1" | "rouge2" | "rougeL": {"precision", "recall", "fmeasure"}} for one pair.

    Equals rouge-score's `RougeScorer([...], use_stemmer=stem).score(reference, prediction)`
    (note its argument order: target first).
    """
    pred, ref = rouge_tokenize(prediction, stem), rouge_tokenize(reference, stem)
    return {
        "rouge1": _rouge_n(pred, ref, 1),
        "rouge2": _rouge_n(pred, ref, 2),
        "rougeL": _precision_recall_f(_lcs_length(pred, ref), len(pred), len(ref)),
    }


def rouge_corpus(predictions: Sequence[str], references: Sequence[str],
                 stem: bool = True) -> dict[str, float]:
    """Mean over pairs of each F-measure ({"rouge1", "rouge2", "rougeL"}), as commonly reported
    (e.g. `evaluate`'s rouge with use_aggregator=False, then averaged); no bootstrap."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no pairs to score")
    totals = Counter()
    for prediction, reference in zip(predictions, references):
        for name, score in rouge(prediction, reference, stem).items():
            totals[name] += score["fmeasure"]
    return {name: totals[name] / len(predictions) for name in ("rouge1", "rouge2", "rougeL")}


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------

def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(total_nll / total_tokens): total_nll is the summed (not averaged) negative
    log-likelihood, in nats, of total_tokens predicted tokens. Overflow gives inf."""
    if total_tokens <= 0:
        raise ValueError(f"total_tokens must be positive, got {total_tokens}")
    try:
        return math.exp(total_nll / total_tokens)
    except OverflowError:
        return math.inf
