"""Evaluate a base model, adapters or merged models on a dataset, and print one comparison table.

    python eval.py --model minilm-l6 --dataset ../shared/data/rotten_tomatoes --adapters base runs/a/adapter runs/b/adapter
    python eval.py --model smollm2-135m --dataset ../shared/data/bbc_news --window 512      (perplexity)
    python eval.py --model minilm-l6 --adapters runs/a/adapter --predict "a great film" "a dull film"
    python eval.py --model smollm2-135m --generate "The capital of France is"

Each entry of --adapters is `base` (the model alone) or an adapter folder (LoRA or prompt tuning, in
peft's format); --merge folds LoRA adapters into the weights first. Classification: accuracy and F1;
prompt/answer pairs: perplexity of the answers (and ROUGE with --rouge); plain text: perplexity
over sliding windows of --window tokens advancing by --stride. Results: a Markdown table and JSON.
--predict (probabilities per label) and --generate (continuations) evaluate one entry of --adapters on
the texts given instead; --json writes their results too.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import data
from evaluation import classification_logits, evaluate, longest_rouge_prompt, perplexity_of_texts
from lora import load_adapter, merge_and_unload
from lora.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterError, ModulesToSave, check_adapter_folder
from models import LoadError, Tokenizer, generate, load_model
from models.loading import DECODERS, check_positions, open_safetensors, read_config, read_json, resolve, write_json
from quant.allocator import keep_freed_memory

# flags only an evaluation on --dataset reads
DATASET_FLAGS = ("dataset", "dataset_config", "split", "task", "samples", "label_words", "rouge", "window", "stride")
# what each of the other modes would ignore: --predict scores its texts in one pass (no generation), --generate
# continues its prompts whole and all at once (no truncation, one batch)
IGNORED_BY = {"predict": DATASET_FLAGS + ("max_new_tokens",), "generate": DATASET_FLAGS + ("max_length", "batch_size")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.HelpFormatter)
    p.add_argument("--model", required=True, help="base model: folder, fetched name, alias or Hub id")
    p.add_argument("--adapters", nargs="+", default=["base"], help="'base' and/or adapter folders, one table column each")
    p.add_argument("--merge", action="store_true", help="merge each LoRA adapter into the weights before evaluating")
    p.add_argument("--dataset", default=None, help="Hub name or local folder/file (see train.py)")
    p.add_argument("--dataset-config", default=None, help="configuration of a Hub dataset that has several (glue: "
                   "mrpc, rte, ...), or that subfolder of a local dataset folder")
    p.add_argument("--split", default=None, help="split to evaluate (default: test, else validation, else train)")
    p.add_argument("--task", choices=data.TASKS, default=None, help="inferred from the model and dataset when omitted")
    p.add_argument("--samples", type=int, default=None, help="evaluate the first N rows of the split (all when omitted)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (longer inputs are truncated; "
                   "--rouge's prompts keep their last tokens)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    p.add_argument("--label-words", default=data.DEFAULT_LABEL_WORDS, help="generate-label: the word of each label id "
                   f"(default: the words the adapters were trained with, else {data.DEFAULT_LABEL_WORDS})")
    p.add_argument("--rouge", action="store_true", help="prompt/answer pairs: ROUGE of greedy generations")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length (ROUGE, --generate)")
    p.add_argument("--window", type=int, default=None, help="plain text: perplexity window in tokens (default: --max-length)")
    p.add_argument("--stride", type=int, default=None, help="plain text: window advance (default: window / 2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype the model is loaded in")
    p.add_argument("--quant", choices=("none", "nf4", "nf4-dq", "int8"), default="none", help="quantize the base while loading")
    p.add_argument("--predict", nargs="+", default=None, metavar="TEXT", help="print softmax probabilities per label for these texts")
    p.add_argument("--predict-pairs", nargs="+", default=None, metavar="TEXT", help="--predict for a sentence-pair "
                   "classifier: the second text of each pair, one per --predict text")
    p.add_argument("--generate", nargs="+", default=None, metavar="PROMPT", help="print greedy continuations of these prompts")
    p.add_argument("--num-labels", type=int, default=None, help="--predict: number of labels of the classifier "
                   "(default: the adapter's head, else the checkpoint's config, else 2)")
    p.add_argument("--json", default=None, help="also write the results (the table's, or --predict's "
                   "probabilities, or --generate's texts) to this JSON file")
    args = p.parse_args(argv)
    for name in ("samples", "max_length", "batch_size", "max_new_tokens", "window", "num_labels"):  # None: left out
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not (args.dataset or args.predict or args.generate):
        p.error("pass --dataset, --predict or --generate")
    if args.predict and args.generate:
        p.error("--predict and --generate are two modes; pass one of them")
    mode = "predict" if args.predict else "generate" if args.generate else None
    if mode:  # a flag this mode does not read would be ignored without a word
        changed = [f"--{n.replace('_', '-')}" for n in IGNORED_BY[mode] if getattr(args, n) != p.get_default(n)]
        if changed:
            p.error(f"{', '.join(changed)} {'does' if len(changed) == 1 else 'do'} not apply to --{mode}")
        if len(args.adapters) > 1:
            p.error(f"--{mode} runs one model: give --adapters one entry (base or an adapter folder), not "
                    f"{len(args.adapters)}")
    if args.predict_pairs and len(args.predict_pairs) != len(args.predict or []):
        p.error(f"--predict-pairs gives {len(args.predict_pairs)} second texts for {len(args.predict or [])} "
                "--predict texts; give one for each")
    window = args.window or args.max_length
    if args.stride is not None and not 0 < args.stride < window:
        p.error(f"--stride must be between 1 and the window ({window}) - 1, got {args.stride}")
    if args.num_labels is not None and not args.predict:
        p.error("--num-labels sizes the classifier of --predict; a dataset's labels size it otherwise")
    if args.json:  # now, not after an evaluation that may take minutes
        path = Path(args.json)
        if path.is_dir():
            p.error(f"--json {path} is a folder; give the path of a file to write")
        if not path.parent.is_dir():
            p.error(f"--json {path}: {path.parent} is not an existing folder")
    return args


def write_results(path, results):
    """--json: the results, when a path was given (written as train.py writes its files)."""
    if path:
        write_json(path, results)


def load_variant(args, folder, model_task, num_labels, entry):
    """The base model with one adapter (or none) applied, optionally merged."""
    # a head the checkpoint lacks is initialised the same way in every run and for every entry of the table
    # (train.py's "before" too): entries after the first drew other random heads
    torch.manual_seed(0)
    model, tokenizer = load_model(folder, task=model_task, num_labels=num_labels, dtype=getattr(torch, args.dtype),
                                  quant=None if args.quant == "none" else args.quant, ignore_mismatched_sizes=True)
    base = model
    if entry != "base":
        model = load_adapter(model, entry, adapter_name="default")
    # an adapter with the head trained wraps it; merging would hide that, so look now
    untrained = [h for h in base.random_heads if not isinstance(base.get_submodule(h), ModulesToSave)]
    resized = [h for h in untrained if h in base.resized_heads]
    absent = [h for h in untrained if h not in resized]
    source = "the checkpoint" if entry == "base" else "the checkpoint or the adapter"
    for heads, why in ((absent, f"no {', '.join(absent)} in {source}"),
                       (resized, f"the checkpoint's {', '.join(resized)} is sized for another number of labels "
                                 f"than {num_labels}" + ("" if entry == "base" else " and the adapter has none"))):
        if heads:
            print(f"note: {label_of(entry, False)}: {why}; initialised at random, its predictions are chance",
                  file=sys.stderr)
    if entry == "base":
        return model, tokenizer
    if args.merge and not hasattr(model, "prompt_embeddings"):
        model = merge_and_unload(model)
    return model.eval(), tokenizer


def adapter_configs(entries):
    """{entry: its adapter_config.json}, each read once; base entries have none ({})."""
    return {e: {} if e == "base" else read_json(Path(e) / CONFIG_FILE, AdapterError) for e in entries}


def check_can_generate(task_types, task=None):
    """A sequence-classification adapter cannot go into a causal LM; said up front, as load_adapter would only
    name its head's tensor as having no place in the model."""
    for entry, task_type in task_types.items():
        if task_type == "SEQ_CLS":
            raise AdapterError(f"{entry} is a sequence-classification adapter (task_type SEQ_CLS in its {CONFIG_FILE}) "
                               "and cannot generate" + (f"; task {task} needs a causal-LM adapter" if task else ""))


