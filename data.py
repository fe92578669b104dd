"""Datasets for train.py and eval.py: read the splits, check the columns, turn rows into token ids.

A dataset is a Hub name (read with `datasets.load_dataset`) or a local folder of UTF-8 split files
(`train.jsonl`, `validation.csv`, `test.parquet`, ...; the Hub's shards `train-00000-of-00002.parquet`, ...
make one split) or one file (used as the train split).
Columns are the Hub's: `text` + `label` for classification (or a sentence pair in one of GLUE's layouts,
`sentence1`/`sentence2`, `premise`/`hypothesis`, `question1`/`question2`, `question`/`sentence`, encoded as one
sequence by the tokenizer's pair template, with token types for BERT), `question` + `answer` (GSM8K) or
`document` + `summary` (XSum) for prompt/answer pairs, `text` alone for plain language modelling.

Tasks:
    seq-cls          text -> label through the model's classification head
    generate-label   a decoder reads "Review: <text>\\nSentiment:" and must say the label word;
                     the loss covers the answer tokens only
    causal-lm        prompt/answer pairs with the loss on the answer, or plain text
"""
import argparse
import csv
import json
import math
import random
import re
import sys
from pathlib import Path

TASKS = ("seq-cls", "generate-label", "causal-lm")
TEXT_COLUMNS = ("text", "sentence", "review", "content")
# sentence-pair classification, GLUE's layouts (MRPC/RTE, MNLI, QQP, QNLI); a pair wins over one text column
TEXT_PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
                     ("question", "sentence"))
PAIR_COLUMNS = (("question", "answer"), ("document", "summary"), ("prompt", "completion"))
FORMATS = (".jsonl", ".json", ".csv", ".parquet")
SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}  # as `datasets` names a folder's files
SHARD_SUFFIX = re.compile(r"-\d+-of-\d+(-[0-9a-f]+)?$")  # the Hub's train-00000-of-00002[-fingerprint]
HUB_METADATA_FILES = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")
UNREAD_DATA_SUFFIXES = COMPRESSED + (".tsv", ".arrow")
LABEL_PROMPT = "Review: {text}\nSentiment:"
DEFAULT_LABEL_WORDS = "negative,positive"  # generate-label's words for labels 0 and 1
LABELS_FILE = "labels.json"  # {"labels": [...]} in head order: train.py writes it beside the adapter
# (prompt, answer) formats of each pair's columns. The answer brings its own leading space, so prompt and
# answer tokenize as their joined text does ("Answer:" + " The" is "Answer", ":", " The", where a prompt
# ending in a space would give "Answer", ":", " " and then "The"); prompt/completion columns are used as given.
PAIR_FORMATS = {"question": ("Question: {}\nAnswer:", " {}"), "document": ("{}\nSummary:", " {}"), "prompt": ("{}", "{}")}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """train.py's and eval.py's --help: each flag's default, unless its help says it or it is None."""

    def _get_help_string(self, action):
        if action.default is None or "(default:" in action.help:
            return action.help
        return super()._get_help_string(action)


class DataError(ValueError):
    """A dataset that cannot be used as asked; the message says why."""


def read_json_rows(path):
    """Rows of a JSON Lines file, or of a .json file holding one array of objects."""
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors write one) is skipped
        if path.suffix.lower() == ".json" and f.read(4096).lstrip().startswith("["):
            f.seek(0)
            try:
                rows, numbers = json.load(f), None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
        else:
            f.seek(0)
            rows, numbers = [], []
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                    numbers.append(number)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            where = f"{path}:{numbers[i]}" if numbers else f"{path}: item {i}"
            raise DataError(f"{where}: a row must be a JSON object of columns, found a {type(row).__name__}")
    return rows


# what pandas (and so `datasets`) reads as a missing value in a CSV cell; applied to the label column only (a
# text "NA" stays a text)
CSV_MISSING = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
               "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
CSV_BOOLEANS = {"true": True, "false": False}


