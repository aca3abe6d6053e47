"""Embedding backward as a Numba scatter-add (op: functional.Embedding).

The reference's backward is np.add.at(dw, idx, dout), an unbuffered per-element ufunc loop. Here one
loop adds each row of dout into its row of dw, in index order as np.add.at adds them (the same sums,
bit for bit), the inner loop over the C columns vectorised. The forward (a gather, w[idx]) is NumPy's.
"""
import numpy as np
from numba import njit

from ...functional import Embedding


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def embedding_backward(idx, dout, dw):
    """dw[idx[n], :] += dout[n, :] for n in order; idx (N,) int64, dout (N,C), dw (V,C) zeroed."""
    N, C = dout.shape
    for n in range(N):
        row = idx[n]
        for c in range(C):
            dw[row, c] += dout[n, c]


class EmbeddingNumba:
    """Kernel for Embedding with a NumPy float32/float64 table."""

    @staticmethod
    def forward(ctx, idx, w):
        ctx.reference = not (type(w) is np.ndarray and type(idx) is np.ndarray and w.dtype in (np.float32, np.float64)
                            and w.ndim == 2)
        if ctx.reference:
            return Embedding.forward(ctx, idx, w)
        ctx.idx, ctx.w_shape, ctx.dtype = np.ascontiguousarray(idx.reshape(-1), dtype=np.int64), w.shape, w.dtype
        return w[idx]

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return Embedding.backward(ctx, dout)
        dw = np.zeros(ctx.w_shape, dtype=ctx.dtype)
        # dw[v] = sum of dout[b,t] over every (b,t) with idx[b,t] == v (repeated ids accumulate)
        embedding_backward(ctx.idx, np.ascontiguousarray(dout.reshape(-1, ctx.w_shape[1])), dw)
        return None, dw
