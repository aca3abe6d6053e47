"""The 3xTF32 GEMM (kernels/cuda/gemm_3xtf32.py): its split of a float32 value into tf32 parts, stated in NumPy
(runs everywhere); on a GPU, every layout, edges, the bias, beta and split-k against float64 products of the
same operands, its error against cuBLAS's float32 GEMM and against TF32's, row strides wider than the rows,
which products and which GPUs it takes, its setting, reproducibility and a CUDA graph's replay.

Accuracy (largest error over the largest element of the float64 product): at most cuBLAS float32's own error on
the same operands times 1.5, plus 2^-21 (the split's error on each product, which counts only in short sums,
where float32's own error is near zero); element by element, under (K + 24) 2^-24 sum_k |a||b| (float32's
summation bound, plus 3 2^-21 = 24 2^-24 for the split of each product). One TF32 product on the same operands
must fail the first test (so it is not a test any float32-ish product passes).
"""
import importlib

import numpy as np
import pytest

from tinygrad_llm import backend
from tinygrad_llm.tensor import Context

from cuda_replay import eager_then_replayed

needs_gpu = pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA GPU")
LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]


def split_rule(x):
    """The kernel's split in NumPy: hi = x rounded to tf32 (half a tf32 unit added to the bits, 13 low bits
    cleared), lo = x - hi in float32, of which the tensor cores read the 19 high bits (13 low bits cleared)."""
    bits = x.astype(np.float32).view(np.uint32)
    hi = ((bits + np.uint32(0x1000)) & np.uint32(0xffffe000)).view(np.float32)
    lo = (x - hi).astype(np.float32)
    lo_read = (lo.view(np.uint32) & np.uint32(0xffffe000)).view(np.float32)
    return hi, lo, lo_read


