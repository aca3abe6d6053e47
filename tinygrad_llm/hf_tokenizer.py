"""Hugging Face's and OpenAI's tokenizer files in and out: `load_tokenizer(path)` and `save_tokenizer(tok, path)`.

    tok = BPETokenizer.from_pretrained("gpt2-folder")   # vocab.json + merges.txt, encoder.json + vocab.bpe,
                                                        # tokenizer.json, or a training checkpoint
    tok.save_pretrained("export")                       # transformers.AutoTokenizer opens it

The files spell each byte as a printable character (tokenizer._gpt2_byte_alphabet) and list merges rather
than ranks; tokenizer_from_vocab turns them into ranks, and into an IdMappedBPETokenizer when the file's ids
are not those ranks. hub.save_pretrained writes these files beside a model's weights.
"""
import json
import re
from pathlib import Path

import numpy as np

from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .fileio import atomic_write
from .safetensors_file import _CHECKPOINT_NAMES, SafetensorsFile
from .tokenizer import (CHAR_TOKENIZER_ERROR, GPT2_SPLIT_PATTERN, BPETokenizer, CharTokenizer, IdMappedBPETokenizer,
                        _gpt2_byte_alphabet, tokenizer_from_dict)


def check_tokenizer_writable(tokenizer):
    if isinstance(tokenizer, CharTokenizer):
        raise ValueError(CHAR_TOKENIZER_ERROR)
    if not isinstance(tokenizer, BPETokenizer):
        raise ValueError(f"a {type(tokenizer).__name__} cannot be saved as Hugging Face tokenizer files")


def _byte_alphabet():
    alphabet = _gpt2_byte_alphabet()                    # character -> byte
    return alphabet, {b: c for c, b in alphabet.items()}


