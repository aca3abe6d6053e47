"""cuBLASLt through ctypes (graph-capturable): one plan builder, row-major C = op(A) op(B) (+ bias, the BIAS epilogue),
row strides per operand, float32/float64/bf16 in; for Linear, cublas.gemm's single float32 products, gemm_bf16.py.

cuBLASLt's algorithms are chosen per plan (one product's shape, strides, transposes, types, bias and
alignment): its heuristic offers up to LT_CANDIDATES, and on the plan's first call each is timed on that
call's own operands (CUDA events, median of TUNE_RUNS after a warm-up) and the fastest kept, as
cudnn.benchmark does: the heuristic's first pick is not always the fastest (for one of the 6x384 GPT step's
TF32 weight gradients on an H200, 0.149 ms against 0.109 for the best). TINYGRAD_LLM_GEMM_TUNE=0 (or
set_gemm_tune(False)) keeps the heuristic's first instead; 1 (the default) times. The trade: within one
process a plan always gets the same algorithm (so eager and graph-replayed steps agree), but across
processes the timing may pick another one, and other algorithms sum in other orders (float32 rounding);
with 0, runs are bitwise reproducible across processes on one GPU and library version. No timing runs while
a CUDA graph is being captured (runtime.capturing): a plan first used there keeps the heuristic's first;
cuda_graph.py's eager warm-up steps normally choose every algorithm before. A call with beta != 0 (it would
add into C at every timed run) is not timed either.
"""
import ctypes
import os

import cupy as cp
import numpy as np
from cupy.cuda import cublas

from . import runtime
from .runtime import OnFirstUse, default_pool, load_library

ONE = {np.dtype(np.float32): np.array(1, np.float32), np.dtype(np.float64): np.array(1, np.float64)}
ZERO = {np.dtype(np.float32): np.array(0, np.float32), np.dtype(np.float64): np.array(0, np.float64)}
CUDA_TYPE = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}   # cudaDataType CUDA_R_32F, CUDA_R_64F


def compute_type(dtype):
    """cuBLAS compute type of CuPy's own float32/float64 matmuls (so backend.set_tf32 applies here too)."""
    if np.dtype(dtype) == np.float64:
        return cublas.CUBLAS_COMPUTE_64F
    from cupy._core import _routines_linalg as linalg
    tf32 = linalg.get_compute_type(np.dtype(np.float32)) == linalg.COMPUTE_TYPE_TF32
    return cublas.CUBLAS_COMPUTE_32F_FAST_TF32 if tf32 else cublas.CUBLAS_COMPUTE_32F


class _HeuristicResult(ctypes.Structure):   # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


CUDA_R_16BF = 14                                          # cudaDataType of bf16 (uint16 bits here)
CUBLAS_COMPUTE_32F = 68                                   # cublasComputeType_t: float32 sums, no TF32
_LT_DESC_TRANSA, _LT_DESC_TRANSB = 3, 4                   # cublasLtMatmulDescAttributes_t
_LT_DESC_EPILOGUE, _LT_DESC_BIAS_POINTER = 7, 8
_LT_EPILOGUE_DEFAULT, _LT_EPILOGUE_BIAS = 1, 4            # cublasLtEpilogue_t
_LT_PREF_MAX_WORKSPACE_BYTES = 1                          # cublasLtMatmulPreferenceAttributes_t
_LT_PREF_MIN_ALIGNMENT = (5, 6, 7, 8)                     # ... MIN_ALIGNMENT_{A,B,C,D}_BYTES
_LT_WORKSPACE_BYTES = 32 << 20
LT_CANDIDATES = 8     # algorithms asked of cuBLASLt's heuristic for each plan
TUNE_RUNS = 5         # timed runs of each candidate (after one warm-up); the median counts
SPIN_CYCLES = 2_000_000   # the delay kernel's length (about 1 ms): longer than the host takes to issue the timed runs

# One thread that spins for `cycles` clock cycles. Launched before a candidate's timed runs, it holds the GPU
# while the host issues them, so the runs execute back to back and the events time the GPU, not the host's
# issue rate (a product of ~20 us is shorter than issuing one cublasLtMatmul from Python).
_spin = cp.RawKernel(r"""
extern "C" __global__ void tinygrad_llm_spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
""", "tinygrad_llm_spin")

