"""Linear on CUDA arrays with the bias added in the GEMM's epilogue (op: functional.Linear).

out = x w + b as one cuBLASLt matmul with the BIAS epilogue (the bias is added to each tile of the
product before it is stored), as torch's addmm does, instead of a GEMM and then a pass over out reading
and writing it again; in strict float32, gemm_3xtf32's kernel where it takes the shapes (the bias added
as its tiles are stored). Backward: the op's two GEMMs and column sum through cublas.matmul and
cublas.sum_rows_cuda (cuBLASLt's plans for float32, cublasGemmEx otherwise), which a CUDA graph can
capture and CuPy's cannot. Every cuBLASLt plan's algorithm is timed on its first use (cublas.py says how,
and TINYGRAD_LLM_GEMM_TUNE=0 turns that off). Anything missing (the library, an algorithm for the shape,
a misaligned array) takes the op's path.
"""
import cupy as cp
import numpy as np

from ...functional import Linear
from . import gemm_3xtf32
from .cublas import blas, matmul, sum_rows_cuda
from .cublaslt import alignment, lt
from .runtime import served


class LinearCuda:
    """functional.Linear with the bias added in the GEMM's epilogue (cuBLASLt's, or in strict float32 the 3xTF32
    kernel's where it takes the shapes; both need cuBLASLt loaded); backward is the op's."""

    @staticmethod
    def forward(ctx, x, w, b=None):
        if (b is None and served(x, w) and x.dtype == w.dtype and w.ndim == 2 and x.ndim >= 1
                and x.shape[-1] == w.shape[0] and blas() is not None):
            # no bias (the LM head): one GEMM on the project's handle (CuPy's would not capture into a graph)
            x, w = cp.ascontiguousarray(x), cp.ascontiguousarray(w)
            ctx.x, ctx.w, ctx.has_b = x, w, False
            return matmul(x.reshape(-1, w.shape[0]), w).reshape(x.shape[:-1] + (w.shape[1],))
        plan, lib = None, lt()
        if (b is not None and served(x, w, b) and x.dtype == w.dtype == b.dtype and lib is not None and w.ndim == 2
                and x.ndim >= 1 and x.shape[-1] == w.shape[0] and b.shape == (w.shape[1],)):
            x = cp.ascontiguousarray(x)
            w, b = cp.ascontiguousarray(w), cp.ascontiguousarray(b)
            K, M = w.shape
            x2 = x.reshape(-1, K)
            out = cp.empty(x.shape[:-1] + (M,), dtype=x.dtype)
            pointers = (x2.data.ptr, K, w.data.ptr, M, out.data.ptr, M, b.data.ptr)
            if x.dtype == np.float32 and gemm_3xtf32.takes(x2.shape[0], M, K, *pointers):
                gemm_3xtf32.gemm(x2.shape[0], M, K, *pointers[:6], bias=b.data.ptr)
                ctx.x, ctx.w, ctx.has_b = x, w, True
                return out
            align = alignment(x2.data.ptr, w.data.ptr, out.data.ptr)
            if x2.shape[0] > 0 and align >= 16 and b.data.ptr % 16 == 0:
                plan = lib.plan(x2.shape[0], K, M, np.dtype(x.dtype), align)
        if plan is None:
            return Linear.forward(ctx, x, w, b)
        lib.linear(x2, w, b, out, plan)
        ctx.x, ctx.w, ctx.has_b = x, w, True
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w = ctx.x, ctx.w
        if not (served(x, w, dout) and x.dtype == w.dtype == dout.dtype and w.ndim == 2 and blas() is not None):
            return Linear.backward(ctx, dout)
        K, M = w.shape
        x2 = cp.ascontiguousarray(x).reshape(-1, K)
        dout2 = cp.ascontiguousarray(dout).reshape(-1, M)
        w = cp.ascontiguousarray(w)
        need = ctx.needs_input_grad
        # dx = dout w^T, dw = x^T dout (summed over every leading axis), db = sum(dout)
        dx = matmul(dout2, w, trans_b=True).reshape(x.shape) if need[0] else None
        dw = matmul(x2, dout2, trans_a=True) if need[1] else None
        db = sum_rows_cuda(dout2) if ctx.has_b and need[2] else None
        return dx, dw, db

