"""The benchmark scripts' command lines (benchmarks/kernels.py aside): --help lists every option, a zero or
negative count and a missing file are one-line errors, and the default text lies inside the repository."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

# script -> (its count options, whether it reads a text file and how that is named on its command line)
SCRIPTS = {
    "cpu_bf16_gemm": ([], None),
    "cpu_bf16_step": (["--rounds", "--per"], None),
    "flash_attention": (["--warmup", "--repeats"], None),
    "gpu_train": (["--steps", "--iters", "--eval_interval", "--eval_iters", "--profile"], "--data"),
    "lora_step": (["--steps", "--blocks", "--rank"], None),
    "profile_step": (["--steps"], None),
    "shakespeare_vs_torch": (["--max_iters", "--eval_interval", "--eval_iters", "--log_interval", "--threads"], "--data"),
    "tokenizer": (["--repeats"], "text"),
    "train_step": (["--steps", "--rounds"], None),
}


def _load(name):
    """The benchmark module, imported from its file (the scripts import their siblings by plain name)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=sorted(SCRIPTS))
def script(request):
    return request.param, _load(request.param)


def _exit(module, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        module.parse_args(argv)
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def test_help_lists_every_option(script, capsys):
    name, module = script
    code, out, err = _exit(module, ["--help"], capsys)
    assert code == 0 and out.startswith("usage:") and not err
    for option in SCRIPTS[name][0]:
        assert option in out


@pytest.mark.parametrize("value", ["0", "-1", "-1000", "ten"])
def test_counts_must_be_positive_one_line_error(script, value, capsys):
    name, module = script
    for option in SCRIPTS[name][0]:
        code, out, err = _exit(module, [f"{option}={value}"], capsys)
        assert code == 2 and not out
        assert err.count("\n") == 1 and f"argument {option}: must be a positive integer" in err, err


@pytest.mark.parametrize("name", sorted(name for name, (_, option) in SCRIPTS.items() if option))
def test_missing_text_file_is_one_line_error(name, tmp_path, capsys):
    module, option = _load(name), SCRIPTS[name][1]
    missing = tmp_path / "nope.txt"
    code, out, err = _exit(module, [str(missing)] if option == "text" else [option, str(missing)], capsys)
    assert code == 2 and err.count("\n") == 1 and f"{option} {missing}: no such file" in err


def test_default_text_is_inside_the_repository():
    cli_args = _load("cli_args")
    assert cli_args.DEFAULT_TEXT == ROOT / "examples" / "data" / "tinyshakespeare.txt"
    for name in ("gpu_train", "shakespeare_vs_torch", "tokenizer"):
        assert (BENCHMARKS / f"{name}.py").read_text().count("DEFAULT_TEXT") >= 2, name


def test_help_works_from_any_folder_without_installing(tmp_path):
    """A fresh clone: the scripts find the package and their siblings themselves."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for name in ("tokenizer", "gpu_train"):
        result = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), "--help"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr[-1000:]


def test_lora_step_counts_the_gradients_of_frozen_tensors_too():
    """The benchmark's gradient memory must see a gradient wherever one is held, or it could not show that
    frozen weights hold none."""
    import numpy as np
    from tinygrad_llm.lora import apply_lora
    from tinygrad_llm.model import GPT, GPTConfig
    module = _load("lora_step")
    model = apply_lora(GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)), 2, 4)
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    adapters = sum(t.grad.nbytes for t in model.parameters())
    assert module.gradient_bytes(model) == adapters            # frozen weights: no gradient held
    frozen = model.transformer.h[0].attn.c_attn.weight
    frozen.grad = np.zeros_like(frozen.data)
    assert module.gradient_bytes(model) == adapters + frozen.data.nbytes
