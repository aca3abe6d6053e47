"""Evaluate a model: `python -m tinygrad_llm.evaluate --model=PATH --data=FILE --task=lm|classify|instruct [--json]`.

PATH: a checkpoint of this project (.safetensors), a fine-tuning output folder (finetune.py; a LoRA run
is read with its base), or a Hugging Face folder where GPT.from_pretrained exists.

- lm: loss (nats per token), perplexity and bits per byte on a text file or on the val split of a folder
  prepared by data.prepare. The text is cut into consecutive windows of block_size + 1 tokens that overlap
  by one (each token after the first is predicted once, from the tokens before it in its window).
  Bits per byte = total loss / ln 2 / the UTF-8 bytes of the predicted tokens: comparable across tokenizers.
- classify: accuracy, per-class precision and recall, the confusion matrix (labels as in training).
- instruct: the mean loss over response tokens only (prompt masked; the <|endoftext|> counts), and the
  fraction of examples whose greedy answer equals the expected output exactly (both stripped).

--json prints one JSON object as the last line of stdout.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from . import functional as F
from .checkpoint import load_safetensors
from .finetune import (FORMAT, MODEL_NAME, InputError, _Parser, _positive_int, class_report, classify_eval,
                       confusion_matrix, encode, encode_texts, format_confusion, greedy_answer, instruct_eval,
                       exit_code, load_base, load_run, pad_id, read_instructions, read_labeled)
from .tensor import no_grad


def load_any(path):
    """(model, tokenizer, info) from a checkpoint, a fine-tuning folder or a Hugging Face folder.
    info["task"] is "classify" or "instruct" for fine-tuning outputs, "lm" otherwise."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"--model {path}: no such file or folder")
    finetuned = path / MODEL_NAME if path.is_dir() else path
    if finetuned.is_file():
        try:
            _, meta = load_safetensors(finetuned)
        except ValueError as e:
            raise InputError(str(e)) from None
        if meta.get("format") == FORMAT:
            return load_run(finetuned)
    model, tokenizer = load_base(path)
    model.eval()
    return model, tokenizer, {"task": "lm"}


def _text_tokens(data, model, tokenizer):
    """Token ids of the text to score: a text file, or the val split of a prepared data folder."""
    data = Path(data)
    if data.is_dir():
        meta_path = data / "meta.json"
        if not meta_path.is_file():
            raise InputError(f"{data} is a folder without meta.json (not a folder written by data.prepare)")
        meta = json.loads(meta_path.read_text())
        if meta["tokenizer"] != tokenizer.to_dict():
            raise InputError(f"{data} was tokenized with another tokenizer than the model's")
        ids = np.fromfile(data / "val.bin", dtype=meta["dtype"]).astype(np.int64)
    elif data.is_file():
        text = data.read_text(encoding="utf-8", errors="replace")
        if not text:
            raise InputError(f"{data} is empty")
        try:
            ids = np.asarray(encode(tokenizer, text), dtype=np.int64)
        except ValueError as e:
            raise InputError(f"{data}: {e}") from None
    else:
        raise InputError(f"--data {data}: no such file or folder")
    if ids.size < 2:
        raise InputError(f"{data} holds {ids.size} token(s); at least 2 are needed to score one")
    return ids


def _token_bytes(tokenizer, ids):
    """The UTF-8 byte count of the tokens `ids` (a byte-level token counts its own bytes)."""
    table = getattr(tokenizer, "_decoder", None)
    if table is not None:
        return sum(len(table[int(i)]) for i in ids)
    return len(tokenizer.decode(ids).encode("utf-8"))


