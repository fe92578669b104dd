"""eval.py end to end, against references computed in the test from the tiny random checkpoints:

  * adapters: peft.PeftModel.from_pretrained on the transformers model, fed our tokenizer's ids (whose
    parity with transformers' tokenizer is tested in test_models.py);
  * --quant nf4: the transformers model whose linear weights are bitsandbytes' dequantization of
    bitsandbytes' NF4 quantization (test_qlora.reference_model), its loss per text.
Checked: the table's JSON for two adapters (accuracy exactly, loss within 1e-5), --merge equals the
unmerged adapter, --predict prints peft's softmax probabilities, plain-text perplexity of a 4-bit base.
"""
import importlib
import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

import eval as eval_cli
import evaluation
from lora import AdapterError, LoraConfig, PromptTuningModel, apply_lora, save_adapter
from quant import allocator
from models import LoadError, Tokenizer, load_model
from test_qlora import reference_model
import data
from data import DataError
from test_train import keyword_rows, write_jsonl
from tiny import NUM_LABELS, load_hf

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("quiet_warnings")
MAX_LENGTH = 32


def random_adapter(folder, out, seed, task="seq-cls"):
    """A LoRA adapter (and for seq-cls its head) with every saved weight random, written in peft's format;
    task causal-lm gives task_type CAUSAL_LM, what train.py writes for generate-label."""
    model = load_model(folder, task=task, num_labels=NUM_LABELS)[0]
    apply_lora(model, LoraConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    save_adapter(model, out)
    return out


def peft_logits(folder, adapter, texts):
    tok = Tokenizer.from_folder(folder, json.loads((folder / "config.json").read_text()))
    batch = tok(texts, truncation=True, max_length=MAX_LENGTH)
    model = peft.PeftModel.from_pretrained(load_hf(folder, "distilbert", "seq-cls"), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture
def setup(tiny, tmp_path):
    folder = tiny.folder("distilbert", "seq-cls")
    rows = keyword_rows(24, NUM_LABELS, seed=4)
    dataset = write_jsonl(tmp_path / "data", "test", rows)
    adapters = [random_adapter(folder, tmp_path / f"adapter{i}", seed=i) for i in (1, 2)]
    return folder, rows, dataset, adapters


def run_eval(*argv):
    return eval_cli.main([str(a) for a in argv])


def test_table_of_two_adapters_equals_peft(setup, tmp_path):
    folder, rows, dataset, adapters = setup
    results = run_eval("--model", folder, "--dataset", dataset, "--max-length", MAX_LENGTH, "--adapters", "base",
                       *adapters, "--json", tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert list(results) == ["base", adapters[0].name, adapters[1].name]  # columns named by folder
    labels = torch.tensor([r["label"] for r in rows])
    for adapter in adapters:
        logits = peft_logits(folder, adapter, [r["text"] for r in rows])
        assert results[adapter.name]["accuracy"] == (logits.argmax(-1) == labels).sum().item() / len(rows)
        assert results[adapter.name]["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-5)
    assert results[adapters[0].name] != results[adapters[1].name]


def test_adapters_with_the_same_folder_name_get_a_column_each(setup, tmp_path):
    """Two runs' adapters are both `<run>/adapter`: the columns are named by path (one used to overwrite the
    other); the same entry twice is numbered."""
    folder, _, dataset, adapters = setup
    paths = [shutil.copytree(a, tmp_path / f"run{i}" / "same" / "adapter") for i, a in enumerate(adapters)]
    results = run_eval("--model", folder, "--dataset", dataset, "--max-length", MAX_LENGTH, "--adapters", *paths,
                       paths[0])
    assert list(results) == [f"{paths[0]} #1", str(paths[1]), f"{paths[0]} #2"]
    alone = run_eval("--model", folder, "--dataset", dataset, "--max-length", MAX_LENGTH, "--adapters", *adapters)
    assert [results[f"{paths[0]} #1"], results[str(paths[1])], results[f"{paths[0]} #2"]] == [
        alone[adapters[0].name], alone[adapters[1].name], alone[adapters[0].name]]


def test_merged_adapter_equals_unmerged(setup):
    folder, _, dataset, adapters = setup
    common = ("--model", folder, "--dataset", dataset, "--max-length", MAX_LENGTH, "--adapters", adapters[0])
    unmerged = run_eval(*common)[adapters[0].name]
    merged = run_eval(*common, "--merge")
    assert list(merged) == [f"{adapters[0].name} (merged)"]
    merged = merged[f"{adapters[0].name} (merged)"]
    assert merged["accuracy"] == unmerged["accuracy"]
    assert merged["loss"] == pytest.approx(unmerged["loss"], abs=1e-5)


def test_a_soft_prompt_is_not_labelled_merged(setup, tmp_path):
    folder, _, dataset, adapters = setup
    prompt = PromptTuningModel(load_model(folder, task="seq-cls", num_labels=NUM_LABELS)[0]).add_prompt("default", 4)
    save_adapter(prompt, tmp_path / "prompt")
    results = run_eval("--model", folder, "--dataset", dataset, "--max-length", MAX_LENGTH, "--merge", "--adapters",
                       tmp_path / "prompt", adapters[0])
    assert list(results) == ["prompt", f"{adapters[0].name} (merged)"]


def test_predict_prints_peft_probabilities(setup, capsys):
    folder, _, _, adapters = setup
    texts = ["a wonderful film", "terrible plot and it was okay"]
    run_eval("--model", folder, "--adapters", adapters[1], "--num-labels", NUM_LABELS, "--max-length", MAX_LENGTH,
             "--predict", *texts)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [p["text"] for p in printed] == texts
    expected = peft_logits(folder, adapters[1], texts).softmax(-1)
    got = torch.tensor([p["probabilities"] for p in printed])
    torch.testing.assert_close(got, expected, rtol=0, atol=6e-5)  # printed with 4 decimals


def test_predict_takes_the_label_count_of_the_checkpoint(tiny, capsys):
    """--predict on a fine-tuned checkpoint without --num-labels: its config's id2label (3 labels here) sizes the
    head, so the probabilities are transformers'; it used to assume 2 and stop on the head's shape."""
    folder = tiny.folder("bert", "seq-cls")
    texts = ["a wonderful film", "terrible plot and it was okay"]
    run_eval("--model", folder, "--max-length", MAX_LENGTH, "--predict", *texts)
    got = torch.tensor([json.loads(line)["probabilities"] for line in capsys.readouterr().out.splitlines()
                        if line.startswith("{")])
    tok = load_model(folder, task="seq-cls", num_labels=NUM_LABELS)[1]
    with torch.no_grad():
        expected = torch.cat([load_hf(folder, "bert", "seq-cls")(input_ids=torch.tensor([tok.encode(t)])).logits
                              for t in texts]).softmax(-1)
    assert got.shape == (2, NUM_LABELS)
    torch.testing.assert_close(got, expected, rtol=0, atol=6e-5)  # printed with 4 decimals


@pytest.mark.parametrize("columns", [("sentence1", "sentence2"), ("question", "sentence")])
def test_sentence_pairs_are_classified_as_transformers_does(tiny, tmp_path, columns):
    """GLUE's pair layouts (MRPC/RTE, and QNLI, whose `sentence` is then the second text, not the only one): one
    sequence from the tokenizer's pair template with token types, cut longest first; accuracy and loss equal
    transformers' on BertTokenizerFast's encoding of the same pairs. (They used to be refused as lacking `text`.)"""
    from transformers import BertTokenizerFast

    folder = tiny.folder("bert", "seq-cls")
    rows = [{columns[0]: a, columns[1]: b, "label": i % NUM_LABELS}
            for i, (a, b) in enumerate(zip(FIRST_TEXTS, SECOND_TEXTS))]
    dataset = write_jsonl(tmp_path / "data", "test", rows)
    results = run_eval("--model", folder, "--dataset", dataset, "--max-length", 16)["base"]
    hf_tok = BertTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    hf = load_hf(folder, "bert", "seq-cls")
    with torch.no_grad():
        logits = torch.cat([hf(**{k: torch.tensor([v]) for k, v in hf_tok(r[columns[0]], r[columns[1]],
                                                                              truncation=True, max_length=16).items()}
                               ).logits for r in rows])
        without_types = torch.cat([hf(torch.tensor([hf_tok(r[columns[0]], r[columns[1]], truncation=True,
                                                           max_length=16)["input_ids"]])).logits for r in rows])
    labels = torch.tensor([r["label"] for r in rows])
    assert results["accuracy"] == (logits.argmax(-1) == labels).sum().item() / len(rows)
    assert results["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-5)
    assert abs(F.cross_entropy(without_types, labels).item() - results["loss"]) > 1e-3  # the token types count


def test_predict_pairs_prints_transformers_probabilities(tiny, capsys):
    """--predict with --predict-pairs: each text and its second text as one pair sequence with token types; the
    printed probabilities are transformers' softmax on BertTokenizerFast's encoding of the pairs."""
    from transformers import BertTokenizerFast

    folder = tiny.folder("bert", "seq-cls")
    run_eval("--model", folder, "--max-length", 16, "--predict", *FIRST_TEXTS[:3], "--predict-pairs", *SECOND_TEXTS[:3])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(p["text"], p["pair"]) for p in printed] == list(zip(FIRST_TEXTS[:3], SECOND_TEXTS[:3]))
    hf_tok = BertTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    with torch.no_grad():
        expected = torch.cat([load_hf(folder, "bert", "seq-cls")(**hf_tok(a, b, truncation=True, max_length=16,
                                                                          return_tensors="pt")).logits
                              for a, b in zip(FIRST_TEXTS[:3], SECOND_TEXTS[:3])]).softmax(-1)
    torch.testing.assert_close(torch.tensor([p["probabilities"] for p in printed]), expected, rtol=0, atol=6e-5)
    with pytest.raises(SystemExit):
        run_eval("--model", folder, "--predict", "one", "two", "--predict-pairs", "only one")
    assert "--predict-pairs gives 1 second texts for 2 --predict texts; give one for each" in capsys.readouterr().err


def test_flags_for_another_mode_are_errors(setup, tiny, tmp_path, capsys):
    """--window / --stride on data that is not plain text, and --num-labels without --predict, were ignored
    without a word."""
    folder, _, dataset, _ = setup
    with pytest.raises(DataError, match=r"^--window and --stride slide over plain text; split 'test' holds seq-cls "
                                        r"examples$"):
        run_eval("--model", folder, "--dataset", dataset, "--max-length", MAX_LENGTH, "--window", 16)
    pairs = write_jsonl(tmp_path / "pairs", "test", [{"question": "two and two?", "answer": "four"}] * 2)
    with pytest.raises(DataError, match=r"split 'test' holds prompt/answer pairs$"):
        run_eval("--model", tiny.folder("gpt2", "causal-lm"), "--dataset", pairs, "--max-length", 32, "--stride", 8)
    with pytest.raises(SystemExit):
        run_eval("--model", folder, "--dataset", dataset, "--num-labels", 3)
    assert capsys.readouterr().err.strip().endswith(
        "error: --num-labels sizes the classifier of --predict; a dataset's labels size it otherwise")


FIRST_TEXTS = ["the movie was wonderful", "a terrible plot", "it was okay I guess, with a long and winding middle part",
               "good", "bad acting and worse music", "the film is fine"]
SECOND_TEXTS = ["I liked it", "the plot was fine and the acting was not bad at all, really not bad", "meh", "great",
                "awful", "fine film"]


def test_plain_text_perplexity_of_a_4bit_base(tiny, tmp_path, allocator_settings):
    folder = tiny.folder("llama", "causal-lm")
    texts = ["the movie was wonderful and the plot was okay", "a terrible film", "it is a story of the rain"]
    dataset = write_jsonl(tmp_path / "data", "test", [{"text": t} for t in texts])
    results = run_eval("--model", folder, "--dataset", dataset, "--task", "causal-lm", "--quant", "nf4",
                       "--max-length", 64)
    # no gradients: freed memory is kept for reuse as without --quant (train.py --quant maps instead)
    assert allocator_settings == [(allocator.M_MMAP_THRESHOLD, 1 << 30), (allocator.M_TRIM_THRESHOLD, 1 << 30)]

    reference = reference_model(folder, "llama", "causal-lm", "nf4")
    tok = load_model(folder, task="causal-lm")[1]
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok.encode(text)])
            total += reference(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert results["base"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.parametrize("cli", ["eval", "train"])
def test_help_explains_every_flag_and_states_each_default_once(cli, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(cli).parse_args(["--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", options)[1:]  # one per flag: "--name VALUE   help ..."
    assert len(entries) > 10
    for entry in entries:
        flag, *help_text = re.split(r"\s{2,}", entry.strip(), maxsplit=1)  # help follows 2+ spaces or a new line
        help_text = " ".join(" ".join(help_text).split())
        assert len(help_text) > 10, f"{flag}: no help text"
        assert help_text.count("(default:") <= 1 and "(default: None)" not in help_text, help_text


def test_a_missing_adapter_fails_before_any_evaluation(setup, tmp_path, monkeypatch):
    folder, _, dataset, adapters = setup
    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: pytest.fail("evaluated before every adapter was checked"))
    with pytest.raises(AdapterError, match=r"nowhere is not an adapter folder: it needs adapter_config.json and "
                                           r"adapter_model.safetensors"):
        run_eval("--model", folder, "--dataset", dataset, "--adapters", "base", adapters[0], tmp_path / "nowhere")


def test_columns_done_before_a_failing_adapter_are_printed(setup, tiny, tmp_path, capsys):
    """Each column's metrics are printed when it is done: an adapter that fails to load after minutes of
    evaluation (here one made for another model) no longer takes the finished columns with it."""
    folder, _, dataset, _ = setup
    other = load_model(tiny.folder("gpt2", "causal-lm"), task="causal-lm")[0]
    save_adapter(apply_lora(other, LoraConfig(r=4)), tmp_path / "other")
    base = run_eval("--model", folder, "--dataset", dataset, "--max-length", MAX_LENGTH)["base"]
    capsys.readouterr()
    with pytest.raises(AdapterError):
        run_eval("--model", folder, "--dataset", dataset, "--max-length", MAX_LENGTH, "--adapters", "base",
                 tmp_path / "other")
    assert capsys.readouterr().out.splitlines() == ["base: " + ", ".join(f"{k} {v:.4f}" for k, v in base.items())]


def test_a_run_folder_or_an_adapter_in_the_wrong_place_is_named(setup, tmp_path):
    """train.py's run folder passed as the adapter, or an adapter passed as the model: the error says what to
    pass instead (it said only that files were missing)."""
    folder, _, dataset, adapters = setup
    run = tmp_path / "run"
    shutil.copytree(adapters[0], run / "adapter")
    with pytest.raises(AdapterError, match=rf"^{re.escape(str(run))} is not an adapter folder: it needs "
                                           rf"adapter_config.json and adapter_model.safetensors; did you mean "
                                           rf"{re.escape(str(run / 'adapter'))}\?$"):
        run_eval("--model", folder, "--dataset", dataset, "--adapters", run)
    base = json.loads((adapters[0] / "adapter_config.json").read_text())["base_model_name_or_path"]
    with pytest.raises(LoadError, match=rf"^{re.escape(str(run / 'adapter'))} holds an adapter, not a model: pass its "
                                        rf"base model \({re.escape(base)}\) as the model and this folder as the "
                                        rf"adapter$"):
        run_eval("--model", run / "adapter", "--dataset", dataset)


@pytest.mark.parametrize("flag", ["--samples", "--max-length", "--batch-size", "--max-new-tokens", "--window",
                                  "--num-labels"])
def test_out_of_range_flags_are_usage_errors(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        eval_cli.parse_args(["--model", "x", "--dataset", "d", flag, "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {flag} must be positive, got 0")


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # "" is no token for GPT-2's tokenizer, one (<s>) for Llama's
def test_empty_texts_add_nothing_to_perplexity(tiny, tmp_path, family):
    """Plain-text corpora (wikitext) hold empty lines: they have no token to predict, so the perplexity is
    transformers' over the other texts; a split of empty texts only is a one-line error."""
    folder = tiny.folder(family, "causal-lm")
    texts = ["the movie was wonderful and the plot was okay", "", "a terrible film", ""]
    dataset = write_jsonl(tmp_path / "data", "test", [{"text": t} for t in texts])
    results = run_eval("--model", folder, "--dataset", dataset, "--task", "causal-lm", "--max-length", 64)
    reference, tok = load_hf(folder, family, "causal-lm"), load_model(folder, task="causal-lm")[1]
    total, count = 0.0, 0
    with torch.no_grad():
        for text in filter(None, texts):
            ids = torch.tensor([tok.encode(text)])
            total += reference(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert results["base"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    empty = write_jsonl(tmp_path / "empty", "test", [{"text": ""}] * 3)
    with pytest.raises(DataError, match=r"^none of the 3 texts has a token to predict \(are they empty\?\)$"):
        run_eval("--model", folder, "--dataset", empty, "--task", "causal-lm", "--max-length", 64)


def test_a_head_at_random_is_pointed_out(tiny, tmp_path, capsys):
    """The checkpoint has no classification head: its predictions are chance unless the adapter trained it."""
    from safetensors.torch import load_file, save_file

    folder = tiny.folder("distilbert", "base")
    for name in ("trained_head", "no_head"):
        save_adapter(apply_lora(load_model(folder, task="seq-cls")[0], LoraConfig(r=4)), tmp_path / name)
    # an adapter without the head (a classifier always trains it here, as in peft; other tools may not save it)
    weights = tmp_path / "no_head" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "classifier" not in k}, weights)
    config = json.loads((tmp_path / "no_head" / "adapter_config.json").read_text())
    (tmp_path / "no_head" / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": None}))
    notes = {}
    for entry in ("base", tmp_path / "trained_head", tmp_path / "no_head"):
        run_eval("--model", folder, "--adapters", entry, "--predict", "a wonderful film", "--max-length", 64)
        notes[str(entry)] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == {
        "base": ["note: base: no pre_classifier, classifier in the checkpoint; initialised at random, its predictions "
                 "are chance"],
        str(tmp_path / "trained_head"): [],
        str(tmp_path / "no_head"): ["note: no_head: no pre_classifier, classifier in the checkpoint or the adapter; "
                                    "initialised at random, its predictions are chance"]}


def test_a_checkpoint_head_for_other_labels_is_trained_afresh(tiny, tmp_path, capsys):
    """Fine-tuning a 3-label checkpoint on 2-label data: train.py starts the head fresh with a note (it used to
    stop on the shape of classifier.weight), and eval.py evaluates the adapter on the same test split to the
    same figures train.py reported, pointing out that the base's head is chance."""
    import train

    folder = tiny.folder("bert", "seq-cls")  # a classifier for 3 labels
    dataset = tmp_path / "data"
    write_jsonl(dataset, "train", keyword_rows(16))
    write_jsonl(dataset, "test", keyword_rows(8, seed=1))
    final = train.main(["--model", str(folder), "--dataset", str(dataset), "--output-dir", str(tmp_path / "run"),
                        "--max-length", "32", "--max-steps", "3", "--batch-size", "8"])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {folder}'s classifier is sized for another number of labels than the data's 2; it starts "
                     "at random"]
    results = run_eval("--model", folder, "--dataset", dataset, "--max-length", 32, "--adapters", "base",
                       tmp_path / "run" / "adapter")
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")] == [
        "note: base: the checkpoint's classifier is sized for another number of labels than 2; initialised at "
        "random, its predictions are chance"]
    for key in ("accuracy", "f1", "loss"):
        assert results["run"][key] == pytest.approx(final[key], abs=1e-6), key


def test_inputs_longer_than_the_positions_fail_first(tiny, tmp_path, monkeypatch):
    """--max-length (or the perplexity --window) plus a soft prompt's tokens must fit the model's 64 positions:
    one line naming the flags before any evaluation; it used to be a traceback from the forward of a long
    example. As long as they fit, the long example is evaluated."""
    folder = tiny.folder("gpt2", "causal-lm")
    prompt = PromptTuningModel(load_model(folder, task="causal-lm")[0]).add_prompt("default", 8)
    save_adapter(prompt, tmp_path / "prompt")
    dataset = write_jsonl(tmp_path / "data", "test", [{"text": "a long and winding review of a film " * 20}])
    with monkeypatch.context() as m:
        m.setattr(evaluation, "next_token_nll", lambda *a: pytest.fail("an evaluation ran first"))
        with pytest.raises(LoadError, match=r"^--max-length 100 exceeds .*gpt2-causal-lm's maximum of 64 positions$"):
            run_eval("--model", folder, "--dataset", dataset, "--task", "causal-lm", "--max-length", 100)
        with pytest.raises(LoadError, match=r"^--window 65 exceeds .*gpt2-causal-lm's maximum of 64 positions$"):
            run_eval("--model", folder, "--dataset", dataset, "--task", "causal-lm", "--window", 65)
        with pytest.raises(LoadError, match=r"^--max-length 57 \+ 8 virtual tokens of .*prompt exceeds .*maximum of 64 "
                                            r"positions$"):
            run_eval("--model", folder, "--dataset", dataset, "--max-length", 57, "--adapters", "base",
                     tmp_path / "prompt")
        with pytest.raises(LoadError, match=r"^--max-length 60 \+ 8 virtual tokens of .*prompt exceeds"):
            run_eval("--model", folder, "--predict", "a film", "--max-length", 60, "--adapters", tmp_path / "prompt")
    results = run_eval("--model", folder, "--dataset", dataset, "--max-length", 56, "--adapters", "base",
                       tmp_path / "prompt")
    assert set(results) == {"base", "prompt"} and all(math.isfinite(r["perplexity"]) for r in results.values())


def test_generation_that_would_run_past_the_positions_fails_first(tiny, tmp_path, monkeypatch):
    """Before generating (it used to fail with a traceback after max_new_tokens - 1 steps), and for --rouge before
    the perplexity pass; ROUGE's prompts are cut to --max-length like the training inputs, so --max-length +
    --max-new-tokens is what must fit."""
    folder = tiny.folder("gpt2", "causal-lm")
    with pytest.raises(LoadError, match=r"^\d+ prompt tokens \+ 70 new tokens exceed the model's maximum of 64 "
                                        r"positions$"):
        run_eval("--model", folder, "--generate", "a wonderful film", "--max-new-tokens", 70)
    rows = [{"question": "what is two and two, and why is it so? " * 4, "answer": "four"}] * 3
    dataset = write_jsonl(tmp_path / "data", "test", rows)
    with monkeypatch.context() as m:
        m.setattr(evaluation, "next_token_nll", lambda *a: pytest.fail("the perplexity pass ran first"))
        with pytest.raises(LoadError, match=r"^--rouge's longest prompt \(40 tokens\) \+ --max-new-tokens 30 exceeds "
                                            r".*gpt2-causal-lm's maximum of 64 positions$"):
            run_eval("--model", folder, "--dataset", dataset, "--rouge", "--max-length", 40, "--max-new-tokens", 30)
    result = run_eval("--model", folder, "--dataset", dataset, "--rouge", "--max-length", 40, "--max-new-tokens", 25)
    assert set(result["base"]) >= {"rouge1", "rouge2", "rougeL"}


def test_a_split_lacking_a_class_still_fits_the_adapters_head(tiny, setup, tmp_path, capsys):
    """The head has NUM_LABELS outputs; rows of labels 0 and 1 only (a --samples cut, say) used to build a 2-label
    model that the adapter did not fit. --predict takes the head's size from the adapter too."""
    folder, rows, _, adapters = setup
    some = [r for r in rows if r["label"] < NUM_LABELS - 1]
    dataset = write_jsonl(tmp_path / "some", "test", some)
    results = run_eval("--model", folder, "--dataset", dataset, "--max-length", MAX_LENGTH, "--adapters", adapters[0])
    logits = peft_logits(folder, adapters[0], [r["text"] for r in some])
    labels = torch.tensor([r["label"] for r in some])
    assert results[adapters[0].name]["accuracy"] == (logits.argmax(-1) == labels).sum().item() / len(some)
    capsys.readouterr()
    run_eval("--model", folder, "--adapters", adapters[0], "--max-length", MAX_LENGTH, "--predict", "a fine film")
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(printed[0]["probabilities"]) == NUM_LABELS
    two = load_model(tiny.folder("distilbert", "base"), task="seq-cls", num_labels=2)[0]  # same layers, 2 labels
    save_adapter(apply_lora(two, LoraConfig(r=4)), tmp_path / "two")
    with pytest.raises(AdapterError, match=r"^the adapters' classification heads have different numbers of labels: "
                                           r"\[2, 3\]$"):
        run_eval("--model", folder, "--dataset", dataset, "--adapters", adapters[0], tmp_path / "two")


def test_generate_label_on_a_split_of_one_class(tiny, tmp_path):
    """Two label words and rows of label 0 only: the labels are 0 and 1 (it used to say 2 words for 1 label)."""
    rows = [{"text": "a dull film", "label": 0}, {"text": "a tiresome story", "label": 0}]
    dataset = write_jsonl(tmp_path / "data", "test", rows)
    folder = tiny.folder("gpt2", "causal-lm")
    results = run_eval("--model", folder, "--dataset", dataset, "--task", "generate-label", "--label-words", "bad,good",
                       "--max-length", 64)
    # the reference: transformers' log-likelihood of " bad" + eos against " good" + eos after the prompt
    hf, tok = load_hf(folder, "gpt2", "causal-lm"), load_model(folder, task="causal-lm")[1]
    right = 0
    with torch.no_grad():
        for row in rows:
            prompt = tok.encode(data.LABEL_PROMPT.format(text=row["text"]))
            scores = []
            for word in ("bad", "good"):
                answer = tok.encode(" " + word, add_special_tokens=False) + [tok.eos_token_id]
                logp = hf(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
                scores.append(logp.gather(-1, torch.tensor(answer)[:, None]).sum().item())
            right += scores[0] > scores[1]
    assert results["base"]["accuracy"] == right / len(rows)


def test_labels_saved_by_train_map_a_split_of_named_labels(tiny, tmp_path, capsys):
    """train.py writes the head's labels (labels.json); eval.py maps a split through them, so a test split of
    "pos" rows only is scored against head output 1 (it used to build a 1-label model that did not fit)."""
    import train

    names = {0: "neg", 1: "pos"}
    rows = [{**r, "label": names[r["label"]]} for r in keyword_rows(16)]
    write_jsonl(tmp_path / "data", "train", rows)
    write_jsonl(tmp_path / "data", "validation", rows[:8])
    folder, out = tiny.folder("bert", "base"), tmp_path / "out"
    train.main(["--model", str(folder), "--dataset", str(tmp_path / "data"), "--output-dir", str(out),
                "--max-steps", "2", "--batch-size", "8", "--max-length", str(MAX_LENGTH)])
    assert json.loads((out / "adapter" / "labels.json").read_text()) == {"labels": ["neg", "pos"]}
    positive = [r for r in rows if r["label"] == "pos"]
    dataset = write_jsonl(tmp_path / "pos", "test", positive)
    capsys.readouterr()
    run_eval("--model", folder, "--adapters", out / "adapter", "--max-length", MAX_LENGTH, "--predict",
             *[r["text"] for r in positive])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert all(p["labels"] == ["neg", "pos"] for p in printed)
    expected = sum(p["probabilities"][1] > p["probabilities"][0] for p in printed) / len(printed)
    results = run_eval("--model", folder, "--dataset", dataset, "--max-length", MAX_LENGTH, "--adapters",
                       out / "adapter")
    assert results["out"]["accuracy"] == expected  # the column is named by the run folder
    unknown = write_jsonl(tmp_path / "unknown", "test", [{"text": "so so", "label": "meh"}])
    with pytest.raises(DataError, match=r"label 'meh' is out of range \(expected one of \['neg', 'pos'\]\)"):
        run_eval("--model", folder, "--dataset", unknown, "--max-length", MAX_LENGTH, "--adapters", out / "adapter")


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # "" is no token for GPT-2's tokenizer, one (<s>) for Llama's
def test_an_empty_prompt_has_nothing_to_continue(tiny, family, monkeypatch, capsys):
    """A prompt of no tokens used to fail inside generate with an IndexError; now one line before the model loads.
    A tokenizer that prepends a BOS token gives "" a token, and generation continues from it."""
    folder = tiny.folder(family, "causal-lm")
    if family == "llama":
        assert run_eval("--model", folder, "--generate", "", "--max-new-tokens", 3)[0]["prompt"] == ""
        return
    with monkeypatch.context() as m:
        m.setattr(eval_cli, "load_variant", lambda *a: pytest.fail("the model was loaded first"))
        with pytest.raises(DataError, match=r"^--generate prompt '' has no tokens: an empty prompt has nothing to "
                                            r"continue$"):
            run_eval("--model", folder, "--generate", "a film", "", "--max-new-tokens", 3)


def test_predict_and_generate_write_json(setup, tiny, tmp_path, capsys):
    """--json used to be written by the table mode only: --predict writes each text's probabilities (every digit;
    the printed lines round them), --generate each prompt with its continuation."""
    folder, _, _, adapters = setup
    texts = ["a wonderful film", "terrible plot and it was okay"]
    results = run_eval("--model", folder, "--adapters", adapters[0], "--max-length", MAX_LENGTH, "--predict", *texts,
                       "--json", tmp_path / "predict.json")
    assert json.loads((tmp_path / "predict.json").read_text()) == results
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["text"] for r in results] == texts and len(results[0]["probabilities"]) == NUM_LABELS
    for r, p in zip(results, printed):
        assert p["probabilities"] == [round(x, 4) for x in r["probabilities"]]
        torch.testing.assert_close(torch.tensor(r["probabilities"]), torch.tensor(p["probabilities"]), rtol=0,
                                   atol=5e-5)
    prompts = ["the movie was", "a terrible"]
    results = run_eval("--model", tiny.folder("gpt2", "causal-lm"), "--generate", *prompts, "--max-new-tokens", 4,
                       "--json", tmp_path / "generate.json")
    assert json.loads((tmp_path / "generate.json").read_text()) == results
    assert [r["prompt"] for r in results] == prompts
    assert capsys.readouterr().out.splitlines() == [f"{r['prompt']!r} -> {r['generated']!r}" for r in results]


@pytest.mark.parametrize("where", ["missing folder", "a folder"])
def test_a_json_path_that_cannot_be_written_fails_first(setup, tmp_path, monkeypatch, capsys, where):
    """--json in a folder that does not exist, or naming a folder, used to fail with an errno message after the
    whole evaluation."""
    folder, _, dataset, _ = setup
    path = tmp_path / "nowhere" / "x.json" if where == "missing folder" else tmp_path
    monkeypatch.setattr(eval_cli, "resolve", lambda *a: pytest.fail("the model was looked up first"))
    with pytest.raises(SystemExit):
        run_eval("--model", folder, "--dataset", dataset, "--json", path)
    expected = (f"error: --json {path}: {path.parent} is not an existing folder" if where == "missing folder" else
                f"error: --json {path} is a folder; give the path of a file to write")
    assert capsys.readouterr().err.strip().endswith(expected)


def test_an_encoder_cannot_generate(tiny, tmp_path):
    """The message used to be the loader's "task 'causal-lm' is not available for BERT; use 'base' or 'seq-cls'",
    naming tasks the CLI does not have; it now says what train.py says."""
    folder = tiny.folder("bert", "base")
    with pytest.raises(LoadError, match=r"^--generate needs a decoder; .*bert-base is a bert encoder$"):
        run_eval("--model", folder, "--generate", "hello")
    dataset = write_jsonl(tmp_path / "data", "test", keyword_rows(4))
    with pytest.raises(LoadError, match=r"^task generate-label needs a decoder; .*bert-base is a bert encoder "
                                        r"\(use --task seq-cls\)$"):
        run_eval("--model", folder, "--dataset", dataset, "--task", "generate-label", "--max-length", MAX_LENGTH)


def test_a_sequence_classification_adapter_cannot_generate(tiny, tmp_path):
    """It used to fail on its head: "tensor score.weight has no place in this model (wrong base model or
    targets?)"."""
    folder = tiny.folder("gpt2", "causal-lm")
    model = load_model(folder, task="seq-cls", num_labels=2)[0]
    save_adapter(apply_lora(model, LoraConfig(r=4)), tmp_path / "cls")
    message = rf"^{re.escape(str(tmp_path / 'cls'))} is a sequence-classification adapter \(task_type SEQ_CLS in " \
              r"its adapter_config.json\) and cannot generate"
    with pytest.raises(AdapterError, match=message + "$"):
        run_eval("--model", folder, "--adapters", tmp_path / "cls", "--generate", "hello", "--max-new-tokens", 3)
    dataset = write_jsonl(tmp_path / "data", "test", keyword_rows(4))
    with pytest.raises(AdapterError, match=message + "; task generate-label needs a causal-LM adapter$"):
        run_eval("--model", folder, "--dataset", dataset, "--task", "generate-label", "--max-length", 64,
                 "--adapters", "base", tmp_path / "cls")


@pytest.mark.parametrize("argv, message", [
    (["--predict", "x", "--dataset", "d"], "--dataset does not apply to --predict"),
    (["--generate", "x", "--rouge", "--window", "8", "--split", "s", "--task", "causal-lm", "--label-words", "a,b"],
     "--split, --task, --label-words, --rouge, --window do not apply to --generate"),
    (["--predict", "x", "--max-new-tokens", "5"], "--max-new-tokens does not apply to --predict"),
    (["--generate", "x", "--max-length", "16", "--batch-size", "4"],
     "--max-length, --batch-size do not apply to --generate"),
    (["--predict", "x", "--adapters", "base", "a"],
     "--predict runs one model: give --adapters one entry (base or an adapter folder), not 2"),
    (["--predict", "x", "--generate", "y"], "--predict and --generate are two modes; pass one of them")])
def test_flags_predict_and_generate_would_ignore_are_errors(argv, message, capsys):
    """They used to be ignored without a word (--predict with --generate: --predict)."""
    with pytest.raises(SystemExit) as exc:
        eval_cli.parse_args(["--model", "m", *argv])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")


def test_flags_left_at_their_defaults_are_not_errors():
    args = eval_cli.parse_args(["--model", "m", "--generate", "x", "--adapters", "base", "--label-words",
                                data.DEFAULT_LABEL_WORDS, "--max-length", "128", "--merge"])
    assert args.generate == ["x"]


def test_causal_lm_adapters_make_labelled_text_generate_label(tiny, tmp_path, capsys):
    """Without --task, labelled text was seq-cls whatever the adapter: a generate-label adapter (task_type
    CAUSAL_LM) then scored through a random classification head. Its task_type now makes the task generate-label."""
    folder = tiny.folder("gpt2", "causal-lm")
    adapter = random_adapter(folder, tmp_path / "clm", 0, task="causal-lm")
    dataset = write_jsonl(tmp_path / "data", "test", keyword_rows(8))
    common = ("--model", folder, "--dataset", dataset, "--max-length", 64, "--adapters", "base", adapter)
    inferred = run_eval(*common)
    assert "note: task generate-label, as the adapters are causal-LM ones (task_type CAUSAL_LM); pass --task to " \
           "choose another" in capsys.readouterr().err
    assert inferred == run_eval(*common, "--task", "generate-label")
    assert "loss" in run_eval("--model", folder, "--dataset", dataset, "--max-length", 64)["base"]  # seq-cls


def test_generate_label_adapters_keep_their_label_words(tiny, tmp_path):
    """train.py saves the words beside the adapter; eval.py scores them unless told others, which must match.
    It scored " negative"/" positive" without a word for an adapter trained on bad,excellent."""
    import train

    folder = tiny.folder("llama", "causal-lm")
    dataset = write_jsonl(tmp_path / "data", "train", keyword_rows(8))
    write_jsonl(tmp_path / "data", "test", keyword_rows(8, seed=1))
    out = tmp_path / "out"
    after = train.main(["--model", str(folder), "--dataset", str(dataset), "--task", "generate-label", "--label-words",
                        "bad,excellent", "--max-steps", "2", "--max-length", "32", "--output-dir", str(out)])
    assert json.loads((out / "adapter" / data.LABELS_FILE).read_text())["label_words"] == ["bad", "excellent"]
    common = ("--model", folder, "--dataset", dataset, "--split", "test", "--max-length", 32, "--adapters", out / "adapter")
    assert run_eval(*common)["out"] == run_eval(*common, "--label-words", "bad,excellent")["out"] == after
    with pytest.raises(DataError, match=r"^--label-words bad,good differs from the words the adapter was trained with: "
                                        r"bad,excellent$"):
        run_eval(*common, "--label-words", "bad,good")


def test_a_random_head_is_the_same_in_every_column(tiny, tmp_path):
    """The checkpoint has no classifier, so each entry's head is drawn at random: from the same seed for every
    entry (a second `base` column used to get other numbers than the first)."""
    dataset = write_jsonl(tmp_path / "data", "test", keyword_rows(24, 2, seed=4))
    results = run_eval("--model", tiny.folder("bert", "base"), "--dataset", dataset, "--max-length", MAX_LENGTH,
                       "--adapters", "base", "base")
    first, second = results.values()
    assert first == second


def test_generation_stops_at_the_generation_configs_eos_ids(tiny, tmp_path, capsys):
    """transformers' generate stops at generation_config.json's eos ids (Qwen2.5-Instruct lists two); only the
    tokenizer's eos used to stop ours, which then ran on past the other."""
    folder = tiny.copy("llama", "causal-lm", tmp_path / "llama")
    tok = Tokenizer.from_folder(folder, json.loads((folder / "config.json").read_text()))
    ids = tok(["a wonderful film"])["input_ids"]
    hf = load_hf(folder, "llama", "causal-lm")
    with torch.no_grad():
        plain = hf.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    stop = plain[3]  # a token greedy decoding reaches after a few steps
    assert stop not in plain[:3] and stop != tok.eos_token_id
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, stop]}))
    hf = load_hf(folder, "llama", "causal-lm")
    with torch.no_grad():
        ref = hf.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    assert ref.tolist() == plain[:4]  # transformers stopped at `stop`
    result = run_eval("--model", folder, "--generate", "a wonderful film", "--max-new-tokens", 12)
    assert result[0]["generated"] == tok.decode(ref)


def test_rouge_checks_every_column_before_the_first(tiny, tmp_path, monkeypatch):
    """--rouge's longest prompt + a soft prompt + --max-new-tokens past the positions: one line before any column
    is evaluated (the base column used to be evaluated in full first)."""
    folder = tiny.folder("gpt2", "causal-lm")
    prompt = PromptTuningModel(load_model(folder, task="causal-lm")[0]).add_prompt("default", 8)
    save_adapter(prompt, tmp_path / "prompt")
    rows = [{"question": "what is two and two, and why is it so? " * 4, "answer": "four"}] * 3
    dataset = write_jsonl(tmp_path / "data", "test", rows)
    monkeypatch.setattr(evaluation, "next_token_nll", lambda *a: pytest.fail("a column was evaluated first"))
    with pytest.raises(LoadError, match=r"^--rouge's longest prompt \(40 tokens\) \+ 8 virtual tokens of .*prompt \+ "
                                        r"--max-new-tokens 20 exceeds .*gpt2-causal-lm's maximum of 64 positions$"):
        run_eval("--model", folder, "--dataset", dataset, "--rouge", "--max-length", 40, "--max-new-tokens", 20,
                 "--adapters", "base", tmp_path / "prompt")


def test_rouge_on_an_empty_prompt_is_one_line(tiny, tmp_path):
    """GPT-2's tokenizer adds no BOS, so an empty prompt has no token to continue: generate failed with an
    IndexError (alone in its batch) or continued from padding (beside others)."""
    folder = tiny.folder("gpt2", "causal-lm")
    rows = [{"prompt": "a question", "completion": "an answer"}, {"prompt": "", "completion": "an answer"}]
    dataset = write_jsonl(tmp_path / "data", "test", rows)
    with pytest.raises(DataError, match=r"^row 1 of split 'test' has an empty prompt: --rouge has nothing to "
                                        r"generate from$"):
        run_eval("--model", folder, "--dataset", dataset, "--rouge", "--max-length", 32)


def test_the_labels_of_a_base_model_come_from_the_whole_split(tiny, tmp_path):
    """--samples cutting a sorted split to one class used to build a 1-output head: accuracy 1, loss 0."""
    rows = sorted(keyword_rows(12, 2, seed=3), key=lambda r: r["label"])
    dataset = write_jsonl(tmp_path / "sorted", "test", rows)
    folder = tiny.folder("distilbert", "base")
    cut = run_eval("--model", folder, "--dataset", dataset, "--samples", 4, "--max-length", MAX_LENGTH)["base"]
    # the reference: the same seeded 2-label head through --predict, its probabilities scored by hand
    predicted = run_eval("--model", folder, "--num-labels", 2, "--max-length", MAX_LENGTH, "--predict",
                         *[r["text"] for r in rows[:4]])
    probs = torch.tensor([r["probabilities"] for r in predicted])
    labels = torch.tensor([r["label"] for r in rows[:4]])
    assert labels.tolist() == [0] * 4
    assert cut["accuracy"] == (probs.argmax(-1) == labels).float().mean().item()
    assert cut["loss"] == pytest.approx(F.nll_loss(probs.log(), labels).item(), abs=1e-5)


@pytest.mark.parametrize("rows,message", [
    ([{"text": "a", "label": 0}, {"text": "b", "label": 0}], r"^split 'test' has one label \(0\); a classifier needs "
                                                              r"two or more$"),
    ([{"text": "a", "label": "pos"}], r"^split 'test' has one label \('pos'\); a classifier needs two or more$"),
    ([{"text": "a", "label": -1}], r"^split 'test' has no labels: -1 marks a row without a label, as in GLUE's test "
                                   r"splits; use a labelled split$"),
])
def test_a_split_without_two_labels_is_one_line(tiny, tmp_path, rows, message):
    dataset = write_jsonl(tmp_path / "data", "test", rows)
    with pytest.raises(data.DataError, match=message):
        run_eval("--model", tiny.folder("distilbert", "base"), "--dataset", dataset, "--max-length", MAX_LENGTH)


def test_a_folder_without_test_validation_or_train_is_one_line(tiny, tmp_path):
    dataset = write_jsonl(tmp_path / "data", "reviews", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    with pytest.raises(data.DataError, match=r"^the dataset has no test, validation or train split \(it has "
                                             r"reviews\); pick one with --split$"):
        run_eval("--model", tiny.folder("distilbert", "base"), "--dataset", dataset, "--max-length", MAX_LENGTH)


def test_a_confidently_wrong_classifier_has_its_full_cross_entropy(tiny):
    """The loss was the NLL of probabilities floored at 1e-12, so no example counted more than 27.63."""
    model, tok = load_model(tiny.folder("gpt2", "seq-cls"), task="seq-cls", num_labels=NUM_LABELS)
    with torch.no_grad():
        model.score.weight.mul_(300)
    rows = keyword_rows(6, NUM_LABELS, seed=5)
    examples = data.encode(rows, "seq-cls", tok, MAX_LENGTH, list(range(NUM_LABELS)))
    result = evaluation.evaluate(model, examples, "seq-cls", tok, 4)
    batch = tok([r["text"] for r in rows], truncation=True, max_length=MAX_LENGTH)
    reference = load_hf(tiny.folder("gpt2", "seq-cls"), "gpt2", "seq-cls")
    with torch.no_grad():
        reference.score.weight.mul_(300)
        logits = reference(**batch).logits
    expected = F.cross_entropy(logits, torch.tensor([r["label"] for r in rows])).item()
    assert expected > 100
    assert result["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_perplexity_beyond_floats_is_inf(tiny, tmp_path):
    """exp of a mean NLL above 709.78 nats overflows: plain text raised OverflowError, pairs gave inf."""
    model, tok = load_model(tiny.folder("gpt2", "causal-lm"), task="causal-lm")
    with torch.no_grad():
        model.transformer.wte.weight.mul_(5000)  # the tied head: logits far beyond any softmax's range
    result = evaluation.perplexity_of_texts(model, tok, ["the movie was wonderful and the plot was okay"], 16, 8)
    assert result["loss"] > 710 and result["perplexity"] == math.inf


def test_a_window_of_one_token_is_one_line(tiny, tmp_path):
    dataset = write_jsonl(tmp_path / "data", "test", [{"text": "a terrible film"}])
    for flags in (("--window", 1), ("--max-length", 1)):
        with pytest.raises(DataError, match=r"^plain-text perplexity needs a window of 2 tokens or more; "
                                            rf"{flags[0]} is 1$"):
            run_eval("--model", tiny.folder("gpt2", "causal-lm"), "--dataset", dataset, "--task", "causal-lm", *flags)


def test_an_empty_text_without_special_tokens_is_one_line(tiny, tmp_path):
    """GPT-2 / Qwen2 tokenizers add no token, so "" is no input at all: alone in a batch it stopped on torch's
    dtype error, and in a batch it was scored from padding."""
    with pytest.raises(data.DataError, match=r"^a text is empty and this tokenizer adds no special token, so a "
                                             r"classifier has no token to read; leave empty texts out$"):
        run_eval("--model", tiny.folder("qwen2", "seq-cls"), "--predict", "a fine film", "", "--max-length", MAX_LENGTH)
    dataset = write_jsonl(tmp_path / "data", "test", [{"text": "", "label": 0}, {"text": "b", "label": 1}])
    with pytest.raises(data.DataError, match=r"^a text is empty"):
        run_eval("--model", tiny.folder("gpt2", "seq-cls"), "--dataset", dataset, "--max-length", MAX_LENGTH)
