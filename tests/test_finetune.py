"""Fine-tuning: instruction_batch's layout and loss (against torch), the classifier, data reading, the CLIs
(classify, instruct, LoRA, export) end to end on a tiny model, and bad input."""
import json

import numpy as np
import pytest
from oracle import torch

from tinygrad_llm import finetune
from tinygrad_llm.checkpoint import load_model, load_safetensors, save_checkpoint
from tinygrad_llm.finetune import GPTClassifier, classification_batch, instruction_batch
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.tensor import Tensor
from tinygrad_llm.tokenizer import BPETokenizer

EOT = "<|endoftext|>"
TEXT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request. "
        "Instruction Input Response spam ham free prize call now win cash the of and to ") * 3


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train(TEXT, vocab_size=300, special_tokens=[EOT])


def tiny_checkpoint(path, tokenizer, block_size=96, seed=0):
    config = GPTConfig(vocab_size=tokenizer.n_vocab, block_size=block_size, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config, rng=np.random.default_rng(seed))
    save_checkpoint(path, model, meta={"tokenizer": tokenizer.to_dict()})
    return path


EXAMPLES = [{"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Repeat the word.", "input": "spam", "output": "spam spam spam and ham"},
            {"instruction": "Win?", "input": "", "output": ""}]


# ---- instruction_batch -------------------------------------------------------------------------

def test_instruction_batch_layout(tokenizer):
    eot = tokenizer.special_tokens[EOT]
    x, y = instruction_batch(EXAMPLES, tokenizer)
    rows = []
    for e in EXAMPLES:   # built independently of the code under test: the Alpaca template spelled out
        prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                  f"request.\n\n### Instruction:\n{e['instruction']}" + (f"\n\n### Input:\n{e['input']}" if e["input"] else "")
                  + "\n\n### Response:\n")
        p = tokenizer.encode(prompt)
        rows.append((p, tokenizer.encode(e["output"]) + [eot]))
    T = max(len(p) + len(r) for p, r in rows)
    assert x.shape == y.shape == (3, T) and x.dtype.kind == y.dtype.kind == "i"
    for i, (p, r) in enumerate(rows):
        full = p + r + [eot] * (T + 1 - len(p) - len(r))
        np.testing.assert_array_equal(x[i], full[:T])                       # padded with the end-of-text id
        expected = np.array(full[1:T + 1])
        expected[:len(p) - 1] = -100                                        # the prompt is masked
        expected[len(p) + len(r) - 1:] = -100                               # padding after the first eot is masked
        np.testing.assert_array_equal(y[i], expected)
        trained = np.flatnonzero(y[i] != -100)
        assert trained.size == len(r) and np.all(np.diff(trained) == 1) and y[i, trained[-1]] == eot
    # without masking every target up to the first eot trains
    _, y_all = instruction_batch(EXAMPLES, tokenizer, mask_prompt=False)
    for i, (p, r) in enumerate(rows):
        assert (y_all[i] != -100).sum() == len(p) + len(r) - 1
    x8, y8 = instruction_batch(EXAMPLES, tokenizer, max_length=8)
    np.testing.assert_array_equal(x8, x[:, :8])
    np.testing.assert_array_equal(y8, y[:, :8])


def test_instruction_loss_equals_torch_cross_entropy_with_ignore_index(tokenizer):
    x, y = instruction_batch(EXAMPLES, tokenizer)
    config = GPTConfig(vocab_size=tokenizer.n_vocab, block_size=x.shape[1], n_layer=1, n_head=2, n_embd=16, dtype="float64")
    model = GPT(config, rng=np.random.default_rng(0))
    logits, loss = model(x, y)
    t_logits = torch.tensor(logits.numpy(), requires_grad=True)
    ref = torch.nn.functional.cross_entropy(t_logits.reshape(-1, config.vocab_size), torch.tensor(y).reshape(-1), ignore_index=-100)
    assert abs(loss.item() - ref.item()) < 1e-12
    ref.backward()
    leaf = Tensor(logits.numpy(), requires_grad=True)   # the gradient into the logits
    finetune.F.cross_entropy(leaf, y).backward()
    np.testing.assert_allclose(leaf.grad, t_logits.grad.numpy(), atol=1e-14)


