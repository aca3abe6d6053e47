"""Softmax + cross-entropy fused, forward and backward (op: functional.CrossEntropy).

The reference makes a NumPy pass per operation (max, subtract, exp, sum, divide into a kept (N, V)
probability array; in backward a copy, a scatter and a multiply). Here:

  forward   Numba row pass: row max (four chains), e = x - max, the target's shifted logit -> np.exp(e)
            in place (NumPy's SIMD exp) -> Numba row pass: row sum (float64, four chains), nll = log sum - x_t
  backward  one Numba pass: dlogits = (e / sum - onehot(target)) * dout * scale

Kept for backward: e = exp(x - max) (N, V) and the row sums (N,), as the reference keeps its
probabilities. Rows whose target is ignore_index give loss 0 and gradient 0.

The exp runs as np.exp between the Numba passes (SIMD), and the row max and sum run as four independent
chains: with Numba's scalar exp and one-chain sums the kernel lost to the op. Figures: benchmarks/RESULTS.md.
"""
import math

import numpy as np
from numba import njit

from ...functional import CrossEntropy
from .rows import row_max


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def shift_rows(x, targets, ignore_index, e, target_shifted):
    """e = x - rowmax(x) (N,V); target_shifted[r] = e[r, target] (0 where ignored). np.exp then runs on e."""
    N, V = x.shape
    for r in range(N):
        row, out = x[r], e[r]
        m = row_max(row, V)
        for jj in range(V):
            out[jj] = row[jj] - m
        t = targets[r]
        target_shifted[r] = out[t] if t != ignore_index else 0.0


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def sum_rows_nll(e, targets, ignore_index, target_shifted, row_sum, nll):
    """e = exp(x - max): row_sum[r] = sum(e[r]) (float64 accumulator), nll = log(row_sum) - shifted target."""
    N, V = e.shape
    for r in range(N):
        row = e[r]
        t0, t1, t2, t3 = 0.0, 0.0, 0.0, 0.0  # float64, four chains: no single add latency chain per row
        j = 0
        while j + 4 <= V:
            t0, t1, t2, t3 = t0 + row[j], t1 + row[j + 1], t2 + row[j + 2], t3 + row[j + 3]
            j += 4
        for jj in range(j, V):
            t0 += row[jj]
        total = (t0 + t1) + (t2 + t3)
        row_sum[r] = total
        nll[r] = math.log(total) - target_shifted[r] if targets[r] != ignore_index else 0.0


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def cross_entropy_backward(e, targets, ignore_index, row_sum, row_scale, dx):
    """dx = (e / row_sum - onehot(target)) * row_scale per row; 0 on ignored rows."""
    N, V = e.shape
    for r in range(N):
        t = targets[r]
        out = dx[r]
        if t == ignore_index:
            for j in range(V):
                out[j] = 0.0
            continue
        row = e[r]
        g = row_scale[r]
        f = g / row_sum[r]
        for j in range(V):
            out[j] = row[j] * f
        out[t] = (row[t] / row_sum[r] - 1.0) * g


class CrossEntropyNumba:
    """Kernel for CrossEntropy, NumPy float32/float64 logits with the class axis last."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index=-100, reduction="mean"):
        ctx.reference = not (type(logits) is np.ndarray and type(targets) is np.ndarray and logits.size > 0
                            and logits.dtype in (np.float32, np.float64) and reduction in ("mean", "sum", "none"))
        if ctx.reference:
            return CrossEntropy.forward(ctx, logits, targets, ignore_index=ignore_index, reduction=reduction)
        V = logits.shape[-1]
        x = logits.reshape(-1, V)
        t = np.ascontiguousarray(targets.reshape(-1), dtype=np.int64)
        N, dtype = x.shape[0], logits.dtype
        e = np.empty((N, V), dtype)
        target_shifted, row_sum, nll = np.empty(N, dtype), np.empty(N, np.float64), np.empty(N, dtype)
        shift_rows(x, t, ignore_index, e, target_shifted)
        np.exp(e, out=e)  # NumPy's SIMD exp (Numba's is a scalar libm call)
        sum_rows_nll(e, t, ignore_index, target_shifted, row_sum, nll)
        count = int((t != ignore_index).sum())
        # "mean" divides by the number of counted targets; with none counted the loss is 0, not 0/0
        ctx.scale = 1 / max(count, 1) if reduction == "mean" else 1.0
        ctx.e, ctx.t, ctx.row_sum = e, t, row_sum
        ctx.ignore_index, ctx.reduction, ctx.shape = ignore_index, reduction, logits.shape
        if reduction == "none":
            return nll.reshape(targets.shape)
        return np.asarray(nll.sum() * ctx.scale, dtype=dtype)

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return CrossEntropy.backward(ctx, dout)
        e = ctx.e
        row_scale = np.broadcast_to(np.asarray(dout, dtype=e.dtype).reshape(-1) * e.dtype.type(ctx.scale), e.shape[:1])
        dx = np.empty_like(e)
        # dlogits = (softmax(logits) - onehot(target)) * dout * scale, zero on ignored rows
        cross_entropy_backward(e, ctx.t, ctx.ignore_index, ctx.row_sum, np.ascontiguousarray(row_scale), dx)
        return dx.reshape(ctx.shape), None
