"""python -m tinygrad_llm.generate: Hugging Face's greedy continuation, streamed UTF-8, one-line errors."""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_models import hf_greedy, make_checkpoint
from tinygrad_llm import backend
from tinygrad_llm import generate as generate_module

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, kernels=False, timeout=120):
    """The CLI in a subprocess; kernels=False runs the NumPy reference path (no Numba start-up: ~1 s a run
    instead of ~4 s), which the model's own tests check against the kernels."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TINYGRAD_LLM_KERNELS": "1" if kernels else "0"}
    return subprocess.run([sys.executable, "-m", "tinygrad_llm.generate", *map(str, args)], capture_output=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.safetensors"
    model, tokenizer = make_checkpoint(path, "bpe")
    return path, model, tokenizer


@pytest.mark.slow
def test_greedy_equals_transformers_and_stdout_is_prompt_plus_continuation(hf_gpt2):
    folder, hf_model, hf_tokenizer = hf_gpt2
    prompts = ["The quick brown", "日本語の"]
    for prompt in prompts:
        result = run_cli("--model", folder, "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "24",
                         kernels=prompt == prompts[0])
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.decode("utf-8") == prompt + hf_greedy(hf_model, hf_tokenizer, prompt, 24)
        assert b"tokens/s" in result.stderr                       # the status went to stderr


def test_checkpoint_sampling_is_seeded_and_equals_the_library(checkpoint):
    path, model, tokenizer = checkpoint
    prompt = "Où est"
    args = ["--model", path, "--prompt", prompt, "--max_new_tokens", "20", "--temperature", "0.9", "--top_k", "50",
            "--top_p", "0.95", "--seed", "7"]
    first, again = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout == again.stdout
    from tinygrad_llm.sample import generate
    ids = generate(model, np.array(tokenizer.encode(prompt)), 20, temperature=0.9, top_k=50, top_p=0.95,
                   stop_tokens=[tokenizer.special_tokens["<|endoftext|>"]], rng=np.random.default_rng(7))
    new = [i for i in ids[len(tokenizer.encode(prompt)):].tolist() if i != tokenizer.special_tokens["<|endoftext|>"]]
    assert first.stdout.decode("utf-8") == prompt + tokenizer.decode(new)


class FakeStdout:
    """sys.stdout for main(): records each write and which writes a flush followed."""

    def __init__(self):
        self.buffer = self
        self.chunks, self.flushed_after = [], []

    def write(self, data):
        self.chunks.append(bytes(data))

    def flush(self):
        self.flushed_after.append(len(self.chunks))

    def isatty(self):
        return False


def test_stream_writes_whole_characters_and_flushes_each_token(checkpoint, monkeypatch):
    path, model, tokenizer = checkpoint
    text = "é 日本 😀!"
    byte_ids = list(text.encode("utf-8"))             # ids 0..255 are the single bytes: a character spans tokens

    def fake_stream(model, idx, max_new_tokens, **kwargs):
        for token in byte_ids[:max_new_tokens]:
            yield np.array([token])

    monkeypatch.setattr(generate_module, "generate_stream", fake_stream)
    out = FakeStdout()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    generate_module.main(["--model", str(path), "--prompt", "héllo", "--max_new_tokens", "100"])   # no SystemExit
    assert b"".join(out.chunks) == ("héllo" + text).encode("utf-8")
    for chunk in out.chunks:
        chunk.decode("utf-8")                         # never a character cut in two
    assert out.flushed_after == list(range(1, len(out.chunks) + 1))   # each write reaches the reader at once
    assert len(out.chunks) == 1 + len(text)           # the prompt, then one write per completed character


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--top_p", "1.5"], "top_p must be in (0, 1]"),
    (["--prompt", "x", "--max_new_tokens", "0"], "max_new_tokens must be at least 1"),
    (["--prompt", "x", "--temperature", "-1"], "temperature must be"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "the " * 40], "longer than the model's context of 32"),
    (["--prompt", "x", "--model", "/nonexistent/model"], "no such folder or checkpoint file"),
    (["--prompt", "x", "--max_new_tokens", "many"], "expects an integer, got 'many'"),
    (["--prompt", "x", "--max_new_token", "5"], "did you mean --max_new_tokens?"),
    pytest.param(["--prompt", "x", "--device", "cuda"], "--device cuda needs CuPy",
                 marks=pytest.mark.skipif(backend.cuda_available(), reason="a GPU is here: cuda works")),
])
def test_bad_input_is_one_line_on_stderr_and_a_nonzero_exit(checkpoint, args, message, capfd):
    """In this process (a subprocess per case cost ~1 s each); the last case runs as a real command."""
    if "--model" not in args:
        args = ["--model", str(checkpoint[0])] + args
    with pytest.raises(SystemExit) as exit_info:
        generate_module.main(args)
    assert exit_info.value.code != 0
    out, err = capfd.readouterr()
    assert out == ""
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_a_bad_command_prints_no_traceback(checkpoint):
    result = run_cli("--model", checkpoint[0], "--prompt", "x", "--top_p", "1.5")
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode() == "error: top_p must be in (0, 1], got 1.5\n"


def test_help_lists_every_option_with_its_default():
    result = run_cli("--help")
    assert result.returncode == 0
    text = result.stdout.decode()
    for option in ("--model", "--prompt", "--max_new_tokens", "--temperature", "--top_k", "--top_p", "--seed",
                   "--device"):
        assert option in text
    assert "(default: 100)" in text and "(default: 1.0)" in text and "(default: cpu)" in text
    assert "(default: a fresh one each run)" in text
