"""bf16 matrix products with float32 sums and float32 results (precision.py's policy), beside cublas.py:
cuBLASLt's matmul (Linear, with the bias in the epilogue) and the pointer-array batched GEMM (attention's
products for every (batch, head) pair).

bf16 arrays are CuPy uint16 arrays holding the bits (mixed.py says why). Every call goes through the
project's ctypes handles (cublaslt.lt's and cublas.batched_gemm's), never CuPy's cuBLAS, so that a CUDA
graph can capture it. A library that cannot be loaded, or a shape cuBLASLt has no algorithm for, makes a
call return False, having done nothing: the caller then takes another path.
"""
import numpy as np

from .cublas import batched_gemm, pointer_table
from .cublaslt import CUBLAS_COMPUTE_32F, CUDA_R_16BF, CUDA_TYPE, ONE, ZERO, lt


def bf16_matmul(M, N, K, a, lda, b, ldb, c, ldc, trans_a=False, trans_b=False, bias=None):
    """Row-major C (M, N) = op(A) op(B) (+ bias (N,)): a, b device pointers to bf16 (uint16) matrices, c to
    float32, bias a float32 CuPy array or None; op(A) is M x K (A stored K x M when trans_a), op(B) K x N
    (stored N x K when trans_b); lda, ldb, ldc row strides in elements. One cuBLASLt matmul, float32 sums
    (bias added in the epilogue), on cublaslt.lt's plans (the algorithm timed on a plan's first use, as
    cublaslt.py says). Returns False, having done nothing, where cuBLASLt is missing or offers no algorithm
    (or an address is not 16-byte aligned): the caller takes another path."""
    lib = lt()
    if lib is None:
        return False
    return lib.matmul(M, N, K, a, lda, b, ldb, c, ldc, bool(trans_a), bool(trans_b), in_type=CUDA_R_16BF,
                      compute=CUBLAS_COMPUTE_32F, bias=0 if bias is None else bias.data.ptr)


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
