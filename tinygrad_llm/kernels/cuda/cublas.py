"""cuBLAS through ctypes: the pointer-array batched GEMM (every (batch, head) product of attention in one
call), plain and strided-batched GEMMs on raw pointers on a handle of the project's own, and, from
cublaslt.py, cuBLASLt's plans (Linear with the bias in the epilogue, every single float32 product: their
algorithms timed on first use, TINYGRAD_LLM_GEMM_TUNE). CuPy's cuBLAS calls cannot be captured into a CUDA
graph; these can, so every GEMM of a training step on the GPU comes through here. A library that cannot be
loaded makes its wrapper None: the callers then take another path.
"""
import ctypes

import cupy as cp
import numpy as np
from cupy.cuda import cublas

from . import gemm_3xtf32, runtime
from .cublaslt import CUDA_TYPE, ONE, ZERO, _Lt, compute_type, lt
from .runtime import OnFirstUse, default_pool, load_library, register_cache


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
    place. A single float32 product (batch 1: Linear's backward, the LM head, sum_rows) in strict float32
    goes to gemm_3xtf32 where that takes it (float32's accuracy on the tensor cores), else to cuBLASLt's
    plans (lt().matmul: the algorithm timed on first use) where the library loads and the addresses are
    16-byte aligned; the rest, and anything cuBLASLt declines, to cublasGemmEx / GemmStridedBatchedEx on the
    project's ctypes handle (capturable); CuPy's cuBLAS where that library is missing."""
    dtype = np.dtype(dtype)
    t = CUDA_TYPE[dtype]
    if batch == 1 and dtype == np.float32:
        if gemm_3xtf32.takes(M, N, K, a, lda, b, ldb, c, ldc, trans_a=trans_a, trans_b=trans_b):
            gemm_3xtf32.gemm(M, N, K, a, lda, b, ldb, c, ldc, trans_a, trans_b, beta=beta)
            return
        plans = lt()   # cuBLASLt's plan (its algorithm timed once), where it takes the product
        if plans is not None and plans.matmul(M, N, K, a, lda, b, ldb, c, ldc, trans_a, trans_b, in_type=t, beta=beta):
            return
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
