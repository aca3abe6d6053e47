"""The cuBLAS calls CuPy does not bind, through ctypes: cuBLASLt's matmul with a bias epilogue (Linear)
and the pointer-array batched GEMM (every (batch, head) product of attention in one call), plus the
strided-batched GEMM on raw pointers. A library that cannot be loaded makes its wrapper None: the
callers then take another path.
"""
import ctypes

import cupy as cp
import numpy as np
from cupy.cuda import cublas

from .runtime import OnFirstUse, load_library

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


# ---- batched GEMMs on raw pointers ------------------------------------------------------------------

def gemm(dtype, batch, M, N, K, a, lda, stride_a, b, ldb, stride_b, c, ldc, stride_c, trans_a=False, trans_b=False):
    """C[i] = op(A[i]) op(B[i]) for i < batch, every matrix row-major with its own row stride (ld) and its
    own batch stride, all in elements; a, b, c are device pointers. op(A) is M x K (A stored K x M when
    trans_a), op(B) K x N, C M x N. One cuBLAS strided-batched call: row-major C = A B is column-major
    C^T = B^T A^T, so B goes first. Strided views (a head's columns inside qkv) are read in place."""
    dtype = np.dtype(dtype)
    t = CUDA_TYPE[dtype]
    cublas.gemmStridedBatchedEx(
        cp.cuda.device.get_cublas_handle(), cublas.CUBLAS_OP_T if trans_b else cublas.CUBLAS_OP_N,
        cublas.CUBLAS_OP_T if trans_a else cublas.CUBLAS_OP_N, N, M, K, ONE[dtype].ctypes.data,
        b, t, ldb, stride_b, a, t, lda, stride_a, ZERO[dtype].ctypes.data, c, t, ldc, stride_c, batch,
        compute_type(dtype), cublas.CUBLAS_GEMM_DEFAULT)


class _BatchedGemm:
    """cublasGemmBatchedEx through ctypes (CuPy binds only the strided-batched GEMMs), on a handle of its own."""

    def __init__(self):
        self.lib = load_library("cublas")
        self.handle = ctypes.c_void_p()
        status = self.lib.cublasCreate_v2(ctypes.byref(self.handle))
        if status != 0:
            raise RuntimeError(f"cublasCreate failed with status {status}")

    def __call__(self, op_a, op_b, m, n, k, alpha, a_array, a_type, lda, b_array, b_type, ldb, beta, c_array, c_type,
                 ldc, count, compute):
        c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
        self.lib.cublasSetStream_v2(self.handle, c_void_p(cp.cuda.get_current_stream().ptr))
        status = self.lib.cublasGemmBatchedEx(
            self.handle, c_int(op_a), c_int(op_b), c_int(m), c_int(n), c_int(k), c_void_p(alpha), c_void_p(a_array),
            c_int(a_type), c_int(lda), c_void_p(b_array), c_int(b_type), c_int(ldb), c_void_p(beta), c_void_p(c_array),
            c_int(c_type), c_int(ldc), c_int(count), c_int(compute), c_int(-1))   # -1: CUBLAS_GEMM_DEFAULT
        if status != 0:
            raise RuntimeError(f"cublasGemmBatchedEx failed with status {status}")


batched_gemm = OnFirstUse(_BatchedGemm)


HEADS_IN_ONE_CALL = True
_pointer_tables = {}   # operand bases and strides -> device array of the B*NH matrices' pointers (A, B, C)


def gemm_heads(dtype, B, NH, M, N, K, a, lda, a_b, a_h, b, ldb, b_b, b_h, c, ldc, c_b, c_h,
               trans_a=False, trans_b=False):
    """gemm for every (batch, head) pair at once: matrix (i, h) of an operand starts at
    base + i * stride_b + h * stride_h (elements). Heads inside qkv (stride HS) and batches (stride T*3C)
    are not one stride apart, so this is cuBLAS's pointer-array batched GEMM: one call for all B*NH
    products. The pointer table is built on the host and kept, keyed by the bases: CuPy's pool hands
    the same blocks out step after step, so the steady state uploads nothing. HEADS_IN_ONE_CALL = False,
    or no libcublas to load: one strided-batched call per head."""
    batched = batched_gemm() if HEADS_IN_ONE_CALL else None
    if batched is None:
        size = np.dtype(dtype).itemsize
        for h in range(NH):
            gemm(dtype, B, M, N, K, a + h * a_h * size, lda, a_b, b + h * b_h * size, ldb, b_b, c + h * c_h * size,
                 ldc, c_b, trans_a=trans_a, trans_b=trans_b)
        return
    dtype = np.dtype(dtype)
    key = (dtype, B, NH, a, a_b, a_h, b, b_b, b_h, c, c_b, c_h)
    table = _pointer_tables.get(key)
    if table is None:
        if len(_pointer_tables) >= 1024:
            _pointer_tables.clear()
        i, h = np.arange(B, dtype=np.uint64)[:, None], np.arange(NH, dtype=np.uint64)[None, :]
        size = np.uint64(dtype.itemsize)
        ptrs = [(np.uint64(base) + (i * np.uint64(sb) + h * np.uint64(sh)) * size).ravel()
                for base, sb, sh in ((a, a_b, a_h), (b, b_b, b_h), (c, c_b, c_h))]
        table = _pointer_tables[key] = cp.asarray(np.concatenate(ptrs))
    n, t, p0 = B * NH, CUDA_TYPE[dtype], table.data.ptr
    # row-major C = A B is column-major C^T = B^T A^T: B's pointers go first
    batched(1 if trans_b else 0, 1 if trans_a else 0, N, M, K, ONE[dtype].ctypes.data, p0 + 8 * n, t, ldb, p0, t, lda,
            ZERO[dtype].ctypes.data, p0 + 16 * n, t, ldc, n, compute_type(dtype))
