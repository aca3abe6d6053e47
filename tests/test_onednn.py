"""oneDNN's matmul for the CPU's bf16 products (kernels/cpu/dnnl.py) and the choice between it and MKL
(kernels/cpu/bf16_gemm.py, TINYGRAD_LLM_CPU_BF16_GEMM).

Three groups, each skipped with the loader's reason where it cannot run:
- bf16 (needs oneDNN's bf16 matmul, which oneDNN 3.2 has only on CPUs with AVX-512: it refuses on AVX2):
  oneDNN's bf16 product against the float64 product of the same bf16-rounded inputs, plain, transposed,
  packed, with bias, batched over attention's head views; and the bf16 model's loss and gradients with
  oneDNN chosen against those with MKL chosen.
- plumbing (needs libdnnl only): the same code with float32 operands (oneDNN's float32 matmul): layouts,
  strides, bias, alpha/beta, the packed weight's reorder, the split over threads; and the whole bf16 model run
  with its products in oneDNN's float32 matmul on the bf16 operands' exact float32 values (a bf16 product with
  float32 sums, bar the order of the sums) against the model with MKL chosen.
- the choice and its errors (needs nothing): a bad value, a missing oneDNN named in one line, "auto".
Tolerances: 1e-5 relative for a product against float64 (as test_cpu_bf16.py); the model against the model
with MKL chosen: 1e-3 relative for the loss, 1e-2 for each parameter's gradient (norm of the difference over the
norm). Both paths round the same operands, but a float32 sum in another order can put an intermediate
(attention's P, dS, an activation) on the other side of a bf16 rounding step (2^-9 relative): measured 1e-3 on
the oneDNN float32 path here, against 5e-2 allowed and over 1e-4 seen between bf16 and float32.
"""
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from tinygrad_llm import precision
from tinygrad_llm.kernels.cpu import bf16_gemm, dnnl, mkl
from tinygrad_llm.kernels.cpu.mixed import from_bf16

BF16_REASON = dnnl.missing_reason()
needs_bf16 = pytest.mark.skipif(BF16_REASON is not None, reason=f"needs oneDNN's bf16 matmul: {BF16_REASON}")
needs_lib = pytest.mark.skipif(dnnl.f32_reason() is not None,
                               reason=f"needs libdnnl ('.[onednn]'): {dnnl.f32_reason()}")
needs_mkl = pytest.mark.skipif(mkl.missing_reason() is not None, reason=f"needs MKL ('.[mkl]'): {mkl.missing_reason()}")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def bits(x):
    return (precision.round_to_bfloat16(x).view(np.uint32) >> 16).astype(np.uint16)


def operands(rng, M, N, K, trans_a, trans_b, dtype):
    """a (M, K), b (K, N) as bf16 bits (dtype "bf16") or float32, each stored transposed when asked (then
    read in place), and their exact values in float64."""
    a, b = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
    if dtype == "bf16":
        a, b = bits(a), bits(b)
        values = [from_bf16(a).astype(np.float64), from_bf16(b).astype(np.float64)]
    else:
        values = [a.astype(np.float64), b.astype(np.float64)]
    a = np.ascontiguousarray(a.T).T if trans_a else a
    b = np.ascontiguousarray(b.T).T if trans_b else b
    return a, b, values[0] @ values[1]


SHAPES = [(1, 1, 1), (7, 5, 3), (300, 70, 50), (1, 33, 17), (33, 1, 17), (512, 384, 256)]


def check_gemm(monkeypatch, dtype, M, N, K, trans_a, trans_b):
    monkeypatch.setattr(dnnl, "PARALLEL_MIN_FLOPS", 1 << 20)    # the largest case is split over threads
    rng = np.random.default_rng(M + 3 * N + 7 * K)
    a, b, expected = operands(rng, M, N, K, trans_a, trans_b, dtype)
    bias = rng.standard_normal(N).astype(np.float32)
    c = rng.standard_normal((M, N)).astype(np.float32)
    for right in (b, dnnl.PackedB(b)):
        for parallel in (True, False):
            assert rel_err(dnnl.gemm(a, right, np.full((M, N), np.nan, np.float32), parallel=parallel),
                           expected) < 1e-5
            got = dnnl.gemm(a, right, np.full((M, N), np.nan, np.float32), parallel=parallel, bias=bias)
            assert rel_err(got, expected + bias) < 1e-5
        assert rel_err(dnnl.gemm(a, right, c.copy(), alpha=0.5, beta=1.0), 0.5 * expected + c) < 1e-5
    out = np.full((M, 2 * N), np.nan, np.float32)    # an output with a row stride of its own
    dnnl.gemm(a, b, out[:, :N])
    assert rel_err(out[:, :N], expected) < 1e-5 and np.isnan(out[:, N:]).all()


@needs_bf16
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_bf16_gemm_equals_float64_product_of_rounded_inputs(monkeypatch, M, N, K, trans_a, trans_b):
    check_gemm(monkeypatch, "bf16", M, N, K, trans_a, trans_b)


