"""What a user of the command lines meets: the shipped text, a run that will not overwrite another, Ctrl-C and
SIGTERM saving a resumable state, resume keeping the run's settings, the memory check, one-line errors, --help,
progress output, and divergence (at a step or an evaluation) ending as an error."""
import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from test_train import assert_bitwise_equal, records, tiny, write_text
from tinygrad_llm import backend
from tinygrad_llm import sample as sample_module
from tinygrad_llm import train as train_module
from tinygrad_llm.checkpoint import load_checkpoint, load_safetensors
from tinygrad_llm.data import SHAKESPEARE_TEXT, prepare
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.optim import AdamW, param_groups
from tinygrad_llm.train import (ConfigTooLarge, TrainConfig, TrainingDiverged, TrainingInterrupted, count_params,
                                estimate_memory, resume_config, train)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TINY_FLAGS = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "4",
              "--lr", "1e-2", "--min_lr", "1e-3", "--warmup_iters", "2", "--eval_interval", "4", "--eval_iters", "2",
              "--log_interval", "0", "--sample_chars", "0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prepare(write_text(root / "input.txt"), root / "char")
    return str(root / "char")


def run_main(main, argv, capsys):
    """(exit code, stdout, stderr) of a CLI main run in this process."""
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code not in (0, None), err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def file_bytes(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


# ---- the text ships with the project ---------------------------------------------------------------

def test_the_shipped_text_is_the_one_its_provenance_line_names():
    readme = (ROOT / "examples" / "data" / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| tinyshakespeare.txt"))
    size, digest = re.search(r"\| ([\d,]+) bytes \| ([0-9a-f]{64}) \|", row).groups()
    data = SHAKESPEARE_TEXT.read_bytes()
    assert SHAKESPEARE_TEXT == ROOT / "examples" / "data" / "tinyshakespeare.txt"
    assert len(data) == int(size.replace(",", "")) == 1_115_394
    assert hashlib.sha256(data).hexdigest() == digest
    assert "karpathy/char-rnn" in row
    example = (ROOT / "examples" / "train_shakespeare.py").read_text()
    assert "urllib" not in example and "http" not in example  # nothing to download


# ---- a new run never overwrites a saved one ----------------------------------------------------------

def test_a_new_run_into_a_folder_holding_a_run_refuses_and_touches_nothing(data_dir, tmp_path, capsys):
    train(tiny(data_dir, tmp_path, max_iters=4))
    before = file_bytes(tmp_path)
    assert {"ckpt.safetensors", "last.safetensors", "metrics.jsonl"} <= set(before)
    with pytest.raises(FileExistsError, match=r"already holds a run .*--init_from=resume.*--overwrite=true"):
        train(tiny(data_dir, tmp_path, max_iters=4, seed=1))
    code, _, err = run_main(train_module.main, ["--data_dir", data_dir, "--out_dir", str(tmp_path), *TINY_FLAGS], capsys)
    assert_one_line_error(code, err, "--init_from=resume", "--overwrite=true")
    code, _, err = run_main(load_example_main(), ["--data_dir", data_dir, "--out_dir", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "--init_from=resume", "--overwrite=true")
    assert file_bytes(tmp_path) == before

    train(tiny(data_dir, tmp_path, max_iters=2, seed=1, overwrite=True))     # asked for: replaced, not appended
    assert [r["iter"] for r in records(tmp_path)] == [0, 2]
    assert load_checkpoint(tmp_path / "last.safetensors")["step"] == 2


# ---- SIGINT / SIGTERM ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigint_saves_the_state_and_resume_continues_bit_for_bit(data_dir, tmp_path):
    settings = dict(dropout=0.1, lr_decay_iters=300, eval_interval=10, log_interval=1)
    flags = [f"--{k}={v}" for k, v in settings.items()]
    interrupted = tmp_path / "interrupted"
    child = subprocess.Popen([sys.executable, "-m", "tinygrad_llm.train", "--data_dir", data_dir, "--out_dir",
                              str(interrupted), *TINY_FLAGS, *flags, "--max_iters=100000"],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if line.startswith("iter    12 |"):
                break
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, err
    step = load_checkpoint(interrupted / "last.safetensors")["step"]
    assert step > 12
    assert err == (f"interrupted by SIGINT at iteration {step}; the run's state is saved in {interrupted}/last.safetensors; "
                   f"continue it with --init_from=resume --out_dir={interrupted}\n")

    end = step + 7
    resumed = train(resume_config(interrupted, max_iters=end))
    whole = train(tiny(data_dir, tmp_path / "whole", **{**settings, "log_interval": 0}, max_iters=end))
    assert_bitwise_equal(resumed["model"].state_dict(), whole["model"].state_dict())
    strip = lambda rs: [{k: r[k] for k in ("iter", "train_loss", "val_loss", "lr")} for r in rs]  # noqa: E731
    assert strip(records(interrupted)) == strip(records(tmp_path / "whole"))
    for name in ("ckpt.safetensors", "last.safetensors"):
        assert_bitwise_equal(load_safetensors(interrupted / name)[0], load_safetensors(tmp_path / "whole" / name)[0])


def test_sigterm_finishes_the_step_saves_and_says_how_to_resume(data_dir, tmp_path, monkeypatch):
    real_step = train_module.train_step
    def terminated_during_step_5(model, optimizer, config, rng, it, *args):
        if it == 5:
            os.kill(os.getpid(), signal.SIGTERM)          # arrives mid-step: the step still completes
        return real_step(model, optimizer, config, rng, it, *args)
    monkeypatch.setattr(train_module, "train_step", terminated_during_step_5)
    config = tiny(data_dir, tmp_path / "parts", max_iters=10)
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM at iteration 6; .* --init_from=resume"):
        train(config)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "parts" / "last.safetensors")["step"] == 6
    resumed = train(resume_config(tmp_path / "parts"))
    whole = train(tiny(data_dir, tmp_path / "whole", max_iters=10))
    assert_bitwise_equal(resumed["model"].state_dict(), whole["model"].state_dict())


# ---- resume remembers the run -------------------------------------------------------------------------

def test_resume_takes_the_data_and_settings_from_the_checkpoint(data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    code, _, err = run_main(train_module.main, ["--data_dir", data_dir, "--out_dir", out, *TINY_FLAGS,
                                                "--max_iters", "8", "--norm", "rmsnorm"], capsys)
    assert code == 0, err
    # no --data_dir, no model flags: all from the checkpoint (the default data_dir does not exist here)
    code, stdout, err = run_main(train_module.main, ["--init_from=resume", "--out_dir", out], capsys)
    assert code == 0, err
    assert "resuming from" in stdout and "at iteration 8" in stdout

    code, _, err = run_main(train_module.main, ["--init_from=resume", "--out_dir", out, "--n_embd", "32"], capsys)
    assert_one_line_error(code, err, "--n_embd=32 (the run has 16)")
    code, _, err = run_main(train_module.main, ["--init_from=resume", "--out_dir", out, "--data_dir", "elsewhere"], capsys)
    assert_one_line_error(code, err, "--data_dir=elsewhere")
    code, _, err = run_main(train_module.main, ["--init_from=resume", "--out_dir", out, "--max_iters", "16"], capsys)
    assert_one_line_error(code, err, "learning-rate schedule", "--lr_decay_iters=8 keeps it", "--lr_decay_iters=16 stretches")

    code, _, err = run_main(train_module.main, ["--init_from=resume", "--out_dir", out, "--max_iters", "16",
                                                "--lr_decay_iters", "8"], capsys)
    assert code == 0, err
    saved = load_checkpoint(Path(out) / "last.safetensors")
    assert saved["step"] == 16 and saved["config"]["norm"] == "rmsnorm" and saved["config"]["n_embd"] == 16
    lrs = {r["iter"]: r["lr"] for r in records(out)}
    assert lrs[12] == lrs[16] == 1e-3                               # the stated schedule: min_lr after 8
    # the example script resumes without --data and without tokenizing anything again
    example = load_example_main()
    code, stdout, err = run_main(example, ["--init_from=resume", "--out_dir", out, "--max_iters", "16",
                                           "--lr_decay_iters", "8"], capsys)
    assert code == 0, err
    assert "tokenizing" not in stdout and "resuming from" in stdout


def load_example_main():
    import importlib.util
    spec = importlib.util.spec_from_file_location("example_train", ROOT / "examples" / "train_shakespeare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda argv: train_module.run_cli(module.main, argv)


# ---- memory -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("switches", [{}, dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False)])
def test_count_params_equals_the_built_model(switches):
    config = GPTConfig(vocab_size=37, block_size=12, n_layer=3, n_head=2, n_embd=24, **switches)
    assert count_params(config) == GPT(config).num_params()
    untied = GPTConfig(vocab_size=37, block_size=12, n_layer=1, n_head=2, n_embd=24, tie_embeddings=False)
    assert count_params(untied) == GPT(untied).num_params()


@pytest.mark.parametrize("overrides", [dict(n_embd=128, block_size=16, n_head=4),    # width-heavy
                                       dict(n_embd=16, block_size=128, n_head=4),    # attention-heavy
                                       dict(n_embd=32, block_size=32, dtype="float64", dropout=0.1)])
def test_the_memory_estimate_bounds_the_measured_peak_within_2x(data_dir, overrides):
    config = TrainConfig(data_dir=data_dir, n_layer=2, batch_size=4, **overrides)
    vocab = 36
    rng = np.random.default_rng(0)
    for measure in (False, True):                         # the first pass compiles the kernels
        if measure:
            tracemalloc.start()
        model = GPT(config.model_config(vocab), rng=rng)
        optimizer = AdamW(param_groups(model, 0.1), lr=1e-3)
        for it in range(2):
            train_module.train_step(model, optimizer, config, rng, it, 1e-3, Path("unused"))
        if measure:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        del model, optimizer
    estimate = estimate_memory(config, vocab)["total"]
    assert peak <= estimate <= 2 * peak, (peak, estimate)


def test_a_config_too_big_for_memory_stops_with_the_estimate_before_allocating(data_dir, tmp_path, monkeypatch, capsys):
    start = time.perf_counter()
    with pytest.raises(ConfigTooLarge, match=r"needs about [\d,.]+ GiB \(parameters .*\) but [\d,.]+ [GM]iB of memory"):
        train(TrainConfig(data_dir=data_dir, out_dir=str(tmp_path / "a"), n_embd=100_000, block_size=8))
    assert time.perf_counter() - start < 5 and not (tmp_path / "a").exists()
    code, _, err = run_main(train_module.main, ["--data_dir", data_dir, "--out_dir", str(tmp_path / "b"),
                                                "--block_size=100000"], capsys)
    assert_one_line_error(code, err, "GiB of memory is available")
    # the comparison is with what the machine has: a tiny config against 128 KiB free
    monkeypatch.setattr(train_module, "available_memory", lambda device: 2**17)
    need = estimate_memory(tiny(data_dir, tmp_path), 36)["total"]
    assert need > 2**17
    with pytest.raises(ConfigTooLarge, match=r"but 0.1 MiB of memory is available"):
        train(tiny(data_dir, tmp_path / "c"))


# ---- bad input: one line on stderr, a non-zero exit ------------------------------------------------

@pytest.fixture
def texts(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.dat").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "nul.txt").write_bytes(b"text\x00with a NUL\n" * 10)
    (tmp_path / "a_file").write_text("x")
    return tmp_path


@pytest.mark.parametrize("argv, fragments", [
    (["--data", "{tmp}/empty.txt"], ["input text file is empty"]),
    (["--data", "{tmp}/binary.dat"], ["binary.dat is not UTF-8 text"]),
    (["--data", "{tmp}/nul.txt"], ["nul.txt looks like a binary file"]),
    (["--tokenizer", "bpe:lots"], ["tokenizer 'bpe:lots': expected 'bpe:N'"]),
    (["--tokenizer", "bpe:100"], ["N an integer >= 256"]),
    (["--tokenizer", "word"], ["tokenizer must be 'char', 'bpe:N'"]),
    (["--out_dir", "{tmp}/a_file/run"], ["a_file is a file, not a folder"]),
    (["--grad_clip=nan"], ["grad_clip must be a finite number, got nan"]),
    (["--max_iters", "-5"], ["max_iters must be a non-negative integer"]),
    (["--init_from=resume", "--out_dir", "{tmp}/nothing"], ["holds no checkpoint"]),
    (["--data", "{tmp}/missing.txt"], ["missing.txt: no such file"]),
])
def test_example_bad_input_is_one_line(argv, fragments, texts, monkeypatch, capsys):
    monkeypatch.chdir(texts)
    argv = [a.replace("{tmp}", str(texts)) for a in argv]
    code, _, err = run_main(load_example_main(), argv + ["--max_iters=2"] * ("--max_iters" not in argv), capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (texts / "out").exists()


def test_cuda_without_cupy_is_one_line(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)           # as on a machine without CuPy
    monkeypatch.setattr(backend, "_cupy", None)
    code, _, err = run_main(train_module.main, ["--data_dir", data_dir, "--out_dir", str(tmp_path / "o"),
                                                "--device", "cuda"], capsys)
    assert_one_line_error(code, err, "--device cuda needs CuPy")
    code, _, err = run_main(sample_module.main, ["--ckpt", str(tmp_path / "x"), "--device", "cuda"], capsys)
    assert_one_line_error(code, err, "--device cuda needs CuPy")


@pytest.mark.parametrize("argv, fragment", [
    (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0, got '-1'"),
    (["--temperature=nan"], "argument --temperature: must be a finite number >= 0"),
    (["--top_k", "0"], "argument --top_k: must be an integer >= 1, got '0'"),
    (["--top_p", "1.5"], "argument --top_p: must be in (0, 1], got '1.5'"),
    (["--prompt", ""], "--prompt is empty"),
    (["--max_new_tokens", "-5"], "argument --max_new_tokens: must be a positive integer, got '-5'"),
    (["--max_new_tokens=ten"], "argument --max_new_tokens: expects an integer"),
    (["--ckpt", "{tmp}/missing.safetensors"], "checkpoint file not found"),
    (["--prompt", "\u00e9t\u00e9"], "is not in the vocabulary"),
    (["--topk", "3"], "unknown option '--topk'; did you mean --top_k?"),
])
def test_sample_bad_input_is_one_line(argv, fragment, data_dir, tmp_path_factory, capsys):
    ckpt = tmp_path_factory.getbasetemp() / "sample_ckpt"
    if not (ckpt / "ckpt.safetensors").exists():
        train(tiny(data_dir, ckpt, max_iters=0))
    argv = [a.replace("{tmp}", str(ckpt)) for a in argv]
    code, _, err = run_main(sample_module.main, ["--ckpt", str(ckpt / "ckpt.safetensors"), *argv], capsys)
    assert_one_line_error(code, err, fragment)


def test_a_bad_input_in_a_fresh_process_is_one_stderr_line_and_exit_2():
    run = subprocess.run([sys.executable, "-m", "tinygrad_llm.sample", "--max_new_tokens", "-5"],
                         env=ENV, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "error: argument --max_new_tokens: must be a positive integer, got '-5'\n"


# ---- --help ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["tinygrad_llm.train", "tinygrad_llm.sample"])
def test_help_of_both_modules_lists_every_option_with_its_default(module):
    run = subprocess.run([sys.executable, "-m", module, "--help"], env=ENV, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stderr == ""
    text = " ".join(run.stdout.split())
    names = ([f.name for f in fields(TrainConfig)] if module.endswith("train") else
             ["ckpt", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "device"])
    assert all(f"--{name} " in text for name in names)
    assert text.count("(default: ") == len(names)                 # each option's line ends with its default
    if module.endswith("train"):
        assert "--max_iters N optimizer steps (default: 2000)" in text
        assert "--lr X peak learning rate (default: 0.001)" in text


def test_the_example_help_lists_its_own_options_and_every_key(capsys):
    code, out, _ = run_main(load_example_main(), ["--help"], capsys)
    text = " ".join(out.split())
    assert code == 0
    assert "--data DATA the text to train on (default: examples/data/tinyshakespeare.txt)" in text
    assert "--tokenizer" in text and all(f"--{f.name} " in text for f in fields(TrainConfig))


# ---- progress -------------------------------------------------------------------------------------------

class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_the_eta_leaves_the_first_step_out_and_bars_show_on_a_terminal(data_dir, tmp_path, monkeypatch, capsys):
    real_step = train_module.train_step
    calls = []
    def slow_first_step(*args):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)                                 # as kernels compiling
        return real_step(*args)
    monkeypatch.setattr(train_module, "train_step", slow_first_step)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train(tiny(data_dir, tmp_path / "run", max_iters=10, log_interval=1))
    out = capsys.readouterr().out
    assert re.search(r"first step 1\.\d\d s \(includes compiling the kernels once; left out of the rate and ETA\)", out)
    lines = {int(m.group(1)): m.group(0) for m in re.finditer(r"iter +(\d+) \|.*", out)}
    assert lines[0].endswith("ETA -")
    assert lines[1].endswith("ETA 0:00"), lines[1]           # 8 steps of a few ms, not 8 x (1 s + ...) / 2
    assert re.search(r"training: +\d+%.*\d+/10 \[.*it/s", terminal.getvalue())

    terminal.seek(0)
    terminal.truncate()
    prepare(write_text(tmp_path / "t.txt"), tmp_path / "d")
    assert "tokenizing" in terminal.getvalue() and "B/s" in terminal.getvalue()


def test_a_missing_matplotlib_is_said_once(data_dir, tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    train(tiny(data_dir, tmp_path, max_iters=8))                     # 3 evaluations
    out = capsys.readouterr().out
    assert out.count("loss.png skipped: matplotlib is not installed") == 1
    assert not (tmp_path / "loss.png").exists()


# ---- divergence ends as an error ------------------------------------------------------------------------

@pytest.mark.parametrize("max_iters, where", [(1, r"train loss is nan at the evaluation of iteration 1"),
                                              (4, r"loss is nan at iteration 1 \(micro-batch 0\)")],
                         ids=["at-the-final-evaluation", "at-a-step"])
def test_a_huge_lr_diverges_into_an_error_and_the_best_checkpoint_stays_good(data_dir, tmp_path, capsys,
                                                                              max_iters, where):
    # lr 1e10, no clipping: step 0's loss is finite, its update ruins the weights
    flags = ["--data_dir", data_dir, "--out_dir", str(tmp_path), *TINY_FLAGS, "--lr=1e10", "--min_lr=0",
             "--warmup_iters=0", "--grad_clip=0", "--eval_interval=100", f"--max_iters={max_iters}"]
    with np.errstate(all="ignore"):
        with pytest.raises(TrainingDiverged, match=where + r".*(Linear|SelfAttention|Embedding).*non-finite.*"
                                                         r"last good checkpoint .* is untouched"):
            train_module._main(train_module.config_argument_parser(), flags)
        best = load_safetensors(tmp_path / "ckpt.safetensors")[0]
        assert load_checkpoint(tmp_path / "ckpt.safetensors")["step"] == 0
        assert all(np.isfinite(a).all() for a in load_safetensors(tmp_path / "ckpt.safetensors")[0].values())
        assert not (tmp_path / "last.safetensors").exists()
        assert [r["iter"] for r in records(tmp_path)] == [0]
        capsys.readouterr()
        code, _, err = run_main(train_module.main, flags + ["--overwrite=true"], capsys)
    assert code == 1 and "training stopped" in err.splitlines()[-1]
    assert_bitwise_equal(load_safetensors(tmp_path / "ckpt.safetensors")[0], best)
