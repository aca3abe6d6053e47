"""Tokenizers: text <-> lists of integer token ids.

Two kinds, with the same surface (`encode`, `decode`, `vocab_size`, `to_dict`):

- `CharTokenizer`: one id per distinct character, the tiny-Shakespeare baseline.
- `BPETokenizer`: byte-level byte pair encoding with a regex pre-split and special tokens,
  following tiktoken's interface and producing tiktoken's ids for the same ranks.

`tokenizer_from_dict(d)` rebuilds either kind from its `to_dict()` (checkpoints and meta.json store
that dict). The merge and training loops on bytes are in bpe.py; Hugging Face's and OpenAI's tokenizer files
are read and written by hf_tokenizer.py. Design notes, the tie-break and the end-of-text convention:
docs/tokenizer.md.
"""
import codecs
import functools
import json
import re
from collections import Counter
from itertools import chain, filterfalse, repeat
from pathlib import Path

import numpy as np
import regex

from .bpe import (_HEAP_MIN_BYTES, _NO_RANK, _add_token, _byte_ranks, _merge_batch_kernel,  # noqa: F401 (public paths)
                  _merge_by_rank, _merge_by_rank_heap, _pair_table, _replace_pair, _train_ranks, train_ranks_reference)
from .fileio import atomic_write, remove_stale_temporaries

# The pre-split patterns of GPT-2 and GPT-4 (cl100k): text is cut into pieces (words with their
# leading space, number runs, punctuation runs, whitespace runs) and BPE never merges across pieces.
# These are tiktoken's spellings (r50k_base and cl100k_base), so splits agree with theirs.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                      r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")

CHAR_TOKENIZER_ERROR = ("a character tokenizer cannot be written as Hugging Face tokenizer files (vocab.json and "
                        "merges.txt describe byte-level BPE); export the weights alone (tokenizer=None)")


class CharTokenizer:
    """One token per character, ids in sorted character order.

    >>> tok = CharTokenizer.from_text("hello")
    >>> tok.chars, tok.vocab_size
    (['e', 'h', 'l', 'o'], 4)
    >>> tok.encode("hole")
    [1, 3, 2, 0]
    >>> tok.decode([1, 0, 2, 2, 3])
    'hello'
    """

    def __init__(self, chars):
        if isinstance(chars, (str, list, tuple)):
            chars = list(chars)
        else:
            raise ValueError(f"CharTokenizer: chars must be a string (or list) of characters, got {type(chars).__name__}")
        bad = next((c for c in chars if not (isinstance(c, str) and len(c) == 1)), None)
        if bad is not None:
            raise ValueError(f"CharTokenizer: chars must be single characters, got {str(bad)[:20]!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: chars must be distinct single characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            # find the first unknown character only on the error path, so encoding stays one pass
            position, char = next((i, c) for i, c in enumerate(text) if c not in self.stoi)
            raise ValueError(f"character {char!r} at position {position} is not in the "
                             f"vocabulary of {self.vocab_size} characters") from None

    def decode(self, ids):
        ids = [int(i) for i in ids]  # accepts numpy integers from sampled arrays
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return "".join([self.chars[i] for i in ids])

    def to_dict(self):
        return {"kind": "char", "chars": "".join(self.chars)}

    def save_pretrained(self, path):
        """Always raises: Hugging Face's tokenizer files describe byte-level BPE, not characters."""
        raise ValueError(CHAR_TOKENIZER_ERROR)

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict) or d.get("kind") != "char":
            raise ValueError(f"not a CharTokenizer dict (kind={d.get('kind') if isinstance(d, dict) else None!r})")
        if not isinstance(d.get("chars"), str):
            raise ValueError(f"malformed CharTokenizer dict: 'chars' must be a string of the vocabulary's characters, "
                             f"got {type(d.get('chars')).__name__}")
        return cls(d["chars"])


