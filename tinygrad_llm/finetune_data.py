"""Fine-tuning data: labelled texts and Alpaca-style instructions read and checked, tokens, batches.

    rows = read_labeled("train.tsv")                     # [(label, text)] from .csv/.tsv or label<TAB>text lines
    inputs, targets = instruction_batch(examples, tokenizer, mask_prompt=True)   # (B, T) each, -100 masked

Used by finetune.py (the CLIs) and evaluate.py; every reader raises InputError naming the file and the problem.
"""
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np

from .model import IGNORE_INDEX
from .tokenizer import BPETokenizer

END_OF_TEXT = "<|endoftext|>"


class InputError(ValueError):
    """A user's input (a file, an option) is wrong; the message says which and why."""


# ---- reading data -------------------------------------------------------------------------------

def read_labeled(path):
    """[(label, text)] from a .csv/.tsv with a header holding `label` and `text`, or a headerless label<TAB>text file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e})") from None
    if not content.strip():
        raise InputError(f"{path} is empty")
    lines = content.splitlines()
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    first = [c.strip().lower() for c in next(csv.reader([lines[0]], delimiter=delimiter))]
    rows = []
    if path.suffix.lower() == ".csv" or ("label" in first and "text" in first):
        if not ("label" in first and "text" in first):
            raise InputError(f"{path}: the header row needs columns 'label' and 'text', found {first}")
        reader = csv.reader(io.StringIO(content), delimiter=delimiter,
                            quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE)
        next(reader)
        li, ti = first.index("label"), first.index("text")
        for number, row in enumerate(reader, 2):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) <= max(li, ti):
                raise InputError(f"{path} line {number}: {len(row)} columns, the header has {len(first)}")
            rows.append((row[li].strip(), row[ti], number))
    else:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if "\t" not in line:
                raise InputError(f"{path} line {number}: no tab; expected label<TAB>text, or a header row "
                                 "with 'label' and 'text' columns")
            label, text = line.split("\t", 1)
            rows.append((label.strip(), text, number))
    if not rows:
        raise InputError(f"{path} holds a header but no examples")
    for label, text, number in rows:
        if not label:
            raise InputError(f"{path} line {number}: empty label")
        if not text.strip():
            raise InputError(f"{path} line {number}: empty text")
    return [(label, text) for label, text, _ in rows]


def balance(rows, rng):
    """Downsample every class to the size of the rarest one (rows kept in their order)."""
    labels = sorted({label for label, _ in rows})
    counts = {c: sum(1 for label, _ in rows if label == c) for c in labels}
    n = min(counts.values())
    keep = set()
    for c in labels:
        where = [i for i, (label, _) in enumerate(rows) if label == c]
        keep.update(rng.choice(where, size=n, replace=False).tolist())
    return [r for i, r in enumerate(rows) if i in keep]


def read_instructions(path):
    """The list of {"instruction", "input", "output"} dicts of an Alpaca-style JSON file, checked."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise InputError(f"{path} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a non-empty JSON list of {{instruction, input, output}} objects")
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise InputError(f"{path} item {i}: expected an object, got {type(e).__name__}")
        missing = [k for k in ("instruction", "output") if k not in e]
        if missing:
            raise InputError(f"{path} item {i}: missing field(s) {missing}")
        for k in ("instruction", "input", "output"):
            if not isinstance(e.get(k, ""), str):
                raise InputError(f"{path} item {i}: field {k!r} must be a string")
        if not e["instruction"].strip():
            raise InputError(f"{path} item {i}: empty instruction")
    return data


# ---- tokens -------------------------------------------------------------------------------------

def encode(tokenizer, text):
    """Ids of `text` as plain text (special-token strings in it are not special)."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.encode(text, disallowed_special=())
    return tokenizer.encode(text)


def pad_id(tokenizer):
    """The end-of-text id where the tokenizer has one, else 0."""
    return getattr(tokenizer, "special_tokens", {}).get(END_OF_TEXT, 0)


def eot_id(tokenizer):
    special = getattr(tokenizer, "special_tokens", {})
    if END_OF_TEXT not in special:
        raise InputError(f"instruction tuning needs a tokenizer with {END_OF_TEXT}; this model's has none "
                         "(train the base with a BPE tokenizer, e.g. --tokenizer bpe:512)")
    return special[END_OF_TEXT]


def encode_texts(tokenizer, texts, max_length, what):
    """Token lists, each cut to its first max_length ids; one warning on stderr counting the cut ones."""
    out, cut = [], 0
    for text in texts:
        try:
            ids = encode(tokenizer, text)
        except ValueError as e:
            raise InputError(f"{what}: {e}") from None
        if len(ids) > max_length:
            ids, cut = ids[:max_length], cut + 1
        out.append(ids)
    if cut:
        print(f"warning: {cut} of {len(texts)} texts in {what} are longer than {max_length} tokens; "
              f"each was truncated to its first {max_length}", file=sys.stderr)
    return out


def classification_batch(token_lists, pad):
    """(idx int (B, T) padded on the right with `pad`, last int (B,) the index of each row's last real token)."""
    T = max(len(t) for t in token_lists)
    idx = np.full((len(token_lists), T), pad, dtype=np.int64)
    for i, t in enumerate(token_lists):
        idx[i, :len(t)] = t
    return idx, np.array([len(t) - 1 for t in token_lists], dtype=np.int64)


ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")


def format_prompt(example):
    """The Alpaca template up to and including the response header (the part the model is given)."""
    text = f"{ALPACA_HEADER}\n\n### Instruction:\n{example['instruction']}"
    if example.get("input"):
        text += f"\n\n### Input:\n{example['input']}"
    return text + "\n\n### Response:\n"


def instruction_tokens(example, tokenizer):
    """(prompt ids, response ids + [<|endoftext|>]) of one example; the two parts are encoded apart."""
    return encode(tokenizer, format_prompt(example)), encode(tokenizer, example["output"]) + [eot_id(tokenizer)]


def instruction_batch(examples, tokenizer, mask_prompt=True, max_length=None):
    """(inputs, targets), int64 arrays (B, T), for instruction tuning.

    Row i is prompt + response + <|endoftext|>, padded on the right with the end-of-text id to the longest
    row; targets are the inputs shifted by one. With mask_prompt every target before the response is -100;
    the first <|endoftext|> after the response is a target and every later (padding) target is -100, so
    each row's trained targets are one run ending in <|endoftext|>. max_length cuts both to their first
    max_length columns.
    """
    eot = eot_id(tokenizer)
    if not examples:
        raise ValueError("instruction_batch: no examples")
    parts = [instruction_tokens(e, tokenizer) for e in examples]
    rows = [p + r for p, r in parts]
    T = max(len(r) for r in rows)
    padded = np.full((len(rows), T + 1), eot, dtype=np.int64)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    inputs, targets = padded[:, :-1].copy(), padded[:, 1:].copy()
    for i, ((prompt, _), r) in enumerate(zip(parts, rows)):
        targets[i, len(r) - 1:] = IGNORE_INDEX       # target j is token j+1: the eot at len(r)-1 is target len(r)-2
        if mask_prompt:
            targets[i, :len(prompt) - 1] = IGNORE_INDEX   # the first response token is target len(prompt)-1
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return inputs, targets
