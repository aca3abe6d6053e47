"""Embedding backward as a Numba scatter-add (reference: functional.Embedding).

The reference's backward is np.add.at(dw, idx, dout), an unbuffered per-element ufunc loop. Here one
loop adds each row of dout into its row of dw, in index order as np.add.at adds them (the same sums,
bit for bit), the inner loop over the C columns vectorised. The forward (a gather, w[idx]) is NumPy's.
"""
import numpy as np
from numba import njit

from ...functional import Embedding
from .threads import TOLERANCE, compare_with_reference, forward_backward, median_ms, table_row, torch_or_none

@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def embedding_backward(idx, dout, dw):
    """dw[idx[n], :] += dout[n, :] for n in order; idx (N,) int64, dout (N,C), dw (V,C) zeroed."""
    N, C = dout.shape
    for n in range(N):
        row = idx[n]
        for c in range(C):
            dw[row, c] += dout[n, c]


class NumbaEmbedding:
    """Kernel for Embedding with a NumPy float32/float64 table."""

    @staticmethod
    def forward(ctx, idx, w):
        ctx.fallback = not (type(w) is np.ndarray and type(idx) is np.ndarray and w.dtype in (np.float32, np.float64)
                            and w.ndim == 2)
        if ctx.fallback:
            return Embedding.forward(ctx, idx, w)
        ctx.idx, ctx.w_shape, ctx.dtype = np.ascontiguousarray(idx.reshape(-1), dtype=np.int64), w.shape, w.dtype
        return w[idx]

    @staticmethod
    def backward(ctx, dout):
        if ctx.fallback:
            return Embedding.backward(ctx, dout)
        dw = np.zeros(ctx.w_shape, dtype=ctx.dtype)
        # dw[v] = sum of dout[b,t] over every (b,t) with idx[b,t] == v (repeated ids accumulate)
        embedding_backward(ctx.idx, np.ascontiguousarray(dout.reshape(-1, ctx.w_shape[1])), dw)
        return None, dw


def _inputs(idx_shape, V, C, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, idx_shape), rng.standard_normal((V, C)).astype(dtype)


VALIDATION_CASES = [((4, 9), 65, 16), ((3,), 2, 33), ((1, 1), 1, 1), ((2, 50), 5, 128)]  # many repeats


def validate():
    worst = 0.0
    for dtype in (np.float64, np.float32):
        for idx_shape, V, C in VALIDATION_CASES:
            idx, w = _inputs(idx_shape, V, C, dtype)
            err = compare_with_reference(Embedding, NumbaEmbedding, (idx, w), needs=(False, True))
            assert err <= TOLERANCE[np.dtype(dtype)], f"embedding {idx_shape} {V}x{C} {np.dtype(dtype).name}: {err}"
            worst = max(worst, err)
    return worst


def benchmark(cases=(((12, 64), 65, 128), ((64, 256), 65, 384), ((64, 256), 256, 384))):
    """Forward + backward, float32: token table (V,C) and the position table (block_size, C)."""
    rows, torch = [], torch_or_none()
    for idx_shape, V, C in cases:
        idx, w = _inputs(idx_shape, V, C, np.float32)
        dout = np.random.default_rng(1).standard_normal(idx_shape + (C,)).astype(np.float32)
        t_numba = median_ms(forward_backward(NumbaEmbedding, (idx, w), needs=(False, True), dout=dout))
        t_numpy = median_ms(forward_backward(Embedding, (idx, w), needs=(False, True), dout=dout))
        t_torch = None
        if torch is not None:
            tw, ti, td = torch.from_numpy(w).requires_grad_(), torch.from_numpy(idx), torch.from_numpy(dout)
            t_torch = median_ms(lambda: torch.nn.functional.embedding(ti, tw).backward(td))
        rows.append(table_row("embedding fwd+bwd", f"{idx_shape} V={V} C={C}", np.float32, t_numba, t_numpy, t_torch))
    return rows
