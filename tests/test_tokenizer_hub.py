"""Tokenizer files in and out (BPETokenizer.from_pretrained / save_pretrained / gpt2), with the Hugging Face
tokenizers library, transformers.AutoTokenizer and tiktoken as the oracles."""
import hashlib
import json
import subprocess
import sys
import tarfile

import pytest
from hypothesis import given, settings, strategies as st

from tinygrad_llm.tokenizer import (GPT2_SPLIT_PATTERN, BPETokenizer, CharTokenizer, IdMappedBPETokenizer,
                                    tokenizer_from_dict)

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "Ünïcödé 日本語のテキスト 🤖🎉 emoji, naïve café",
          "def f(x):\n    return x ** 2\n\n\n", "it's don't we'll 12345 67890 ... !!! ???", "\t\ttabs  and   spaces "] * 20
TEXTS = ["The quick brown fox", "Ünïcödé 日本語 🤖 新しいテキスト ñandú Ελληνικά", "   \n\n  x\t\t y   ", "trailing  \n",
         "<|endoftext|>hello<|endoftext|>", "lazy dogs jumped 123456789", "def g(y):\n        return", "",
         "I'm sure it'll work—they've said so. 👩‍👩‍👧 \u200b\u00a0 \r\n", "a" * 300]


def _hf_ids(hf_tokenizer, text):
    return hf_tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def hf_trained(tmp_path_factory):
    """A byte-level BPE trained by the tokenizers library: special tokens take ids 0..2, the 256 bytes
    come next in its alphabet's order, then the merges."""
    folder = tmp_path_factory.mktemp("hf_trained")
    trained = tokenizers.ByteLevelBPETokenizer()
    trained.train_from_iterator(CORPUS, vocab_size=420, min_frequency=1,
                                special_tokens=["<|endoftext|>", "<pad>", "<s>"])
    trained.save_model(str(folder))
    trained.save(str(folder / "tokenizer.json"))
    return folder, trained


def test_reads_tokenizers_library_ids(hf_trained, tmp_path):
    folder, trained = hf_trained
    vocab = json.loads((folder / "vocab.json").read_text())
    assert vocab["<|endoftext|>"] == 0 and vocab["!"] == 3   # not GPT-2's order
    tok = BPETokenizer.from_pretrained(folder)
    assert isinstance(tok, IdMappedBPETokenizer) and tok.special_tokens == {"<|endoftext|>": 0, "<pad>": 1, "<s>": 2}
    for text in TEXTS:
        ids = tok.encode(text, allowed_special="all")
        assert ids == trained.encode(text).ids, text
        assert tok.decode(ids) == text
    # the same from tokenizer.json alone, and through the checkpoint dict
    (tmp_path / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    alone = BPETokenizer.from_pretrained(tmp_path)
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    tok.save(tmp_path / "tok.json")
    assert type(BPETokenizer.load(tmp_path / "tok.json")) is IdMappedBPETokenizer
    for text in TEXTS:
        want = trained.encode(text).ids
        assert alone.encode(text, allowed_special="all") == want
        assert again.encode(text, allowed_special="all") == want
        assert BPETokenizer.load(tmp_path / "tok.json").encode(text, allowed_special="all") == want


def test_save_pretrained_round_trips_through_autotokenizer(hf_trained, tmp_path):
    folder, trained = hf_trained
    tok = BPETokenizer.from_pretrained(folder)
    tok.save_pretrained(tmp_path / "out")
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in TEXTS:
        assert _hf_ids(auto, text) == trained.encode(text).ids, text
    # without tokenizer.json, transformers builds GPT-2's tokenizer from vocab.json + merges.txt
    (tmp_path / "out" / "tokenizer.json").unlink()
    slow = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in TEXTS:
        assert _hf_ids(slow, text) == trained.encode(text).ids, text


@pytest.mark.parametrize("pattern", [GPT2_SPLIT_PATTERN, None], ids=["gpt2-pattern", "gpt4-pattern"])
def test_trained_here_opens_in_autotokenizer(tmp_path, pattern):
    kw = {"pattern": pattern} if pattern else {}
    tok = BPETokenizer.train("".join(CORPUS), 330, special_tokens=["<|endoftext|>"], **kw)
    tok.save_pretrained(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    back = BPETokenizer.from_pretrained(tmp_path)   # the pattern read back from tokenizer.json
    for text in TEXTS:
        ids = tok.encode(text, allowed_special="all")
        assert _hf_ids(auto, text) == ids, text
        assert auto.decode(ids) == text
        assert back.encode(text, allowed_special="all") == ids


def test_openai_file_names(hf_trained, tmp_path):
    folder, trained = hf_trained
    (tmp_path / "encoder.json").write_text((folder / "vocab.json").read_text())
    (tmp_path / "vocab.bpe").write_text((folder / "merges.txt").read_text())
    tok = BPETokenizer.from_pretrained(tmp_path)
    assert tok.encode(TEXTS[1]) == trained.encode(TEXTS[1]).ids


def test_bad_files_and_char_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="character tokenizer cannot be written"):
        CharTokenizer.from_text("abc").save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match="lacks 254 of the 256 single bytes"):
        BPETokenizer.from_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json, vocab.json"):
        BPETokenizer.from_pretrained(tmp_path / "empty")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="merges.txt line 2: expected two tokens"):
        BPETokenizer.from_pretrained(tmp_path)