def test_instruction_batch_needs_an_end_of_text_token():
    from tinygrad_llm.tokenizer import CharTokenizer
    with pytest.raises(ValueError, match="endoftext"):
        instruction_batch(EXAMPLES, CharTokenizer.from_text(TEXT + "#:\n?."))


# ---- the classifier ------------------------------------------------------------------------------

def test_classifier_reads_the_last_real_token_so_padding_changes_nothing(tokenizer):
    config = GPTConfig(vocab_size=tokenizer.n_vocab, block_size=32, n_layer=2, n_head=2, n_embd=16, dtype="float64")
    model = GPTClassifier(config, n_classes=3, rng=np.random.default_rng(0))
    lists = [tokenizer.encode("free prize"), tokenizer.encode("call now and win cash"), tokenizer.encode("ham")]
    idx, last = classification_batch(lists, pad=tokenizer.special_tokens[EOT])
    assert idx.shape == (3, max(map(len, lists))) and last.tolist() == [len(t) - 1 for t in lists]
    batched = model(idx, last).numpy()
    assert batched.shape == (3, 3)
    for i, t in enumerate(lists):
        alone = model(np.array([t]), np.array([len(t) - 1])).numpy()
        np.testing.assert_allclose(batched[i], alone[0], atol=1e-12)
    # the same features as GPT's final hidden state, times the head
    h = model.hidden_states(idx).numpy()[np.arange(3), last]
    np.testing.assert_allclose(batched, h @ model.score.weight.numpy() + model.score.bias.numpy(), atol=1e-12)
    assert {n for n, _ in model.named_parameters()} >= {"score.weight", "score.bias", "transformer.wte.weight"}
    assert not any(n.startswith("lm_head") for n, _ in model.named_parameters())


def test_set_trainable(tokenizer):
    config = GPTConfig(vocab_size=tokenizer.n_vocab, block_size=16, n_layer=3, n_head=2, n_embd=8)
    model = GPTClassifier(config, 2)
    finetune.set_trainable(model, "last:1")
    names = {n for n, _ in model.named_parameters()}
    assert names == {"score.weight", "score.bias", "transformer.ln_f.weight", "transformer.ln_f.bias"} | {
        n for n in finetune.all_tensors(model) if n.startswith("transformer.h.2.")}
    finetune.set_trainable(model, "head")
    assert {n for n, _ in model.named_parameters()} == {"score.weight", "score.bias"}
    finetune.set_trainable(model, "all")
    assert len(model.parameters()) == len(finetune.all_tensors(model))


# ---- reading labelled data ------------------------------------------------------------------------

def test_read_labeled_formats(tmp_path):
    (tmp_path / "a.tsv").write_text("ham\thello there\nspam\tWIN a prize, now\n\n")
    (tmp_path / "b.csv").write_text('id,text,label\n1,"hello, there",ham\n2,"WIN ""now""",spam\n')
    (tmp_path / "c.tsv").write_text("text\tlabel\nhello\tham\n")
    assert finetune.read_labeled(tmp_path / "a.tsv") == [("ham", "hello there"), ("spam", "WIN a prize, now")]
    assert finetune.read_labeled(tmp_path / "b.csv") == [("ham", "hello, there"), ("spam", 'WIN "now"')]
    assert finetune.read_labeled(tmp_path / "c.tsv") == [("ham", "hello")]


@pytest.mark.parametrize("content, match", [
    ("", "is empty"), ("  \n", "is empty"), ("label,text\n", "no examples"), ("ham hello\n", "no tab"),
    ("\thello\n", "empty label"), ("ham\t \n", "empty text")])
def test_read_labeled_bad_files(tmp_path, content, match):
    path = tmp_path / ("x.csv" if content.startswith("label,") else "x.tsv")
    path.write_text(content)
    with pytest.raises(finetune.InputError, match=match):
        finetune.read_labeled(path)


def test_read_labeled_missing_columns(tmp_path):
    (tmp_path / "x.csv").write_text("category,text\nham,hi\n")
    with pytest.raises(finetune.InputError, match="'label' and 'text'"):
        finetune.read_labeled(tmp_path / "x.csv")


def test_balance_downsamples_to_the_rarest_class():
    rows = [("ham", str(i)) for i in range(10)] + [("spam", str(i)) for i in range(3)]
    out = finetune.balance(rows, np.random.default_rng(0))
    assert sorted(label for label, _ in out) == ["ham"] * 3 + ["spam"] * 3