def infer_task(rows, is_decoder, task_types):
    """data.infer_task, except that labelled text evaluated with causal-LM adapters (task_type CAUSAL_LM, what
    train.py writes for generate-label) is generate-label: as seq-cls their classification head would be random."""
    task = data.infer_task(rows, is_decoder)
    if task == "seq-cls" and is_decoder and set(task_types.values()) == {"CAUSAL_LM"}:
        print("note: task generate-label, as the adapters are causal-LM ones (task_type CAUSAL_LM); pass --task "
              "to choose another", file=sys.stderr)
        return "generate-label"
    return task


def head_labels(entry):
    """How many labels the classification head saved in an adapter has (None: base, or no head)."""
    if entry == "base":
        return None
    with open_safetensors(Path(entry) / WEIGHTS_FILE, AdapterError) as f:
        return next((f.get_slice(k).get_shape()[0] for k in f.keys()
                     if k.split(".")[-2:] in (["classifier", "weight"], ["score", "weight"])), None)


def saved_labels(folder, adapters, key="labels"):
    """What train.py saved beside the adapters (or the fine-tuned model) in labels.json, or None: "labels" in
    head order, or generate-label's "label_words"."""
    files = [Path(e) / data.LABELS_FILE for e in adapters if e != "base"] + [Path(folder) / data.LABELS_FILE]
    saved = [value for f in files if f.is_file() if (value := read_json(f, AdapterError).get(key)) is not None]
    if any(s != saved[0] for s in saved):
        raise AdapterError(f"the adapters were trained on different {key.replace('_', ' ')}: {saved}")
    return saved[0] if saved else None


