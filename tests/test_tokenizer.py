"""Tokenizer tests: each behaviour pinned by an invariant, an external oracle (tiktoken) or a
worked example small enough to check by hand."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from tinygrad_llm import tokenizer as tokenizer_module
from tinygrad_llm.tokenizer import (GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, BPETokenizer, CharTokenizer,
                                    _ascii_twin, _count_pieces, _encode_bytes, _gpt2_byte_alphabet,
                                    _merge_batch_numba, _merge_by_rank, _merge_by_rank_heap, _pair_table, tokenizer_from_dict,
                                    train_ranks_reference)
import regex

SHAKESPEARE = Path(__file__).resolve().parents[1] / "examples" / "data" / "tinyshakespeare.txt"  # shipped with the repository
PATTERNS = {"gpt2": GPT2_SPLIT_PATTERN, "gpt4": GPT4_SPLIT_PATTERN}

# texts where tokenizers usually disagree: whitespace runs, contractions, CJK, emoji, code, scripts
HARD_TEXTS = [
    "", " ", "   ", "\n", "\n\n\n", "\t \t", "a  b   c    d", "trailing spaces   ", "   leading",
    "line one\r\nline two\r\n", "x\n \n  \ny", "\u00a0non-breaking\u00a0space\u3000ideographic",
    "I'm can't we'll they've he'd she's you're I'M DON'T 'tis", "o'clock '''quoted'''",
    "我们在北京学习自然语言处理。こんにちは世界！한국어 텍스트",
    "emoji 😀😃 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽",
    "def f(x):\n    return x**2  # square\n\tif a != b: print(f'{a!r}')\n",
    "numbers 1 12 123 1234 12345 3.14159 1,000,000 ٣٤٥ ⅷ",
    "Ελληνικά, русский, العربية, עברית, हिन्दी, ไทย — mixed!",
    "e\u0301 composed é vs decomposed; zero\u200bwidth",
    "<|endoftext|> is plain text here", "!!!???...,,,;;;", "MiXeD CaSe WoRdS", "a" * 300,
]


def _corpus():
    """A training text with every script of HARD_TEXTS, so merges form inside multi-byte characters."""
    base = SHAKESPEARE.read_text(encoding="utf-8")[:100_000] if SHAKESPEARE.is_file() else "hello world " * 500
    return base + "\n".join(HARD_TEXTS * 20)


@pytest.fixture(scope="module")
def trained():
    corpus = _corpus()
    return {name: BPETokenizer.train(corpus, 600, pattern=p, special_tokens=["<|endoftext|>", "<|pad|>"])
            for name, p in PATTERNS.items()}


@pytest.fixture(scope="module")
def reference(trained):
    """tiktoken built from the same ranks, pattern and special tokens: the external oracle."""
    tiktoken = pytest.importorskip("tiktoken")
    return {name: tiktoken.Encoding(f"test_{name}", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks,
                                    special_tokens=tok.special_tokens) for name, tok in trained.items()}


# ----- CharTokenizer -----

def test_char_worked_example_and_round_trip():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"] and tok.vocab_size == 8
    assert tok.encode("hold") == [3, 5, 4, 1]
    assert tok.decode(tok.encode("hello world")) == "hello world"
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert isinstance(again, CharTokenizer) and again.chars == tok.chars


def test_char_errors_name_the_culprit():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"'z' at position 2"):
        tok.encode("abzc")
    with pytest.raises(ValueError, match=r"token id 3 is outside"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tokenizer_from_dict({"kind": "wordpiece"})


# ----- BPE: worked example, reference loop, tie-break -----

def test_bpe_worked_example():
    # "aaabdaaabac" is one piece. Pair counts: aa 4, ab 2, the rest 1 -> merge aa=256.
    # Then (aa,a) 2 and (a,b) 2 tie; (97,98) < (256,97) -> merge ab=257.
    # Then (aa,ab) 2 is the only pair seen twice -> merge aaab=258.
    tok = BPETokenizer.train("aaabdaaabac", 259, special_tokens=["<|endoftext|>"])
    merged = {t: r for t, r in tok.mergeable_ranks.items() if r >= 256}
    assert merged == {b"aa": 256, b"ab": 257, b"aaab": 258}
    assert tok.special_tokens == {"<|endoftext|>": 259} and tok.n_vocab == tok.vocab_size == 260
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.encode("aab") == [256, 98]  # aa (256) beats ab (257): lower rank first
    assert tok.decode([258, 100, 259]) == "aaabd<|endoftext|>"


def test_merge_by_rank_is_tiktokens_rule():
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"bc": 257}
    assert _merge_by_rank(b"abc", ranks) == [256, 99]  # ab has the lower rank; ab+c is not a token
    assert _merge_by_rank(b"bcab", ranks) == [257, 256]  # ab first although bc is further left
    assert _merge_by_rank(b"abc", ranks | {b"abc": 258}) == [258]


@pytest.mark.parametrize("pattern", PATTERNS.values(), ids=PATTERNS.keys())
def test_fast_training_equals_reference_loop(pattern):
    text = _corpus()[:30_000]
    fast = BPETokenizer.train(text, 400, pattern=pattern)
    assert fast.mergeable_ranks == train_ranks_reference(_count_pieces(text, pattern, ()), 400)


def test_training_stops_when_no_pair_is_left():
    tok = BPETokenizer.train("ab ab", 1000)
    assert tok.n_vocab == 258  # ab, then " ab"


def test_training_is_deterministic_and_streamable():
    text = _corpus()[:20_000]
    blocks = [text[i:i + 997] for i in range(0, len(text), 997)]  # only the block ends change pieces
    assert BPETokenizer.train(text, 300).mergeable_ranks == BPETokenizer.train(text, 300).mergeable_ranks
    assert BPETokenizer.train(iter(blocks), 300).n_vocab == 300


def test_bad_training_arguments():
    with pytest.raises(ValueError, match="at least 256"):
        BPETokenizer.train("abc", 255)
    with pytest.raises(ValueError, match="duplicate special tokens"):
        BPETokenizer.train("abc", 256, special_tokens=["<|a|>", "<|b|>", "<|a|>"])
    with pytest.raises(ValueError, match="lacks 1 single bytes"):
        BPETokenizer.from_tiktoken({bytes([b]): b for b in range(255)}, GPT4_SPLIT_PATTERN)
    with pytest.raises(ValueError, match="taken by another token"):
        BPETokenizer.from_tiktoken({bytes([b]): b for b in range(256)}, GPT4_SPLIT_PATTERN, {"<|x|>": 7})


# ----- round trip and tiktoken parity -----

@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=200), name=st.sampled_from(sorted(PATTERNS)))
def test_round_trip_arbitrary_unicode(trained, text, name):
    tok = trained[name]
    assert tok.decode(tok.encode(text, disallowed_special=())) == text


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_ids_identical_to_tiktoken_on_hard_texts(trained, reference, name):
    tok, ref = trained[name], reference[name]
    for text in HARD_TEXTS + ["".join(HARD_TEXTS)]:
        assert tok.encode(text, disallowed_special=()) == ref.encode(text, disallowed_special=()), text
    mixed = "a<|endoftext|>b <|pad|>c"
    assert tok.encode(mixed, allowed_special="all") == ref.encode(mixed, allowed_special="all")
    if SHAKESPEARE.is_file():
        held_out = SHAKESPEARE.read_text(encoding="utf-8")[-200_000:]  # training saw the first 100k only
        assert tok.encode(held_out) == ref.encode(held_out)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=120), name=st.sampled_from(sorted(PATTERNS)))
def test_ids_identical_to_tiktoken_on_arbitrary_text(trained, reference, text, name):
    assert trained[name].encode_ordinary(text) == reference[name].encode_ordinary(text)


# ----- cold encoding: the batched Numba kernel and the pure-Python loop -----

# _NUMBA_MIN_PIECES that forces each path; "no numba" is a machine without Numba, however many pieces
MERGE_PATHS = {"numba": 0, "python": sys.maxsize, "no numba": 0}


@pytest.fixture(params=sorted(MERGE_PATHS))
def merge_path(request, monkeypatch):
    """Runs a test with every new piece merged by the Numba kernel, by the Python loop, and by the
    Python loop because Numba is missing."""
    if request.param == "numba":
        pytest.importorskip("numba")
    if request.param == "no numba":
        monkeypatch.setattr(tokenizer_module, "_compiled_kernel", lambda: None)
    monkeypatch.setattr(tokenizer_module, "_NUMBA_MIN_PIECES", MERGE_PATHS[request.param])
    monkeypatch.setattr(tokenizer_module, "_NUMBA_MIN_BYTES", MERGE_PATHS[request.param])
    calls = []
    monkeypatch.setattr(tokenizer_module, "_merge_batch_numba",
                        lambda *args: calls.append(1) or _merge_batch_numba(*args))
    yield request.param
    assert bool(calls) == (request.param == "numba"), "the path under test was not taken"


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_cold_encode_equals_tiktoken(trained, reference, merge_path, name):
    tok, ref = trained[name], reference[name]
    held_out = SHAKESPEARE.read_text(encoding="utf-8")[-20_000:] if SHAKESPEARE.is_file() else ""
    texts = HARD_TEXTS + ["".join(HARD_TEXTS), held_out, held_out.replace("'", "\u2019")]
    for text in texts:  # each on a new tokenizer: every piece is new
        cold = BPETokenizer(tok.mergeable_ranks, tok.pattern)
        assert cold.encode_ordinary(text) == ref.encode_ordinary(text), text
    one = BPETokenizer(tok.mergeable_ranks, tok.pattern)  # one tokenizer: some pieces cached, some new
    assert [one.encode_ordinary(t) for t in texts] == [ref.encode_ordinary(t) for t in texts]


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=120), name=st.sampled_from(sorted(PATTERNS)))
def test_numba_kernel_equals_python_loop_on_arbitrary_text(trained, text, name):
    pytest.importorskip("numba")
    tok = trained[name]
    ranks = tok.mergeable_ranks
    datas = [piece.encode("utf-8") for piece in regex.findall(tok.pattern, text)]
    assert _merge_batch_numba(datas, ranks, _pair_table(ranks)) == [_encode_bytes(data, ranks) for data in datas]


def test_numba_kernel_follows_tiktokens_rule():
    pytest.importorskip("numba")
    # aaa ranks before aa, its own prefix: ranks need not come in the order training would make them
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"bc": 257, b"abc": 258, b"aaa": 259, b"aa": 260}
    datas = [b"abc", b"bcab", b"abcbc", b"aaaa", b"aaaaa", b"a", b"", b"xyz"]
    assert _merge_batch_numba(datas, ranks, _pair_table(ranks)) == [_encode_bytes(d, ranks) for d in datas] == [
        (258,), (257, 256), (258, 257), (259, 97), (259, 260), (97,), (), (120, 121, 122)]
    # a whole piece that is a token stays one token although merging by rank would split it
    stuck = {bytes([b]): b for b in range(256)} | {b"bc": 256, b"abcd": 257}  # a|bc|d: neither abc nor bcd is a token
    assert _merge_batch_numba([b"abcd", b"abcde"], stuck, _pair_table(stuck)) == [(257,), (97, 256, 100, 101)]


# ----- long pieces: a run of one character is one piece, merged in n log n -----

RUN_CHARS = ["e", " ", "!", "1", "\n", "\u00e9", "\u6211", "\U0001f600"]


@pytest.fixture(scope="module")
def run_tokenizers():
    """Tokenizers whose vocabularies hold runs (ee, eee, eeee, ...) of each RUN_CHARS character, with
    tiktoken built from the same ranks as the oracle."""
    tiktoken = pytest.importorskip("tiktoken")
    base = SHAKESPEARE.read_text(encoding="utf-8")[:20_000] if SHAKESPEARE.is_file() else "hello world " * 500
    corpus = base + "".join(f"{c * k} x " * (40 // k + 1) for c in RUN_CHARS for k in range(1, 40))
    out = {}
    for name, pattern in PATTERNS.items():
        tok = BPETokenizer.train(corpus, 700, pattern=pattern)
        out[name] = tok, tiktoken.Encoding(f"runs_{name}", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks,
                                           special_tokens={})
    return out


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_runs_of_one_character_equal_tiktoken(run_tokenizers, merge_path, name):
    tok, ref = run_tokenizers[name]
    for c in RUN_CHARS:
        lengths = [1, 2, 3, 64, 65, 66, 1001] + ([50_000] if merge_path == "numba" and c in "e\u00e9" else [])
        for n in lengths:
            text = f"{c * n} again {c * n}"
            cold = BPETokenizer(tok.mergeable_ranks, tok.pattern)
            assert cold.encode_ordinary(text) == ref.encode_ordinary(text), (c, n)


@settings(max_examples=60, deadline=None)
@given(word=st.text(alphabet="eabé", min_size=60, max_size=400))
def test_heap_merge_equals_scan_on_long_pieces(run_tokenizers, word):
    """The heap merge (pieces over _HEAP_MIN_BYTES), in Python and in the kernel, joins what the scan joins."""
    ranks = run_tokenizers["gpt4"][0].mergeable_ranks
    data = word.encode("utf-8")
    scan = _merge_by_rank(data, ranks)
    assert _merge_by_rank_heap(data, ranks) == scan
    if data not in ranks:
        assert _merge_batch_numba([b"ab", data, b"e"], ranks, _pair_table(ranks))[1] == tuple(scan)


@pytest.mark.slow
def test_a_megabyte_of_one_character_encodes_in_under_a_second():
    """It was quadratic: 16k characters took 8.6 s and a megabyte did not finish. In a child process (a
    regression would otherwise hang the test run); CPU time of the encode alone, the kernel loaded first."""
    code = textwrap.dedent("""
        import time
        from tinygrad_llm.tokenizer import BPETokenizer, GPT4_SPLIT_PATTERN
        text = "the cheese " * 300 + "".join(f"{'e' * k} " * 10 for k in range(1, 30))
        tok = BPETokenizer.train(text, 400, pattern=GPT4_SPLIT_PATTERN)
        tok.encode("warm up the kernel " + "e" * 20_000)
        start = time.process_time()
        ids = tok.encode("e" * 1_000_000)
        print(time.process_time() - start, len(ids))
    """)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-2000:]
    seconds, n_ids = result.stdout.split()
    assert float(seconds) < 1.0 and int(n_ids) < 1_000_000


def test_cold_encode_past_the_cache_limit(trained, reference, monkeypatch):
    tok, ref = trained["gpt4"], reference["gpt4"]
    monkeypatch.setattr(tokenizer_module, "_ENCODE_CACHE_LIMIT", 10)
    cold = BPETokenizer(tok.mergeable_ranks, tok.pattern)
    text = "".join(HARD_TEXTS)
    assert cold.encode_ordinary("a b c") == ref.encode_ordinary("a b c") and len(cold._cache) == 3
    assert cold.encode_ordinary(text) == cold.encode_ordinary(text) == ref.encode_ordinary(text)
    assert len(cold._cache) == 3  # the long text's new pieces did not fit: none were kept


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(max_codepoint=127), max_size=80), name=st.sampled_from(sorted(PATTERNS)))
def test_ascii_twin_splits_like_regex(text, name):
    pattern = PATTERNS[name]
    assert _ascii_twin(pattern).findall(text) == regex.findall(pattern, text)


def test_ascii_twin_declines_what_it_cannot_translate():
    assert _ascii_twin(r"\p{Lu}+|\s") is None and _ascii_twin(r"\w+") is None and _ascii_twin("é|.") is None
    assert _ascii_twin(r"[\s\p{N}]+|\S").pattern == r"[\t\n\x0b\x0c\r 0-9]+|[^\t\n\x0b\x0c\r ]"


# ----- special tokens -----

def test_special_token_policy(trained):
    tok = trained["gpt4"]
    eot, pad = tok.special_tokens["<|endoftext|>"], tok.special_tokens["<|pad|>"]
    text = "hi<|endoftext|>there<|pad|>"
    with pytest.raises(ValueError, match=re.escape("'<|endoftext|>' at position 2")):
        tok.encode(text)
    with pytest.raises(ValueError, match=re.escape("'<|pad|>'")):
        tok.encode(text, allowed_special={"<|endoftext|>"})
    assert tok.encode(text, allowed_special="all") == tok.encode("hi") + [eot] + tok.encode("there") + [pad]
    as_text = tok.encode(text, disallowed_special=())
    assert eot not in as_text and pad not in as_text and tok.decode(as_text) == text
    assert tok.encode_ordinary(text) == as_text
    # allowed one, the other plain text (not disallowed): like tiktoken
    mixed = tok.encode(text, allowed_special={"<|pad|>"}, disallowed_special=())
    assert mixed[-1] == pad and eot not in mixed
    with pytest.raises(ValueError, match="unknown special tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})


# ----- decoding -----

def test_decode_replaces_invalid_utf8_and_rejects_unknown_ids(trained):
    tok = trained["gpt4"]
    assert tok.decode_bytes([0xE4, 0xB8]) == b"\xe4\xb8" and tok.decode([0xE4, 0xB8]) == "\ufffd"
    with pytest.raises(ValueError, match=f"token id {tok.n_vocab} is not in the vocabulary"):
        tok.decode([1, tok.n_vocab])


def test_streaming_decode_holds_back_split_characters(trained):
    tok = trained["gpt4"]
    text = "héllo 世界 😀 done"
    byte_ids = list(text.encode("utf-8"))  # single bytes split every multi-byte character
    dec = tok.incremental_decoder()
    pieces = [dec.feed(i) for i in byte_ids]
    assert "".join(pieces) + dec.flush() == text
    assert "\ufffd" not in "".join(pieces)
    emoji_start = text.encode("utf-8").index("😀".encode("utf-8"))
    assert pieces[emoji_start:emoji_start + 3] == ["", "", ""] and pieces[emoji_start + 3] == "😀"
    dec = tok.incremental_decoder()  # merged tokens, fed a few at a time
    ids = tok.encode(text)
    assert "".join(dec.feed(ids[i:i + 2]) for i in range(0, len(ids), 2)) + dec.flush() == text
    dec = tok.incremental_decoder()
    assert dec.feed([0xF0, 0x9F]) == "" and dec.flush() == "\ufffd"  # stream ended mid-character


# ----- saving and loading -----

def test_save_load_round_trip(trained, tmp_path):
    tok = trained["gpt2"]
    path = tmp_path / "tok.json"
    tok.save(path)
    again = BPETokenizer.load(path)
    assert again.mergeable_ranks == tok.mergeable_ranks and again.pattern == tok.pattern
    assert again.special_tokens == tok.special_tokens
    assert again.encode("A round trip, 世界!") == tok.encode("A round trip, 世界!")
    listing = (tmp_path / "tok.vocab").read_text(encoding="utf-8").splitlines()
    assert len(listing) == tok.n_vocab and listing[104] == "104\t'h'" and "<|pad|>" in listing[-1]
    assert isinstance(tokenizer_from_dict(tok.to_dict()), BPETokenizer)


def test_load_errors_are_clear(trained, tmp_path):
    bad = tmp_path / "bad.json"
    with pytest.raises(FileNotFoundError, match="bad.json"):
        BPETokenizer.load(bad)
    bad.write_bytes(b"\x00\xffnot json")
    with pytest.raises(ValueError, match="not a tinygrad_llm BPE tokenizer file"):
        BPETokenizer.load(bad)
    bad.write_text(json.dumps({"model": "something else"}))
    with pytest.raises(ValueError, match="format is not"):
        BPETokenizer.load(bad)
    trained["gpt4"].save(bad)
    payload = json.loads(bad.read_text())
    bad.write_text(json.dumps(payload | {"version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        BPETokenizer.load(bad)
    bad.write_text(json.dumps(payload | {"tokens": payload["tokens"][:200]}))  # bytes 200..255 lost
    with pytest.raises(ValueError, match="corrupt"):
        BPETokenizer.load(bad)
    bad.write_text(json.dumps(payload | {"tokens": payload["tokens"][:300] + ["zz"]}))
    with pytest.raises(ValueError, match="corrupt"):
        BPETokenizer.load(bad)
    with pytest.raises(ValueError, match="reserved"):
        trained["gpt4"].save(tmp_path / "x.vocab")


def _write_gpt2_files(tok, folder):
    """encoder.json + vocab.bpe in OpenAI's layout for `tok`'s merges, single bytes in GPT-2's order."""
    alphabet = _gpt2_byte_alphabet()
    spell = {byte: char for char, byte in alphabet.items()}
    merged = sorted((r, t) for t, r in tok.mergeable_ranks.items() if r >= 256)
    ranks = {bytes([b]): i for i, b in enumerate(alphabet.values())} | {t: r for r, t in merged}
    lines = []
    for r, token in merged:  # any split into two earlier tokens is a valid merge line
        k = next(k for k in range(1, len(token)) if ranks.get(token[:k], r) < r and ranks.get(token[k:], r) < r)
        lines.append(" ".join("".join(spell[b] for b in part) for part in (token[:k], token[k:])))
    encoder = {"".join(spell[b] for b in t): r for t, r in ranks.items()} | {"<|endoftext|>": len(ranks)}
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return ranks