def read_csv_rows(path):
    csv.field_size_limit(2**31 - 1)  # the module's default, 131072 characters, is shorter than long documents
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        rows = []
        for row in reader:
            if None in row:  # fields beyond the header's: an unquoted comma, which `datasets` refuses too
                raise DataError(f"{path}:{reader.line_num}: {len(reader.fieldnames) + len(row[None])} fields where the "
                                f"header has {len(reader.fieldnames)}; quote a text that holds commas")
            # an empty cell is a missing value, as `datasets` reads it (None), not an empty text
            rows.append({k: v if v != "" else None for k, v in row.items()})
    # CSV has only strings; the label column is typed as `datasets` (pandas) types it: booleans, int64, else
    # float64, so "10" does not sort between "1" and "2", "1" and " 1.0" are one class, "NA" is no label
    labels = [row.get("label") for row in rows]
    labels = [None if label is None or label.strip() in CSV_MISSING else label.strip() for label in labels]
    present = [label for label in labels if label is not None]
    if present and all(label.lower() in CSV_BOOLEANS for label in present):
        labels = [None if label is None else CSV_BOOLEANS[label.lower()] for label in labels]
    else:
        for number, pattern in ((int, r"[-+]?\d+"), (float, r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")):
            if present and all(re.fullmatch(pattern, label) for label in present):
                labels = [None if label is None else number(label) for label in labels]
                break
    for row, label in zip(rows, labels):
        if "label" in row:
            row["label"] = label
    return rows


def read_file(path):
    path = Path(path)
    try:
        return read_rows(path)
    except csv.Error as e:  # e.g. a line ending inside a quoted cell
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as "
                        "UTF-8") from None


def read_rows(path):
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_json_rows(path)
    if suffix == ".csv":
        return read_csv_rows(path)
    if suffix == ".parquet":
        import pyarrow  # comes with `datasets`
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except pyarrow.ArrowException as e:
            raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        rows = table.to_pylist()
        # a file written by `datasets` records its features: a ClassLabel's -1 is a missing label, as load_splits
        # reads it from the Hub
        features = json.loads((table.schema.metadata or {}).get(b"huggingface", b"{}")).get("info", {}).get("features", {})
        if (features.get("label") or {}).get("_type") == "ClassLabel":
            for row in rows:
                row["label"] = None if row.get("label") == -1 else row.get("label")
        return rows
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FORMATS)}")


def dataset_label(dataset, config=None):
    """How the result tables name a dataset: "glue/mrpc" for a configuration, else as given."""
    return f"{dataset}/{config}" if config else str(dataset)


def load_splits(dataset, config=None):
    """{split name: list of row dicts} from a local folder/file or a Hub dataset name.

    config: the configuration of a Hub dataset that has several (GLUE: "mrpc", "rte", ...), or the subfolder of
    a local folder laid out the same way (glue/mrpc/train.jsonl, ...).
    """
    path = Path(dataset).expanduser()
    if config and path.is_file():
        raise DataError(f"--dataset-config picks a Hub configuration or a subfolder; {path} is a file")
    if config and path.is_dir():
        if not (path / config).is_dir():
            raise DataError(f"{path} has no subfolder {config!r} (--dataset-config); it has: "
                            f"{', '.join(sorted(d.name for d in path.iterdir() if d.is_dir())) or 'none'}")
        path = path / config
    if path.is_dir():
        return read_folder(path)
    if path.is_file():
        return {"train": read_file(path)}
    if path.suffix.lower() in FORMATS + UNREAD_DATA_SUFFIXES or str(dataset).startswith((".", "/", "~")) or str(dataset).count("/") > 1:
        raise DataError(f"dataset {dataset!r}: no such file or folder")
    try:
        import datasets

        loaded = datasets.load_dataset(str(dataset), config)
    except Exception as e:  # reported with its reason, not swallowed
        raise DataError(f"could not load dataset {dataset!r}" + (f" ({config})" if config else "") + " from the Hub ("
                        f"{type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); pass a local folder of "
                        f"{'/'.join(FORMATS)} split files instead") from None
    splits = {name: list(split) for name, split in loaded.items()}
    for name, split in loaded.items():  # a ClassLabel's -1 is a missing label (GLUE's test splits, SNLI's)
        if isinstance(getattr(split, "features", {}).get("label"), datasets.ClassLabel):
            for row in splits[name]:
                row["label"] = None if row["label"] == -1 else row["label"]
    return splits


def split_name(stem):
    """The split a file stem names: the Hub's shard suffix (train-00000-of-00002, optionally with a fingerprint)
    removed, and `datasets`' keywords (dev, valid, val; eval, testing; training) read as its three splits."""
    name = SHARD_SUFFIX.sub("", stem)
    return next((split for split, words in SPLIT_KEYWORDS.items() if name.lower() in words), name)


