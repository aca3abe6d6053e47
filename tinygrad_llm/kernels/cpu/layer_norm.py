"""layer_norm and rms_norm, forward and backward, one pass per row (ops: functional.LayerNorm, RMSNorm).

The references make a NumPy pass per operation (mean, subtract, square, mean, sqrt, divide, multiply,
add; backward about ten more, recomputing xhat). Here each row is read a few times while it is in
cache: statistics, then output. Parameter gradients (dw, db) are sums over rows in float64 (C,)
accumulators. Row statistics accumulate in float64 for float32 inputs too.

Figures (against the op and PyTorch): benchmarks/RESULTS.md.
"""
import math

import numpy as np
from numba import njit

from ...functional import LayerNorm, RMSNorm

# The row sums are small functions compiled with fastmath="reassoc" only (no nnan/ninf/contract), which
# lets LLVM reorder each sum into vector lanes once it inlines them; the kernels around them keep strict
# IEEE order, so the elementwise formulas round as the references' do (with reassoc on the whole kernel,
# hypothesis found a float64 C = 2 row, where dx is pure cancellation, 3.7e-10 from the op). With every
# row sum one chain of dependent float64 adds the kernels ran several times slower. The row statistics,
# once summed in float64, are stored in x's dtype and read back, so the elementwise passes run at x's width.
REASSOC = {"reassoc"}


@njit(parallel=False, fastmath=REASSOC, error_model="numpy", cache=True)
def _sum(row):
    total = 0.0
    for j in range(row.shape[0]):
        total += row[j]
    return total


@njit(parallel=False, fastmath=REASSOC, error_model="numpy", cache=True)
def _sum_squared_deviations(row, mu):
    total = 0.0
    for j in range(row.shape[0]):
        d = row[j] - mu
        total += d * d
    return total


@njit(parallel=False, fastmath=REASSOC, error_model="numpy", cache=True)
def _sums_dxhat(dout, x, w, mu, rs):
    """sum(dxhat) and sum(dxhat * xhat) of one row, dxhat = dout * w, xhat = (x - mu) * rs."""
    sum_dxhat = 0.0
    sum_dxhat_xhat = 0.0
    for j in range(x.shape[0]):
        dxhat = dout[j] * w[j]
        sum_dxhat += dxhat
        sum_dxhat_xhat += dxhat * ((x[j] - mu) * rs)
    return sum_dxhat, sum_dxhat_xhat


@njit(parallel=False, fastmath=REASSOC, error_model="numpy", cache=True)
def _sum_squares(row):
    total = 0.0
    for j in range(row.shape[0]):
        total += row[j] * row[j]
    return total


@njit(parallel=False, fastmath=REASSOC, error_model="numpy", cache=True)
def _sum_dxhat_xhat_rms(dout, x, w, rs):
    """sum(dxhat * xhat) of one row, dxhat = dout * w, xhat = x * rs."""
    total = 0.0
    for j in range(x.shape[0]):
        total += dout[j] * w[j] * (x[j] * rs)
    return total


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def layer_norm_forward(x, w, b, eps, out, mean, rstd):
    """x, out: (N,C); w, b: (C,); mean, rstd: (N,) written for backward."""
    N, C = x.shape
    for r in range(N):
        mean[r] = _sum(x[r]) / C
        mu = mean[r]
        rstd[r] = 1.0 / math.sqrt(_sum_squared_deviations(x[r], mu) / C + eps)
        rs = rstd[r]
        for j in range(C):
            out[r, j] = (x[r, j] - mu) * rs * w[j] + b[j]


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def layer_norm_backward(dout, x, w, mean, rstd, dx, dw, db):
    """dx: (N,C); dw, db: (C,) float64, zeroed, summed over the rows."""
    N, C = x.shape
    means = np.empty(2, x.dtype)  # mean(dxhat) and mean(dxhat * xhat) of a row, in x's dtype
    for r in range(N):
        mu, rs = mean[r], rstd[r]
        sum_dxhat, sum_dxhat_xhat = _sums_dxhat(dout[r], x[r], w, mu, rs)
        for j in range(C):
            xhat = (x[r, j] - mu) * rs
            dw[j] += dout[r, j] * xhat
            db[j] += dout[r, j]
        means[0], means[1] = sum_dxhat / C, sum_dxhat_xhat / C
        mean_dxhat, mean_dxhat_xhat = means[0], means[1]
        for j in range(C):
            xhat = (x[r, j] - mu) * rs
            dx[r, j] = rs * (dout[r, j] * w[j] - mean_dxhat - xhat * mean_dxhat_xhat)


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def rms_norm_forward(x, w, eps, out, rstd):
    N, C = x.shape
    for r in range(N):
        rstd[r] = 1.0 / math.sqrt(_sum_squares(x[r]) / C + eps)
        rs = rstd[r]
        for j in range(C):
            out[r, j] = x[r, j] * rs * w[j]


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def rms_norm_backward(dout, x, w, rstd, dx, dw):
    """dx: (N,C); dw: (C,) float64, zeroed, summed over the rows."""
    N, C = x.shape
    mean = np.empty(1, x.dtype)  # mean(dxhat * xhat) of a row, in x's dtype
    for r in range(N):
        rs = rstd[r]
        for j in range(C):
            dw[j] += dout[r, j] * (x[r, j] * rs)
        mean[0] = _sum_dxhat_xhat_rms(dout[r], x[r], w, rs) / C
        mean_dxhat_xhat = mean[0]
        for j in range(C):
            dx[r, j] = rs * (dout[r, j] * w[j] - x[r, j] * rs * mean_dxhat_xhat)


