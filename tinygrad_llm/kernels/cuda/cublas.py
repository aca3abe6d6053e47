"""cuBLAS through ctypes: cuBLASLt's matmul with a bias epilogue (Linear), the pointer-array batched GEMM
(every (batch, head) product of attention in one call), and plain and strided-batched GEMMs on raw pointers
on a handle of the project's own. CuPy's cuBLAS calls cannot be captured into a CUDA graph; these can, so
every GEMM of a training step on the GPU comes through here. A library that cannot be loaded makes its
wrapper None: the callers then take another path.
"""
import ctypes

import cupy as cp
import numpy as np
from cupy.cuda import cublas

from . import runtime
from .runtime import OnFirstUse, default_pool, load_library, register_cache


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


# ---- cuBLASLt: D = W X + bias in one matmul ---------------------------------------------------------

class _HeuristicResult(ctypes.Structure):   # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_LT_DESC_EPILOGUE, _LT_DESC_BIAS_POINTER = 7, 8          # cublasLtMatmulDescAttributes_t
_LT_EPILOGUE_BIAS = 4                                     # cublasLtEpilogue_t
_LT_PREF_MAX_WORKSPACE_BYTES = 1                          # cublasLtMatmulPreferenceAttributes_t
_LT_WORKSPACE_BYTES = 32 << 20


class _Lt:
    """A cuBLASLt handle and, per (rows, in, out, dtype, compute type), a descriptor and an algorithm."""

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

    def _layout(self, dtype, rows, cols, ld):
        layout = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), ctypes.c_int(CUDA_TYPE[dtype]),
                                                        ctypes.c_uint64(rows), ctypes.c_uint64(cols), ctypes.c_int64(ld)),
                    "cublasLtMatrixLayoutCreate")
        return layout

    def plan(self, N, K, M, dtype):
        """Column-major D (M, N) = W (M, K) X (K, N) + bias (M,): row-major out (N, M) = x (N, K) w (K, M) + b."""
        compute = compute_type(dtype)
        key = (N, K, M, dtype, compute)
        if key not in self.plans:
            if len(self.plans) >= 256:   # e.g. generation without a KV cache: a new N every token
                self.plans.clear()       # (the descriptors are a few hundred bytes of host memory each)
            try:
                self.plans[key] = self._make_plan(N, K, M, dtype, compute)
            except RuntimeError:         # a shape cuBLASLt will not describe: the reference takes it
                self.plans[key] = None
        return self.plans[key]

    def _make_plan(self, N, K, M, dtype, compute):
        lib, desc, pref = self.lib, ctypes.c_void_p(), ctypes.c_void_p()
        self._check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), ctypes.c_int(compute),
                                                 ctypes.c_int(CUDA_TYPE[dtype])), "cublasLtMatmulDescCreate")
        epilogue = ctypes.c_uint32(_LT_EPILOGUE_BIAS)
        self._check(lib.cublasLtMatmulDescSetAttribute(desc, _LT_DESC_EPILOGUE, ctypes.byref(epilogue),
                                                       ctypes.c_size_t(4)),
                    "cublasLtMatmulDescSetAttribute(EPILOGUE)")
        a, b, d = self._layout(dtype, M, K, M), self._layout(dtype, K, N, K), self._layout(dtype, M, N, M)
        self._check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
        size = ctypes.c_uint64(_LT_WORKSPACE_BYTES)
        self._check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _LT_PREF_MAX_WORKSPACE_BYTES,
                                                             ctypes.byref(size), ctypes.c_size_t(8)),
                    "cublasLtMatmulPreferenceSetAttribute")
        result, count = _HeuristicResult(), ctypes.c_int(0)
        status = lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, a, b, d, d, pref, 1, ctypes.byref(result),
                                                    ctypes.byref(count))
        lib.cublasLtMatmulPreferenceDestroy(pref)
        return (desc, a, b, d, result) if status == 0 and count.value > 0 else None

    def linear(self, x2, w, bias, out, plan):
        desc, a, b, d, result = plan
        pointer = ctypes.c_void_p(bias.data.ptr)
        self._check(self.lib.cublasLtMatmulDescSetAttribute(desc, _LT_DESC_BIAS_POINTER, ctypes.byref(pointer),
                                                            ctypes.c_size_t(ctypes.sizeof(pointer))),
                    "cublasLtMatmulDescSetAttribute(BIAS)")
        dtype = np.dtype(x2.dtype)
        self._check(self.lib.cublasLtMatmul(
            self.handle, desc, ctypes.c_void_p(ONE[dtype].ctypes.data), ctypes.c_void_p(w.data.ptr), a,
            ctypes.c_void_p(x2.data.ptr), b, ctypes.c_void_p(ZERO[dtype].ctypes.data), ctypes.c_void_p(out.data.ptr), d,
            ctypes.c_void_p(out.data.ptr), d, ctypes.byref(result.algo), ctypes.c_void_p(self.workspace.data.ptr),
            ctypes.c_size_t(_LT_WORKSPACE_BYTES), ctypes.c_void_p(cp.cuda.get_current_stream().ptr)), "cublasLtMatmul")



