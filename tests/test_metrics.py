"""metrics.py against hand counts, sklearn (when installed), rouge-score and nltk's Porter stemmer.

References are computed here, from the definitions or by the reference packages, never pasted in.
Real-text checks use the first 200 pairs of ../shared/data/xsum_sample/test.jsonl and skip when
it is absent.
"""

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metrics import accuracy, f1, f1_scores, perplexity, porter_stem, rouge, rouge_corpus, rouge_tokenize

ROOT = Path(__file__).resolve().parent.parent
XSUM = ROOT.parent / "shared" / "data" / "xsum_sample" / "test.jsonl"
N_PAIRS = 200
ROUGE_TYPES = ["rouge1", "rouge2", "rougeL"]


# --------------------------------------------------------------------------------------------
# accuracy / F1
# --------------------------------------------------------------------------------------------

def f1_by_counting(preds, labels, cls):
    """F1 of one class straight from the definition: count TP/FP/FN, then 2PR/(P+R), 0/0 -> 0."""
    tp = sum(1 for p, y in zip(preds, labels) if p == cls and y == cls)
    fp = sum(1 for p, y in zip(preds, labels) if p == cls and y != cls)
    fn = sum(1 for p, y in zip(preds, labels) if p != cls and y == cls)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def test_binary_hand_counts():
    labels = [1, 1, 1, 0, 0, 0, 1, 0]
    preds = [1, 0, 1, 1, 0, 0, 1, 1]
    # positive class 1: TP = 3 (idx 0, 2, 6), FP = 2 (idx 3, 7), FN = 1 (idx 1)
    #   P = 3/5, R = 3/4, F1 = 2*(3/5)(3/4)/(3/5+3/4) = 2/3
    # class 0: TP = 2 (idx 4, 5), FP = 1 (idx 1), FN = 2 (idx 3, 7): P = 2/3, R = 1/2, F1 = 4/7
    assert f1_by_counting(preds, labels, 1) == pytest.approx(2 / 3)
    assert f1_by_counting(preds, labels, 0) == pytest.approx(4 / 7)
    assert accuracy(preds, labels) == pytest.approx(5 / 8)
    assert f1(preds, labels, "binary") == pytest.approx(2 / 3)
    assert f1(preds, labels, "binary", positive_label=0) == pytest.approx(4 / 7)
    assert f1(preds, labels, "macro") == pytest.approx((2 / 3 + 4 / 7) / 2)
    assert f1(preds, labels, "micro") == pytest.approx(5 / 8)
    assert f1_scores(preds, labels) == pytest.approx(
        {"accuracy": 5 / 8, "f1": (2 / 3 + 4 / 7) / 2, "f1_binary": 2 / 3})


def test_multiclass_macro_with_a_class_never_predicted():
    labels = [0, 0, 1, 1, 2, 2, 2]
    preds = [0, 1, 1, 1, 0, 0, 1]
    # class 0: TP 1, FP 2, FN 1 -> P 1/3, R 1/2, F1 2/5
    # class 1: TP 2, FP 2, FN 0 -> P 1/2, R 1,   F1 2/3
    # class 2: TP 0, FP 0, FN 3 -> P 0/0 := 0, R 0, F1 0 (never predicted: zero division)
    by_hand = {0: 2 / 5, 1: 2 / 3, 2: 0.0}
    for cls, expected in by_hand.items():
        assert f1_by_counting(preds, labels, cls) == pytest.approx(expected)
    assert f1(preds, labels) == pytest.approx(sum(by_hand.values()) / 3)
    assert f1(preds, labels, "micro") == pytest.approx(accuracy(preds, labels)) == pytest.approx(3 / 7)
    scores = f1_scores(preds, labels)
    assert set(scores) == {"accuracy", "f1"}  # 3 classes: no binary F1
    # a 3-class model whose predictions and labels on a split are 0 and 1 only: still not binary (the
    # key came and went with the predictions, and eval.py's table failed on a missing row)
    assert set(f1_scores([0, 1, 1], [0, 1, 0], num_classes=3)) == {"accuracy", "f1"}
    assert set(f1_scores([0, 0, 0], [0, 0, 0], num_classes=2)) == {"accuracy", "f1", "f1_binary"}
    with pytest.raises(ValueError):
        f1(preds, labels, "binary")