# ---- GPT-2's own vocabulary, from the openai-whisper source package -------------------------------

R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"   # tiktoken's r50k_base hash


@pytest.fixture(scope="module")
def gpt2_tiktoken_file(request):
    """whisper/assets/gpt2.tiktoken from the openai-whisper source package, fetched once with pip and kept in
    pytest's cache folder (checked against the hash each time)."""
    folder = request.config.cache.mkdir("openai-whisper-sdist")
    path = folder / "gpt2.tiktoken"
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == R50K_SHA256:
        return path
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                        "openai-whisper", "-d", str(folder)], check=True, timeout=180, capture_output=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"could not fetch the openai-whisper source package from the package index: {e}")
    archive = max(folder.glob("openai_whisper-*.tar.gz"))
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
        data = tar.extractfile(member).read()
    assert hashlib.sha256(data).hexdigest() == R50K_SHA256
    path.write_bytes(data)
    archive.unlink()
    return path


@pytest.mark.slow
def test_gpt2_vocabulary_matches_tiktoken_and_transformers(gpt2_tiktoken_file, tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    r50k = tiktoken.Encoding("r50k_base", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(gpt2_tiktoken_file)),
                             special_tokens={"<|endoftext|>": 50256})
    tok = BPETokenizer.gpt2(gpt2_tiktoken_file)
    assert tok.vocab_size == 50257
    tok.save_pretrained(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    back = BPETokenizer.from_pretrained(tmp_path)
    assert type(back) is BPETokenizer   # GPT-2's own ids are its ranks: no id mapping needed
    for text in TEXTS + ["".join(CORPUS)]:
        want = r50k.encode(text, allowed_special="all")
        assert tok.encode(text, allowed_special="all") == want
        assert back.encode(text, allowed_special="all") == want
        assert _hf_ids(auto, text) == want
    assert tok.encode("Hello world") == [15496, 995]


@settings(deadline=None)
@given(st.lists(st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
                          st.sampled_from(["<|endoftext|>", "<pad>", " ", "  ", "\n\n", "'s", "fox", "日本", "🤖"])),
                max_size=8))
def test_ids_equal_the_tokenizers_library_on_any_text(hf_trained, parts):
    folder, trained = hf_trained
    tok = _hf_trained_tokenizer(folder)
    text = "".join(parts)
    assert tok.encode(text, allowed_special="all") == trained.encode(text).ids


_LOADED = {}


def _hf_trained_tokenizer(folder):
    if folder not in _LOADED:
        _LOADED[folder] = BPETokenizer.from_pretrained(folder)
    return _LOADED[folder]


@pytest.fixture(scope="module")
def gpt4_pattern_pair(tmp_path_factory):
    """A tokenizer trained here with the GPT-4 split pattern, and transformers' tokenizer of its files."""
    folder = tmp_path_factory.mktemp("gpt4_pattern")
    tok = BPETokenizer.train("".join(CORPUS), 330, special_tokens=["<|endoftext|>"])
    tok.save_pretrained(folder)
    return tok, transformers.AutoTokenizer.from_pretrained(folder)


@settings(deadline=None)
@given(st.lists(st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
                          st.sampled_from(["<|endoftext|>", " ", "  ", "\n\n", "\r\n", "'S", "1234567", "fox", "🤖"])),
                max_size=8))
def test_gpt4_pattern_export_equals_transformers_on_any_text(gpt4_pattern_pair, parts):
    tok, auto = gpt4_pattern_pair
    text = "".join(parts)
    assert _hf_ids(auto, text) == tok.encode(text, allowed_special="all")