@no_grad()
def evaluate_lm(model, tokenizer, ids, max_tokens=None, batch_size=8):
    """{"loss", "perplexity", "bits_per_byte", "tokens", "bytes"} over ids (int array)."""
    if max_tokens is not None:
        ids = ids[:max_tokens + 1]
    T = model.config.block_size
    windows = [ids[s:s + T + 1] for s in range(0, len(ids) - 1, T)]
    full = [w for w in windows if len(w) == T + 1]
    batches = [np.stack(full[i:i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w[None] for w in windows if len(w) != T + 1]      # the shorter last window, alone
    total, count = 0.0, 0
    for w in batches:
        logits, _ = model(w[:, :-1])
        total += F.cross_entropy(logits, w[:, 1:], reduction="sum").item()
        count += w.shape[0] * (w.shape[1] - 1)
    n_bytes = _token_bytes(tokenizer, ids[1:])
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
            "tokens": count, "bytes": n_bytes}


def evaluate_classify(model, tokenizer, info, path):
    rows = read_labeled(path)
    names = info["labels"]
    unseen = sorted({label for label, _ in rows} - set(names))
    if unseen:
        raise InputError(f"{path}: label(s) {unseen} were not seen in training (the model knows {names})")
    ids = {label: i for i, label in enumerate(names)}
    tokens = encode_texts(tokenizer, [t for _, t in rows], model.config.block_size, str(path))
    labels = np.array([ids[label] for label, _ in rows], dtype=np.int64)
    loss, acc, preds = classify_eval(model, tokens, labels, pad_id(tokenizer))
    matrix = confusion_matrix(labels, preds, len(names))
    return {"loss": loss, "accuracy": acc, "per_class": class_report(matrix, names), "confusion": matrix.tolist(),
            "labels": names, "examples": len(rows)}


def evaluate_instruct(model, tokenizer, path, max_new_tokens=None, show=3):
    examples = read_instructions(path)
    T = model.config.block_size
    loss = instruct_eval(model, examples, tokenizer, True, T)
    answers = [greedy_answer(model, tokenizer, e, max_new_tokens) for e in examples]
    exact = [a.strip() == e["output"].strip() for a, e in zip(answers, examples)]
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "exact_match": float(np.mean(exact)),
            "examples": len(examples),
            "samples": [{"instruction": e["instruction"], "input": e.get("input", ""), "expected": e["output"],
                         "answer": a} for e, a in list(zip(examples, answers))[:show]]}


def build_parser():
    p = _Parser(prog="python -m tinygrad_llm.evaluate", description=__doc__.splitlines()[0], allow_abbrev=False,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a checkpoint, a fine-tuning output folder or a Hugging Face folder")
    p.add_argument("--data", required=True, help="lm: a text file or prepared folder; classify: .csv/.tsv; instruct: .json")
    p.add_argument("--task", required=True, choices=("lm", "classify", "instruct"))
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--max_tokens", type=_positive_int, default=None, help="lm: score at most this many tokens")
    p.add_argument("--max_new_tokens", type=_positive_int, default=None, help="instruct: cap on each greedy answer")
    return p


def run(args):
    model, tokenizer, info = load_any(args.model)
    if args.task == "classify" and info["task"] != "classify":
        raise InputError(f"--task=classify needs a classifier (a classify fine-tuning output); {args.model} is a language model")
    if args.task in ("lm", "instruct") and info["task"] == "classify":
        raise InputError(f"--task={args.task} needs a language model; {args.model} is a classifier")
    if args.task == "lm":
        result = evaluate_lm(model, tokenizer, _text_tokens(args.data, model, tokenizer), args.max_tokens)
        print(f"loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | bits per byte "
              f"{result['bits_per_byte']:.4f} | {result['tokens']:,} tokens, {result['bytes']:,} bytes")
    elif args.task == "classify":
        result = evaluate_classify(model, tokenizer, info, args.data)
        print(f"accuracy {result['accuracy']:.4f} ({result['examples']} examples), loss {result['loss']:.4f}")
        for name, r in result["per_class"].items():
            print(f"  {name}: precision {r['precision']:.4f}, recall {r['recall']:.4f}, support {r['support']}")
        print(format_confusion(np.array(result["confusion"]), result["labels"]))
    else:
        result = evaluate_instruct(model, tokenizer, args.data, args.max_new_tokens)
        print(f"response loss {result['loss']:.4f} | exact match {result['exact_match']:.4f} ({result['examples']} examples)")
        for s in result["samples"]:
            print(f"### {s['instruction']} {s['input']}".rstrip() + f"\n  expected: {s['expected']}\n  answer:   {s['answer']}")
    return result


def main(argv=None):
    def run_and_print(args):
        result = run(args)
        if args.json:
            print(json.dumps(result))
    return exit_code(build_parser(), run_and_print, argv)


if __name__ == "__main__":
    sys.exit(main())
