"""The mixed-precision policy (precision.py), on any machine: bf16 rounding against PyTorch's, the one policy
table and the ops that name bf16 kernels, the per-region weight copies, and bfloat16 refused on a CPU
(with a one-line message saying what is missing) by GPTConfig's model, TrainConfig and the train CLI.
The GPU's bf16 kernels are tested in tests/test_gpu_bf16.py.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

from tinygrad_llm import functional as F
from tinygrad_llm import precision
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.tensor import Function
from tinygrad_llm.train_config import TrainConfig


def test_round_to_bfloat16_equals_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.3895314e38, -3.3895314e38, 3.4e38, 1e-40, -1e-45,
                                  1.00390625, 1.01171875, 1.0 + 2 ** -8 + 2 ** -20], dtype=np.float32)]).astype(np.float32)
    ours = precision.round_to_bfloat16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    assert ours.shape == x.shape and ours.dtype == np.float32
    # ties go to even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7
    assert precision.round_to_bfloat16(np.float32(1 + 2 ** -8)) == 1.0
    assert np.isnan(precision.round_to_bfloat16(np.array([np.nan], np.float32))).all()


def _functions():
    return {name: value for name, value in vars(F).items() if isinstance(value, type) and issubclass(value, Function)}


def test_policy_table_and_the_ops_that_name_bf16_kernels_agree():
    functions = _functions()
    named = {name for name, op in functions.items() if "bf16_kernels" in op.__dict__}
    assert named == set(precision.BF16_OPS) | set(precision.BF16_COPY_PRODUCERS)
    assert not set(precision.BF16_OPS) & set(precision.BF16_COPY_PRODUCERS)
    for name in precision.BF16_OPS:
        assert functions[name].bf16_kernels["cuda"].startswith("mixed.")
        assert functions[name].bf16_kernels["cpu"].startswith("mixed")     # mixed.py, mixed_attention.py (MKL)
    # what stays float32 under the policy: the norms, softmax, the loss, the elementwise ops
    for name in ("LayerNorm", "RMSNorm", "Softmax", "CrossEntropy", "GELU", "Dropout", "DropoutAdd", "Embedding"):
        assert name not in precision.BF16_OPS


def test_param_dtype_and_config_choices():
    assert precision.param_dtype("bfloat16") == "float32" and precision.param_dtype("float64") == "float64"
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dtype="bfloat16")
    assert config.param_dtype == "float32"
    model = GPT(config, rng=np.random.default_rng(0))
    assert {p.dtype for p in model.parameters()} == {np.dtype(np.float32)}
    with pytest.raises(ValueError, match="dtype='float16'"):
        GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dtype="float16")


def test_weight_copy_once_per_region_and_per_layout():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    calls = []

    def convert(a):
        calls.append(a.shape)
        return precision.round_to_bfloat16(a)

    with precision.autocast("bfloat16"):
        assert precision.current() == "bfloat16"
        first = precision.weight_copy(w, convert)
        assert precision.weight_copy(w, convert) is first
        precision.weight_copy(w.T, convert)          # a transposed view: a copy of its own
    assert precision.current() is None and calls == [(3, 4), (4, 3)]
    with precision.weight_copies():                  # a training step around two micro-batches
        for _ in range(2):
            with precision.autocast("bfloat16"):
                precision.weight_copy(w, convert)
    assert calls == [(3, 4), (4, 3), (3, 4)]
    precision.weight_copy(w, convert)                # outside any region: converted every time
    precision.weight_copy(w, convert)
    assert len(calls) == 5
    with precision.autocast("float32"):
        assert precision.current() is None


def test_unsupported_reason_says_what_is_missing(monkeypatch):
    monkeypatch.delenv(precision.EMULATION_ENV, raising=False)
    assert precision.unsupported_reason("float32", "cpu") is None
    assert precision.unsupported_reason("bfloat16", "cuda") is None
    units, no_units = {"avx512_bf16", "amx_bf16"}, {"avx2", "avx512f"}
    mkl_missing = "MKL's bf16 GEMM (pip install 'tinygrad_llm[mkl]'): not found (libmkl_rt.so.3: no such file)"
    lacking = precision.unsupported_reason("bfloat16", "cpu", flags=no_units, library_reason=None)
    assert "avx512_bf16 or amx_bf16" in lacking and "lacks" in lacking and "\n" not in lacking and "MKL" not in lacking
    assert precision.unsupported_reason("bfloat16", "cpu", flags=units, library_reason=None) is None
    no_mkl = precision.unsupported_reason("bfloat16", "cpu", flags=units, library_reason=mkl_missing)
    assert "MKL" in no_mkl and "tinygrad_llm[mkl]" in no_mkl and mkl_missing in no_mkl and "lacks" not in no_mkl
    both = precision.unsupported_reason("bfloat16", "cpu", flags=no_units, library_reason=mkl_missing)
    assert "lacks" in both and "tinygrad_llm[mkl]" in both and "\n" not in both
    # the tests' override waives the units, never the library
    monkeypatch.setenv(precision.EMULATION_ENV, "1")
    assert precision.unsupported_reason("bfloat16", "cpu", flags=no_units, library_reason=None) is None
    emulated = precision.unsupported_reason("bfloat16", "cpu", flags=no_units, library_reason=mkl_missing)
    assert "MKL" in emulated and "lacks" not in emulated


def test_unsupported_reason_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    assert precision.cpu_flags(str(info)) == {"fpu", "sse", "avx512f", "amx_bf16", "amx_tile"}
    assert precision.cpu_flags(str(tmp_path / "missing")) is None


def test_bfloat16_on_the_cpu_is_refused_by_the_model_and_train_config(monkeypatch):
    monkeypatch.delenv(precision.EMULATION_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})    # a CPU without bf16 units, whatever this one has
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dtype="bfloat16"))
    with pytest.raises(ValueError, match="bfloat16 on the CPU needs bf16 matrix units"):
        model(np.zeros((1, 4), np.int64))
    with pytest.raises(ValueError, match="bfloat16 on the CPU needs bf16 matrix units"):
        TrainConfig(dtype="bfloat16", device="cpu")
    assert TrainConfig(dtype="bfloat16", device="cuda").dtype == "bfloat16"


def _train_cli(tmp_path, **env):
    import os
    env = {k: v for k, v in os.environ.items() if k != precision.EMULATION_ENV} | env
    return subprocess.run([sys.executable, "-m", "tinygrad_llm.train", "--dtype=bfloat16", "--device", "cpu",
                           "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=env)


def _one_line_refusal(result, tmp_path, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bfloat16 on the CPU" in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(any(f in (precision.cpu_flags() or ()) for f in precision.CPU_BF16_FLAGS),
                    reason="this CPU has bf16 units")
def test_train_cli_refuses_bfloat16_on_a_cpu_without_bf16_units_in_one_line(tmp_path):
    _one_line_refusal(_train_cli(tmp_path), tmp_path, "bf16 matrix units", "lacks")


def test_train_cli_refuses_bfloat16_without_mkl_in_one_line(tmp_path):
    # TINYGRAD_LLM_MKL names where libmkl_rt is; a path without it is a machine without MKL. With the tests'
    # override the units are not asked for, so the line names the library alone.
    missing = str(tmp_path / "libmkl_rt.so.3")
    result = _train_cli(tmp_path, TINYGRAD_LLM_MKL=missing, **{precision.EMULATION_ENV: "1"})
    _one_line_refusal(result, tmp_path, "MKL", "tinygrad_llm[mkl]", missing)
    assert "lacks" not in result.stderr