lt = OnFirstUse(_Lt)


# ---- GEMMs on raw pointers, through the project's own cuBLAS handle ---------------------------------------
# CuPy refuses cuBLAS calls while a stream is captured into a CUDA graph; these ctypes calls capture. Every
# GEMM of the training step on the GPU goes through them (Linear's backward, attention, sum_rows).

_BLAS_WORKSPACE_BYTES = 32 << 20


class _Blas:
    """A cuBLAS handle through ctypes with a workspace of its own (so that nothing is allocated while a graph
    is captured): GemmEx, GemmStridedBatchedEx and GemmBatchedEx (CuPy binds no pointer-array batched GEMM)."""

    def __init__(self):
        self.lib = load_library("cublas")
        self.handle = ctypes.c_void_p()
        status = self.lib.cublasCreate_v2(ctypes.byref(self.handle))
        if status != 0:
            raise RuntimeError(f"cublasCreate failed with status {status}")
        with default_pool():
            self.workspace = cp.empty(_BLAS_WORKSPACE_BYTES, dtype=np.uint8)
        set_workspace = getattr(self.lib, "cublasSetWorkspace_v2", None)
        if set_workspace is not None:
            set_workspace(self.handle, ctypes.c_void_p(self.workspace.data.ptr), ctypes.c_size_t(_BLAS_WORKSPACE_BYTES))

    def _on_current_stream(self):
        self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(cp.cuda.get_current_stream().ptr))

    _check = staticmethod(_Lt._check)

    def gemm(self, op_a, op_b, m, n, k, alpha, a, a_type, lda, b, b_type, ldb, beta, c, c_type, ldc, compute):
        """cublasGemmEx (column-major, as cuBLAS)."""
        c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
        self._on_current_stream()
        self._check(self.lib.cublasGemmEx(
            self.handle, c_int(op_a), c_int(op_b), c_int(m), c_int(n), c_int(k), c_void_p(alpha), c_void_p(a),
            c_int(a_type), c_int(lda), c_void_p(b), c_int(b_type), c_int(ldb), c_void_p(beta), c_void_p(c),
            c_int(c_type), c_int(ldc), c_int(compute), c_int(-1)), "cublasGemmEx")   # -1: CUBLAS_GEMM_DEFAULT

    def gemm_strided(self, op_a, op_b, m, n, k, alpha, a, a_type, lda, stride_a, b, b_type, ldb, stride_b, beta, c,
                     c_type, ldc, stride_c, count, compute):
        """cublasGemmStridedBatchedEx."""
        c_int, c_void_p, c_ll = ctypes.c_int, ctypes.c_void_p, ctypes.c_longlong
        self._on_current_stream()
        self._check(self.lib.cublasGemmStridedBatchedEx(
            self.handle, c_int(op_a), c_int(op_b), c_int(m), c_int(n), c_int(k), c_void_p(alpha), c_void_p(a),
            c_int(a_type), c_int(lda), c_ll(stride_a), c_void_p(b), c_int(b_type), c_int(ldb), c_ll(stride_b),
            c_void_p(beta), c_void_p(c), c_int(c_type), c_int(ldc), c_ll(stride_c), c_int(count), c_int(compute),
            c_int(-1)), "cublasGemmStridedBatchedEx")

    def __call__(self, op_a, op_b, m, n, k, alpha, a_array, a_type, lda, b_array, b_type, ldb, beta, c_array, c_type,
                 ldc, count, compute):
        """cublasGemmBatchedEx: arrays of device pointers."""
        c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
        self._on_current_stream()
        self._check(self.lib.cublasGemmBatchedEx(
            self.handle, c_int(op_a), c_int(op_b), c_int(m), c_int(n), c_int(k), c_void_p(alpha), c_void_p(a_array),
            c_int(a_type), c_int(lda), c_void_p(b_array), c_int(b_type), c_int(ldb), c_void_p(beta), c_void_p(c_array),
            c_int(c_type), c_int(ldc), c_int(count), c_int(compute), c_int(-1)), "cublasGemmBatchedEx")