_tune = None          # the TINYGRAD_LLM_GEMM_TUNE setting once read (gemm_tune), or set by set_gemm_tune
tunings = 0           # plans whose candidates were timed so far (tests read it)


def _read_gemm_tune():
    value = os.environ.get("TINYGRAD_LLM_GEMM_TUNE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"TINYGRAD_LLM_GEMM_TUNE must be 1 (time cuBLASLt's candidates) or 0 (the heuristic's "
                         f"first), got {value!r}")
    return value == "1"


def gemm_tune():
    """True when a plan's first use times cuBLASLt's candidate algorithms (TINYGRAD_LLM_GEMM_TUNE, read once)."""
    global _tune
    if _tune is None:
        _tune = _read_gemm_tune()
    return _tune


def set_gemm_tune(on):
    """Turn the timing of candidates on or off (overriding TINYGRAD_LLM_GEMM_TUNE) and forget every algorithm
    chosen so far: the next use of each plan chooses again, timed or the heuristic's first."""
    global _tune
    _tune = bool(on)
    if lt.value is not None:
        for plan in lt.value.plans.values():
            if plan is not None:
                plan.algo = None


def alignment(*pointers):
    """The largest power of two, at most 256, that divides every address (bytes)."""
    align = 256
    for p in pointers:
        while p % align:
            align //= 2
    return align


def _may_time(stream):
    """False while a CUDA graph is being captured (no event or synchronization may run then): runtime.capturing
    (cuda_graph.py sets it), or the current stream itself capturing."""
    if runtime.capturing:
        return False
    if stream.ptr in (0, 1):   # (the legacy default stream is never captured)
        return True
    try:
        return not stream.is_capturing()
    except Exception:     # (a query refused while some capture runs): do not time
        return False


class _Plan:
    """A cuBLASLt matmul descriptor, its three layouts, the heuristic's candidates (best guess first) and
    `algo`, the index of the one chosen (None until the plan's first call)."""

    def __init__(self, desc, first, second, d, results, bias, scale):
        self.desc, self.first, self.second, self.d = desc, first, second, d
        self.results, self.bias, self.scale, self.algo = results, bias, scale, None


class _Lt:
    """A cuBLASLt handle with a workspace of its own, and its plans by shape, layout, types and alignment."""

    def __init__(self):
        self.lib = load_library("cublasLt")
        self.handle = ctypes.c_void_p()
        self._check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        with default_pool():
            self.workspace = cp.empty(_LT_WORKSPACE_BYTES, dtype=np.uint8)
        self.plans = {}

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def _layout(self, cuda_type, rows, cols, ld):
        layout = ctypes.c_void_p()
        status = self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), ctypes.c_int(cuda_type),
                                                     ctypes.c_uint64(rows), ctypes.c_uint64(cols), ctypes.c_int64(ld))
        self._check(status, "cublasLtMatrixLayoutCreate")
        return layout

    def _cached(self, key, make):
        if key not in self.plans:
            if len(self.plans) >= 256:   # e.g. generation without a KV cache: a new N every token
                self.plans.clear()       # (the descriptors are a few hundred bytes of host memory each)
            try:
                self.plans[key] = make()
            except RuntimeError:         # a shape cuBLASLt will not describe: the caller takes another path
                self.plans[key] = None
        return self.plans[key]

    def get_plan(self, M, N, K, lda, ldb, ldc, trans_a, trans_b, in_type, out_type, compute, bias, align):
        """The plan of row-major C (M, N) = op(A) op(B) (+ bias (N,)), made on first use (None where cuBLASLt
        offers no algorithm): A, B of cudaDataType in_type, C of out_type, row strides lda, ldb, ldc (elements),
        op(A) M x K (A stored K x M when trans_a), op(B) K x N (B stored N x K when trans_b), every operand's
        address a multiple of align bytes."""
        key = (M, N, K, lda, ldb, ldc, bool(trans_a), bool(trans_b), in_type, out_type, compute, bool(bias), align)
        return self._cached(key, lambda: self.make_plan(*key))

    def make_plan(self, M, N, K, lda, ldb, ldc, trans_a, trans_b, in_type, out_type, compute, bias, align):
        """Descriptor, layouts and up to LT_CANDIDATES algorithms (see get_plan). Row-major C = op(A) op(B) is
        column-major C^T (N, M) = op(B)^T op(A)^T, so B is cuBLASLt's first operand (and trans_b its TRANSA)."""
        lib, desc, pref = self.lib, ctypes.c_void_p(), ctypes.c_void_p()
        self._check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), ctypes.c_int(compute), ctypes.c_int(out_type)),
                    "cublasLtMatmulDescCreate")
        for attribute, value in ((_LT_DESC_TRANSA, int(trans_b)), (_LT_DESC_TRANSB, int(trans_a)),
                                 (_LT_DESC_EPILOGUE, _LT_EPILOGUE_BIAS if bias else _LT_EPILOGUE_DEFAULT)):
            v = ctypes.c_int32(value)
            self._check(lib.cublasLtMatmulDescSetAttribute(desc, attribute, ctypes.byref(v), ctypes.c_size_t(4)),
                        "cublasLtMatmulDescSetAttribute")
        # stored shapes, column-major: B is (N, K) (ld ldb), or (K, N) when trans_b; A is (K, M), or (M, K) when trans_a
        first = self._layout(in_type, K if trans_b else N, N if trans_b else K, ldb)
        second = self._layout(in_type, M if trans_a else K, K if trans_a else M, lda)
        d = self._layout(out_type, N, M, ldc)
        self._check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
        try:
            # the workspace's size, and the operands' alignment (cuBLASLt assumes 256 bytes unless told)
            settings = [(_LT_PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(_LT_WORKSPACE_BYTES))]
            settings += [(attribute, ctypes.c_uint32(align)) for attribute in _LT_PREF_MIN_ALIGNMENT]
            for attribute, v in settings:
                self._check(lib.cublasLtMatmulPreferenceSetAttribute(pref, attribute, ctypes.byref(v),
                                                                     ctypes.c_size_t(ctypes.sizeof(v))),
                            "cublasLtMatmulPreferenceSetAttribute")
            results, count = (_HeuristicResult * LT_CANDIDATES)(), ctypes.c_int(0)
            status = lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, first, second, d, d, pref, LT_CANDIDATES,
                                                        results, ctypes.byref(count))
        finally:
            lib.cublasLtMatmulPreferenceDestroy(pref)
        usable = [results[i] for i in range(count.value) if results[i].state == 0] if status == 0 else []
        if not usable:
            lib.cublasLtMatmulDescDestroy(desc)
            for layout in (first, second, d):
                lib.cublasLtMatrixLayoutDestroy(layout)
            return None
        scale = np.dtype(np.float64) if out_type == CUDA_TYPE[np.dtype(np.float64)] else np.dtype(np.float32)
        return _Plan(desc, first, second, d, usable, bias, scale)

    def _matmul(self, plan, index, a, b, c, alpha, beta, stream):
        """One cublasLtMatmul with candidate `index`; returns cuBLAS's status."""
        c_void_p = ctypes.c_void_p
        return self.lib.cublasLtMatmul(
            self.handle, plan.desc, c_void_p(alpha), c_void_p(b), plan.first, c_void_p(a), plan.second, c_void_p(beta),
            c_void_p(c), plan.d, c_void_p(c), plan.d, ctypes.byref(plan.results[index].algo),
            c_void_p(self.workspace.data.ptr), ctypes.c_size_t(_LT_WORKSPACE_BYTES), c_void_p(stream.ptr))

    def run(self, plan, a, b, c, bias=0, beta=0):
        """C = op(A) op(B) (+ bias) (+ beta C) on device addresses a, b, c (bias: the (N,) vector's address, for
        a plan with the BIAS epilogue) with the plan's algorithm: on the plan's first call, choose() picks it.
        Returns False where cuBLASLt refuses the call (nothing was launched)."""
        if plan.bias:
            pointer = ctypes.c_void_p(bias)
            self._check(self.lib.cublasLtMatmulDescSetAttribute(plan.desc, _LT_DESC_BIAS_POINTER, ctypes.byref(pointer),
                                                                ctypes.c_size_t(ctypes.sizeof(pointer))),
                        "cublasLtMatmulDescSetAttribute(BIAS)")
        scale = plan.scale
        beta_host = ZERO[scale] if beta == 0 else ONE[scale] if beta == 1 else np.array(beta, scale)
        alpha = ONE[scale].ctypes.data
        stream = cp.cuda.get_current_stream()
        if plan.algo is None:
            plan.algo = self.choose(plan, a, b, c, alpha, beta == 0, stream)
        return self._matmul(plan, plan.algo, a, b, c, alpha, beta_host.ctypes.data, stream) == 0

    def choose(self, plan, a, b, c, alpha, zero_beta, stream):
        """The index of the candidate this plan keeps. Timing on (gemm_tune), beta == 0 and no graph being
        captured: each candidate once to warm up, then, behind the delay kernel (_spin), TUNE_RUNS times
        between CUDA events on the current stream, on the call's own operands (C is overwritten by the call
        that follows); the lowest median wins, a candidate cuBLASLt refuses is skipped. Otherwise the
        heuristic's first."""
        global tunings
        tune = gemm_tune()
        if not (tune and zero_beta and len(plan.results) > 1 and _may_time(stream)):
            return 0
        tunings += 1
        events = [cp.cuda.Event() for _ in range(TUNE_RUNS + 1)]
        beta = ZERO[plan.scale].ctypes.data
        best, best_time = 0, None
        for index in range(len(plan.results)):
            if self._matmul(plan, index, a, b, c, alpha, beta, stream) != 0:
                continue
            failed = False
            try:
                _spin((1,), (1,), (np.int64(SPIN_CYCLES),))   # (on the current stream: `stream`)
            except Exception:   # (no delay kernel: the runs are timed as issued)
                pass
            events[0].record(stream)
            for r in range(TUNE_RUNS):
                failed = self._matmul(plan, index, a, b, c, alpha, beta, stream) != 0 or failed
                events[r + 1].record(stream)
            events[-1].synchronize()
            if failed:
                continue
            times = sorted(cp.cuda.get_elapsed_time(events[r], events[r + 1]) for r in range(TUNE_RUNS))
            if best_time is None or times[TUNE_RUNS // 2] < best_time:
                best, best_time = index, times[TUNE_RUNS // 2]
        return best

    def matmul(self, M, N, K, a, lda, b, ldb, c, ldc, trans_a=False, trans_b=False, in_type=0, compute=None,
               bias=0, beta=0):
        """Row-major C (M, N) float32 (float64 for float64 inputs) = op(A) op(B) (+ bias (N,)) (+ beta C) on
        device addresses (see get_plan; in_type a cudaDataType, compute None: compute_type of the input's
        float dtype). Returns False, having done nothing, where an address is not 16-byte aligned or cuBLASLt
        offers no algorithm or refuses the call."""
        align = alignment(a, b, c)
        if align < 16 or bias % 16:
            return False
        f64 = CUDA_TYPE[np.dtype(np.float64)]
        out_type = f64 if in_type == f64 else CUDA_TYPE[np.dtype(np.float32)]
        if compute is None:
            compute = compute_type(np.float64 if in_type == f64 else np.float32)
        plan = self.get_plan(M, N, K, lda, ldb, ldc, trans_a, trans_b, in_type, out_type, compute, bool(bias), align)
        if plan is None:
            return False
        return self.run(plan, a, b, c, bias, beta)

    # Linear's forward: row-major out (N, M) = x (N, K) w (K, M) + b, its plans keyed (N, K, M, dtype, compute)
    def plan(self, N, K, M, dtype, align=256):
        """The plan of Linear's out = x w + b for float32/float64 x (N, K), w (K, M), b (M,) (None: no algorithm)."""
        dtype = np.dtype(dtype)
        compute, t = compute_type(dtype), CUDA_TYPE[dtype]
        key = (N, K, M, dtype, compute) + (() if align == 256 else (align,))
        return self._cached(key, lambda: self.make_plan(N, M, K, K, M, M, False, False, t, t, compute, True, align))

    def linear(self, x2, w, bias, out, plan):
        """out = x2 w + bias with a plan of plan()."""
        if not self.run(plan, x2.data.ptr, w.data.ptr, out.data.ptr, bias.data.ptr):
            raise RuntimeError(f"cublasLtMatmul refused Linear's product {x2.shape} x {w.shape}")


lt = OnFirstUse(_Lt)