@needs_lib
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_float32_gemm_plumbing_equals_float64_product(monkeypatch, M, N, K, trans_a, trans_b):
    check_gemm(monkeypatch, "f32", M, N, K, trans_a, trans_b)


def check_batched(dtype):
    """4-D products over views of attention's layout: q, k from a (B, T, NH, HS) array (head views), k read
    transposed, the output a view into a wider (B, NH, T, 2T) array; and the 3-D case."""
    rng = np.random.default_rng(0)
    B, T, NH, HS = 2, 37, 3, 16
    conv = bits if dtype == "bf16" else (lambda x: x)
    value = (lambda x: from_bf16(x).astype(np.float64)) if dtype == "bf16" else (lambda x: x.astype(np.float64))
    q = conv(rng.standard_normal((B, T, NH, HS)).astype(np.float32)).transpose(0, 2, 1, 3)
    k = conv(rng.standard_normal((B, T, NH, HS)).astype(np.float32)).transpose(0, 2, 1, 3)
    wide = np.full((B, NH, T, 2 * T), np.nan, np.float32)
    dnnl.batched(q[:, :, 5:], k.swapaxes(2, 3), wide[:, :, 5:, :T], alpha=0.25)
    expected = 0.25 * np.einsum("bhmk,bhnk->bhmn", value(np.ascontiguousarray(q[:, :, 5:])),
                                value(np.ascontiguousarray(k)))
    assert rel_err(wide[:, :, 5:, :T], expected) < 1e-5
    assert np.isnan(wide[:, :, :5]).all() and np.isnan(wide[:, :, :, T:]).all()
    out3 = np.empty((NH, T - 5, T), np.float32)
    dnnl.batched(q[1, :, 5:], k[1].swapaxes(1, 2), out3)
    assert rel_err(out3, 4 * expected[1]) < 1e-5


@needs_bf16
def test_bf16_batched_over_attention_views_equals_float64():
    check_batched("bf16")


@needs_lib
def test_float32_batched_plumbing_over_attention_views():
    check_batched("f32")


@needs_lib
def test_operands_it_cannot_read_are_refused_in_one_line():
    a = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="no unit stride"):
        dnnl.gemm(a[:, ::2], np.zeros((3, 2), np.float32), np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="bf16 .uint16 bits. or float32"):
        dnnl.gemm(a.astype(np.float64), np.zeros((6, 2)), np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="alpha"):
        dnnl.gemm(a, np.zeros((6, 2), np.float32), np.zeros((4, 2), np.float32), alpha=2.0,
                  bias=np.zeros(2, np.float32))


@needs_lib
def test_primitives_are_made_once_per_shape():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((9, 11)).astype(np.float32), rng.standard_normal((11, 13)).astype(np.float32)
    dnnl.gemm(a, b, np.empty((9, 13), np.float32))
    before = len(dnnl.api._primitives)
    for _ in range(3):
        dnnl.gemm(a, b, np.empty((9, 13), np.float32))
        dnnl.gemm(a + 1, b, np.empty((9, 13), np.float32))
    assert len(dnnl.api._primitives) == before
    packed = dnnl.PackedB(b)
    for rows in (9, 9, 9):
        dnnl.gemm(a[:rows], packed, np.empty((rows, 13), np.float32))
    assert len(packed.layouts) == 1    # one reorder serves every product of that layout


# ---- the whole model with oneDNN chosen --------------------------------------------------------------

class Float32Shim:
    """dnnl's interface for mixed.py and mixed_attention.py, running oneDNN's float32 matmul on the exact float32
    values of the bf16 operands (layouts kept: a transposed operand stays transposed): the bf16 products' results
    up to float32 summation order, on a CPU whose oneDNN has no bf16 matmul."""
    NAME = "onednn"
    calls = []

    @staticmethod
    def f32(x):
        if type(x) is np.ndarray and x.dtype == np.uint16:
            return (x.astype(np.uint32, order="K") << np.uint32(16)).view(np.float32)
        return x

    @classmethod
    def gemm(cls, a, b, out, **kw):
        cls.calls.append("gemm")
        return dnnl.gemm(cls.f32(a), b if type(b) is dnnl.PackedB else cls.f32(b), out, **kw)

    @classmethod
    def batched(cls, a, b, out, **kw):
        cls.calls.append("batched")
        return dnnl.batched(cls.f32(a), cls.f32(b), out, **kw)

    @classmethod
    def packed_b(cls, b):
        return dnnl.PackedB(cls.f32(b))


def model_loss_and_grads(monkeypatch, choice, library=None):
    from tinygrad_llm.model import GPT, GPTConfig
    monkeypatch.setenv(precision.EMULATION_ENV, "1")
    monkeypatch.setenv(bf16_gemm.ENV, choice)
    if library is not None:   # in place of what the choice would load (and of its check)
        monkeypatch.setattr(bf16_gemm, "library", lambda: library)
        monkeypatch.setattr(bf16_gemm, "missing_reason", lambda: None)
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=64, dtype="bfloat16")
    model = GPT(config, rng=np.random.default_rng(3))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 65, (4, 64)), rng.integers(0, 65, (4, 64))
    with precision.weight_copies():
        _, loss = model(x, y)
        loss.backward()
    monkeypatch.undo()
    return loss.item(), {name: p.grad.copy() for name, p in model.named_parameters()}