def label_words_of(args, folder, task):
    """--label-words, or the words the adapters were trained with (a different --label-words is an error)."""
    saved = saved_labels(folder, args.adapters, "label_words") if task == "generate-label" else None
    if saved is None:
        return args.label_words
    given = [w.strip() for w in args.label_words.split(",")]
    if args.label_words != data.DEFAULT_LABEL_WORDS and given != saved:
        raise data.DataError(f"--label-words {args.label_words} differs from the words the adapter was trained with: "
                             f"{','.join(saved)}")
    return ",".join(saved)


def label_names(rows, split, task, folder, adapters, label_words):
    """The label of each head output: as train.py saved them (labels.json beside the adapter or fine-tuned
    model), else from the whole split (not only --samples' rows). Labels 0.. are then ids 0..K-1, K the most
    of: the split's largest label + 1, the adapters' heads, the label words; so a split lacking a class still
    fits."""
    saved = saved_labels(folder, adapters)
    heads = {n for n in map(head_labels, adapters) if n}
    if len(heads) > 1:
        raise AdapterError(f"the adapters' classification heads have different numbers of labels: {sorted(heads)}")
    head = next(iter(heads), None)
    names = saved or data.label_names([rows])  # encoding checks that each row's label is one of them
    if not saved and names == list(range(len(names))):
        words = len(label_words.split(",")) if task == "generate-label" else 0
        names = list(range(max(len(names), words, head or 0)))
    if not names:
        raise data.DataError(f"split {split!r} has no labels: -1 marks a row without a label, as in GLUE's test "
                             "splits; use a labelled split")
    if len(names) < 2:
        raise data.DataError(f"split {split!r} has one label ({names[0]!r}); a classifier needs two or more")
    if head and len(names) != head:
        raise data.DataError(f"the split has {len(names)} labels {names}, the adapter's classification head {head}")
    return names


