"""bf16 matrix products with float32 sums and float32 results (precision.py's policy), beside cublas.py:
cuBLASLt's matmul (Linear, with the bias in the epilogue) and the pointer-array batched GEMM (attention's
products for every (batch, head) pair).

bf16 arrays are CuPy uint16 arrays holding the bits (mixed.py says why). Every call goes through the
project's ctypes handles (cublas.lt's and cublas.batched_gemm's), never CuPy's cuBLAS, so that a CUDA
graph can capture it. A library that cannot be loaded, or a shape cuBLASLt has no algorithm for, makes a
call return False, having done nothing: the caller then takes another path.
"""
import ctypes

import cupy as cp
import numpy as np

from .cublas import (_LT_DESC_BIAS_POINTER, _LT_DESC_EPILOGUE, _LT_EPILOGUE_BIAS, _LT_PREF_MAX_WORKSPACE_BYTES,
                     _LT_WORKSPACE_BYTES, CUDA_TYPE, ONE, ZERO, _HeuristicResult, batched_gemm, lt,
                     pointer_table)

CUDA_R_16BF = 14                        # cudaDataType of bf16
CUBLAS_COMPUTE_32F = 68                 # cublasComputeType_t: float32 sums (no TF32)
_LT_DESC_TRANSA, _LT_DESC_TRANSB = 3, 4  # cublasLtMatmulDescAttributes_t
_LT_EPILOGUE_DEFAULT = 1                 # cublasLtEpilogue_t
_bf16_plans = {}


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


def _bf16_plan(lib, M, N, K, lda, ldb, ldc, trans_a, trans_b, bias):
    """cuBLASLt descriptor, layouts and algorithm for row-major C (M, N) fp32 = op(A) op(B) (+ bias (N,) fp32)
    with bf16 A, B: column-major C^T (N, M) = op(B)^T op(A)^T, so B is cuBLASLt's first operand."""
    key = (M, N, K, lda, ldb, ldc, trans_a, trans_b, bias)
    if key in _bf16_plans:
        return _bf16_plans[key]
    if len(_bf16_plans) >= 256:
        _bf16_plans.clear()
    desc, pref = ctypes.c_void_p(), ctypes.c_void_p()
    _check(lib.lib.cublasLtMatmulDescCreate(ctypes.byref(desc), ctypes.c_int(CUBLAS_COMPUTE_32F),
                                                ctypes.c_int(CUDA_TYPE[np.dtype(np.float32)])), "cublasLtMatmulDescCreate")
    for attribute, value in ((_LT_DESC_TRANSA, int(trans_b)), (_LT_DESC_TRANSB, int(trans_a)),
                             (_LT_DESC_EPILOGUE, _LT_EPILOGUE_BIAS if bias else _LT_EPILOGUE_DEFAULT)):
        v = ctypes.c_int32(value)
        _check(lib.lib.cublasLtMatmulDescSetAttribute(desc, attribute, ctypes.byref(v), ctypes.c_size_t(4)),
                   "cublasLtMatmulDescSetAttribute")
    f32 = np.dtype(np.float32)
    # stored shapes, column-major: B is (N, K) (ld ldb), or (K, N) when trans_b; A is (K, M), or (M, K) when trans_a
    a_lt = _layout_typed(lib, CUDA_R_16BF, K if trans_b else N, N if trans_b else K, ldb)
    b_lt = _layout_typed(lib, CUDA_R_16BF, M if trans_a else K, K if trans_a else M, lda)
    d = _layout_typed(lib, CUDA_TYPE[f32], N, M, ldc)
    _check(lib.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
    size = ctypes.c_uint64(_LT_WORKSPACE_BYTES)
    _check(lib.lib.cublasLtMatmulPreferenceSetAttribute(pref, _LT_PREF_MAX_WORKSPACE_BYTES, ctypes.byref(size),
                                                            ctypes.c_size_t(8)), "cublasLtMatmulPreferenceSetAttribute")
    result, count = _HeuristicResult(), ctypes.c_int(0)
    status = lib.lib.cublasLtMatmulAlgoGetHeuristic(lib.handle, desc, a_lt, b_lt, d, d, pref, 1, ctypes.byref(result),
                                                    ctypes.byref(count))
    lib.lib.cublasLtMatmulPreferenceDestroy(pref)
    plan = _bf16_plans[key] = (desc, a_lt, b_lt, d, result) if status == 0 and count.value > 0 else None
    return plan


def _layout_typed(lib, cuda_type, rows, cols, ld):
    layout = ctypes.c_void_p()
    _check(lib.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), ctypes.c_int(cuda_type), ctypes.c_uint64(rows),
                                                  ctypes.c_uint64(cols), ctypes.c_int64(ld)), "cublasLtMatrixLayoutCreate")
    return layout