def data_files(folder):
    """The split files of a folder; an error for one that looks like data in a format not read here."""
    files = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in HUB_METADATA_FILES:
            continue
        if p.suffix.lower() in FORMATS:
            files.append(p)
        elif p.suffix.lower() in UNREAD_DATA_SUFFIXES:
            raise DataError(f"{p}: {p.suffix} files are not read; convert it to one of {', '.join(FORMATS)}"
                            + (" (decompress it)" if p.suffix.lower() in COMPRESSED else ""))
    return files


def read_folder(path):
    """{split: rows} of a folder of split files, or of split subfolders (train/0000.parquet, ...)."""
    files = data_files(path)
    folders = [d for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if not files and len(folders) == 1 and split_name(folders[0].name) not in SPLIT_KEYWORDS:
        # one folder of data inside: a Hub snapshot's data/, the Parquet converter's default/train/0000.parquet
        return read_folder(folders[0])
    if not files:
        subfolders = {d.name: data_files(d) for d in folders}
        subfolders = {name: found for name, found in subfolders.items() if found}
        if subfolders and all(split_name(name) in SPLIT_KEYWORDS for name in subfolders):
            splits = {}
            for name, found in subfolders.items():
                if split_name(name) in splits:
                    raise DataError(f"{path}: split {split_name(name)!r} is in two subfolders; keep one")
                splits[split_name(name)] = [row for p in found for row in read_file(p)]
            return splits
        raise DataError(f"{path} holds no {'/'.join(FORMATS)} files" + (
            f"; its subfolders {', '.join(subfolders)} do: pick one with --dataset-config" if subfolders else ""))
    splits, sources = {}, {}
    for p in files:  # the Hub's shards (train-00000-of-00002.parquet, ...) are parts of one split
        name, source = split_name(p.stem), (SHARD_SUFFIX.sub("", p.stem), p.suffix)
        if sources.setdefault(name, (source, p))[0] != source:
            raise DataError(f"{path}: split {name!r} is in two files, {sources[name][1].name} and {p.name}; keep one")
        splits.setdefault(name, []).extend(read_file(p))
    return splits


def pick_split(splits, wanted, fallbacks, labels=False):
    """`wanted` when given (an error if the dataset lacks it), else the first of `fallbacks` it has, else None.
    labels: a fallback labelled -1 throughout (GLUE's test splits: no labels) gives way to a later one, with a note."""
    if wanted:
        if wanted not in splits:
            raise DataError(f"split {wanted!r} not found; the dataset has {', '.join(splits)}")
        return wanted
    present = [name for name in dict.fromkeys(fallbacks) if name and name in splits]
    unlabelled = [name for name in present if labels and splits[name]
                  and all(no_label(row.get("label")) or class_of(row.get("label")) == -1 for row in splits[name])]
    # never the train split in an unlabelled one's place: scores on the training data would pass for a test's
    chosen = next((name for name in present if name not in unlabelled and name != "train"), None) \
        if unlabelled else None
    chosen = chosen or (present[0] if present else None)
    for name in unlabelled[:present.index(chosen)] if chosen in present else []:
        print(f"note: split {name!r} has no labels (-1 throughout, as GLUE's test splits); split {chosen!r} is "
              "evaluated instead", file=sys.stderr)
    return chosen


def columns_of(rows):
    return set(rows[0]) if rows else set()


def text_column(rows):
    cols = columns_of(rows)
    return next((c for c in TEXT_COLUMNS if c in cols), None)


def classification_columns(rows):
    """The text column, or the two of a sentence pair, that a classifier reads: a tuple, or None."""
    cols, one = columns_of(rows), text_column(rows)
    return next((p for p in TEXT_PAIR_COLUMNS if set(p) <= cols), None) or ((one,) if one else None)


def pair_columns(rows):
    cols = columns_of(rows)
    return next(((p, a) for p, a in PAIR_COLUMNS if p in cols and a in cols), None)


def infer_task(rows, is_decoder):
    """seq-cls for labelled text, causal-lm for pairs or plain text (decoders only)."""
    if not rows:
        raise DataError("the train split is empty")
    cols = columns_of(rows)
    if "label" in cols and classification_columns(rows):
        return "seq-cls"
    if is_decoder and (pair_columns(rows) or text_column(rows)):
        return "causal-lm"
    raise DataError(f"cannot infer the task from columns {sorted(cols)}; pass --task")


def is_missing(value):
    """None (an empty CSV cell too) or NaN (pandas' and JSON's missing number)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def no_label(value):
    """A missing value, or an empty label (the texts of a plain-text corpus may be empty)."""
    return is_missing(value) or value == ""


def check_rows(rows, task, split):
    """Raise a DataError naming the problem if `rows` cannot serve `task`."""
    if not rows:
        raise DataError(f"split {split!r} is empty")
    cols = columns_of(rows)
    if task in ("seq-cls", "generate-label"):
        # generate-label's prompt quotes one text; a classifier also reads a sentence pair
        one = text_column(rows)
        texts = classification_columns(rows) if task == "seq-cls" else (one,) if one else None
        missing = [c for c in ("label",) if c not in cols] + ([] if texts else ["text"])
        if missing:
            raise DataError(f"split {split!r} lacks column(s) {', '.join(missing)} needed by {task}; "
                            f"it has {', '.join(sorted(cols))}")
        if all(no_label(row.get("label")) for row in rows):  # a Hub ClassLabel's -1 throughout (GLUE's test splits)
            raise DataError(f"split {split!r} has no labels: pick a labelled split (train.py --test-split / "
                            "--eval-split, eval.py --split)")
        for number, row in enumerate(rows):
            missing = "label" if no_label(row.get("label")) else \
                next((c for c in texts if is_missing(row.get(c))), None)
            if missing:
                raise DataError(f"split {split!r} row {number}: missing {missing}")
            if not isinstance(row["label"], (str, int, float)):  # bool is an int
                raise DataError(f"split {split!r} row {number}: label {row['label']!r} is not one class "
                                "(a string or a number)")
            if isinstance(row["label"], float) and not row["label"].is_integer():
                raise DataError(f"split {split!r} row {number}: label {row['label']!r} is a score, not a class; "
                                "regression (e.g. STS-B's similarity scores) is not supported")
    elif task == "causal-lm":
        if not pair_columns(rows) and not text_column(rows):
            raise DataError(f"split {split!r} has neither a text column nor prompt/answer columns "
                            f"({', '.join('/'.join(p) for p in PAIR_COLUMNS)}); it has {', '.join(sorted(cols))}")
        columns = pair_columns(rows) or (text_column(rows),)
        for number, row in enumerate(rows):
            missing = next((c for c in columns if is_missing(row.get(c))), None)  # str(None) would train on "None"
            if missing:
                raise DataError(f"split {split!r} row {number}: missing {missing}")
    else:
        raise DataError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def check_rouge(task, rows, split):
    """--rouge scores generated answers against references, so it needs causal-lm prompt/answer pairs."""
    if task != "causal-lm" or not pair_columns(rows):
        why = f"the task is {task}" if task != "causal-lm" else f"split {split!r} is plain text"
        raise DataError(f"--rouge scores generated answers, so it needs task causal-lm on prompt/answer columns "
                        f"({', '.join('/'.join(p) for p in PAIR_COLUMNS)}); {why}")


def class_of(label):
    """The class a label names, one key whatever type the file stored it as: True, 1.0, "1" and "1.0" are 1
    (a JSON string beside a CSV number), other strings and fractions are as they are."""
    if isinstance(label, float) and label.is_integer():
        return int(label)
    if isinstance(label, str) and re.fullmatch(r"-?\d+(\.0*)?", label):
        return int(float(label))
    return int(label) if isinstance(label, bool) else label


def labelled(rows):
    """The classes of rows; none for a split labelled -1 throughout (GLUE's test splits: no labels)."""
    labels = (row.get("label") for row in rows)  # check_rows names a bad one; eval.py reads past its --samples
    classes = {class_of(label) for label in labels if isinstance(label, (str, int, float)) and not no_label(label)}
    return set() if classes == {-1} else classes


def without_missing(classes):
    """-1 beside ids 0..K with K >= 2 marks rows without a label (SNLI's pairs without a gold label); beside other
    labels (-1/1, -1/0/1, -2..2 sentiment) it is a class. A ClassLabel says so itself: its -1 is read as missing."""
    others = classes - {-1}
    ids = others and all(isinstance(c, int) for c in others) and min(others) == 0 and max(others) >= 2
    return others if ids else classes


def label_names(rows_by_split):
    """Sorted distinct classes over all labelled splits; labels that are all integers from 0 name the ids
    0..max (as a Hub ClassLabel does), other integers (1..5 stars, -1/0/1) keep their values, in order, anything
    else is named as a string."""
    classes = without_missing(set().union(*map(labelled, rows_by_split)))  # decided over every split at once
    if classes and all(isinstance(c, int) for c in classes):
        return list(range(max(classes) + 1)) if min(classes) == 0 else sorted(classes)
    return sorted(map(str, classes))


def check_classes(rows, split):
    """Training a classifier needs two classes or more among the labels."""
    classes = labelled(rows)
    if len(classes) < 2:
        raise DataError(f"split {split!r} has {'one label' if classes else 'no labels'} "
                        f"({', '.join(map(repr, classes))}); training a classifier needs two or more")


def label_ids(rows, names, split):
    index = {name if isinstance(name, int) else str(class_of(name)): i for i, name in enumerate(names)}
    by_name = any(isinstance(name, str) for name in names)  # label_names: ids only when every label is an int
    ids = []
    for number, row in enumerate(rows):
        label = row["label"]
        key = str(class_of(label)) if by_name else class_of(label)
        if key not in index:
            unlabelled = ("; -1 marks a row without a label here (GLUE's test splits, SNLI's pairs without a gold "
                          "label): leave such rows out, or pick a labelled split (train.py --test-split / --eval-split, "
                          "eval.py --split)") if class_of(label) == -1 else ""
            raise DataError(f"split {split!r} row {number}: label {label!r} is out of range "
                            f"(expected one of {names}){unlabelled}")
        ids.append(index[key])
    return ids


def subsample(rows, n, seed):
    """A fixed random subset of n rows (all rows when n is None or larger)."""
    if n is None or n >= len(rows):
        return rows
    return random.Random(seed).sample(rows, n)


def encode_classification(rows, tokenizer, max_length, names, split):
    """Token ids and label of each row; a sentence pair is encoded as one sequence by the tokenizer's pair template
    (BERT: [CLS] a [SEP] b [SEP], cut longest first) with its token types for a model that has them."""
    texts, *pairs = ([str(r[c]) for r in rows] for c in classification_columns(rows))
    examples = encode_texts(tokenizer, texts, pairs[0] if pairs else None, max_length)
    for example, label in zip(examples, label_ids(rows, names, split)):
        example["label"] = label
    return examples


def encode_texts(tokenizer, texts, pairs, max_length):
    """{"input_ids"} per text, or per (text, pair) with "token_type_ids" too where the model embeds them."""
    specials = tokenizer.tokenizer.num_special_tokens_to_add(pairs is not None)
    least = specials + (1 if pairs is None else 2)  # a token of each text; below it the tokenizer cuts nothing
    if max_length < least:
        kind = "text" if pairs is None else "sentence pair"
        raise DataError(f"--max-length {max_length} leaves no room for the text: this tokenizer adds {specials} special "
                        f"tokens to each {kind}; use at least {least}")
    encoded = tokenizer(texts, text_pairs=pairs, padding=False, truncation=True, max_length=max_length,
                        return_tensors=None)
    keys = [k for k in ("input_ids", "token_type_ids") if k in encoded and k in tokenizer.model_input_names]
    if any(not ids for ids in encoded["input_ids"]):  # GPT-2 and Qwen2 tokenizers add no token to an empty text
        raise DataError("a text is empty and this tokenizer adds no special token, so a classifier has no token to "
                        "read; leave empty texts out")
    return [dict(zip(keys, values)) for values in zip(*(encoded[k] for k in keys))]


def encode_prompt(tokenizer, text, max_length):
    """The prompt's token ids, at most max_length (none for 0): the text is cut from the left and the
    tokenizer's leading special tokens (BOS) stay, as transformers' truncation_side="left" keeps them."""
    return tokenizer.encode(text, max_length=max_length, truncation_side="left") if max_length > 0 else []


def prompt_answer(prompt_ids, answer_ids):
    """input_ids = prompt + answer, labels = -100 on the prompt."""
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}


def label_word_ids(tokenizer, words):
    """The tokens generate-label trains and scores for each label word: " word" and eos."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [tokenizer.encode(" " + w, add_special_tokens=False) + eos for w in words]


def encode_generate_label(rows, tokenizer, max_length, words, names, split):
    word_ids = label_word_ids(tokenizer, words)
    room = max(len(ids) for ids in word_ids)  # the prompt is cut so that every word fits after it
    if max_length <= room:
        raise DataError(f"generate-label keeps {room} of --max-length's tokens for the longest label word and eos; "
                        f"--max-length {max_length} leaves none for the text")
    text = text_column(rows)
    examples = []
    for row, y in zip(rows, label_ids(rows, names, split)):
        # every prompt is cut to the same room, whatever its label's word (scoring sees the same prompt)
        prompt = encode_prompt(tokenizer, LABEL_PROMPT.format(text=row[text]), max_length - room)
        examples.append({**prompt_answer(prompt, word_ids[y]), "label": y, "prompt_ids": prompt})
    return examples


def encode_causal_lm(rows, tokenizer, max_length):
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pair, text = pair_columns(rows), text_column(rows)
    examples = []
    for row in rows:
        if pair:
            prompt_format, answer_format = PAIR_FORMATS[pair[0]]
            prompt = prompt_format.format(row[pair[0]])
            answer = (tokenizer.encode(answer_format.format(row[pair[1]]), add_special_tokens=False) + eos)[:max_length]
            example = prompt_answer(encode_prompt(tokenizer, prompt, max_length - len(answer)), answer)
            # the prompt that ROUGE's generations continue, cut from the left as in training
            examples.append({**example, "prompt_ids": encode_prompt(tokenizer, prompt, max_length),
                             "reference": str(row[pair[1]])})
        else:
            ids = tokenizer.encode(str(row[text]))[:max_length]
            examples.append({"input_ids": ids, "labels": list(ids)})
    return examples


def parse_label_words(label_words, names, task):
    """--label-words "negative,positive" -> one word per label, checked against the labels found (None: the
    task is not generate-label, and words other than the default would be ignored, so they are an error)."""
    if task != "generate-label":
        if label_words != DEFAULT_LABEL_WORDS:
            raise DataError(f"--label-words applies to --task generate-label; the task is {task}")
        return None
    words = [w.strip() for w in label_words.split(",")]
    if len(words) != len(names):
        raise DataError(f"--label-words gives {len(words)} word{'s' * (len(words) != 1)} for {len(names)} labels {names}")
    if "" in words or len(set(words)) < len(words):  # two labels with one word could never be told apart
        raise DataError(f"--label-words must give a different, non-empty word for each label, got {words}")
    return words


def encode(rows, task, tokenizer, max_length, names=None, words=None, split="train"):
    """Token ids (and labels) of `rows` for `task`; see the encode_* functions. Causal-LM rows with no
    token to predict (an empty text: plain-text corpora such as wikitext have many) are left out."""
    if task == "seq-cls":
        return encode_classification(rows, tokenizer, max_length, names, split)
    if task == "generate-label":
        return encode_generate_label(rows, tokenizer, max_length, words, names, split)
    examples = [e for e in encode_causal_lm(rows, tokenizer, max_length) if any(t != -100 for t in e["labels"][1:])]
    if not examples:
        raise DataError(f"split {split!r}: no row has a token to predict (empty texts, or --max-length {max_length} "
                        "too short?)")
    if len(examples) < len(rows):
        print(f"split {split!r}: {len(rows) - len(examples)} of {len(rows)} rows have no token to predict "
              "(empty text) and are left out", file=sys.stderr)
    return examples


def collate(examples, pad_id, side="right"):
    """Pad a list of encoded examples into tensors: input_ids, attention_mask, token_type_ids and labels (if any)."""
    import torch

    T = max(len(e["input_ids"]) for e in examples)

    def pad(seq, value):
        fill = [value] * (T - len(seq))
        return fill + seq if side == "left" else seq + fill

    batch = {"input_ids": torch.tensor([pad(e["input_ids"], pad_id) for e in examples]),
             "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples])}
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = torch.tensor([pad(e["token_type_ids"], 0) for e in examples])
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([pad(e["labels"], -100) for e in examples])
    elif "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples])
    return batch
