"""Offline tokenization into .bin memmaps, and random training windows drawn from them.

    prepare("input.txt", "data/shakespeare_char")        # -> train.bin, val.bin, meta.json
    x, y = get_batch("data/shakespeare_char", "train", batch_size=12, block_size=64,
                     rng=np.random.default_rng(0))         # x, y: int64 (12, 64), y = x shifted by one

The .bin files are the bare token ids, uint16 when the vocabulary fits in 16 bits, else uint32;
meta.json says which, and holds the tokenizer so the ids can be decoded later.
"""
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .fileio import atomic_write
from .tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_dict

CHUNK_CHARS = 1 << 20  # characters read (and tokens copied) per step: this bounds prepare's memory
END_OF_TEXT = "<|endoftext|>"
# tiny Shakespeare, shipped in a checkout (examples/data/README.md says where it comes from); the default text
# of examples/train_shakespeare.py and the benchmarks. An installed copy of the package without the checkout lacks it.
SHAKESPEARE_TEXT = Path(__file__).resolve().parents[1] / "examples" / "data" / "tinyshakespeare.txt"


def read_blocks(path, chunk_chars=CHUNK_CHARS):
    """Yield the text of `path` in blocks of about `chunk_chars` characters.

    A block ends only at a newline with a non-whitespace character on both sides: with a tiny
    chunk_chars, "a\n b\nc" comes out as ["a\n b\n", "c"] (the first newline has a space after it).
    Why there: in both the GPT-2 and the GPT-4 split pattern such a newline ends a piece, the same
    piece whether or not the text goes on after it, and no piece looks behind; so encoding block by block
    gives exactly the ids of encoding the whole text at once. A block grows past chunk_chars only
    while no such newline comes (a file with "\r\n" line ends, or one long line, is read whole).
    """
    carry = ""
    with open(path, encoding="utf-8", newline="") as f:  # newline="": keep "\r\n" as in the file
        while block := f.read(chunk_chars):
            text = carry + block
            cut = _last_safe_cut(text)
            if cut:
                yield text[:cut]
            carry = text[cut:]
    if carry:
        yield carry


def _last_safe_cut(text):
    """Index just after the last newline with non-whitespace on both sides (0 if there is none)."""
    i = text.rfind("\n", 0, len(text) - 1)
    while i > 0:
        # str.isspace is a superset of the regex \s, so "not isspace" is always a \S character
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", 0, i)
    return 0


def check_tokenizer_spec(spec):
    """ValueError unless spec is "char", "bpe:N" (N >= 256) or the path of a file (a saved BPE tokenizer)."""
    if spec == "char" or (isinstance(spec, (str, Path)) and not str(spec).startswith("bpe:") and Path(spec).is_file()):
        return
    if isinstance(spec, str) and spec.startswith("bpe:"):
        n = spec[4:]
        if not (n.isdigit() and int(n) >= 256):
            raise ValueError(f"tokenizer {spec!r}: expected 'bpe:N' with N an integer >= 256 "
                             "(the 256 bytes, then the merges), e.g. 'bpe:512'")
        return
    raise ValueError(f"tokenizer must be 'char', 'bpe:N' or the path of a saved BPE tokenizer file; got {spec!r}")


def _text_blocks(path, chunk_chars, desc):
    """read_blocks with a progress bar over the file's bytes (on a terminal), and a clear error for a file
    that is not text: one that is not UTF-8, or holds NUL characters (a binary file that happens to decode)."""
    with tqdm(total=path.stat().st_size, desc=desc, unit="B", unit_scale=True, disable=None, leave=False) as bar:
        try:
            for block in read_blocks(path, chunk_chars):
                if "\x00" in block:
                    raise ValueError(f"{path} looks like a binary file, not text: it holds NUL characters")
                bar.update(len(block.encode("utf-8")))
                yield block
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason}: byte {e.object[e.start]:#04x}); "
                             "give a text file") from None


def _build_tokenizer(spec, input_path, chunk_chars):
    if spec == "char":
        chars = set()
        for block in _text_blocks(input_path, chunk_chars, "reading characters"):
            chars.update(block)
        return CharTokenizer(sorted(chars))
    if isinstance(spec, str) and spec.startswith("bpe:"):
        large = input_path.stat().st_size > 10 * CHUNK_CHARS  # show the merges' progress when training takes a while
        return BPETokenizer.train(_text_blocks(input_path, chunk_chars, "BPE: counting pieces"), int(spec[4:]),
                                  special_tokens=(END_OF_TEXT,), verbose=large)
    return BPETokenizer.load(spec)


