"""cuBLASLt's plans and the timing of their candidate algorithms (kernels/cuda/cublaslt.py): every layout,
float32 (strict and TF32), bf16 in, with and without the bias epilogue, odd shapes and row strides wider than
the matrix, with the timing on and off, against float64 products of the same operands; the timing runs once
a plan, never while a CUDA graph is being captured, never with beta != 0; TINYGRAD_LLM_GEMM_TUNE's values.

Skipped (cleanly, at collection) where CuPy or a GPU is missing. Tolerances (largest error over the largest
reference magnitude): float32 1e-5 (float32 sums in another order); TF32 5e-3 (inputs rounded to 10
mantissa bits, about 5e-4 each); bf16 in 1e-5 against the float64 product of the bf16-rounded operands.
"""
import importlib

import numpy as np
import pytest

from tinygrad_llm import backend, precision
from tinygrad_llm.tensor import Context

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA GPU")]

TOL = {"float32": 1e-5, "tf32": 5e-3, "bf16": 1e-5}
LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]


def _cuda(name):
    return importlib.import_module(f"tinygrad_llm.kernels.cuda.{name}")


@pytest.fixture
def cublaslt(monkeypatch):
    """kernels/cuda/cublaslt.py, with strict float32 products kept on cuBLAS (gemm_3xtf32 off: these tests are
    about cuBLASLt's plans); afterwards the choices made under the test's setting are forgotten and the setting
    is what it was."""
    monkeypatch.setattr(_cuda("gemm_3xtf32"), "MODE", "cublas")
    module = _cuda("cublaslt")
    assert module.lt() is not None, module.lt.error
    original = module._tune
    yield module
    module.set_gemm_tune(True)
    module._tune = original


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def wide(cp, rng, rows, cols, pad):
    """A (rows, cols) float32 matrix as a view of a (rows, cols + pad) device array: row stride cols + pad."""
    host = rng.standard_normal((rows, cols + pad)).astype(np.float32)
    return host[:, :cols], cp.asarray(host)


def plan_of(cublaslt, kind, M, N, K, lda, ldb, ldc, trans_a, trans_b, bias, align=256):
    """The cached plan of that product (None if none was made), keyed as cublaslt._Lt.get_plan keys it."""
    in_type = cublaslt.CUDA_R_16BF if kind == "bf16" else 0
    compute = cublaslt.CUBLAS_COMPUTE_32F if kind == "bf16" else cublaslt.compute_type(np.float32)
    return cublaslt.lt().plans.get((M, N, K, lda, ldb, ldc, trans_a, trans_b, in_type, 0, compute, bias, align))


class Product:
    """Operands of C (M, N) = op(A) op(B) (+ bias) on the device, row strides widened by pad, and the float64
    reference; run() computes it through the path `kind` names and returns C's (M, N) values."""

    def __init__(self, kind, M, N, K, trans_a=False, trans_b=False, bias=False, pad=0, seed=0):
        import cupy as cp
        self.cp, self.kind, self.M, self.N, self.K = cp, kind, M, N, K
        self.trans_a, self.trans_b, self.pad = trans_a, trans_b, pad
        rng = np.random.default_rng(seed)
        a, self.a = wide(cp, rng, *((K, M) if trans_a else (M, K)), pad)
        b, self.b = wide(cp, rng, *((N, K) if trans_b else (K, N)), pad)
        self.lda, self.ldb, self.ldc = self.a.shape[1], self.b.shape[1], N + pad
        self.bias = cp.asarray(rng.standard_normal(N).astype(np.float32)) if bias else None
        if kind == "bf16":
            mixed = _cuda("mixed")
            self.a, self.b = mixed.to_bf16(self.a), mixed.to_bf16(self.b)
            a, b = precision.round_to_bfloat16(a), precision.round_to_bfloat16(b)
        a, b = a.astype(np.float64), b.astype(np.float64)
        self.want = (a.T if trans_a else a) @ (b.T if trans_b else b)
        if bias:
            self.want = self.want + self.bias.get()
        self.c = cp.full((M, self.ldc), np.nan, dtype=np.float32)

    def plan(self, cublaslt):
        return plan_of(cublaslt, self.kind, self.M, self.N, self.K, self.lda, self.ldb, self.ldc, self.trans_a,
                       self.trans_b, self.bias is not None)

    def run(self, cublaslt, beta=0):
        """Returns C's values; asserts cuBLASLt took the product and nothing past C's columns was written."""
        M, N, K, a, b, c = self.M, self.N, self.K, self.a.data.ptr, self.b.data.ptr, self.c.data.ptr
        if self.kind == "bf16":
            served = _cuda("gemm_bf16").bf16_matmul(M, N, K, a, self.lda, b, self.ldb, c, self.ldc, self.trans_a,
                                                    self.trans_b, self.bias)
        elif self.bias is not None:
            served = cublaslt.lt().matmul(M, N, K, a, self.lda, b, self.ldb, c, self.ldc, self.trans_a, self.trans_b,
                                        bias=self.bias.data.ptr, beta=beta)
        else:   # the project's gemm entry: cuBLASLt first for a single float32 product
            _cuda("cublas").gemm(np.float32, 1, M, N, K, a, self.lda, 0, b, self.ldb, 0, c, self.ldc, 0,
                        trans_a=self.trans_a, trans_b=self.trans_b, beta=beta)
            served = True
        assert served
        plan = self.plan(cublaslt)
        assert plan is not None and plan.algo is not None   # cuBLASLt's plan ran it (not cublasGemmEx)
        out = self.c.get()
        assert np.isnan(out[:, N:]).all()
        return out[:, :N]