def test_the_split_holds_a_float32_value_to_2_to_the_minus_21():
    """Stated bounds of the kernel's docstring: lo = x - hi exactly, |lo| <= 2^-11 |x|, hi + lo_read within
    2^-21 |x| of x; and a product of two split values (three products, a_lo b_lo dropped) within 3 2^-21 |a b|."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(200_000) * np.exp2(rng.integers(-60, 60, 200_000))).astype(np.float32)
    x = np.concatenate([x, np.float32([1.0, -1.0, 0.0, 1 + 2 ** -11, 1 + 2 ** -12, np.finfo(np.float32).tiny])])
    hi, lo, lo_read = split_rule(x)
    x64, hi64, lo64, read64 = (v.astype(np.float64) for v in (x, hi, lo, lo_read))
    assert np.array_equal(hi64 + lo64, x64)                       # the float32 subtraction is exact
    assert np.all(np.abs(lo64) <= 2.0 ** -11 * np.abs(x64))
    assert np.all(np.abs(hi.view(np.uint32) & 0x1fff) == 0)     # hi is a tf32 value
    assert np.all(np.abs(hi64 + read64 - x64) <= 2.0 ** -21 * np.abs(x64))
    a, b = x[:100_000], x[100_000:200_000]
    ah, _, al = (v.astype(np.float64) for v in split_rule(a))
    bh, _, bl = (v.astype(np.float64) for v in split_rule(b))
    exact = a.astype(np.float64) * b.astype(np.float64)
    assert np.all(np.abs(al * bh + ah * bl + ah * bh - exact) <= 3 * 2.0 ** -21 * np.abs(exact))
    # TF32 alone (hi only) is off by far more, on most of these values
    assert np.mean(np.abs(ah * bh - exact) > 2.0 ** -16 * np.abs(exact)) > 0.5


def _cuda(name):
    return importlib.import_module(f"tinygrad_llm.kernels.cuda.{name}")


@pytest.fixture
def g3(monkeypatch):
    """gemm_3xtf32 switched on, TF32 off; both restored afterwards."""
    module = _cuda("gemm_3xtf32")
    monkeypatch.setattr(module, "MODE", "3xtf32")
    backend.set_tf32(False)
    yield module
    backend.set_tf32(False)


def operands(cp, rng, M, N, K, ta, tb):
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    return a, b, cp.asarray(a), cp.asarray(b)


def product64(a, b, ta, tb):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a.T if ta else a) @ (b.T if tb else b)


def rel_err(got, want):
    assert np.isfinite(got).all()
    return float(np.abs(got - want).max() / np.abs(want).max())


def cublas_product(g3, monkeypatch, da, db, ta, tb):
    """The same product by cuBLAS (float32, or TF32 while set_tf32 is on), through cublas.matmul."""
    with monkeypatch.context() as m:
        m.setattr(g3, "MODE", "cublas")
        return _cuda("cublas").matmul(da, db, trans_a=ta, trans_b=tb).get()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("ta,tb", LAYOUTS)
@pytest.mark.parametrize("M,N,K", [(64, 64, 4), (200, 100, 52), (132, 260, 388), (1024, 384, 384), (96, 128, 20000)])
def test_against_float64_cublas_and_tf32(g3, monkeypatch, ta, tb, M, N, K):
    """Sizes off the 128 x 128 tiles, K off the 32-wide k tiles, and K = 20000 over few outputs (split k)."""
    import cupy as cp
    rng = np.random.default_rng(M + N + K + 2 * ta + tb)
    a, b, da, db = operands(cp, rng, M, N, K, ta, tb)
    want = product64(a, b, ta, tb)
    assert g3.takes(M, N, K, da.data.ptr, da.shape[1], db.data.ptr, db.shape[1], 0, N, trans_a=ta, trans_b=tb)
    calls = record(monkeypatch, g3)
    got = _cuda("cublas").matmul(da, db, trans_a=ta, trans_b=tb).get()
    assert len(calls) == 1
    ours, theirs = rel_err(got, want), rel_err(cublas_product(g3, monkeypatch, da, db, ta, tb), want)
    assert ours <= 1.5 * theirs + 2.0 ** -21, (ours, theirs)
    bound = (K + 24) * 2.0 ** -24 * (np.abs(a.T if ta else a).astype(np.float64) @ np.abs(b.T if tb else b))
    assert np.all(np.abs(got - want) <= bound)
    backend.set_tf32(True)
    try:
        tf32 = rel_err(cublas_product(g3, monkeypatch, da, db, ta, tb), want)
    finally:
        backend.set_tf32(False)
    assert tf32 > 1.5 * theirs + 2.0 ** -21 and tf32 > 10 * ours, (tf32, ours)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("ta,tb", LAYOUTS)
@pytest.mark.parametrize("M,N,K", [(200, 100, 52), (128, 68, 4000)])
def test_bias_and_beta(g3, ta, tb, M, N, K):
    """C = op(A) op(B) + bias + beta C, beta 0, 1 and 0.5; one slice and split k (the sum kernel adds them)."""
    import cupy as cp
    rng = np.random.default_rng(7)
    a, b, da, db = operands(cp, rng, M, N, K, ta, tb)
    bias = rng.standard_normal(N).astype(np.float32)
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    dbias = cp.asarray(bias)
    for beta in (0.0, 1.0, 0.5):
        dc = cp.asarray(c0)
        g3.gemm(M, N, K, da.data.ptr, da.shape[1], db.data.ptr, db.shape[1], dc.data.ptr, N, ta, tb,
                bias=dbias.data.ptr, beta=beta)
        want = product64(a, b, ta, tb) + bias + beta * c0.astype(np.float64)
        # the product's bound (test_against_float64_cublas_and_tf32), and a rounding for each of the two adds
        size = (np.abs(a.T if ta else a).astype(np.float64) @ np.abs(b.T if tb else b) + np.abs(bias)
                + abs(beta) * np.abs(c0))
        assert np.all(np.abs(dc.get() - want) <= (K + 26) * 2.0 ** -24 * size), beta


@pytest.mark.gpu
@needs_gpu
def test_which_products_it_takes(g3, monkeypatch):
    """Strict float32 products of supported shapes through cublas.matmul and Linear's forward (with its bias);
    not with TF32 on, not under TINYGRAD_LLM_FP32_GEMM=cublas, not for a size off a multiple of 4, a 4-byte
    aligned operand, or fewer than 64 rows (sum_rows' ones-vector product)."""
    import cupy as cp
    rng = np.random.default_rng(3)
    x = cp.asarray(rng.standard_normal((256, 96)).astype(np.float32))
    w = cp.asarray(rng.standard_normal((96, 128)).astype(np.float32))
    bias = cp.asarray(rng.standard_normal(128).astype(np.float32))
    calls = record(monkeypatch, g3)
    linear = _cuda("linear").LinearCuda
    out = linear.forward(Context((True, True, True)), x, w, bias)
    assert len(calls) == 1 and calls[0]["bias"] == bias.data.ptr
    want = x.get().astype(np.float64) @ w.get() + bias.get()
    assert rel_err(out.get(), want) < 1e-6
    _cuda("cublas").matmul(x, w)
    assert len(calls) == 2
    shifted = cp.asarray(rng.standard_normal(256 * 96 + 1).astype(np.float32))[1:].reshape(256, 96)
    for skipped in (lambda: _cuda("cublas").matmul(x[:, :95].copy(), w[:95]),       # K = 95
                    lambda: _cuda("cublas").matmul(shifted, w),                      # 4 bytes past 16-byte alignment
                    lambda: backend.sum_rows(x)):
        skipped()
    assert len(calls) == 2
    backend.set_tf32(True)
    _cuda("cublas").matmul(x, w)
    backend.set_tf32(False)
    monkeypatch.setattr(g3, "MODE", "cublas")
    _cuda("cublas").matmul(x, w)
    linear.forward(Context((True, True, True)), x, w, bias)
    assert len(calls) == 2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("ta,tb", LAYOUTS)
def test_row_strides_wider_than_the_rows(g3, ta, tb):
    """Each operand a view of a wider array (row stride past its row's length), C too: the columns past the
    view's are neither read nor written."""
    import cupy as cp
    rng = np.random.default_rng(11)
    M, N, K, pad = 132, 96, 200, 8
    a = rng.standard_normal((K, M + pad) if ta else (M, K + pad)).astype(np.float32)
    b = rng.standard_normal((N, K + pad) if tb else (K, N + pad)).astype(np.float32)
    c = np.full((M, N + pad), 7.0, np.float32)
    da, db, dc = cp.asarray(a), cp.asarray(b), cp.asarray(c)
    args = (M, N, K, da.data.ptr, a.shape[1], db.data.ptr, b.shape[1], dc.data.ptr, N + pad)
    assert g3.takes(*args, trans_a=ta, trans_b=tb)
    assert not g3.takes(M, N, K, da.data.ptr, (M if ta else K) - 4, db.data.ptr, b.shape[1], dc.data.ptr, N + pad,
                        trans_a=ta, trans_b=tb)   # a row stride shorter than the row
    g3.gemm(*args, ta, tb)
    got = dc.get()
    want = product64(a[:, :M] if ta else a[:, :K], b[:, :K] if tb else b[:, :N], ta, tb)
    assert rel_err(got[:, :N], want) < 1e-6
    assert bool((got[:, N:] == 7.0).all())


@pytest.mark.gpu
@needs_gpu
def test_only_gpus_of_the_capabilities_with_the_shared_memory(g3, monkeypatch):
    """takes() on a device outside CAPABILITIES, or one allowing less shared memory a block than a layout's kernel
    asks for (an RTX or L-series part: 101,376 bytes), says no: that layout keeps cuBLAS."""
    import cupy as cp
    a, b, c = (cp.empty((128, 128), np.float32) for _ in range(3))
    args = (128, 128, 128, a.data.ptr, 128, b.data.ptr, 128, c.data.ptr, 128)
    capable, sms, shared = g3._device()
    assert capable and g3.takes(*args)
    dev = cp.cuda.Device().id
    monkeypatch.setitem(g3._devices, dev, (False, sms, shared))
    assert not g3.takes(*args)
    monkeypatch.setitem(g3._devices, dev, (True, sms, 101376))
    for ta, tb in LAYOUTS:
        assert g3.takes(*args, trans_a=ta, trans_b=tb) == (g3.shared_bytes(g3.CONFIG, ta, tb) <= 101376)
    assert g3.takes(*args, trans_a=True) and not g3.takes(*args)


@pytest.mark.gpu
@needs_gpu
def test_a_bad_setting_is_refused_before_anything_runs(g3, monkeypatch):
    import cupy as cp
    monkeypatch.setattr(g3, "MODE", "fast")
    a, b = cp.ones((64, 64), np.float32), cp.ones((64, 64), np.float32)
    out = cp.full((64, 64), 2.0, np.float32)
    with pytest.raises(ValueError, match=r"^TINYGRAD_LLM_FP32_GEMM must be 3xtf32 or cublas, got 'fast'$"):
        _cuda("cublas").matmul(a, b, out=out)
    assert bool((out == 2.0).all())


@pytest.mark.gpu
@needs_gpu
def test_runs_repeat_bit_for_bit_and_replay_from_a_cuda_graph(g3):
    """The split-k sums are added in a fixed order: two runs agree bit for bit, and a graph's replay equals the
    eager run (the workspace is made before capture and kept)."""
    import cupy as cp
    rng = np.random.default_rng(5)
    M, N, K = 384, 256, 16384
    a, b, da, db = operands(cp, rng, M, N, K, True, False)
    out = cp.empty((M, N), np.float32)
    bias = cp.asarray(rng.standard_normal(N).astype(np.float32))
    step = lambda: g3.gemm(M, N, K, da.data.ptr, M, db.data.ptr, N, out.data.ptr, N, True, False, bias=bias.data.ptr)
    assert g3._slices(M, N, K, g3.CONFIG, g3._kernel(g3.CONFIG, True, False)[3]) > 1
    step()
    first = out.copy()
    eager = eager_then_replayed(step, [out])
    assert bool((eager[0] == first).all()) and bool((out == first).all())
    assert rel_err(out.get(), product64(a, b, True, False) + bias.get()) < 1e-6


def record(monkeypatch, g3):
    """Calls of g3.gemm (their keyword arguments), still run."""
    calls, run = [], g3.gemm

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return run(*args, **kwargs)
    monkeypatch.setattr(g3, "gemm", recorded)
    return calls