blas = OnFirstUse(_Blas)
batched_gemm = blas   # (the pointer-array batched GEMM is the handle's __call__)


def gemm(dtype, batch, M, N, K, a, lda, stride_a, b, ldb, stride_b, c, ldc, stride_c, trans_a=False, trans_b=False,
         beta=0):
    """C[i] = op(A[i]) op(B[i]) (+ beta C[i]) for i < batch, every matrix row-major with its own row stride
    (ld) and its own batch stride, all in elements; a, b, c are device pointers. op(A) is M x K (A stored
    K x M when trans_a), op(B) K x N (B stored N x K when trans_b), C M x N. Row-major C = A B is
    column-major C^T = B^T A^T, so B goes first. Strided views (a head's columns inside qkv) are read in
    place. Through the project's ctypes handle (capturable); CuPy's cuBLAS where that library is missing."""
    dtype = np.dtype(dtype)
    t = CUDA_TYPE[dtype]
    lib = blas()
    op_a, op_b = (1 if trans_a else 0), (1 if trans_b else 0)   # CUBLAS_OP_T, CUBLAS_OP_N
    scale = ONE[dtype] if beta == 1 else ZERO[dtype] if beta == 0 else np.array(beta, dtype)
    if lib is None:
        cublas.gemmStridedBatchedEx(
            cp.cuda.device.get_cublas_handle(), op_b, op_a, N, M, K, ONE[dtype].ctypes.data,
            b, t, ldb, stride_b, a, t, lda, stride_a, scale.ctypes.data, c, t, ldc, stride_c, batch,
            compute_type(dtype), cublas.CUBLAS_GEMM_DEFAULT)
    elif batch == 1:
        lib.gemm(op_b, op_a, N, M, K, ONE[dtype].ctypes.data, b, t, ldb, a, t, lda, scale.ctypes.data, c, t, ldc,
                 compute_type(dtype))
    else:
        lib.gemm_strided(op_b, op_a, N, M, K, ONE[dtype].ctypes.data, b, t, ldb, stride_b, a, t, lda, stride_a,
                         scale.ctypes.data, c, t, ldc, stride_c, batch, compute_type(dtype))


def matmul(a, b, trans_a=False, trans_b=False, out=None, beta=0):
    """op(a) @ op(b) for C-contiguous 2-D arrays of one float dtype (op: the transpose where asked), into
    `out` (a new array when None; beta=1 adds to it): gemm on the project's handle."""
    M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
    N = b.shape[0] if trans_b else b.shape[1]
    if out is None:
        out = cp.empty((M, N), dtype=a.dtype)
    if M and N:
        if K == 0:
            if beta == 0:
                out.fill(0)
        else:
            gemm(a.dtype, 1, M, N, K, a.data.ptr, a.shape[1], 0, b.data.ptr, b.shape[1], 0, out.data.ptr, N, 0,
                 trans_a=trans_a, trans_b=trans_b, beta=beta)
    return out


_ones = register_cache({})   # (n, dtype, device) -> a kept vector of n ones


