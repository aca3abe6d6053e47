"""The evaluate CLI: lm (loss, perplexity, bits per byte against an independent computation), classify,
instruct (response loss, exact match), --json, and bad input."""
import json
import math

import numpy as np
import pytest
from test_finetune import EXAMPLES, TEXT, _spam_files, tiny_checkpoint

from tinygrad_llm import evaluate, finetune
from tinygrad_llm.checkpoint import load_model
from tinygrad_llm.tokenizer import BPETokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train(TEXT, vocab_size=300, special_tokens=["<|endoftext|>"])


def _json_line(capsys):
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1])


def test_lm_loss_perplexity_and_bits_per_byte(tmp_path, tokenizer, capsys):
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors", tokenizer, block_size=96)
    text = "the cat is here, and the rest of it: free cash now!\n" * 2
    (tmp_path / "t.txt").write_text(text)
    assert evaluate.main([f"--model={ckpt}", f"--data={tmp_path / 't.txt'}", "--task=lm", "--json"]) == 0
    result = _json_line(capsys)
    # independently: the text fits one window, so the loss is the model's own mean loss on ids[1:] given ids[:-1]
    ids = np.array(tokenizer.encode(text))
    assert len(ids) <= 97
    model, _ = load_model(ckpt)
    _, loss = model(ids[None, :-1], ids[None, 1:])
    predicted_bytes = len(tokenizer.decode(ids[1:].tolist()).encode("utf-8"))
    assert result["tokens"] == len(ids) - 1 and result["bytes"] == predicted_bytes
    assert abs(result["loss"] - loss.item()) < 1e-5
    assert abs(result["perplexity"] - math.exp(loss.item())) < 1e-3 * result["perplexity"]
    assert abs(result["bits_per_byte"] - loss.item() * (len(ids) - 1) / math.log(2) / predicted_bytes) < 1e-5


def test_lm_windows_cover_every_token_once(tmp_path, tokenizer, capsys):
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors", tokenizer, block_size=8)
    text = "to the shop and the cat is here " * 5
    (tmp_path / "t.txt").write_text(text)
    assert evaluate.main([f"--model={ckpt}", f"--data={tmp_path / 't.txt'}", "--task=lm", "--json"]) == 0
    result = _json_line(capsys)
    ids = np.array(tokenizer.encode(text))
    model, _ = load_model(ckpt)
    total = 0.0
    for s in range(0, len(ids) - 1, 8):   # windows of 8 predictions, each from its own start
        w = ids[s:s + 9]
        _, loss = model(w[None, :-1], w[None, 1:])
        total += loss.item() * (len(w) - 1)
    assert result["tokens"] == len(ids) - 1
    assert abs(result["loss"] - total / (len(ids) - 1)) < 1e-5


def test_classify_and_the_run_folder(tmp_path, tokenizer, capsys):
    base = tiny_checkpoint(tmp_path / "base.safetensors", tokenizer)
    train, val = _spam_files(tmp_path)
    out = tmp_path / "run"
    assert finetune.main(["classify", f"--init={base}", f"--train={train}", f"--val={val}", f"--out={out}", "--epochs=1"]) == 0
    capsys.readouterr()
    assert evaluate.main([f"--model={out}", f"--data={train}", "--task=classify", "--json"]) == 0
    result = _json_line(capsys)
    # the metrics follow from the confusion matrix: recompute them from the model's own predictions
    model, tok, _ = finetune.load_run(out)
    rows = finetune.read_labeled(train)
    idx, last = finetune.classification_batch([tok.encode(t) for _, t in rows], tok.special_tokens["<|endoftext|>"])
    preds = model(idx, last).numpy().argmax(-1)
    truth = np.array([["ham", "spam"].index(label) for label, _ in rows])
    assert result["accuracy"] == pytest.approx((preds == truth).mean())
    matrix = np.array(result["confusion"])
    assert matrix.sum() == len(rows) and matrix[1, 1] == ((preds == 1) & (truth == 1)).sum()
    spam = result["per_class"]["spam"]
    assert spam["recall"] == pytest.approx(matrix[1, 1] / matrix[1].sum())
    if matrix[:, 1].sum():
        assert spam["precision"] == pytest.approx(matrix[1, 1] / matrix[:, 1].sum())
    # bad input: unseen label, wrong task for the model
    (tmp_path / "eggs.tsv").write_text("eggs\thello\n")
    assert evaluate.main([f"--model={out}", f"--data={tmp_path / 'eggs.tsv'}", "--task=classify"]) == 1
    assert "not seen in training" in capsys.readouterr().err
    assert evaluate.main([f"--model={out}", f"--data={train}", "--task=lm"]) == 1
    assert "classifier" in capsys.readouterr().err
    assert evaluate.main([f"--model={base}", f"--data={train}", "--task=classify"]) == 1
    assert "needs a classifier" in capsys.readouterr().err


def test_instruct_response_loss_and_exact_match(tmp_path, tokenizer, capsys, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors", tokenizer)
    (tmp_path / "d.json").write_text(json.dumps(EXAMPLES[:2]))
    # exact match counts answers equal to the expected output after stripping: half of them here
    answers = iter([" hi\n", "not it"])
    monkeypatch.setattr(evaluate, "greedy_answer", lambda *a, **k: next(answers))
    assert evaluate.main([f"--model={ckpt}", f"--data={tmp_path / 'd.json'}", "--task=instruct", "--json"]) == 0
    result = _json_line(capsys)
    assert result["exact_match"] == 0.5
    model, _ = load_model(ckpt)
    x, y = finetune.instruction_batch(EXAMPLES[:2], tokenizer, max_length=96)
    _, loss = model(x, y)
    assert abs(result["loss"] - loss.item()) < 1e-5       # the mean over the response targets only


def test_bad_input(tmp_path, tokenizer, capsys):
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors", tokenizer)
    (tmp_path / "empty.txt").write_text("")
    cases = [([f"--model={tmp_path / 'nope'}", "--data=x", "--task=lm"], "no such file"),
             ([f"--model={ckpt}", f"--data={tmp_path / 'empty.txt'}", "--task=lm"], "is empty"),
             ([f"--model={ckpt}", f"--data={tmp_path / 'nope.txt'}", "--task=lm"], "no such file"),
             ([f"--model={ckpt}", f"--data={tmp_path / 'empty.txt'}", "--task=instruct"], "is empty"),
             ([f"--model={ckpt}", "--data", "x", "--task", "poem"], "invalid choice")]
    for argv, match in cases:
        assert evaluate.main(argv) != 0
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