_ENCODE_CACHE_LIMIT = 1 << 18  # pieces remembered per tokenizer; beyond this, new pieces are not cached
# A call with fewer new pieces than this (a prompt, a sentence) merges them in Python: at ~7 us a piece
# that is under 2 ms, and a short-lived process is spared importing Numba and loading the compiled kernel
# (~0.5 s together, once per process; see docs/tokenizer.md).
_NUMBA_MIN_PIECES = 256
# ... unless the new pieces hold this many bytes: a long piece (a run of one character) merges at ~20 us a
# byte in Python even with the heap (_merge_by_rank_heap), about 100x the kernel's time.
_NUMBA_MIN_BYTES = 4096
_FILE_FORMAT, _FILE_VERSION = "tinygrad_llm.bpe", 1


# What \p{L}, \p{N} and \s mean on ASCII text, spelled out for the standard library's `re`
# (Python >= 3.11 has the possessive quantifiers the split patterns use). Spelled out because the
# `regex` module's \s leaves out \x1c..\x1f, which `re`'s \s would include.
_ASCII_CLASSES = {r"\p{L}": "A-Za-z", r"\p{N}": "0-9", r"\s": r"\t\n\x0b\x0c\r "}


def _ascii_twin(pattern):
    """The split pattern for text known to be ASCII, compiled with the standard `re`, which runs
    the GPT patterns about 2.5x faster than `regex` (tests check that both give the same pieces);
    None if the pattern holds a class this table does not translate.

    >>> _ascii_twin(r" ?\\p{L}+|\\p{N}|[^\\s\\p{L}]").pattern
    ' ?[A-Za-z]+|[0-9]|[^\\\\t\\\\n\\\\x0b\\\\x0c\\\\r A-Za-z]'
    """
    if not pattern.isascii():
        return None
    out, i, in_class = [], 0, False
    # (a pattern that `regex` compiles but whose translation `re` does not is left to `regex`: see the end)
    while i < len(pattern):
        if pattern.startswith(r"\p{", i):
            token = pattern[i:i + 5]
        else:
            token = pattern[i:i + 2] if pattern[i] == "\\" else pattern[i]
        if token in _ASCII_CLASSES:
            out.append(_ASCII_CLASSES[token] if in_class else f"[{_ASCII_CLASSES[token]}]")
        elif token == r"\S" and not in_class:
            out.append("[^" + _ASCII_CLASSES[r"\s"] + "]")
        elif token[0] == "\\" and token[1] in "pPSwWdDbB":
            return None
        else:
            in_class = (in_class or token == "[") and token != "]"
            out.append(token)
        i += len(token)
    try:
        return re.compile("".join(out))
    except re.error:
        return None


def _encode_bytes(data, ranks):
    """Ids of one piece's bytes, as a tuple: a whole piece that is a token stays one token (as in tiktoken),
    even if merges by rank would split it; otherwise _merge_by_rank (_merge_by_rank_heap when long)."""
    if data in ranks:
        return (ranks[data],)
    merge = _merge_by_rank_heap if len(data) > _HEAP_MIN_BYTES else _merge_by_rank
    return tuple(merge(data, ranks))


@functools.cache
def _compiled_kernel():
    """_merge_batch_kernel compiled (cache=True: to disk, so later processes load it instead of
    compiling), or None without Numba. Imported on first use: importing Numba alone takes ~0.2 s."""
    try:
        from numba import njit
    except ImportError:
        return None
    return njit(cache=True)(_merge_batch_kernel)


def _merge_batch_numba(datas, ranks, pair_table):
    """[_encode_bytes(d, ranks) for d in datas] in one call of the compiled kernel: the pieces travel
    as one flat array of bytes with start offsets, their ids come back the same way."""
    if not datas:
        return []
    # map() rather than comprehensions: the loops over the pieces then run in C
    starts = np.zeros(len(datas) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, datas), np.int64, len(datas)), out=starts[1:])
    data = np.frombuffer(b"".join(datas), dtype=np.uint8)
    whole = np.fromiter(map(ranks.get, datas, repeat(-1)), np.int32, len(datas))
    out, out_starts = np.empty(len(data), dtype=np.int32), np.zeros_like(starts)
    _compiled_kernel()(data, starts, whole, *pair_table, out, out_starts)
    # slices of a tuple are tuples: what the cache keeps (the garbage collector stops scanning tuples of ints)
    ids, ends = tuple(out.tolist()), out_starts.tolist()
    return list(map(ids.__getitem__, map(slice, ends, ends[1:])))