@pytest.mark.parametrize("pad", [0, 3], ids=["dense", "strided"])
@pytest.mark.parametrize("M,N,K", [(1, 65, 13), (37, 19, 45), (300, 384, 1152)], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("trans_a,trans_b", LAYOUTS, ids=["nn", "tn", "nt", "tt"])
@pytest.mark.parametrize("kind", ["float32", "tf32", "bf16"])
@pytest.mark.parametrize("tune", [True, False], ids=["tuned", "heuristic"])
def test_product_equals_float64_reference(tune, kind, trans_a, trans_b, bias, M, N, K, pad, cublaslt):
    cublaslt.set_gemm_tune(tune)
    product = Product(kind, M, N, K, trans_a, trans_b, bias, pad, seed=M + N + K + pad)
    try:
        backend.set_tf32(kind == "tf32")
        got = product.run(cublaslt)   # (asserts the plan of set_tf32's compute type ran it)
    finally:
        backend.set_tf32(False)
    assert rel_err(got, product.want) < TOL[kind]


def test_tf32_switch_reaches_the_plans(cublaslt):
    """set_tf32 changes the plans' compute type: TF32's error is far above float32's on K = 1152."""
    errors = {}
    for kind in ("float32", "tf32"):
        try:
            backend.set_tf32(kind == "tf32")
            product = Product(kind, 300, 384, 1152, seed=5)
            errors[kind] = rel_err(product.run(cublaslt), product.want)
        finally:
            backend.set_tf32(False)
    assert errors["float32"] < 1e-5 and errors["tf32"] > 3 * errors["float32"]


@pytest.mark.parametrize("kind", ["float32", "tf32", "bf16"])
def test_tuned_and_heuristic_agree_and_one_plan_is_timed_once(kind, cublaslt, monkeypatch):
    import cupy as cp
    try:
        backend.set_tf32(kind == "tf32")
        product = Product(kind, 512, 384, 1536, bias=kind == "bf16", seed=11)
        cublaslt.set_gemm_tune(False)
        before = cublaslt.tunings
        first = product.run(cublaslt)
        plan = product.plan(cublaslt)
        assert plan.algo == 0 and cublaslt.tunings == before
        assert len(plan.results) > 1   # (else there is nothing to choose from and this test proves little)
        cublaslt.set_gemm_tune(True)     # (forgets the choice)
        assert plan.algo is None
        with cp.cuda.Stream(non_blocking=True):   # timed on a stream of its own (as cuda_graph.py's warm-up steps)
            tuned = product.run(cublaslt)
        assert cublaslt.tunings == before + 1 and 0 <= plan.algo < len(plan.results)
        created = []
        real_event = cp.cuda.Event
        monkeypatch.setattr(cp.cuda, "Event", lambda *a, **k: created.append(1) or real_event(*a, **k))
        again = product.run(cublaslt)     # the same plan: no timing, the same algorithm
        assert cublaslt.tunings == before + 1 and not created
    finally:
        backend.set_tf32(False)
    np.testing.assert_array_equal(again, tuned)
    assert rel_err(tuned, product.want) < TOL[kind] and rel_err(first, product.want) < TOL[kind]
    assert rel_err(tuned, first) < 2 * TOL[kind]
    if plan.algo == 0:
        np.testing.assert_array_equal(tuned, first)


def test_the_fastest_candidate_is_kept_and_a_refused_one_skipped(cublaslt, monkeypatch):
    """Fake timings: candidate 0 would be fastest but cuBLASLt refuses it, the last is next fastest: kept."""
    import cupy as cp
    cublaslt.set_gemm_tune(True)
    product = Product("float32", 256, 384, 1152, seed=3)
    plan = cublaslt.lt().get_plan(256, 384, 1152, product.lda, product.ldb, product.ldc, False, False, 0, 0,
                                cublaslt.compute_type(np.float32), False, 256)
    n = len(plan.results)
    assert n >= 3
    plan.algo = None
    last, timed = [None], []
    real = cublaslt._Lt._matmul

    def matmul(self, plan, index, *args):
        last[0] = index
        if index == 0 and plan.algo is None:   # while choosing
            return 15                          # CUBLAS_STATUS_NOT_SUPPORTED
        return real(self, plan, index, *args)

    def elapsed(start, stop):
        timed.append(last[0])
        return {0: 0.5, n - 1: 1.0}.get(last[0], 2.0)

    monkeypatch.setattr(cublaslt._Lt, "_matmul", matmul)
    monkeypatch.setattr(cp.cuda, "get_elapsed_time", elapsed)
    got = product.run(cublaslt)
    assert plan.algo == n - 1
    assert 0 not in timed and sorted(set(timed)) == list(range(1, n)) and len(timed) == (n - 1) * cublaslt.TUNE_RUNS
    assert rel_err(got, product.want) < TOL["float32"]


@pytest.mark.parametrize("flag", [True, False], ids=["runtime.capturing", "stream_capturing"])
@pytest.mark.parametrize("kind", ["float32", "bf16"])
def test_a_plan_first_used_in_a_capture_takes_the_heuristics_first(kind, flag, cublaslt, monkeypatch):
    """Inside a graph's capture (runtime.capturing set, as cuda_graph.py does, or only the stream capturing) no
    event is made and nothing timed; the heuristic's first is kept, so eager calls afterwards run the
    graph's algorithm: replay and eager agree bit for bit."""
    import cupy as cp
    runtime = _cuda("runtime")
    product = Product(kind, 384, 1152, 384, bias=kind == "bf16", seed=7)
    cublaslt.set_gemm_tune(False)
    eager = product.run(cublaslt)            # (the kernel loaded before the capture)
    plan = product.plan(cublaslt)
    cublaslt.set_gemm_tune(True)
    assert plan.algo is None and len(plan.results) > 1
    before, created = cublaslt.tunings, []
    real_event = cp.cuda.Event
    monkeypatch.setattr(cp.cuda, "Event", lambda *a, **k: created.append(1) or real_event(*a, **k))
    stream = cp.cuda.Stream(non_blocking=True)
    product.c.fill(np.nan)
    cp.cuda.Device().synchronize()
    monkeypatch.setattr(runtime, "capturing", flag)
    with stream:
        stream.begin_capture()
        try:
            M, N, K = product.M, product.N, product.K
            if kind == "bf16":
                served = _cuda("gemm_bf16").bf16_matmul(M, N, K, product.a.data.ptr, product.lda, product.b.data.ptr,
                                                        product.ldb, product.c.data.ptr, product.ldc, bias=product.bias)
            else:
                served = cublaslt.lt().matmul(M, N, K, product.a.data.ptr, product.lda, product.b.data.ptr, product.ldb,
                                            product.c.data.ptr, product.ldc)
        finally:
            graph = stream.end_capture()
    monkeypatch.setattr(runtime, "capturing", False)
    assert served and plan.algo == 0 and cublaslt.tunings == before and not created
    assert np.isnan(product.c.get()).all()   # captured, not run
    graph.launch(stream)
    stream.synchronize()
    replayed = product.c.get()[:, :product.N]
    np.testing.assert_array_equal(replayed, eager)
    monkeypatch.setattr(cp.cuda, "Event", real_event)
    np.testing.assert_array_equal(product.run(cublaslt), eager)   # eager again: the same algorithm, not timed
    assert cublaslt.tunings == before and plan.algo == 0


def test_beta_nonzero_is_not_timed_and_adds(cublaslt):
    import cupy as cp
    cublaslt.set_gemm_tune(True)
    product = Product("float32", 512, 384, 384, trans_b=True, seed=9)
    product.c = cp.ones((512, 384), np.float32)
    before = cublaslt.tunings
    got = product.run(cublaslt, beta=1)
    plan = product.plan(cublaslt)
    assert cublaslt.tunings == before and plan.algo == 0 and len(plan.results) > 1
    assert rel_err(got, product.want + 1) < TOL["float32"]
    assert rel_err(product.run(cublaslt), product.want) < TOL["float32"]   # beta = 0 now: the plan keeps its choice
    assert cublaslt.tunings == before and plan.algo == 0


def test_matmul_of_views_by_alignment(cublaslt):
    """cublaslt.matmul and Linear on addresses 16 bytes past an allocation: cuBLASLt plans for that alignment;
    4 bytes past: cublasGemmEx. Both equal the float64 product."""
    import cupy as cp
    rng = np.random.default_rng(4)
    M, N, K = 64, 96, 128
    a = rng.standard_normal(M * K + 4).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    want = a[4:].reshape(M, K).astype(np.float64) @ b
    da, db = cp.asarray(a), cp.asarray(b)
    got = _cuda("cublas").matmul(da[4:].reshape(M, K), db).get()
    assert rel_err(got, want) < TOL["float32"]
    assert plan_of(cublaslt, "float32", M, N, K, K, N, N, False, False, False, align=16).algo is not None
    want1 = a[1:M * K + 1].reshape(M, K).astype(np.float64) @ b
    count = len(cublaslt.lt().plans)
    assert rel_err(_cuda("cublas").matmul(da[1:M * K + 1].reshape(M, K), db).get(), want1) < TOL["float32"]
    assert len(cublaslt.lt().plans) == count   # (no plan for a 4-byte aligned operand)
    bias = rng.standard_normal(N).astype(np.float32)
    out = _cuda("linear").LinearCuda.forward(Context((True, True, True)), da[4:].reshape(M, K), db, cp.asarray(bias))
    assert rel_err(out.get(), want + bias) < TOL["float32"]
    assert cublaslt.lt().plans.get((M, K, N, np.dtype(np.float32), cublaslt.compute_type(np.float32), 16)) is not None


def test_the_setting_is_read_from_the_environment_and_a_bad_value_refused(cublaslt, monkeypatch):
    import cupy as cp
    cublaslt.set_gemm_tune(True)   # (every plan chooses again on its next use)
    for value, on in (("1", True), ("0", False)):
        monkeypatch.setenv("TINYGRAD_LLM_GEMM_TUNE", value)
        monkeypatch.setattr(cublaslt, "_tune", None)
        assert cublaslt.gemm_tune() is on
    monkeypatch.delenv("TINYGRAD_LLM_GEMM_TUNE")
    monkeypatch.setattr(cublaslt, "_tune", None)
    assert cublaslt.gemm_tune() is True   # the default
    monkeypatch.setenv("TINYGRAD_LLM_GEMM_TUNE", "yes")
    monkeypatch.setattr(cublaslt, "_tune", None)
    with pytest.raises(ValueError, match=r"^TINYGRAD_LLM_GEMM_TUNE must be 1 .* or 0 .*, got 'yes'$") as error:
        cublaslt.gemm_tune()
    assert "\n" not in str(error.value)
    # read at a plan's first use, before anything is launched: the output is untouched
    a, b = cp.ones((4, 8), np.float32), cp.ones((8, 16), np.float32)
    out = cp.full((4, 16), 2.0, np.float32)
    with pytest.raises(ValueError, match="TINYGRAD_LLM_GEMM_TUNE"):
        _cuda("cublas").matmul(a, b, out=out)
    np.testing.assert_array_equal(out.get(), np.full((4, 16), 2.0, np.float32))