def bf16_matmul(M, N, K, a, lda, b, ldb, c, ldc, trans_a=False, trans_b=False, bias=None):
    """Row-major C (M, N) = op(A) op(B) (+ bias (N,)): a, b device pointers to bf16 (uint16) matrices, c to
    float32, bias a float32 CuPy array or None; op(A) is M x K (A stored K x M when trans_a), op(B) K x N
    (stored N x K when trans_b); lda, ldb, ldc row strides in elements. One cuBLASLt matmul, float32 sums
    (bias added in the epilogue). Returns False, having done nothing, where cuBLASLt is missing or offers
    no algorithm: the caller takes another path."""
    lib = lt()
    if lib is None:
        return False
    plan = _bf16_plan(lib, M, N, K, lda, ldb, ldc, bool(trans_a), bool(trans_b), bias is not None)
    if plan is None:
        return False
    desc, a_lt, b_lt, d, result = plan
    if bias is not None:
        pointer = ctypes.c_void_p(bias.data.ptr)
        _check(lib.lib.cublasLtMatmulDescSetAttribute(desc, _LT_DESC_BIAS_POINTER, ctypes.byref(pointer),
                                                          ctypes.c_size_t(ctypes.sizeof(pointer))),
                   "cublasLtMatmulDescSetAttribute(BIAS)")
    f32 = np.dtype(np.float32)
    _check(lib.lib.cublasLtMatmul(
        lib.handle, desc, ctypes.c_void_p(ONE[f32].ctypes.data), ctypes.c_void_p(b), a_lt, ctypes.c_void_p(a), b_lt,
        ctypes.c_void_p(ZERO[f32].ctypes.data), ctypes.c_void_p(c), d, ctypes.c_void_p(c), d, ctypes.byref(result.algo),
        ctypes.c_void_p(lib.workspace.data.ptr), ctypes.c_size_t(_LT_WORKSPACE_BYTES),
        ctypes.c_void_p(cp.cuda.get_current_stream().ptr)), "cublasLtMatmul(bf16)")
    return True


def gemm_heads_bf16(B, NH, M, N, K, a, lda, a_b, a_h, b, ldb, b_b, b_h, c, ldc, c_b, c_h, trans_a=False, trans_b=False):
    """gemm_heads with bf16 (uint16) A and B and a float32 C, float32 sums: one pointer-array batched GEMM
    (cublasGemmBatchedEx through ctypes) for every (batch, head) pair. Strides in elements of each operand's
    own type (A, B: 2 bytes; C: 4). Returns False, having done nothing, where libcublas cannot be loaded."""
    batched = batched_gemm()
    if batched is None:
        return False
    # written on the device and kept (cublas.pointer_table): capturable into a CUDA graph
    table = pointer_table(B, NH, ((a, a_b, a_h, 2), (b, b_b, b_h, 2), (c, c_b, c_h, 4)))
    n, p0, f32 = B * NH, table.data.ptr, np.dtype(np.float32)
    # row-major C = A B is column-major C^T = B^T A^T: B's pointers go first
    batched(1 if trans_b else 0, 1 if trans_a else 0, N, M, K, ONE[f32].ctypes.data, p0 + 8 * n, CUDA_R_16BF, ldb, p0,
            CUDA_R_16BF, lda, ZERO[f32].ctypes.data, p0 + 16 * n, CUDA_TYPE[f32], ldc, n, CUBLAS_COMPUTE_32F)
    return True