def test_macro_counts_classes_seen_only_in_predictions():
    labels = [0, 0, 1, 1]
    preds = [0, 3, 1, 1]  # class 3 is predicted but never true: P 0, R 0/0 := 0, F1 0
    expected = sum(f1_by_counting(preds, labels, c) for c in (0, 1, 3)) / 3
    assert f1(preds, labels) == pytest.approx(expected)
    assert f1_by_counting(preds, labels, 3) == 0.0


def test_zero_division_binary():
    # Positive class absent from labels and predictions: F1 = 0/0 := 0.0 (sklearn's default).
    assert f1([0, 0, 0], [0, 0, 0], "binary") == 0.0
    assert f1_scores([0, 0, 0], [0, 0, 0]) == {"accuracy": 1.0, "f1": 1.0, "f1_binary": 0.0}
    # Positive class never predicted.
    assert f1([0, 0, 0], [1, 0, 0], "binary") == 0.0
    # Never right about it: F1 0 even though both P and R are defined.
    assert f1([1, 0], [0, 1], "binary") == 0.0


def test_random_cases_against_counting_definition():
    rng = random.Random(0)
    for trial in range(50):
        n_classes = rng.choice([2, 3, 5])
        labels = [rng.randrange(n_classes) for _ in range(rng.randint(1, 40))]
        preds = [rng.randrange(n_classes) for _ in labels]
        classes = sorted(set(labels) | set(preds))
        macro = sum(f1_by_counting(preds, labels, c) for c in classes) / len(classes)
        assert f1(preds, labels) == pytest.approx(macro, abs=1e-12)
        assert accuracy(preds, labels) == pytest.approx(
            sum(p == y for p, y in zip(preds, labels)) / len(labels), abs=1e-12)
        assert f1(preds, labels, "micro") == pytest.approx(accuracy(preds, labels), abs=1e-12)
        if n_classes == 2:
            assert f1(preds, labels, "binary") == pytest.approx(
                f1_by_counting(preds, labels, 1), abs=1e-12)


def test_sklearn_as_second_reference():
    sk = pytest.importorskip("sklearn.metrics", reason="sklearn not installed: second reference skipped")
    rng = random.Random(1)
    for trial in range(30):
        n_classes = rng.choice([2, 3, 4])
        labels = [rng.randrange(n_classes) for _ in range(rng.randint(1, 30))]
        preds = [rng.randrange(n_classes) for _ in labels]
        kw = {"zero_division": 0.0}
        assert accuracy(preds, labels) == pytest.approx(sk.accuracy_score(labels, preds))
        assert f1(preds, labels) == pytest.approx(sk.f1_score(labels, preds, average="macro", **kw))
        assert f1(preds, labels, "micro") == pytest.approx(sk.f1_score(labels, preds, average="micro", **kw))
        if set(labels) | set(preds) <= {0, 1}:
            assert f1(preds, labels, "binary") == pytest.approx(sk.f1_score(labels, preds, **kw))


def test_accepts_tensors_and_rejects_bad_input():
    labels, preds = torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 1, 0])
    assert accuracy(preds, labels) == accuracy(preds.tolist(), labels.tolist()) == 0.5
    assert f1_scores(preds, labels) == f1_scores(preds.tolist(), labels.tolist())
    with pytest.raises(ValueError):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError):
        accuracy([], [])
    with pytest.raises(ValueError):
        f1([0, 1], [0, 1], average="weighted")
    with pytest.raises(ValueError):  # two classes, neither is the positive label
        f1([2, 3], [3, 2], "binary")


# --------------------------------------------------------------------------------------------
# perplexity
# --------------------------------------------------------------------------------------------

def test_perplexity_is_token_weighted():
    torch.manual_seed(0)
    # Two "batches" with different token counts: the token-weighted mean is not the mean of means.
    batches = [(torch.randn(n, 11), torch.randint(0, 11, (n,))) for n in (5, 2)]
    total_nll = sum(F.cross_entropy(logits, target, reduction="sum").item() for logits, target in batches)
    all_logits = torch.cat([b[0] for b in batches])
    all_targets = torch.cat([b[1] for b in batches])
    expected = math.exp(F.cross_entropy(all_logits, all_targets).item())
    assert perplexity(total_nll, 7) == pytest.approx(expected, rel=1e-6)
    mean_of_batch_means = sum(F.cross_entropy(l, t).item() for l, t in batches) / 2
    assert perplexity(total_nll, 7) != pytest.approx(math.exp(mean_of_batch_means), rel=1e-6)
    # Uniform over V outcomes has perplexity V.
    assert perplexity(10 * math.log(11), 10) == pytest.approx(11)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