def _special_regex(tokens):
    # longest first, so that of two special tokens where one is a prefix of the other the longer wins
    return regex.compile("(" + "|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")


def _count_pieces(text, pattern, special_tokens):
    """Counter of the regex pieces of `text` (a str, or an iterable of str blocks), with special-token
    strings cut out first so that no merge ever learns part of one."""
    split, split_ascii = regex.compile(pattern), _ascii_twin(pattern)
    special = _special_regex(special_tokens) if special_tokens else None
    counts = Counter()
    for block in [text] if isinstance(text, str) else text:
        for part in special.split(block)[::2] if special else [block]:  # [::2] drops the specials
            counts.update((split_ascii if split_ascii and part.isascii() else split).findall(part))
    return counts



class IncrementalDecoder:
    """Decodes a stream of token ids, holding back the bytes of a character that is split across
    tokens until the rest arrives, so streamed text never shows a spurious "\\ufffd".

    >>> tok = BPETokenizer.from_tiktoken({bytes([b]): b for b in range(256)}, GPT4_SPLIT_PATTERN)
    >>> dec = tok.incremental_decoder()
    >>> [dec.feed(i) for i in "é!".encode("utf-8")]   # é is the two bytes 0xC3 0xA9
    ['', 'é', '!']
    >>> dec.flush()
    ''
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids):
        """ids: one id (a Python or NumPy integer) or a list of ids; returns the text completed so far."""
        return self.utf8.decode(self.tokenizer.decode_bytes([ids] if hasattr(ids, "__index__") else ids))

    def flush(self):
        """Text held back at the end of the stream (an incomplete character becomes "\\ufffd")."""
        return self.utf8.decode(b"", final=True)


class BPETokenizer:
    """Byte-level byte pair encoding with a regex pre-split and special tokens, as in GPT-2/GPT-4.

    Text is cut into pieces by `pattern`; each piece's UTF-8 bytes start as ids 0..255 and are
    merged into longer tokens by rank. `mergeable_ranks` (bytes -> rank, the rank is the token id)
    and `pattern` are tiktoken's format, so tiktoken built from them gives the same ids.

    Worked example (the tie-break and the end-of-text placement are in docs/tokenizer.md):

    >>> tok = BPETokenizer.train("aaabdaaabac", vocab_size=259, special_tokens=["<|endoftext|>"])
    >>> [token for token, rank in tok.mergeable_ranks.items() if rank >= 256]
    [b'aa', b'ab', b'aaab']
    >>> tok.encode("aaabdaaabac")              # aaab d aaab a c
    [258, 100, 258, 97, 99]
    >>> tok.encode("<|endoftext|>aa", allowed_special="all")
    [259, 256]
    >>> tok.decode([258, 100])
    'aaabd'
    """

    def __init__(self, mergeable_ranks, pattern=GPT4_SPLIT_PATTERN, special_tokens=None):
        if not isinstance(mergeable_ranks, dict) or not isinstance(special_tokens or {}, dict):
            raise ValueError("mergeable_ranks must be a dict of bytes -> rank and special_tokens a dict of str -> id")
        ranks = dict(mergeable_ranks)
        special_tokens = dict(special_tokens or {})
        if not (all(isinstance(k, bytes) for k in ranks) and all(_is_id(v) for v in ranks.values())
                and sorted(ranks.values()) == list(range(len(ranks)))):
            raise ValueError("mergeable_ranks must map bytes to the ranks 0..n-1, each used once")
        for token, i in special_tokens.items():
            if not (isinstance(token, str) and token):
                raise ValueError(f"special_tokens: a special token must be a non-empty string, got {str(token)[:40]!r}")
            if not (_is_id(i) and i >= 0):
                raise ValueError(f"special_tokens: the id of {token!r} must be a non-negative integer, got {str(i)[:40]!r}")
        special_tokens = {token: int(i) for token, i in special_tokens.items()}
        if not isinstance(pattern, str):
            raise ValueError(f"pattern must be a regular expression string, got {type(pattern).__name__}")
        try:
            split = regex.compile(pattern)
        except regex.error as e:
            raise ValueError(f"pattern is not a valid regular expression ({e}): {pattern[:80]!r}") from None
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"mergeable_ranks lacks {len(missing)} single bytes (first: {bytes(missing[:1])!r}); "
                             "byte-level BPE needs all 256 so that any text can be encoded")
        clash = [t for t, i in special_tokens.items() if i < len(ranks) or list(special_tokens.values()).count(i) > 1]
        if clash:
            raise ValueError(f"special token {clash[0]!r} has id {special_tokens[clash[0]]}, which is "
                             f"taken by another token (the {len(ranks)} ranks use ids 0..{len(ranks) - 1})")
        self.mergeable_ranks = ranks
        self.pattern = pattern
        self.special_tokens = special_tokens
        self._split = split
        self._split_ascii = _ascii_twin(pattern)
        self._decoder = {i: token for token, i in ranks.items()}
        self._decoder.update({i: t.encode("utf-8") for t, i in special_tokens.items()})
        self._cache = {}  # piece str -> tuple of ids: text repeats its words, so most pieces are seen before
        self._pair_table = None  # for the Numba kernel, built on first use

    # ----- training and construction -----

    @classmethod
    def train(cls, text, vocab_size, pattern=GPT4_SPLIT_PATTERN, special_tokens=(), verbose=False):
        """Learn vocab_size - 256 merges from `text` (a str, or an iterable of str blocks).

        vocab_size counts the 256 bytes and the merges; special tokens take the ids after them.
        Each step merges the most frequent adjacent pair; among equally frequent pairs, the one
        with the smaller (left id, right id). Training stops early if no pair is left.
        """
        if vocab_size < 256:
            raise ValueError(f"vocab_size must be at least 256 (the single bytes), got {vocab_size}")
        special_tokens = list(special_tokens)
        duplicates = sorted({t for t in special_tokens if special_tokens.count(t) > 1})
        if duplicates:
            raise ValueError(f"duplicate special tokens: {duplicates}")
        ranks = _train_ranks(_count_pieces(text, pattern, special_tokens), vocab_size, verbose)
        return cls(ranks, pattern, {t: len(ranks) + i for i, t in enumerate(special_tokens)})

    @classmethod
    def from_tiktoken(cls, mergeable_ranks, pattern, special_tokens=None):
        """From tiktoken's parts, e.g. enc._mergeable_ranks, enc._pat_str, enc._special_tokens."""
        return cls(mergeable_ranks, pattern, special_tokens)

    @classmethod
    def from_gpt2_files(cls, encoder_json_path, vocab_bpe_path):
        """From OpenAI's GPT-2 `encoder.json` (token -> id) and `vocab.bpe` (the merges, in order).

        Those files spell each byte as a printable character (see _gpt2_byte_alphabet). The ranks
        come from encoder.json; vocab.bpe must agree: its i-th merge is the token of rank 256 + i.
        """
        alphabet = _gpt2_byte_alphabet()

        def to_bytes(word):
            try:
                return bytes(alphabet[c] for c in word)
            except KeyError:
                raise ValueError(f"{encoder_json_path}: {word!r} is not in GPT-2's byte alphabet") from None

        encoder = json.loads(Path(encoder_json_path).read_text(encoding="utf-8"))
        special = {t: encoder.pop(t) for t in ("<|endoftext|>",) if t in encoder}
        ranks = {to_bytes(word): i for word, i in encoder.items()}
        lines = Path(vocab_bpe_path).read_text(encoding="utf-8").split("\n")
        merges = [line.split(" ") for line in lines[1:] if line]  # line 0 is "#version: ..."
        for i, (left, right) in enumerate(merges):
            if ranks.get(to_bytes(left) + to_bytes(right)) != 256 + i:
                raise ValueError(f"{vocab_bpe_path}: merge {i} ({left} {right}) does not match "
                                 f"{encoder_json_path}, which gives it id {ranks.get(to_bytes(left) + to_bytes(right))}")
        return cls(ranks, GPT2_SPLIT_PATTERN, special)

    @classmethod
    def from_pretrained(cls, path):
        """From a Hugging Face tokenizer folder: vocab.json + merges.txt (or OpenAI's encoder.json +
        vocab.bpe, or a byte-level BPE tokenizer.json), giving the same ids as transformers' tokenizer,
        whatever order the ids are in; or from a training checkpoint. See tinygrad_llm.hf_tokenizer."""
        from .hf_tokenizer import load_tokenizer
        return load_tokenizer(path)

    @classmethod
    def gpt2(cls, path):
        """GPT-2's tokenizer (tiktoken's r50k_base) from its files: a `.tiktoken` file (one base64 token
        and its rank per line, e.g. openai-whisper's whisper/assets/gpt2.tiktoken), or a folder holding
        gpt2.tiktoken, vocab.json + merges.txt or encoder.json + vocab.bpe."""
        import base64
        path = Path(path)
        if path.is_dir() and (path / "gpt2.tiktoken").is_file():
            path = path / "gpt2.tiktoken"
        if path.is_dir():
            return cls.from_pretrained(path)
        if not path.is_file():
            raise FileNotFoundError(f"no GPT-2 vocabulary at {path}")
        ranks = {}
        for n, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
            if line:
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(f"{path} line {n}: expected a base64 token and a rank, got {line[:60]!r}") from None
        return cls(ranks, GPT2_SPLIT_PATTERN, {"<|endoftext|>": len(ranks)})

    def save_pretrained(self, path):
        """Write vocab.json, merges.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json to
        folder `path`, so that transformers.AutoTokenizer.from_pretrained(path) gives the same ids."""
        from .hf_tokenizer import save_tokenizer
        return save_tokenizer(self, path)

    def public_id(self, rank):
        """The id a user sees for the token of this rank (the rank itself; not so in IdMappedBPETokenizer)."""
        return rank

    # ----- encoding -----

    @property
    def n_vocab(self):
        return max(self._decoder) + 1

    vocab_size = n_vocab

    def _merge_pieces(self, pieces):
        """Ids of each of `pieces` (distinct str, not in the cache), as tuples."""
        datas = [piece.encode("utf-8") for piece in pieces]
        if ((len(datas) >= _NUMBA_MIN_PIECES or sum(map(len, datas)) >= _NUMBA_MIN_BYTES)
                and _compiled_kernel() is not None):
            if self._pair_table is None:
                self._pair_table = _pair_table(self.mergeable_ranks)
            return _merge_batch_numba(datas, self.mergeable_ranks, self._pair_table)
        return [_encode_bytes(data, self.mergeable_ranks) for data in datas]

    def encode_ordinary(self, text):
        """Ids of `text`, with special-token strings treated as plain text."""
        cache = self._cache
        ascii_only = self._split_ascii is not None and text.isascii()
        pieces = (self._split_ascii if ascii_only else self._split).findall(text)
        try:  # the fast path: every piece seen before, so the whole loop runs in C
            return list(chain.from_iterable(map(cache.__getitem__, pieces)))
        except KeyError:
            pass
        # Some pieces are new: merge all of this text's new pieces in one batch, then look up as above.
        # Distinct pieces in the order they first occur (dict.fromkeys, not a set): the cache's tuples
        # then lie in memory in text order, and later (warm) encodes measured ~5% faster than in set order.
        unique = dict.fromkeys(pieces)
        new = list(filterfalse(cache.__contains__, unique))
        merged = zip(new, self._merge_pieces(new))
        if len(cache) + len(new) <= _ENCODE_CACHE_LIMIT:
            cache.update(merged)
            table = cache
        else:  # no room in the cache for them all: a table for this call only, and none are kept
            table = dict(merged) | {piece: cache[piece] for piece in unique if piece in cache}
        return list(chain.from_iterable(map(table.__getitem__, pieces)))

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """Ids of `text`. Special tokens as in tiktoken: a special token found in the text raises
        ValueError if it is disallowed (by default, all that are not allowed), becomes its special
        id if allowed (a set of names, or "all"), and is plain text otherwise.

        >>> tok = BPETokenizer.train("hi", 256, special_tokens=["<|endoftext|>"])
        >>> tok.encode("hi<|endoftext|>", allowed_special={"<|endoftext|>"})
        [104, 105, 256]
        >>> len(tok.encode("<|endoftext|>", disallowed_special=()))   # 13 plain bytes
        13
        """
        if allowed_special == "all":
            allowed_special = set(self.special_tokens)
        if disallowed_special == "all":
            disallowed_special = set(self.special_tokens) - set(allowed_special)
        unknown = (set(allowed_special) | set(disallowed_special)) - set(self.special_tokens)
        if unknown:
            raise ValueError(f"unknown special tokens {sorted(unknown)}; this tokenizer has {sorted(self.special_tokens)}")
        if disallowed_special:
            found = _special_regex(disallowed_special).search(text)
            if found:
                raise ValueError(f"text contains the special token {found.group()!r} at position {found.start()}, "
                                 f"which is disallowed. Pass allowed_special={{{found.group()!r}}} (or 'all') to encode "
                                 "it as its special id, or disallowed_special=() to encode it as plain text.")
        if not allowed_special:
            return self.encode_ordinary(text)
        ids = []
        for i, part in enumerate(_special_regex(allowed_special).split(text)):
            # split with a capturing group alternates: text, special, text, special, ..., text
            if i % 2:
                ids.append(self.special_tokens[part])
            else:
                ids.extend(self.encode_ordinary(part))
        return ids

    # ----- decoding -----

    def decode_bytes(self, ids):
        try:
            return b"".join([self._decoder[i] for i in ids])
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]!r} is not in the vocabulary of {self.n_vocab}") from None

    def decode(self, ids, errors="replace"):
        """Text of `ids`; bytes that are not valid UTF-8 (a character cut in two) become "\\ufffd"."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def incremental_decoder(self):
        return IncrementalDecoder(self)

    # ----- saving and loading -----

    def to_dict(self):
        """JSON-ready: the tokens in rank order as hex strings, the pattern, the special tokens."""
        tokens = sorted(self.mergeable_ranks, key=self.mergeable_ranks.get)
        return {"kind": "bpe", "pattern": self.pattern, "special_tokens": self.special_tokens,
                "tokens": [t.hex() for t in tokens]}

    @classmethod
    def from_dict(cls, d):
        if cls is BPETokenizer and isinstance(d, dict) and d.get("kind") == "bpe_ids":   # ids not its ranks
            return IdMappedBPETokenizer.from_dict(d)
        if not isinstance(d, dict) or d.get("kind") != "bpe":
            raise ValueError(f"not a BPETokenizer dict (kind={d.get('kind') if isinstance(d, dict) else None!r})")
        missing = [k for k in ("tokens", "pattern", "special_tokens") if k not in d]
        if missing:
            raise ValueError(f"malformed BPETokenizer dict: it lacks {missing}")
        if not isinstance(d["tokens"], list):
            raise ValueError(f"malformed BPETokenizer dict: 'tokens' must be a list of hex strings, got {type(d['tokens']).__name__}")
        if not isinstance(d["special_tokens"], dict):
            raise ValueError(f"malformed BPETokenizer dict: 'special_tokens' must map strings to ids, "
                             f"got {type(d['special_tokens']).__name__}")
        try:
            ranks = {bytes.fromhex(t): i for i, t in enumerate(d["tokens"])}
        except (TypeError, ValueError):
            bad = next(t for t in d["tokens"] if not _is_hex(t))
            raise ValueError(f"malformed BPETokenizer dict: 'tokens' holds {str(bad)[:40]!r}, not a hex string") from None
        if len(ranks) != len(d["tokens"]):
            raise ValueError("malformed BPETokenizer dict: a token is listed twice in 'tokens'")
        return cls(ranks, d["pattern"], d["special_tokens"])

    def save(self, path):
        """Write `path` (JSON: format, version, the dict above) and, beside it with the suffix
        .vocab, a listing to read: one line per id with the token's text."""
        path = Path(path)
        if path.suffix == ".vocab":
            raise ValueError(f"{path}: the .vocab suffix is reserved for the readable listing")
        payload = {"format": _FILE_FORMAT, "version": _FILE_VERSION, **self.to_dict()}
        listing = [f"{i}\t{self._decoder[i].decode('utf-8', errors='replace')!r}" for i in sorted(self._decoder)]
        for target, text in ((path, json.dumps(payload)), (path.with_suffix(".vocab"), "\n".join(listing) + "\n")):
            atomic_write(target, text)

    @classmethod
    def load(cls, path):
        path = Path(path)
        remove_stale_temporaries(path)  # left by a process killed while it saved this file
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} is not a tinygrad_llm BPE tokenizer file (not JSON)") from None
        if not isinstance(payload, dict) or payload.get("format") != _FILE_FORMAT:
            raise ValueError(f"{path} is not a tinygrad_llm BPE tokenizer file (format is not {_FILE_FORMAT!r})")
        if payload.get("version") != _FILE_VERSION:
            raise ValueError(f"{path} has format version {payload.get('version')!r}; "
                             f"this code reads version {_FILE_VERSION}")
        try:
            return cls.from_dict(payload)
        except ValueError as e:
            raise ValueError(f"{path} is corrupt: {e}") from None


