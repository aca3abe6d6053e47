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
    assert named == set(precision.BF16_OPS)
    for name in precision.BF16_OPS:
        assert functions[name].bf16_kernels["cuda"].startswith("mixed.")
    # what stays float32 under the policy: the norms, softmax, the loss, the elementwise ops
    for name in ("LayerNorm", "RMSNorm", "Softmax", "CrossEntropy", "GELU", "Dropout", "Embedding"):
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


def test_unsupported_reason_says_what_is_missing():
    assert precision.unsupported_reason("float32", "cpu") is None
    assert precision.unsupported_reason("bfloat16", "cuda") is None
    lacking = precision.unsupported_reason("bfloat16", "cpu", flags={"avx2", "avx512f"})
    assert "avx512_bf16 or amx_bf16" in lacking and "lacks" in lacking and "\n" not in lacking
    having = precision.unsupported_reason("bfloat16", "cpu", flags={"avx512_bf16", "amx_bf16"})
    assert "not built yet" in having and "avx512_bf16, amx_bf16" in having


def test_unsupported_reason_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    assert precision.cpu_flags(str(info)) == {"fpu", "sse", "avx512f", "amx_bf16", "amx_tile"}
    assert precision.cpu_flags(str(tmp_path / "missing")) is None


def test_bfloat16_on_the_cpu_is_refused_by_the_model_and_train_config():
    reason = precision.unsupported_reason("bfloat16", "cpu")
    assert reason is not None   # no CPU bf16 kernels exist yet, whatever this CPU has
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dtype="bfloat16"))
    with pytest.raises(ValueError, match="bfloat16 on the CPU"):
        model(np.zeros((1, 4), np.int64))
    with pytest.raises(ValueError, match="bfloat16 on the CPU"):
        TrainConfig(dtype="bfloat16", device="cpu")
    assert TrainConfig(dtype="bfloat16", device="cuda").dtype == "bfloat16"


def test_train_cli_refuses_bfloat16_on_the_cpu_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tinygrad_llm.train", "--dtype=bfloat16", "--device", "cpu",
                             "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bfloat16 on the CPU" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