def check_lengths(args, cfg, configs, plain_text, rouge_prompt=None):
    """Each entry's inputs fit the model: --max-length (or the perplexity --window) plus the tokens of a soft
    prompt, and with rouge_prompt (the longest prompt --rouge continues) that prompt, the soft prompt and
    --max-new-tokens; checked before any evaluation instead of failing inside the forward of a long example."""
    flag, tokens = ("--window", args.window) if plain_text and args.window else ("--max-length", args.max_length)
    for entry, config in configs.items():
        virtual = config.get("num_virtual_tokens") if config.get("peft_type") == "PROMPT_TUNING" else 0
        virtual = virtual if isinstance(virtual, int) else 0  # a bad value is load_adapter's error to report
        of_entry = f" + {virtual} virtual tokens of {entry}" if virtual else ""
        check_positions(cfg, args.model, tokens + virtual, f"{flag} {tokens}{of_entry}")
        if rouge_prompt is not None:  # the last new token is not fed back
            check_positions(cfg, args.model, rouge_prompt + virtual + args.max_new_tokens - 1,
                            f"--rouge's longest prompt ({rouge_prompt} tokens){of_entry} + --max-new-tokens "
                            f"{args.max_new_tokens}")


def label_of(entry, merge, full=False):
    if entry == "base":
        return "base"
    path = Path(entry)
    name = str(path) if full else path.parent.name if path.name == "adapter" else path.name
    return name + (" (merged)" if merge else "")


def column_labels(entries, merge, configs):
    """One table column per entry: its short label, its path where two short labels clash, then a number.
    "(merged)" marks the LoRA adapters --merge merges (a soft prompt cannot be)."""
    merged = [merge and configs[e].get("peft_type") == "LORA" for e in entries]
    labels = [label_of(e, m) for e, m in zip(entries, merged)]
    labels = [lab if labels.count(lab) == 1 else label_of(e, m, full=True) for lab, e, m in zip(labels, entries, merged)]
    return [lab if labels.count(lab) == 1 else f"{lab} #{labels[:i].count(lab) + 1}" for i, lab in enumerate(labels)]