def test_gpt2_files_load_like_tiktoken(trained, tmp_path, monkeypatch):
    load = pytest.importorskip("tiktoken.load")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the files directly, cache nothing
    ranks = _write_gpt2_files(trained["gpt2"], tmp_path)
    tok = BPETokenizer.from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    assert tok.mergeable_ranks == ranks
    assert tok.mergeable_ranks == load.data_gym_to_mergeable_bpe_ranks(str(tmp_path / "vocab.bpe"),
                                                                       str(tmp_path / "encoder.json"))
    assert tok.special_tokens == {"<|endoftext|>": len(ranks)} and tok.pattern == GPT2_SPLIT_PATTERN
    assert _gpt2_byte_alphabet()["Ġ"] == ord(" ")
    lines = (tmp_path / "vocab.bpe").read_text().split("\n")
    (tmp_path / "vocab.bpe").write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]))
    with pytest.raises(ValueError, match="merge 0 .* does not match"):
        BPETokenizer.from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


def test_tokenizer_save_and_load_remove_stale_temporaries(trained, tmp_path):
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()                                   # a writer that was killed: its pid no longer runs
    path = tmp_path / "tok.json"
    stale = [f".tok.json.{child.pid}.abcdefgh.tmp", f".tok.vocab.{child.pid}.abcdefgh.tmp"]
    kept = [".tok.json.notes.tmp", "tok.json.bak"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    trained["gpt4"].save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["tok.json", "tok.vocab"])
    (tmp_path / stale[0]).write_bytes(b"x")
    BPETokenizer.load(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["tok.json", "tok.vocab"])


