"""Run a model over encoded examples and score it: shared by train.py (before/after, every N steps) and eval.py.

    seq-cls          accuracy, F1 (macro; binary too for 2 classes), loss
    generate-label   accuracy and F1, predicting the label word with the highest log-likelihood
                     log p(word | prompt) = sum over the word's tokens of log softmax(logits)[token]
    causal-lm        loss and perplexity = exp(sum NLL / number of answer tokens) (token-weighted);
                     with `rouge=True` also ROUGE-1/2/L of greedy generations against the references
"""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import metrics
from data import DataError, collate, label_word_ids
from models import generate
from models.generate import check_room


def scored_labels(labels, virtual=0):
    """The labels a causal LM's next-token loss scores: labels[:, 1:], as position t predicts token t + 1 and
    nothing predicts the first token, or all of them after a soft prompt of `virtual` tokens, whose last
    position predicts the first token (peft pads the labels with -100 for the virtual tokens, then shifts)."""
    return labels if virtual else labels[:, 1:]


def next_token_nll(model, batch, virtual=None):
    """(sum of next-token NLL over labelled positions, their count), computed by the model from its
    hidden states at those positions only (no logits elsewhere, none materialised; models/fused.py).
    virtual: the tokens of the model's soft prompt (default: its virtual_tokens, 0 without one)."""
    virtual = getattr(model, "virtual_tokens", 0) if virtual is None else virtual
    targets = scored_labels(batch["labels"], virtual)
    scored = targets != -100
    keep = F.pad(scored, (max(virtual - 1, 0), 1))  # (B, virtual + T): the positions whose next token is scored
    nll = model(batch["input_ids"], batch["attention_mask"], logits_mask=keep, targets=targets[scored])
    return nll, int(scored.sum())


def batches(examples, batch_size, pad_id, side="right", desc=None):
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False, disable=desc is None):
        yield collate(examples[start:start + batch_size], pad_id, side)


def classify(model, batch):
    """Logits (B, num_labels) of a classifier for a collated batch, with a sentence pair's token types if any."""
    token_types = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
    return model(batch["input_ids"], batch["attention_mask"], **token_types)


@torch.no_grad()
def classification_logits(model, examples, batch_size, pad_id, desc=None):
    """The classifier's logits for each example, in float32: (N, num_labels)."""
    model.eval()
    return torch.cat([classify(model, b).float() for b in batches(examples, batch_size, pad_id, desc=desc)])


@torch.no_grad()
def label_word_scores(model, examples, tokenizer, words, batch_size, desc=None):
    """log p(word | prompt) for every example and label word: (N, num_labels)."""
    model.eval()
    scores = torch.empty(len(examples), len(words))
    for k, ids in enumerate(label_word_ids(tokenizer, words)):
        candidates = [{"input_ids": e["prompt_ids"] + ids, "labels": [-100] * len(e["prompt_ids"]) + ids}
                      for e in examples]
        for start in range(0, len(candidates), batch_size):
            batch = collate(candidates[start:start + batch_size], tokenizer.pad_token_id)
            targets = batch["labels"][:, 1:]
            keep = F.pad(targets != -100, (0, 1))  # (B, T): positions that predict a word token
            logp = model(batch["input_ids"], batch["attention_mask"], logits_mask=keep).float().log_softmax(-1)
            token_logp = logp.gather(-1, targets[keep[:, :-1]][:, None])[:, 0]  # (n,)
            rows = keep.nonzero()[:, 0]
            B = len(batch["labels"])
            scores[start:start + B, k] = torch.zeros(B).index_add_(0, rows, token_logp)
    return scores


def classification_metrics(probs_or_scores, labels, loss=None):
    predictions = probs_or_scores.argmax(-1).tolist()
    result = metrics.f1_scores(predictions, labels, num_classes=probs_or_scores.shape[-1])
    if loss is not None:
        result["loss"] = loss
    return result


def metric_names(task, labels):
    """The keys of evaluate's result for `task` without ROUGE, in order; `labels`: the label names."""
    if task == "causal-lm":
        return ["loss", "perplexity"]
    return ["accuracy", "f1"] + (["f1_binary"] if len(labels) == 2 else []) + (["loss"] if task == "seq-cls" else [])