def main(argv=None):
    args = parse_args(argv)
    for entry in args.adapters:  # all of them before the first evaluation, which may take minutes
        if entry != "base":
            check_adapter_folder(entry)
    configs = adapter_configs(args.adapters)
    task_types = {e: c.get("task_type") for e, c in configs.items() if e != "base"}
    # freed activations are reused, quantized or not (quant/allocator.py): without gradients the peak is
    # the weights plus one layer's activations either way, and returning them to the OS made smollm2's
    # bbc_news perplexity 1.1 x (nf4) to 1.7 x (int8) slower for the same peak
    keep_freed_memory()
    folder = resolve(args.model)
    cfg = read_config(folder)
    is_decoder = cfg["model_type"] in DECODERS
    results = {}
    if args.generate:
        if not is_decoder:
            raise LoadError(f"--generate needs a decoder; {args.model} is a {cfg['model_type']} encoder")
        check_can_generate(task_types)
        tok = Tokenizer.from_folder(folder, cfg)
        tok.padding_side = "left"
        batch = tok(args.generate)
        for prompt, n in zip(args.generate, batch["attention_mask"].sum(1).tolist()):
            if n == 0:  # no token, not even a BOS, to predict the first new one from
                raise data.DataError(f"--generate prompt {prompt!r} has no tokens: an empty prompt has nothing to "
                                     "continue")
        model = load_variant(args, folder, "causal-lm", 2, args.adapters[0])[0]
        out = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=args.max_new_tokens,
                       eos_token_id=tok.stop_token_ids, pad_token_id=tok.pad_token_id)
        results = [{"prompt": prompt, "generated": tok.decode(row)}
                   for prompt, row in zip(args.generate, out[:, batch["input_ids"].shape[1]:])]
        for r in results:
            print(f"{r['prompt']!r} -> {r['generated']!r}")
        write_results(args.json, results)
        return results
    if args.predict:
        check_lengths(args, cfg, {args.adapters[0]: configs[args.adapters[0]]}, plain_text=False)
        id2label = cfg.get("id2label")
        num_labels = head_labels(args.adapters[0]) or args.num_labels or (len(id2label) if isinstance(id2label, dict)
                                                                           else 2)
        model, tok = load_variant(args, folder, "seq-cls", num_labels, args.adapters[0])
        examples = data.encode_texts(tok, args.predict, args.predict_pairs, args.max_length)
        probs = classification_logits(model, examples, args.batch_size, tok.pad_token_id).softmax(-1)
        labels = saved_labels(folder, args.adapters[:1])
        results = [{"text": text} | ({"pair": args.predict_pairs[i]} if args.predict_pairs else {})
                   | {"probabilities": row} | ({"labels": labels} if labels else {})
                   for i, (text, row) in enumerate(zip(args.predict, probs.tolist()))]
        for r in results:  # the file keeps every digit, as the table's JSON does
            print(json.dumps(r | {"probabilities": [round(p, 4) for p in r["probabilities"]]}))
        write_results(args.json, results)
        return results

    splits = data.load_splits(args.dataset, args.dataset_config)
    split = data.pick_split(splits, args.split, ("test", "validation", "train"), labels=args.task != "causal-lm")
    if split is None:
        raise data.DataError(f"the dataset has no test, validation or train split (it has {', '.join(splits)}); "
                             "pick one with --split")
    rows = splits[split][:args.samples]
    task = args.task or infer_task(rows, is_decoder, task_types)
    if task != "seq-cls":
        if not is_decoder:
            raise LoadError(f"task {task} needs a decoder; {args.model} is a {cfg['model_type']} encoder"
                            + (" (use --task seq-cls)" if task == "generate-label" else ""))
        check_can_generate(task_types, task)
    data.check_rows(rows, task, split)
    if args.rouge:
        data.check_rouge(task, rows, split)
    tokenizer = Tokenizer.from_folder(folder, cfg)
    label_words = label_words_of(args, folder, task)
    names = label_names(splits[split], split, task, folder, args.adapters, label_words) if task != "causal-lm" \
        else None
    words = data.parse_label_words(label_words, names, task)
    plain_text = task == "causal-lm" and not data.pair_columns(rows)
    if not plain_text and (args.window or args.stride):
        raise data.DataError(f"--window and --stride slide over plain text; split {split!r} holds "
                             + ("prompt/answer pairs" if task == "causal-lm" else f"{task} examples"))
    window = args.window or args.max_length  # plain text's perplexity window
    if plain_text and window < 2:  # a window must hold a token of context and one to score
        raise data.DataError(f"plain-text perplexity needs a window of 2 tokens or more; "
                             f"{'--window' if args.window else '--max-length'} is {window}")
    examples = None if plain_text else data.encode(rows, task, tokenizer, args.max_length, names, words, split)
    rouge_prompt = longest_rouge_prompt(examples, f"split {split!r}") if args.rouge else None  # pairs only
    check_lengths(args, cfg, configs, plain_text, rouge_prompt)
    model_task = "seq-cls" if task == "seq-cls" else "causal-lm"
    for entry, column in zip(args.adapters, column_labels(args.adapters, args.merge, configs)):
        model, tok = load_variant(args, folder, model_task, len(names) if names else 2, entry)
        if plain_text:
            texts = [str(r[data.text_column(rows)]) for r in rows]
            result = perplexity_of_texts(model, tok, texts, window, args.stride or max(1, window // 2),
                                         desc=f"eval {entry}")
        else:
            result = evaluate(model, examples, task, tok, args.batch_size, words, args.rouge, args.max_new_tokens,
                              desc=f"eval {entry}")
        results[column] = result
        # each column as soon as it is done: an adapter that fails to load later does not take these along
        print(f"{column}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()), flush=True)
    keys = list(next(iter(results.values())))
    print(f"\n{args.model} on {data.dataset_label(args.dataset, args.dataset_config)} [{split}, {len(rows)} rows, "
          f"{task}]\n")
    print("| metric | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r[k]:.4f}" for r in results.values()) + " |")
    print(json.dumps(results))
    write_results(args.json, results)
    return results


if __name__ == "__main__":
    try:
        main()
    except (LoadError, AdapterError, data.DataError, OSError) as e:  # OSError: a file or folder (path and reason)
        sys.exit(f"error: {e}")