# --------------------------------------------------------------------------------------------
# ROUGE against rouge-score
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rouge_scorer():
    module = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score not installed")
    return {stem: module.RougeScorer(ROUGE_TYPES, use_stemmer=stem) for stem in (True, False)}


def assert_same_as_rouge_score(scorer, prediction, reference, stem=True):
    ours = rouge(prediction, reference, stem=stem)
    theirs = scorer[stem].score(reference, prediction)  # rouge-score takes (target, prediction)
    assert set(ours) == set(ROUGE_TYPES)
    for name in ROUGE_TYPES:
        for field in ("precision", "recall", "fmeasure"):
            assert abs(ours[name][field] - getattr(theirs[name], field)) <= 1e-9, (
                name, field, prediction, reference, ours[name], theirs[name])


EDGE_CASES = [
    ("", ""),
    ("", "the cat sat on the mat"),
    ("the cat sat on the mat", ""),
    ("!!! ... ???", "--- ;;; ..."),
    ("?!", "a cat."),
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("The CAT sat on the mat.", "the cat, sat; on (the) mat!"),
    ("the the the the the", "the cat the dog"),
    ("cat the cat the cat the", "the cat the"),
    ("a a a b b", "a b a b a b"),
    ("the", "the"),  # one token: no bigrams on either side
    ("police killed the gunman", "the gunman was shot dead by police"),
    ("running runs runner ran", "run running runs"),
    ("generously generalizations connected connecting", "generous generalization connect"),
    ("Café naïve résumé in Zürich", "cafe naive resume in zurich"),
    ("İstanbul \u212aelvin ﬁnancial straße", "istanbul kelvin financial strasse"),
    ("日本語 テキスト", "中文 text"),
    ("emoji 🙂 test\u00a0non-breaking\tspace\nnewline", "emoji test non breaking space newline"),
    ("3.14 2,000 1990s 100% 4th", "3 14 2000 1990 100 per cent fourth"),
    ("１２３ full-width digits", "123 full width digits"),
    ("it's don't can't won't", "it s don t can t won t"),
    ("skies dying news innings proceed", "sky die news inning proceeding"),
]


@pytest.mark.parametrize("prediction,reference", EDGE_CASES)
@pytest.mark.parametrize("stem", [True, False])
def test_rouge_edge_cases_match_rouge_score(rouge_scorer, prediction, reference, stem):
    assert_same_as_rouge_score(rouge_scorer, prediction, reference, stem)


def test_rouge_hand_counts():
    # pred "the cat the cat" (4 unigrams, 3 bigrams), ref "the cat sat" (3 unigrams, 2 bigrams)
    # rouge1 hits = min(2,1)[the] + min(2,1)[cat] = 2: P 2/4, R 2/3
    # rouge2: pred bigrams {the cat: 2, cat the: 1}, ref {the cat: 1, cat sat: 1}: hits 1, P 1/3, R 1/2
    # rougeL: LCS "the cat" = 2: P 2/4, R 2/3
    scores = rouge("the cat the cat", "the cat sat")
    def prf(p, r):
        return {"precision": p, "recall": r, "fmeasure": 2 * p * r / (p + r)}

    assert scores["rouge1"] == pytest.approx(prf(1 / 2, 2 / 3))
    assert scores["rouge2"] == pytest.approx(prf(1 / 3, 1 / 2))
    assert scores["rougeL"] == pytest.approx(prf(1 / 2, 2 / 3))
    # LCS is a subsequence, not a substring: "a x b y c" vs "a b c" -> 3
    assert rouge("a x b y c", "a b c")["rougeL"]["recall"] == 1.0


def drop_words(text, rng, fraction=0.3):
    words = text.split()
    kept = [w for w in words if rng.random() >= fraction]
    return " ".join(kept)


@pytest.fixture(scope="module")
def xsum_pairs():
    if not XSUM.exists():
        pytest.skip(f"{XSUM} not found (real-text ROUGE checks need ../shared/data/xsum_sample)")
    pairs = []
    with XSUM.open() as f:
        for line in f:
            row = json.loads(line)
            pairs.append((row["document"], row["summary"]))
            if len(pairs) == N_PAIRS:
                break
    return pairs


def first_sentence(document):
    # XSum documents hold one sentence per line.
    return document.strip().split("\n")[0]


