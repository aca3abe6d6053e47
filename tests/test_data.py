"""Data pipeline tests: prepare's files, the streaming cut, and get_batch's windows."""
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinygrad_llm.data import get_batch, load_meta, load_tokenizer, prepare, read_blocks
from tinygrad_llm.tokenizer import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, BPETokenizer, CharTokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "  indented line\n\t\ttabs  \nend.\nx\n \n\n  \nNumbers 12345!\n'Tis so.\n日本語のテキスト\n😀 ok\n") * 8


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_prepare_char_writes_splits_and_meta(text_file, tmp_path):
    meta = prepare(text_file, tmp_path / "out", val_fraction=0.25)
    tok = load_tokenizer(tmp_path / "out")
    assert isinstance(tok, CharTokenizer) and tok.chars == sorted(set(TEXT))
    ids = tok.encode(TEXT)
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val) == int(len(ids) * 0.25)
    assert np.concatenate([train, val]).tolist() == ids
    assert load_meta(tmp_path / "out") == meta
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_prepare_bpe_streams_to_the_same_ids_as_one_pass(text_file, tmp_path):
    meta = prepare(text_file, tmp_path / "bpe", tokenizer="bpe:300", chunk_chars=50)
    tok = load_tokenizer(tmp_path / "bpe")
    assert isinstance(tok, BPETokenizer) and meta["vocab_size"] == 301  # 300 + <|endoftext|>
    ids = np.concatenate([np.fromfile(tmp_path / "bpe" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert ids.tolist() == tok.encode(TEXT)
    # a saved tokenizer, given by path, is used as it is; a literal <|endoftext|> becomes its id
    tok.save(tmp_path / "tok.json")
    (tmp_path / "docs.txt").write_text("one doc\n<|endoftext|>another doc\n", encoding="utf-8")
    prepare(tmp_path / "docs.txt", tmp_path / "docs", tokenizer=str(tmp_path / "tok.json"), val_fraction=0)
    ids = np.fromfile(tmp_path / "docs" / "train.bin", dtype=np.uint16).tolist()
    assert tok.special_tokens["<|endoftext|>"] in ids and load_tokenizer(tmp_path / "docs").decode(ids) == \
        "one doc\n<|endoftext|>another doc\n"


@pytest.mark.parametrize("pattern", [GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN], ids=["gpt2", "gpt4"])
def test_block_cuts_never_change_ids(pattern, tmp_path):
    text = (SHAKESPEARE.read_text(encoding="utf-8")[:40_000] if SHAKESPEARE.is_file() else "") + TEXT
    text += "crlf line\r\nnext\r\n  \r\nword!\nWord\n\n"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8", newline="")
    tok = BPETokenizer.train(text, 320, pattern=pattern)
    for chunk_chars in (7, 64, 1000):
        blocks = list(read_blocks(path, chunk_chars))
        assert "".join(blocks) == text
        assert [i for b in blocks for i in tok.encode_ordinary(b)] == tok.encode_ordinary(text)
    assert list(read_blocks(path, 7))[0].endswith("\n")


def test_read_blocks_worked_example(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a\n b\nc", encoding="utf-8")
    assert list(read_blocks(path, 2)) == ["a\n b\n", "c"]  # the first newline has a space after it


def test_dtype_is_uint32_only_when_the_vocabulary_needs_it(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x12000) if not 0xD800 <= c < 0xE000][:1 << 16]
    for n_chars, dtype in ((1 << 16, "uint16"), ((1 << 16) + 1, "uint32")):
        text = "".join(chars[:n_chars - 1]) + "A"  # ids up to n_chars - 1
        path = tmp_path / f"{n_chars}.txt"
        path.write_text(text, encoding="utf-8")
        meta = prepare(path, tmp_path / str(n_chars), val_fraction=0.5)
        assert meta["vocab_size"] == n_chars and meta["dtype"] == dtype
        ids = np.concatenate([np.fromfile(tmp_path / str(n_chars) / f"{s}.bin", dtype) for s in ("train", "val")])
        assert ids.max() == n_chars - 1 and len(ids) == n_chars


def test_prepare_errors(tmp_path, text_file):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare(tmp_path / "missing.txt", tmp_path / "out")
    with pytest.raises(ValueError, match="'bpe:N'"):
        prepare(text_file, tmp_path / "out", tokenizer="bpe:lots")
    with pytest.raises(ValueError, match="'char', 'bpe:N'"):
        prepare(text_file, tmp_path / "out", tokenizer="wordpiece")
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(text_file, tmp_path / "out", val_fraction=1.0)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        prepare(tmp_path / "empty.txt", tmp_path / "out")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A prepared char-level data folder that the tests below only read."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "input.txt").write_text(TEXT, encoding="utf-8")
    prepare(folder / "input.txt", folder, val_fraction=0.1)
    return folder


def test_get_batch_shapes_shift_and_source(data_dir):
    train = np.fromfile(data_dir / "train.bin", dtype=np.uint16).astype(np.int64)
    x, y = get_batch(data_dir, "train", 6, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (6, 16) and x.dtype == y.dtype == np.int64
    assert (x[:, 1:] == y[:, :-1]).all()
    for row_x, row_y in zip(x, y):  # each row is a window of the data, its target the next window
        starts = [s for s in range(len(train) - 16) if (train[s:s + 16] == row_x).all()]
        assert any((train[s + 1:s + 17] == row_y).all() for s in starts)


@settings(max_examples=20, deadline=None)
@given(block_size=st.integers(1, 40), batch_size=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_targets_are_inputs_shifted_by_one(data_dir, block_size, batch_size, seed):
    x, y = get_batch(data_dir, "val", batch_size, block_size, np.random.default_rng(seed))
    assert x.shape == (batch_size, block_size) and (x[:, 1:] == y[:, :-1]).all()


def test_get_batch_is_deterministic_for_a_seed(data_dir):
    a = get_batch(data_dir, "train", 4, 8, np.random.default_rng(123))
    b = get_batch(data_dir, "train", 4, 8, np.random.default_rng(123))
    c = get_batch(data_dir, "train", 4, 8, np.random.default_rng(124))
    assert all((p == q).all() for p, q in zip(a, b)) and not (a[0] == c[0]).all()


def test_windows_cover_every_token(data_dir):
    """Starts range over every position that leaves room for the target, so no token is skipped
    (the off-by-one of LLMs-from-scratch #23): the first and last tokens appear too."""
    n = load_meta(data_dir)["val_tokens"]
    val = np.fromfile(data_dir / "val.bin", dtype=np.uint16)
    block_size, seen_x, seen_y = 8, np.zeros(n, bool), np.zeros(n, bool)
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y = get_batch(data_dir, "val", 16, block_size, rng)
        for row_x, row_y in zip(x, y):
            s = next(s for s in range(n - block_size) if (val[s:s + block_size + 1] == np.append(row_x, row_y[-1])).all())
            seen_x[s:s + block_size] = seen_y[s + 1:s + block_size + 1] = True
    assert seen_x[:-1].all() and seen_y[1:].all()


def test_get_batch_errors(text_file, tmp_path):
    data_dir, rng = tmp_path / "data", np.random.default_rng(0)
    prepare(text_file, data_dir, val_fraction=0.1)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        get_batch(tmp_path / "nowhere", "train", 2, 8, rng)
    with pytest.raises(ValueError, match="split must be"):
        get_batch(data_dir, "test", 2, 8, rng)
    n_val = load_meta(data_dir)["val_tokens"]
    with pytest.raises(ValueError, match=f"has {n_val} tokens, fewer than block_size"):
        get_batch(data_dir, "val", 2, n_val, rng)
    get_batch(data_dir, "val", 2, n_val - 1, rng)  # the longest window that fits
    raw = (data_dir / "train.bin").read_bytes()
    (data_dir / "train.bin").write_bytes(raw[:-2])
    with pytest.raises(ValueError, match="truncated"):
        get_batch(data_dir, "train", 2, 8, rng)
    (data_dir / "train.bin").unlink()
    with pytest.raises(FileNotFoundError, match="train.bin"):
        get_batch(data_dir, "train", 2, 8, rng)
    (data_dir / "meta.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(ValueError, match="not written by"):
        load_meta(data_dir)


@pytest.mark.parametrize("content, message", [
    (b"", r"input text file is empty"),
    (bytes(range(256)) * 4, r"is not UTF-8 text \(invalid start byte: byte 0x80\)"),
    (b"looks like text\x00but is not\n" * 50, r"looks like a binary file, not text: it holds NUL characters"),
])
@pytest.mark.parametrize("tokenizer", ["char", "bpe:260"])
def test_prepare_refuses_empty_and_binary_files_and_leaves_nothing(tmp_path, content, message, tokenizer):
    path = tmp_path / "input.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        prepare(path, tmp_path / "out", tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec", ["bpe:", "bpe:abc", "bpe:255", "bpe:-3", "words", "missing/tok.json"])
def test_prepare_names_a_bad_tokenizer_before_reading_the_text(text_file, tmp_path, spec):
    with pytest.raises(ValueError, match="tokenizer"):
        prepare(text_file, tmp_path / "out", tokenizer=spec)
    assert not (tmp_path / "out").exists()


def test_a_file_that_turns_out_not_to_be_text_leaves_no_temporary_file(tmp_path):
    tok = BPETokenizer.train("some text to learn from", 260)
    tok.save(tmp_path / "tok.json")                 # a saved tokenizer: the text is first read while encoding
    (tmp_path / "input.txt").write_bytes(b"fine text\n" * 10 + b"\xff\xfe")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        prepare(tmp_path / "input.txt", tmp_path / "out", tokenizer=str(tmp_path / "tok.json"))
    assert not list((tmp_path / "out").glob("*"))