# ----- malformed tokenizer files and dicts: a ValueError naming the field -----

def _bpe_file(trained, tmp_path, **changes):
    path = tmp_path / "tok.json"
    trained["gpt4"].save(path)
    payload = json.loads(path.read_text())
    payload.update(changes)
    path.write_text(json.dumps(payload))
    return path


@pytest.mark.parametrize("changes, message", [
    (dict(pattern="(unclosed"), "pattern is not a valid regular expression"),
    (dict(pattern="[z-a]"), "pattern is not a valid regular expression"),
    (dict(pattern=42), "pattern must be a regular expression string, got int"),
    (dict(special_tokens={"<|endoftext|>": "600"}), r"special_tokens: the id of '<\|endoftext\|>' must be a non-negative integer, got '600'"),
    (dict(special_tokens={"<|endoftext|>": 600.5}), "must be a non-negative integer, got '600.5'"),
    (dict(special_tokens={"<|endoftext|>": True}), "must be a non-negative integer, got 'True'"),
    (dict(special_tokens={"<|endoftext|>": -1}), "must be a non-negative integer"),
    (dict(special_tokens={"<|endoftext|>": None}), "must be a non-negative integer, got 'None'"),
    (dict(special_tokens={"": 700}), "a special token must be a non-empty string"),
    (dict(special_tokens=["<|endoftext|>"]), "'special_tokens' must map strings to ids, got list"),
    (dict(tokens="00ff"), "'tokens' must be a list of hex strings, got str"),
    (dict(tokens=[0, 1]), "'tokens' holds '0', not a hex string"),
    (dict(tokens=["zz"]), "'tokens' holds 'zz', not a hex string"),
])
def test_bpe_file_with_a_bad_field_is_a_value_error_naming_it(trained, tmp_path, changes, message):
    path = _bpe_file(trained, tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        BPETokenizer.load(path)
    with pytest.raises(ValueError, match=message):
        tokenizer_from_dict(json.loads(path.read_text()))


def test_bpe_dict_lacking_a_field_is_named(trained):
    d = trained["gpt4"].to_dict()
    del d["pattern"]
    with pytest.raises(ValueError, match=r"it lacks \['pattern'\]"):
        tokenizer_from_dict(d)


@pytest.mark.parametrize("d, message", [
    ({"kind": "char"}, "'chars' must be a string of the vocabulary's characters, got NoneType"),
    ({"kind": "char", "chars": ["a", "b"]}, "'chars' must be a string of the vocabulary's characters, got list"),
    ({"kind": "char", "chars": 12}, "'chars' must be a string.*got int"),
    ({"kind": "char", "chars": None}, "'chars' must be a string.*got NoneType"),
    ({"kind": "char", "chars": "abca"}, "chars must be distinct"),
    ({"kind": "bpe"}, r"it lacks \['tokens', 'pattern', 'special_tokens'\]"),
    (["char", "abc"], "unknown tokenizer kind None"),
    ({"kind": ["char"]}, "unknown tokenizer kind"),
])
def test_malformed_tokenizer_dicts_are_value_errors(d, message):
    with pytest.raises(ValueError, match=message):
        tokenizer_from_dict(d)


def test_char_tokenizer_constructor_names_bad_characters():
    with pytest.raises(ValueError, match="chars must be single characters, got 'ab'"):
        CharTokenizer(["ab", "c"])
    with pytest.raises(ValueError, match="chars must be single characters, got '7'"):
        CharTokenizer([7])
    with pytest.raises(ValueError, match="chars must be a string"):
        CharTokenizer(None)
    with pytest.raises(ValueError, match="not a CharTokenizer dict"):
        CharTokenizer.from_dict("char")