def check_model_against_mkl(monkeypatch, library):
    loss_mkl, grads_mkl = model_loss_and_grads(monkeypatch, "mkl")
    loss, grads = model_loss_and_grads(monkeypatch, "onednn", library)
    assert abs(loss - loss_mkl) / loss_mkl < 1e-3
    errors = {name: float(np.linalg.norm(grads[name] - grads_mkl[name]) / np.linalg.norm(grads_mkl[name]))
              for name in grads_mkl}
    assert max(errors.values()) < 1e-2, errors
    assert all(g.dtype == np.float32 for g in grads.values())


@needs_bf16
@needs_mkl
def test_model_with_onednn_equals_model_with_mkl(monkeypatch):
    called = []
    spy = types.SimpleNamespace(NAME="onednn", gemm=lambda *a, **k: called.append(1) or dnnl.gemm(*a, **k),
                                batched=dnnl.batched, packed_b=dnnl.packed_b)
    check_model_against_mkl(monkeypatch, spy)
    assert called
    loss_auto, _ = model_loss_and_grads(monkeypatch, "onednn")   # through the real selection
    loss_mkl = model_loss_and_grads(monkeypatch, "mkl")[0]
    assert abs(loss_auto - loss_mkl) / loss_mkl < 1e-3


@needs_lib
@needs_mkl
def test_model_through_onednn_plumbing_equals_model_with_mkl(monkeypatch):
    check_model_against_mkl(monkeypatch, Float32Shim)
    assert {"gemm", "batched"} <= set(Float32Shim.calls)


# ---- the choice and its errors -------------------------------------------------------------------------

def test_choice_reads_the_environment(monkeypatch):
    monkeypatch.delenv(bf16_gemm.ENV, raising=False)
    assert bf16_gemm.choice() == "mkl"
    monkeypatch.setenv(bf16_gemm.ENV, "oneDNN")
    assert bf16_gemm.choice() == "onednn"
    monkeypatch.setenv(bf16_gemm.ENV, "openblas")
    with pytest.raises(ValueError, match="TINYGRAD_LLM_CPU_BF16_GEMM='openblas': expected one of mkl, onednn, auto"):
        bf16_gemm.choice()
    assert "openblas" in bf16_gemm.missing_reason()


def test_missing_onednn_is_named_in_one_line(monkeypatch, tmp_path):
    missing = str(tmp_path / "libdnnl.so.3")
    monkeypatch.setattr(dnnl.api, "_state", None)
    monkeypatch.setenv(dnnl.ENV_PATH, missing)
    assert dnnl.candidates() == [missing]
    reason = dnnl.missing_reason()
    assert reason.startswith("not found") and missing in reason and "\n" not in reason
    monkeypatch.setenv(bf16_gemm.ENV, "onednn")
    line = bf16_gemm.missing_reason()
    assert "oneDNN" in line and "tinygrad_llm[onednn]" in line and missing in line and "\n" not in line
    with pytest.raises(RuntimeError, match="need oneDNN's bf16 matmul"):
        bf16_gemm.library()
    monkeypatch.setenv(precision.EMULATION_ENV, "1")
    refusal = precision.unsupported_reason("bfloat16", "cpu")
    assert "oneDNN" in refusal and missing in refusal and "MKL" not in refusal
    monkeypatch.setenv(bf16_gemm.ENV, "auto")    # auto falls back to MKL
    assert bf16_gemm.name() == "mkl"
    assert bf16_gemm.missing_reason() == (None if mkl.missing_reason() is None
                                          else f"{bf16_gemm.LABELS['mkl']}: {mkl.missing_reason()}")


def test_train_cli_refuses_onednn_when_missing_in_one_line(tmp_path):
    missing = str(tmp_path / "libdnnl.so.3")
    env = dict(os.environ, **{dnnl.ENV_PATH: missing, bf16_gemm.ENV: "onednn", precision.EMULATION_ENV: "1"})
    result = subprocess.run([sys.executable, "-m", "tinygrad_llm.train", "--dtype=bfloat16", "--device", "cpu",
                             "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "oneDNN" in lines[0] and missing in lines[0] and "tinygrad_llm[onednn]" in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_loader_lock_is_reentrant():
    """_load runs under _lock and makes its probe primitive, which takes _lock again: a plain Lock deadlocked
    there on the AMX Xeon, the first CPU where the bf16 probe got as far as that (here it is refused before)."""
    from tinygrad_llm.kernels.cpu import dnnl_api
    with dnnl_api._lock:
        assert dnnl_api._lock.acquire(timeout=1)
        dnnl_api._lock.release()