@torch.no_grad()
def evaluate(model, examples, task, tokenizer, batch_size=32, words=None, rouge=False, max_new_tokens=64, desc=None):
    """Metrics of `model` on encoded `examples` for `task` (see the module docstring)."""
    model.eval()
    if task == "seq-cls":
        logits = classification_logits(model, examples, batch_size, tokenizer.pad_token_id, desc)
        labels = [e["label"] for e in examples]
        loss = F.cross_entropy(logits, torch.tensor(labels)).item()  # of the logits: no floor under a probability
        return classification_metrics(logits.softmax(-1), labels, loss)
    if task == "generate-label":
        scores = label_word_scores(model, examples, tokenizer, words, batch_size, desc)
        return classification_metrics(scores, [e["label"] for e in examples])
    rouge = rouge and "reference" in examples[0]
    if rouge:  # before the perplexity pass, which may take minutes
        check_room(model, longest_rouge_prompt(examples), max_new_tokens)
    total, count = 0.0, 0
    for batch in batches(examples, batch_size, tokenizer.pad_token_id, desc=desc):
        nll, n = next_token_nll(model, batch)
        total, count = total + nll.item(), count + n
    result = {"loss": total / max(count, 1), "perplexity": metrics.perplexity(total, count)}
    if rouge:
        predictions = generate_answers(model, examples, tokenizer, batch_size, max_new_tokens)
        result.update(metrics.rouge_corpus(predictions, [e["reference"] for e in examples]))
    return result


def longest_rouge_prompt(examples, where="the examples"):
    """--rouge generates a continuation of each example's prompt: the longest prompt's length, after checking
    that none is empty (a tokenizer without BOS leaves an empty prompt nothing to continue from)."""
    empty = next((i for i, e in enumerate(examples) if not e["prompt_ids"]), None)
    if empty is not None:
        raise DataError(f"row {empty} of {where} has an empty prompt: --rouge has nothing to generate from")
    return max(len(e["prompt_ids"]) for e in examples)


@torch.no_grad()
def generate_answers(model, examples, tokenizer, batch_size, max_new_tokens):
    """Greedy continuations of each example's prompt, decoded (left padding for the batch)."""
    texts = []
    for start in range(0, len(examples), batch_size):
        prompts = [{"input_ids": e["prompt_ids"]} for e in examples[start:start + batch_size]]
        batch = collate(prompts, tokenizer.pad_token_id, side="left")
        out = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                       eos_token_id=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:])
    return [t.strip() for t in texts]


@torch.no_grad()
def sliding_window_perplexity(model, token_ids, window, stride):
    """Perplexity of one long token sequence with overlapping windows (each token scored once).

    Each window of `window` tokens scores only its last `stride` new tokens (the first window
    scores all), so every scored token after the first window sees at least window - stride tokens of context.
    """
    if not 0 < stride < window:
        raise ValueError(f"stride must be in [1, window - 1] so every window has context, got {stride} for window {window}")
    model.eval()
    if len(token_ids) < 2:  # nothing to predict (an empty text)
        return 0.0, 0
    ids = torch.tensor(token_ids)[None]
    total, count, scored_until = 0.0, 0, 0
    for start in range(0, max(len(token_ids) - 1, 1), stride):
        end = min(start + window, len(token_ids))
        chunk = ids[:, start:end]
        labels = chunk.clone()
        labels[:, : max(scored_until - start, 0)] = -100  # tokens an earlier window already scored
        nll, n = next_token_nll(model, {"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": labels})
        total, count, scored_until = total + nll.item(), count + n, end
        if end == len(token_ids):
            break
    return total, count


def perplexity_of_texts(model, tokenizer, texts, window, stride, desc=None):
    total, count = 0.0, 0
    for text in tqdm(texts, desc=desc, leave=False, disable=desc is None):
        nll, n = sliding_window_perplexity(model, tokenizer.encode(text), window, stride)
        total, count = total + nll, count + n
    if not count:
        raise DataError(f"none of the {len(texts)} texts has a token to predict (are they empty?)")
    return {"loss": total / count, "perplexity": metrics.perplexity(total, count)}