def _is_id(i):
    return isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_))


def _is_hex(t):
    try:
        bytes.fromhex(t)
        return True
    except (TypeError, ValueError):
        return False


def _gpt2_byte_alphabet():
    """GPT-2's files spell byte b as one printable character: bytes that print as themselves
    (b'!'..b'~', 0xA1..0xAC, 0xAE..0xFF) keep their code point; the other 68 (controls, space,
    0x7F..0xA0, 0xAD) take code points 256, 257, ... in byte order: b' ' is 'Ġ' (256 + 32).
    Returns character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in alphabet.values()]
    alphabet.update({chr(256 + n): b for n, b in enumerate(others)})
    return alphabet


class IdMappedBPETokenizer(BPETokenizer):
    """A BPETokenizer whose ids are not its ranks, as in tokenizers trained with the Hugging Face tokenizers
    library (special tokens first, bytes wherever the alphabet put them): it merges by `mergeable_ranks`
    like any BPETokenizer, then gives the token of rank r the id `ids[r]`. special_tokens hold their ids."""

    def __init__(self, mergeable_ranks, pattern, special_tokens, ids):
        super().__init__(mergeable_ranks, pattern)
        ids = np.asarray(ids, dtype=np.int64)
        special_tokens = dict(special_tokens or {})
        if ids.shape != (len(self.mergeable_ranks),) or len(set(ids.tolist()) | set(special_tokens.values())) \
                != len(ids) + len(special_tokens) or ids.min(initial=0) < 0:
            raise ValueError("ids must give each rank a distinct non-negative id, none a special token's")
        self.ids = ids
        self.special_tokens = special_tokens
        self._rank_of = {int(i): r for r, i in enumerate(ids)}
        self._decoder = {int(ids[r]): token for token, r in self.mergeable_ranks.items()}
        self._decoder.update({i: t.encode("utf-8") for t, i in special_tokens.items()})

    def public_id(self, rank):
        return int(self.ids[rank])

    def encode_ordinary(self, text):
        return self.ids[super().encode_ordinary(text)].tolist() if text else []

    def to_dict(self):
        return {**super().to_dict(), "kind": "bpe_ids", "ids": self.ids.tolist()}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict) or d.get("kind") != "bpe_ids":
            raise ValueError(f"not an IdMappedBPETokenizer dict (kind={d.get('kind') if isinstance(d, dict) else None!r})")
        plain = BPETokenizer.from_dict({**d, "kind": "bpe", "special_tokens": {}})
        return cls(plain.mergeable_ranks, plain.pattern, d["special_tokens"], d["ids"])


def tokenizer_from_dict(d):
    """Rebuild a tokenizer from its `to_dict()`, whichever kind it is."""
    kinds = {"char": CharTokenizer, "bpe": BPETokenizer, "bpe_ids": IdMappedBPETokenizer}
    kind = d.get("kind") if isinstance(d, dict) else None
    if not isinstance(kind, str) or kind not in kinds:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(kinds)}")
    return kinds[kind].from_dict(d)