def _special_tokens_in_config(folder):
    """{content: id} of the added tokens a tokenizer_config.json or tokenizer.json lists (may be empty)."""
    found = {}
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        for i, entry in (cfg.get("added_tokens_decoder") or {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                found[entry["content"]] = int(i)
    return found


def _read_vocab_merges(vocab_path, merges_path):
    try:
        vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{vocab_path} is not valid JSON: {e}") from None
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise ValueError(f"{vocab_path} must map token strings to integer ids")
    merges = []
    for n, line in enumerate(Path(merges_path).read_text(encoding="utf-8").split("\n"), 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{merges_path} line {n}: expected two tokens separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return vocab, merges


def tokenizer_from_vocab(vocab, merges, source, extra_special=None, pattern=None):
    """A BPETokenizer (GPT-2's split pattern unless `pattern` is given) giving Hugging Face's ids for a
    byte-level BPE vocabulary {token string: id} and its merges [(left string, right string)] in priority order.

    Each merge joins two tokens into one; a token made by the i-th merge that makes a new token gets the
    rank 256 + i (single bytes are ranks 0..255), which is how tiktoken-style ranks order merges. Tokens
    that are neither a byte nor made by a merge are special tokens. When Hugging Face's ids already are
    those ranks (GPT-2's own files) the tokenizer is a plain BPETokenizer; otherwise (the tokenizers
    library puts special tokens first) it maps its ranks to Hugging Face's ids."""
    alphabet, _ = _byte_alphabet()

    def to_bytes(word):
        try:
            return bytes(alphabet[c] for c in word)
        except KeyError:
            return None

    if len(set(vocab.values())) != len(vocab):
        dup = next(i for i in vocab.values() if list(vocab.values()).count(i) > 1)
        raise ValueError(f"{source}: id {dup} is given to more than one token")
    token_bytes = {word: to_bytes(word) for word in vocab}
    rank = {bytes([b]): b for b in range(256)}
    spelled = set(token_bytes.values())
    missing = [b for b in range(256) if bytes([b]) not in spelled]
    if missing:
        raise ValueError(f"{source}: the vocabulary lacks {len(missing)} of the 256 single bytes (first: "
                         f"{bytes(missing[:1])!r}); byte-level BPE needs them all")
    for n, (left, right) in enumerate(merges):
        for word in (left, right, left + right):
            if word not in vocab or token_bytes[word] is None:
                raise ValueError(f"{source}: merge {n} ({left} {right}) uses {word!r}, which is not a byte-level token "
                                 "of the vocabulary")
        joined = token_bytes[left + right]
        if joined not in rank:
            rank[joined] = len(rank)
    # the id of each rank; a byte or merged token may be spelled once only
    id_of_rank = np.empty(len(rank), dtype=np.int64)
    seen = {}
    for word, b in token_bytes.items():
        if b is not None and b in rank:
            if b in seen:
                raise ValueError(f"{source}: tokens {seen[b]!r} and {word!r} spell the same bytes")
            seen[b] = word
            id_of_rank[rank[b]] = vocab[word]
    special = {word: i for word, i in vocab.items() if token_bytes[word] is None or token_bytes[word] not in rank}
    for word, i in (extra_special or {}).items():
        if word not in vocab:
            special[word] = i
    if np.array_equal(id_of_rank[256:], np.arange(256, len(rank))) and set(id_of_rank[:256]) == set(range(256)) \
            and all(i >= len(rank) for i in special.values()):
        # GPT-2's layout: the ids are ranks already (single bytes in any order among 0..255)
        return BPETokenizer({b: int(id_of_rank[r]) for b, r in rank.items()}, pattern or GPT2_SPLIT_PATTERN, special)
    return IdMappedBPETokenizer(rank, pattern or GPT2_SPLIT_PATTERN, special, id_of_rank)


def load_tokenizer(path):
    """The tokenizer of a Hugging Face folder (vocab.json + merges.txt, or OpenAI's encoder.json +
    vocab.bpe) or of a training checkpoint (the tokenizer saved in its metadata)."""
    path = Path(path)
    if path.is_dir() and not any((path / n).is_file() for n in ("tokenizer.json", "vocab.json", "encoder.json")):
        found = [path / n for n in _CHECKPOINT_NAMES if (path / n).is_file()]
        if found:
            path = found[0]
    if path.is_file():
        with SafetensorsFile(path) as f:
            if f.metadata.get("format") != CHECKPOINT_FORMAT or "tokenizer" not in f.metadata:
                raise ValueError(f"{path} holds no tokenizer (not a tinygrad_llm checkpoint saved with one)")
            return tokenizer_from_dict(json.loads(f.metadata["tokenizer"]))
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer at {path}")
    if (path / "tokenizer.json").is_file():   # the split pattern is only here when it is not GPT-2's
        return _tokenizer_from_tokenizer_json(path / "tokenizer.json")
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        vocab, merges = _read_vocab_merges(path / "vocab.json", path / "merges.txt")
        return tokenizer_from_vocab(vocab, merges, path, _special_tokens_in_config(path))
    if (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
        vocab, merges = _read_vocab_merges(path / "encoder.json", path / "vocab.bpe")
        return tokenizer_from_vocab(vocab, merges, path)
    raise FileNotFoundError(f"{path} has no tokenizer.json, vocab.json + merges.txt or encoder.json + vocab.bpe")


def _tokenizer_from_tokenizer_json(path):
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        model = doc["model"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a tokenizers-library file: {e!r}") from None
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model.type={model.get('type')!r} is not supported (only byte-level 'BPE')")
    pattern = _split_pattern(doc.get("pre_tokenizer") or {}, path)
    if doc.get("normalizer"):
        raise ValueError(f"{path}: normalizer={json.dumps(doc['normalizer'])[:200]} is not supported (only null)")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    added = {t["content"]: t["id"] for t in doc.get("added_tokens") or []}
    return tokenizer_from_vocab(model["vocab"], merges, path, added, pattern)


def _split_pattern(pre, path):
    """The split pattern of a tokenizer.json pre_tokenizer: GPT-2's for ByteLevel with its regex, or the regex
    of a Split followed by a ByteLevel without one (what save_pretrained writes for other patterns)."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return GPT2_SPLIT_PATTERN
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") \
            and isinstance((steps[0].get("pattern") or {}).get("Regex"), str) \
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space"):
        return steps[0]["pattern"]["Regex"]
    raise ValueError(f"{path}: pre_tokenizer={json.dumps(pre)[:200]} is not supported (only GPT-2's ByteLevel, or a "
                     "Split regex, Isolated, then ByteLevel without its regex; no add_prefix_space)")


def tokenizer_files(tokenizer):
    """{file name: text} of vocab.json, merges.txt, tokenizer.json, tokenizer_config.json and
    special_tokens_map.json for a BPETokenizer."""
    check_tokenizer_writable(tokenizer)
    _, spell = _byte_alphabet()
    table = {b: spell[b] for b in range(256)}   # latin-1 decoding makes byte b the character b; then respell
    id_of = tokenizer.public_id                  # rank -> the id a user sees
    # the tokens spelled in GPT-2's alphabet, one character per byte, so the strings split as the bytes do
    words = {token.decode("latin-1").translate(table): r for token, r in tokenizer.mergeable_ranks.items()}
    vocab, merges = {}, []
    for word, r in sorted(words.items(), key=lambda kv: kv[1]):
        vocab[word] = id_of(r)
        if len(word) > 1:
            parts = _last_merge(word, words, r)
            if parts is None:
                raise ValueError(f"token {word!r} (id {id_of(r)}) cannot be written as a merge of two tokens of "
                                 "lower rank, so merges.txt cannot describe it")
            merges.append(" ".join(parts))
    for word, i in tokenizer.special_tokens.items():
        vocab[word] = i
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    special = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    added = [{"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for w, i in special]
    if tokenizer.pattern == GPT2_SPLIT_PATTERN:
        pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    else:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _oniguruma(tokenizer.pattern)}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                      "normalizer": None, "pre_tokenizer": pre, "post_processor": byte_level, "decoder": byte_level,
                      "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                                "ignore_merges": False, "vocab": vocab, "merges": merges}}
    eos = "<|endoftext|>" if "<|endoftext|>" in tokenizer.special_tokens else (special[-1][0] if special else None)
    # transformers' GPT2Tokenizer splits with GPT-2's pattern whatever tokenizer.json says; another pattern
    # needs the generic class, which runs tokenizer.json as written
    gpt2_split = tokenizer.pattern == GPT2_SPLIT_PATTERN
    config = {"tokenizer_class": "GPT2Tokenizer" if gpt2_split else "PreTrainedTokenizerFast", "add_prefix_space": False, "add_bos_token": False,
              "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 1 << 30,
              "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}}
    specials_map = {}
    if eos is not None:
        config.update(bos_token=eos, eos_token=eos, unk_token=eos)
        specials_map = {"bos_token": eos, "eos_token": eos, "unk_token": eos}
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
            "tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
            "special_tokens_map.json": json.dumps(specials_map, indent=2, ensure_ascii=False)}


def _oniguruma(pattern):
    """The split pattern for the tokenizers library's regex engine (Oniguruma, Ruby syntax), where `{1,3}+`
    is not a possessive {1,3} but {1,3} repeated: drop the `+` (the same matches where, as in the GPT-4
    pattern, nothing follows the repeat inside its alternative)."""
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def _last_merge(token, ranks, rank):
    """The two tokens whose merge makes `token` under tiktoken's rule: merge its bytes by rank using only
    tokens of rank below `rank`; if two parts remain, they are the pair (None otherwise)."""
    splits = [(token[:k], token[k:]) for k in range(1, len(token))
              if ranks.get(token[:k], rank) < rank and ranks.get(token[k:], rank) < rank]
    if len(splits) == 1:   # the usual case: one way to make it from two earlier tokens
        return list(splits[0])
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            return None
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts if len(parts) == 2 else None


def save_tokenizer(tokenizer, path):
    """Write the tokenizer's Hugging Face files into folder `path` (created if needed), each atomically."""
    files = tokenizer_files(tokenizer)   # everything is worked out (and may raise) before a file is written
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder")
    for name, text in files.items():
        atomic_write(path / name, text)
    return path