def sum_rows_cuda(a):
    """backend.sum_rows on the GPU: (N, C) -> (C,), the column sums as ones (1, N) @ a (one GEMM)."""
    if a.ndim != 2 or np.dtype(a.dtype) not in CUDA_TYPE:
        return a.sum(axis=0)
    a = cp.ascontiguousarray(a)
    key = (a.shape[0], np.dtype(a.dtype), a.device.id)
    ones = _ones.get(key)
    if ones is None:
        if len(_ones) >= 16 and not runtime.capturing:   # (a graph being captured reads it)
            _ones.clear()
        with default_pool():
            ones = _ones[key] = cp.ones((1, a.shape[0]), dtype=a.dtype)
    return matmul(ones, a).reshape(a.shape[1])


_fill_pointers = cp.RawKernel(r"""
extern "C" __global__ void fill_pointer_table(unsigned long long* out, int B, int NH,
        unsigned long long a, long long a_b, long long a_h, long long a_size,
        unsigned long long b, long long b_b, long long b_h, long long b_size,
        unsigned long long c, long long c_b, long long c_h, long long c_size) {
    int t = blockIdx.x * blockDim.x + threadIdx.x, n = B * NH;
    if (t >= n) return;
    long long i = t / NH, h = t % NH;
    out[t] = a + (i * a_b + h * a_h) * a_size;
    out[n + t] = b + (i * b_b + h * b_h) * b_size;
    out[2 * n + t] = c + (i * c_b + h * c_h) * c_size;
}
""", "fill_pointer_table")

_pointer_tables = register_cache({})   # (B, NH, operands) -> device array of the B*NH matrices' pointers (A, B, C)


def pointer_table(B, NH, operands):
    """The device array of cublasGemmBatchedEx's pointers for matrix (i, h) of each of three operands, each
    operand (base byte address, batch stride, head stride, itemsize), strides in elements: base + (i stride_b +
    h stride_h) itemsize, A's B*NH pointers, then B's, then C's. Written on the device (the first call may be
    inside a graph's capture, where no copy from the host may run) and kept, keyed by the operands: CuPy's pool
    hands the same blocks out step after step, so the steady state writes nothing."""
    key = (B, NH) + tuple(operands)
    table = _pointer_tables.get(key)
    if table is None:
        if len(_pointer_tables) >= 1024 and not runtime.capturing:   # (a graph being captured reads it)
            _pointer_tables.clear()
        with default_pool():
            table = _pointer_tables[key] = cp.empty(3 * B * NH, dtype=np.uint64)
        args = [np.uint64(v) if k == 0 else np.int64(v) for operand in operands for k, v in enumerate(operand)]
        _fill_pointers((-(-B * NH // 128),), (128,), (table, np.int32(B), np.int32(NH), *args))
    return table


HEADS_IN_ONE_CALL = True


def gemm_heads(dtype, B, NH, M, N, K, a, lda, a_b, a_h, b, ldb, b_b, b_h, c, ldc, c_b, c_h,
               trans_a=False, trans_b=False):
    """gemm for every (batch, head) pair at once: matrix (i, h) of an operand starts at
    base + i * stride_b + h * stride_h (elements). Heads inside qkv (stride HS) and batches (stride T*3C)
    are not one stride apart, so this is cuBLAS's pointer-array batched GEMM: one call for all B*NH
    products, from pointer_table. HEADS_IN_ONE_CALL = False,
    or no libcublas to load: one strided-batched call per head."""
    batched = batched_gemm() if HEADS_IN_ONE_CALL else None
    if batched is None:
        size = np.dtype(dtype).itemsize
        for h in range(NH):
            gemm(dtype, B, M, N, K, a + h * a_h * size, lda, a_b, b + h * b_h * size, ldb, b_b, c + h * c_h * size,
                 ldc, c_b, trans_a=trans_a, trans_b=trans_b)
        return
    dtype = np.dtype(dtype)
    size = dtype.itemsize
    table = pointer_table(B, NH, ((a, a_b, a_h, size), (b, b_b, b_h, size), (c, c_b, c_h, size)))
    n, t, p0 = B * NH, CUDA_TYPE[dtype], table.data.ptr
    # row-major C = A B is column-major C^T = B^T A^T: B's pointers go first
    batched(1 if trans_b else 0, 1 if trans_a else 0, N, M, K, ONE[dtype].ctypes.data, p0 + 8 * n, t, ldb, p0, t, lda,
            ZERO[dtype].ctypes.data, p0 + 16 * n, t, ldc, n, compute_type(dtype))