def _covered(x, *params):
    return (type(x) is np.ndarray and x.dtype in (np.float32, np.float64) and x.ndim >= 1 and x.size > 0
            and all(p is None or (type(p) is np.ndarray and p.dtype == x.dtype) for p in params))


def _rows(x):
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]))


def _param(p, C, dtype, fill):
    """A missing w or b acts as ones or zeros: x * 1 and x + 0 are exact."""
    return np.full(C, fill, dtype) if p is None else np.ascontiguousarray(p)


class LayerNormNumba:
    """Kernel for LayerNorm (w, b optional), NumPy float32/float64."""

    @staticmethod
    def forward(ctx, x, w=None, b=None, eps=1e-5):
        ctx.reference = not _covered(x, w, b)
        if ctx.reference:
            return LayerNorm.forward(ctx, x, w, b, eps=eps)
        x2 = _rows(x)
        N, C = x2.shape
        out, mean, rstd = np.empty_like(x2), np.empty(N, x.dtype), np.empty(N, x.dtype)
        ctx.w2 = _param(w, C, x.dtype, 1)
        layer_norm_forward(x2, ctx.w2, _param(b, C, x.dtype, 0), x.dtype.type(eps), out, mean, rstd)
        ctx.x2, ctx.mean, ctx.rstd, ctx.shape = x2, mean, rstd, x.shape
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return LayerNorm.backward(ctx, dout)
        N, C = ctx.x2.shape
        dx, dw, db = np.empty_like(ctx.x2), np.zeros(C), np.zeros(C)
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dw = sum(dout * xhat),  db = sum(dout)
        layer_norm_backward(_rows(dout), ctx.x2, ctx.w2, ctx.mean, ctx.rstd, dx, dw, db)
        need, dtype = ctx.needs_input_grad, ctx.x2.dtype
        dw = dw.astype(dtype) if len(need) > 1 and need[1] else None
        db = db.astype(dtype) if len(need) > 2 and need[2] else None
        return (dx.reshape(ctx.shape) if need[0] else None), dw, db


class RMSNormNumba:
    """Kernel for RMSNorm (w optional), NumPy float32/float64."""

    @staticmethod
    def forward(ctx, x, w=None, eps=None):
        ctx.reference = not _covered(x, w)
        if ctx.reference:
            return RMSNorm.forward(ctx, x, w, eps=eps)
        x2 = _rows(x)
        N, C = x2.shape
        out, rstd = np.empty_like(x2), np.empty(N, x.dtype)
        ctx.w2 = _param(w, C, x.dtype, 1)
        rms_norm_forward(x2, ctx.w2, x.dtype.type(eps), out, rstd)
        ctx.x2, ctx.rstd, ctx.shape = x2, rstd, x.shape
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return RMSNorm.backward(ctx, dout)
        N, C = ctx.x2.shape
        dx, dw = np.empty_like(ctx.x2), np.zeros(C)
        # dx = rstd * (dxhat - xhat * mean(dxhat * xhat)),  dw = sum(dout * xhat)
        rms_norm_backward(_rows(dout), ctx.x2, ctx.w2, ctx.rstd, dx, dw)
        need = ctx.needs_input_grad
        dw = dw.astype(ctx.x2.dtype) if len(need) > 1 and need[1] else None
        return (dx.reshape(ctx.shape) if need[0] else None), dw