def prepare(input_path, out_dir, tokenizer="char", val_fraction=0.1, chunk_chars=CHUNK_CHARS):
    """Tokenize a UTF-8 text file into out_dir/train.bin, val.bin and meta.json; returns the meta dict.

    tokenizer: "char" (one id per character seen in the file), "bpe:N" (train a byte-level BPE with
    N = 256 bytes + merges on this file, plus <|endoftext|> as id N), or the path of a tokenizer saved
    with BPETokenizer.save. Literal "<|endoftext|>" strings in the input become the special id.
    The last val_fraction of the tokens is the validation split, as in nanoGPT.
    """
    input_path, out_dir = Path(input_path), Path(out_dir)
    if not input_path.is_file():
        raise FileNotFoundError(f"input text file not found: {input_path}")
    if input_path.stat().st_size == 0:
        raise ValueError(f"input text file is empty: {input_path}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    check_tokenizer_spec(tokenizer)
    tok = _build_tokenizer(tokenizer, input_path, chunk_chars)
    encode = tok.encode if isinstance(tok, CharTokenizer) else lambda s: tok.encode(s, allowed_special="all")
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)

    out_dir.mkdir(parents=True, exist_ok=True)
    train_tmp, val_tmp = out_dir / "train.bin.tmp", out_dir / "val.bin.tmp"
    n_tokens = 0
    try:
        with open(train_tmp, "wb") as f:
            for block in _text_blocks(input_path, chunk_chars, "tokenizing"):
                ids = np.asarray(encode(block), dtype=dtype)
                ids.tofile(f)
                n_tokens += ids.size
    except BaseException:
        train_tmp.unlink(missing_ok=True)
        raise
    if n_tokens == 0:
        train_tmp.unlink()
        raise ValueError(f"input text file is empty: {input_path}")
    n_val = int(n_tokens * val_fraction)
    n_train = n_tokens - n_val
    # all tokens went to train's temp file; copy its tail to val's, then cut it short
    tokens = np.memmap(train_tmp, dtype=dtype, mode="r", shape=(n_tokens,))
    with open(val_tmp, "wb") as f:
        for start in range(n_train, n_tokens, chunk_chars):
            tokens[start:min(start + chunk_chars, n_tokens)].tofile(f)
    del tokens  # close the map before truncating the file under it
    os.truncate(train_tmp, n_train * dtype.itemsize)
    os.replace(train_tmp, out_dir / "train.bin")
    os.replace(val_tmp, out_dir / "val.bin")

    meta = {"format": "tinygrad_llm.data", "version": 1, "source": str(input_path),
            "tokenizer": tok.to_dict(), "vocab_size": tok.vocab_size, "dtype": dtype.name,
            "train_tokens": n_train, "val_tokens": n_val}
    atomic_write(out_dir / "meta.json", json.dumps(meta))
    return meta


def load_meta(data_dir):
    """The meta.json dict that prepare wrote into data_dir."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run tinygrad_llm.data.prepare first "
                                "(examples/train_shakespeare.py prepares tiny Shakespeare and trains on it)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run prepare") from None
    if not isinstance(meta, dict) or meta.get("format") != "tinygrad_llm.data":
        raise ValueError(f"{path} was not written by tinygrad_llm.data.prepare")
    return meta


def load_tokenizer(data_dir):
    """The tokenizer that produced the ids in data_dir."""
    return tokenizer_from_dict(load_meta(data_dir)["tokenizer"])


@lru_cache(maxsize=16)
def _split_layout(meta_path, mtime_ns):
    """(dtype, tokens per split) from meta.json, parsed once per version of the file: a BPE meta.json
    holds the whole vocabulary, too much to re-read for every batch."""
    meta = load_meta(Path(meta_path).parent)
    return np.dtype(meta["dtype"]), {"train": meta["train_tokens"], "val": meta["val_tokens"]}


def get_batch(data_dir, split, batch_size, block_size, rng):
    """Random windows of the split: x, y int64 (batch_size, block_size), y[b, t] = x[b, t + 1].

    Window starts are drawn uniformly from rng (an np.random.Generator) over every position that
    leaves room for the shifted target, so each token of the split can appear in x or y.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found; run tinygrad_llm.data.prepare first")
    dtype, counts = _split_layout(str(meta_path), meta_path.stat().st_mtime_ns)
    path, n = Path(data_dir) / f"{split}.bin", counts[split]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run tinygrad_llm.data.prepare first")
    if path.stat().st_size != n * dtype.itemsize:
        raise ValueError(f"{path} holds {path.stat().st_size} bytes but meta.json promises {n} {dtype.name} "
                         f"tokens ({n * dtype.itemsize} bytes): truncated or stale, re-run prepare")
    if n < block_size + 1:
        raise ValueError(f"the {split} split has {n} tokens, fewer than block_size + 1 = {block_size + 1}")
    # Open a fresh memmap on every call instead of keeping one for the run: pages read through a
    # long-lived map stay counted in this process's resident memory, which then grows toward the size
    # of the file and looks like a leak (nanoGPT issue #287, fix in PR #428). A new map per batch lets
    # them go; the OS page cache still holds the file, so reopening costs only a few system calls.
    data = np.memmap(path, dtype=dtype, mode="r")
    starts = rng.integers(0, n - block_size, size=batch_size)
    windows = data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)  # a copy, not a view
    return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])