# ---- the CLIs end to end ------------------------------------------------------------------------

def _spam_files(tmp_path):
    rng = np.random.default_rng(0)
    ham = ["see you at home", "ok thanks", "the cat is here", "call me later", "and the rest of it", "to the shop"]
    spam = ["WIN free cash now", "free prize call now", "win a prize now", "cash prize free", "call now to win", "free win"]
    rows = [("ham", t) for t in ham] + [("spam", t) for t in spam]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    (tmp_path / "train.tsv").write_text("".join(f"{l}\t{t}\n" for l, t in rows))
    (tmp_path / "val.tsv").write_text("label\ttext\nham\tok see you\nspam\tfree cash\n")
    return tmp_path / "train.tsv", tmp_path / "val.tsv"


def test_classify_cli_full_then_lora_then_export(tmp_path, tokenizer, capsys):
    base = tiny_checkpoint(tmp_path / "base.safetensors", tokenizer)
    train, val = _spam_files(tmp_path)
    out = tmp_path / "full"
    assert finetune.main(["classify", "--init", str(base), f"--train={train}", "--val", str(val), f"--test={val}",
                          f"--out={out}", "--epochs=2", "--batch_size", "4", "--lr=1e-3"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "epoch" in r] == [1, 2]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(records[0])
    results = json.loads((out / "results.json").read_text())
    assert results["labels"] == ["ham", "spam"] and np.array(results["test"]["confusion"]).sum() == 2
    assert "confusion matrix" in capsys.readouterr().out
    model, _, info = finetune.load_run(out)
    assert isinstance(model, GPTClassifier) and info["labels"] == ["ham", "spam"]

    lora = tmp_path / "lora"
    assert finetune.main(["classify", f"--init={base}", f"--train={train}", f"--val={val}", f"--out={lora}",
                          "--epochs=2", "--batch_size=4", "--lr=1e-2", "--lora_rank=2", "--lora_alpha=4"]) == 0
    arrays, meta = load_safetensors(lora / "model.safetensors")
    assert set(arrays) == {"score.weight", "score.bias"} | {n for n in arrays if n.endswith((".lora_A", ".lora_B"))}
    assert len(arrays) == 2 + 2 * 4                          # the head and one block's 4 adapted linears
    assert json.loads(meta["base"])["path"] == str(base.resolve())
    adapted, tok, _ = finetune.load_run(lora)
    lists = [tok.encode(t) for t in ("free prize", "see you at home now")]
    idx, last = classification_batch(lists, 0)
    before = adapted(idx, last).numpy()
    assert finetune.main(["export", f"--run={lora}", f"--out={tmp_path / 'merged.safetensors'}"]) == 0
    merged, _, info = finetune.load_run(tmp_path / "merged.safetensors")
    assert info["lora"] is None and not finetune.lora_modules(merged)
    np.testing.assert_allclose(merged(idx, last).numpy(), before, atol=1e-5)


def test_instruct_cli_full_and_lora_and_export(tmp_path, tokenizer):
    base = tiny_checkpoint(tmp_path / "base.safetensors", tokenizer)
    (tmp_path / "train.json").write_text(json.dumps(EXAMPLES * 2))
    (tmp_path / "val.json").write_text(json.dumps(EXAMPLES[:2]))
    # lora_emb: adapters on the token and position tables too; the LM head is tied to the token table
    for name, extra in (("full", []), ("lora", ["--lora_rank=2"]), ("lora_emb", ["--lora_rank=2", "--lora_targets=c_fc,wte,wpe"])):
        out = tmp_path / name
        assert finetune.main(["instruct", f"--init={base}", f"--data={tmp_path / 'train.json'}", f"--val={tmp_path / 'val.json'}",
                              f"--out={out}", "--epochs=2", "--batch_size=2", "--max_new_tokens=4"] + extra) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["val_loss"] > 0 and len(results["samples"]) == 2
    arrays, _ = load_safetensors(tmp_path / "lora_emb" / "model.safetensors")
    assert {"transformer.wte.lora_A", "transformer.wte.lora_B", "transformer.wpe.lora_A", "transformer.wpe.lora_B"} <= set(arrays)
    assert np.abs(arrays["transformer.wte.lora_B"]).max() > 0          # the table's adapter trained
    for name in ("lora", "lora_emb"):
        export = tmp_path / f"merged_{name}.safetensors"
        assert finetune.main(["export", f"--run={tmp_path / name}", f"--out={export}"]) == 0
        model, meta = load_model(export)                   # a checkpoint of this project: sample.py reads it
        adapted, tok, _ = finetune.load_run(tmp_path / name)
        x, _ = instruction_batch(EXAMPLES, tok, max_length=96)
        np.testing.assert_allclose(model(x)[0].numpy(), adapted(x)[0].numpy(), atol=1e-5)
        assert meta["tokenizer"] == tok.to_dict()


# ---- bad input: one line on stderr, non-zero exit, nothing written ------------------------------

def _fails(argv, capsys, match, out):
    code = finetune.main(argv)
    err = capsys.readouterr().err
    assert code != 0 and match in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_classify_bad_input(tmp_path, tokenizer, capsys):
    base = tiny_checkpoint(tmp_path / "base.safetensors", tokenizer, block_size=16)
    train, val = _spam_files(tmp_path)
    out = tmp_path / "out"
    common = [f"--init={base}", f"--out={out}", "--epochs=1"]
    (tmp_path / "one.tsv").write_text("ham\thello\nham\tthere\n")
    (tmp_path / "unseen.tsv").write_text("ham\thello\neggs\tthere\n")
    (tmp_path / "empty.tsv").write_text("")
    (tmp_path / "cols.csv").write_text("kind,text\nham,hi\n")
    _fails(["classify", *common, f"--train={tmp_path / 'one.tsv'}", f"--val={val}"], capsys, "at least two classes", out)
    _fails(["classify", *common, f"--train={train}", f"--val={tmp_path / 'unseen.tsv'}"], capsys, "'eggs'", out)
    _fails(["classify", *common, f"--train={train}", f"--val={val}", f"--test={tmp_path / 'unseen.tsv'}"], capsys,
           "do not occur in the training data", out)
    _fails(["classify", *common, f"--train={tmp_path / 'empty.tsv'}", f"--val={val}"], capsys, "is empty", out)
    _fails(["classify", *common, f"--train={tmp_path / 'cols.csv'}", f"--val={val}"], capsys, "'label' and 'text'", out)
    _fails(["classify", *common, f"--train={tmp_path / 'nope.tsv'}", f"--val={val}"], capsys, "no such file", out)
    _fails(["classify", f"--init={tmp_path / 'nope.safetensors'}", f"--out={out}", f"--train={train}", f"--val={val}"],
           capsys, "no such file", out)
    _fails(["classify", *common, f"--train={train}", f"--val={val}", "--trainable=last:x"], capsys, "--trainable", out)
    _fails(["classify", *common, f"--train={train}", f"--val={val}", "--lora_rank=0"], capsys, "positive integer", out)
    _fails(["classify", *common, f"--train={train}", f"--val={val}", "--max_length=17"], capsys, "--max_length", out)
    _fails(["classify", *common, f"--train={train}", f"--val={val}", "--lora_norms=true"], capsys, "need --lora_rank", out)
    _fails(["classify", *common, f"--train={train}", f"--val={val}", "--lora_alpha=4"], capsys, "need --lora_rank", out)
    (tmp_path / "a_file").write_text("keep")
    _fails(["classify", f"--init={base}", f"--out={tmp_path / 'a_file'}", f"--train={train}", f"--val={val}"], capsys,
           "is a file; it must be a folder", tmp_path / "nothing")
    assert (tmp_path / "a_file").read_text() == "keep"
    _fails(["classify", *common, f"--train={train}"], capsys, "--val", out)


def test_texts_longer_than_the_context_are_truncated_with_a_warning(tmp_path, tokenizer, capsys):
    base = tiny_checkpoint(tmp_path / "base.safetensors", tokenizer, block_size=16)
    train, val = _spam_files(tmp_path)
    (tmp_path / "long.tsv").write_text("ham\t" + "the cat is here " * 20 + "\nspam\tfree\n")
    assert finetune.main(["classify", f"--init={base}", f"--out={tmp_path / 'o'}", f"--train={train}",
                          f"--val={tmp_path / 'long.tsv'}", "--epochs=1"]) == 0
    err = capsys.readouterr().err
    assert "1 of 2 texts" in err and "truncated to its first 16" in err


def test_instruct_bad_input(tmp_path, tokenizer, capsys):
    base = tiny_checkpoint(tmp_path / "base.safetensors", tokenizer)
    out = tmp_path / "out"
    cases = {"empty.json": ("", "is empty"), "notjson.json": ("[{", "not valid JSON"),
             "dict.json": ('{"instruction": "x"}', "JSON list"),
             "field.json": ('[{"instruction": "x", "input": ""}]', "missing field(s) ['output']"),
             "type.json": ('[{"instruction": "x", "output": 3}]', "must be a string")}
    for name, (content, match) in cases.items():
        (tmp_path / name).write_text(content)
        _fails(["instruct", f"--init={base}", f"--data={tmp_path / name}", f"--out={out}"], capsys, match, out)
    (tmp_path / "ok.json").write_text(json.dumps(EXAMPLES))
    _fails(["instruct", f"--init={base}", f"--data={tmp_path / 'ok.json'}", f"--val={tmp_path / 'field.json'}",
            f"--out={out}"], capsys, "missing field", out)
    _fails(["instruct", f"--init={base}", f"--data={tmp_path / 'ok.json'}", f"--out={out}", "--mask_prompt=maybe"],
           capsys, "true or false", out)
    for trainable in ("last:x", "last:0", "garbage", "head"):
        _fails(["instruct", f"--init={base}", f"--data={tmp_path / 'ok.json'}", f"--out={out}", f"--trainable={trainable}"],
               capsys, "--trainable", out)
    _fails(["instruct", f"--init={base}", f"--data={tmp_path / 'ok.json'}", f"--out={out}", "--lora_rank=2",
            "--lora_alpha=0"], capsys, "--lora_alpha", out)


def test_a_hugging_face_folder_as_the_base_through_from_pretrained(tmp_path, tokenizer):
    from tinygrad_llm import evaluate
    model = GPT(GPTConfig(vocab_size=tokenizer.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=16))
    model.save_pretrained(tmp_path / "hf", tokenizer=tokenizer)        # holds a model.safetensors of its own
    train, val = _spam_files(tmp_path)
    out = tmp_path / "run"
    assert finetune.main(["classify", f"--init={tmp_path / 'hf'}", f"--train={train}", f"--val={val}", f"--out={out}",
                          "--epochs=1", "--lora_rank=2"]) == 0
    assert json.loads(load_safetensors(out / "model.safetensors")[1]["base"])["path"] == str((tmp_path / "hf").resolve())
    assert evaluate.main([f"--model={out}", f"--data={val}", "--task=classify"]) == 0
    (tmp_path / "hf" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text() + " ")
    with pytest.raises(finetune.InputError, match="has changed"):
        finetune.load_run(out)


# ---- LoRA with the norms trained, the learning-rate schedule -------------------------------------

def test_lora_norms_train_are_saved_and_export_merges_them(tmp_path, tokenizer):
    base = tiny_checkpoint(tmp_path / "base.safetensors", tokenizer)
    train, val = _spam_files(tmp_path)
    run = tmp_path / "lora"
    assert finetune.main(["classify", f"--init={base}", f"--train={train}", f"--val={val}", f"--out={run}",
                          "--epochs=2", "--batch_size=4", "--lr=1e-2", "--lora_rank=2", "--lora_norms=true"]) == 0
    arrays, meta = load_safetensors(run / "model.safetensors")
    norms = {n for n in arrays if ".ln_" in n}
    assert norms == {f"transformer.{m}.{p}" for m in ("h.0.ln_1", "h.0.ln_2", "ln_f") for p in ("weight", "bias")}
    assert json.loads(meta["lora"])["norms"] is True
    base_model, _ = load_model(base)
    assert not np.array_equal(arrays["transformer.ln_f.weight"], base_model.transformer.ln_f.weight.numpy())  # trained
    adapted, tok, _ = finetune.load_run(run)
    np.testing.assert_array_equal(adapted.transformer.ln_f.weight.numpy(), arrays["transformer.ln_f.weight"])
    idx, last = classification_batch([tok.encode(t) for t in ("free prize", "see you at home now")], 0)
    assert finetune.main(["export", f"--run={run}", f"--out={tmp_path / 'merged.safetensors'}"]) == 0
    merged, _, _ = finetune.load_run(tmp_path / "merged.safetensors")
    np.testing.assert_allclose(merged(idx, last).numpy(), adapted(idx, last).numpy(), atol=1e-5)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_sets_the_optimizer_rate_each_step(tmp_path, tokenizer, monkeypatch, schedule):
    base = tiny_checkpoint(tmp_path / "base.safetensors", tokenizer)
    train, val = _spam_files(tmp_path)                     # 12 training texts: 3 steps of 4 per epoch
    seen, step = [], finetune._step
    monkeypatch.setattr(finetune, "_step", lambda model, opt, loss, clip, lr: (step(model, opt, loss, clip, lr),
                                                                               seen.append(opt.lr)))
    assert finetune.main(["classify", f"--init={base}", f"--train={train}", f"--val={val}", f"--out={tmp_path / 'o'}",
                          "--epochs=20", "--batch_size=4", "--lr=1e-2", f"--lr_schedule={schedule}"]) == 0
    assert len(seen) == 60
    if schedule == "constant":
        assert seen == [1e-2] * 60
    else:   # warm-up over the first 5% (3 steps), then a cosine from 1e-2 down to 1e-3 at step 60
        np.testing.assert_allclose(seen[:3], [1e-2 / 3, 2e-2 / 3, 1e-2])
        np.testing.assert_allclose(seen[31], 1e-3 + 0.5 * (1 + np.cos(np.pi * 28 / 57)) * 9e-3)
        assert seen[2] == pytest.approx(seen[3]) and all(a > b for a, b in zip(seen[3:], seen[4:])) and 1e-3 < seen[-1] < 1.01e-3


@pytest.mark.slow
def test_the_worked_example_runs_end_to_end_in_its_smoke_size(tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("example_finetune", Path(__file__).parents[1] / "examples" / "finetune.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--smoke", f"--root={tmp_path}"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| spam |", "| instruct |"))]
    assert len(rows) == 8
    for task, n in (("spam", 20), ("instruct", 4)):
        for init in ("pretrained", "random"):
            for mode in ("full", "lora"):
                result = json.loads((tmp_path / "runs" / f"{task}_{init}_{mode}" / "test.json").read_text())
                assert result["examples"] == n
                assert 0 <= result.get("accuracy", result.get("exact_match")) <= 1 and result["loss"] > 0


@pytest.mark.slow
def test_the_cross_validation_example_folds_never_read_the_test_split(tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    examples = Path(__file__).parents[1] / "examples"
    loaded = {}
    for name in ("finetune", "finetune_cv"):
        spec = importlib.util.spec_from_file_location(f"example_{name}", examples / f"{name}.py")
        loaded[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded[name])
    loaded["finetune"].main(["--smoke", f"--root={tmp_path}", "--steps=data,pretrain"])
    (tmp_path / "spam" / "test.tsv").unlink()                      # the folds must not need it
    loaded["finetune_cv"].main([f"--root={tmp_path}", "--tag=t", "--folds=3", "--probe_full_tables=wte", "--",
                                "--epochs=2", "--lora_rank=2", "--lora_targets=c_fc,wpe"])
    out = capsys.readouterr().out
    rows = (tmp_path / "spam" / "train.tsv").read_text().splitlines() + (tmp_path / "spam" / "val.tsv").read_text().splitlines()
    assert len(rows) == 80                                         # the smoke size: 70% + 10% of 100 messages
    pooled = [line for line in out.splitlines() if "cross-validated accuracy at the last epoch" in line]
    assert len(pooled) == 1 and pooled[0].endswith("over 80 messages")
    folds = tmp_path / "cv" / "t"
    held = [set((folds / f"held{k}.tsv").read_text().splitlines()) for k in range(3)]
    train = [set((folds / f"train{k}.tsv").read_text().splitlines()) for k in range(3)]
    assert sum(len(h) for h in held) == len(rows) and all(not (h & t) for h, t in zip(held, train))
    arrays, _ = load_safetensors(folds / "fold0" / "model.safetensors")
    assert "transformer.wte.weight" in arrays and "transformer.wpe.lora_A" in arrays   # the probe trained the table