def test_rouge_matches_rouge_score_on_xsum(rouge_scorer, xsum_pairs):
    rng = random.Random(0)
    for document, summary in xsum_pairs:
        assert_same_as_rouge_score(rouge_scorer, first_sentence(document), summary)
        assert_same_as_rouge_score(rouge_scorer, drop_words(summary, rng), summary)


def test_rouge_corpus_is_mean_of_pair_fmeasures(rouge_scorer, xsum_pairs):
    predictions = [first_sentence(d) for d, _ in xsum_pairs]
    references = [s for _, s in xsum_pairs]
    ours = rouge_corpus(predictions, references)
    per_pair = [rouge_scorer[True].score(r, p) for p, r in zip(predictions, references)]
    for name in ROUGE_TYPES:
        expected = sum(s[name].fmeasure for s in per_pair) / len(per_pair)
        assert abs(ours[name] - expected) <= 1e-9
    with pytest.raises(ValueError):
        rouge_corpus(predictions, references[:-1])


# --------------------------------------------------------------------------------------------
# Porter stemmer against nltk (as rouge-score uses it)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nltk_stemmer():
    porter = pytest.importorskip("nltk.stem.porter", reason="nltk not installed")
    tokenizers = pytest.importorskip("rouge_score.tokenizers", reason="rouge-score not installed")
    stemmer = tokenizers.DefaultTokenizer(use_stemmer=True)._stemmer  # the very object rouge-score uses
    assert isinstance(stemmer, porter.PorterStemmer)
    return stemmer


def stem_mismatches(nltk_stemmer, words):
    """(word, nltk's stem, ours) wherever they differ, first 20."""
    return [(w, nltk_stemmer.stem(w), porter_stem(w)) for w in sorted(words)
            if porter_stem(w) != nltk_stemmer.stem(w)][:20]


def test_porter_stemmer_matches_nltk_on_xsum_vocabulary(nltk_stemmer, xsum_pairs):
    vocabulary = set()
    for document, _ in xsum_pairs:
        vocabulary.update(rouge_tokenize(document, stem=False))
    assert len(vocabulary) > 5000
    assert not stem_mismatches(nltk_stemmer, vocabulary)


def test_porter_stemmer_matches_nltk_on_rule_examples(nltk_stemmer):
    # Porter's own examples for every step, plus NLTK's special cases.
    words = """caresses ponies ties caress cats feed agreed plastered bled motoring sing conflated
    troubled sized hopping tanned falling hissing fizzed failing filing happy sky relational
    conditional rational valenci hesitanci digitizer conformabli radicalli differentli vileli
    analogousli vietnamization predication operator feudalism decisiveness hopefulness
    callousness formaliti sensitiviti sensibiliti triplicate formative formalize electriciti
    electrical hopeful goodness revival allowance inference airliner gyroscopic adjustable
    defensible irritant replacement adjustment dependent adoption homologou communism activate
    angulariti homologous effective bowdlerize probate rate cease controll roll
    sky skies dying lying tying news innings inning outings outing cannings canning howe proceed
    exceed succeed
    tied cried spy enjoy fully additionally archaeology biology generously syzygy yyyy
    a at is on by yes ion eed ied ies""".split()
    assert not stem_mismatches(nltk_stemmer, words)


def test_porter_stemmer_matches_nltk_on_random_strings(nltk_stemmer):
    # Letter soup rich in the letters the rules look at (y, doubled consonants, e, s, l).
    rng = random.Random(0)
    letters = "aeiouyyslltdbnczgr"
    words = {"".join(rng.choice(letters) for _ in range(rng.randint(1, 12))) for _ in range(5000)}
    assert not stem_mismatches(nltk_stemmer, words)


def test_tokenizer_matches_rouge_score(xsum_pairs):
    tokenizers = pytest.importorskip("rouge_score.tokenizers", reason="rouge-score not installed")
    for stem in (True, False):
        reference = tokenizers.DefaultTokenizer(use_stemmer=stem)
        for document, summary in xsum_pairs[:50]:
            assert rouge_tokenize(document, stem) == reference.tokenize(document)
            assert rouge_tokenize(summary, stem) == reference.tokenize(summary)


def test_no_reference_packages_imported_at_run_time():
    code = ("import sys, metrics; metrics.rouge('a b', 'b a'); metrics.f1([0, 1], [1, 1]); "
            "print(sorted(m for m in ('nltk', 'rouge_score', 'sklearn', 'evaluate', 'transformers', 'peft')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
