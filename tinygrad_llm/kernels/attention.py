"""Scaled dot-product attention, forward and backward, as BLAS products around fused Numba row passes.

Reference: functional.ScaledDotProductAttention, which keeps the (B,NH,TQ,TK) probabilities for
backward and makes about ten NumPy passes over them (scale, mask, max, subtract, exp, sum, divide;
then dP * P, a row sum, a subtract, a multiply). Here, for a chunk of (batch, head) pairs at a time:

  forward   S = Q K^T (BLAS) -> one Numba pass per row: scale, causal mask, max, exp, sum, normalise,
            log-sum-exp -> O = P V (BLAS)
  backward  S = Q K^T, dP = dO V^T (BLAS) -> one Numba pass per row recomputes P = exp(S scale - lse)
            and turns dP into dS = P (dP - rowsum(P dP)) scale -> dV = P^T dO, dQ = dS K, dK = dS^T Q

Saved for backward: q, k, v and the per-row log-sum-exp (B,NH,TQ); the probabilities never outlive a
chunk, so the memory of attention no longer grows with TQ*TK per layer.

Why not one all-Numba tiled loop with an online softmax (flash attention)? Measured on the 6x384 shapes:
Numba's loops reach a few GFLOP/s where OpenBLAS's batched products reach ~100 (matmul.py's rows), and
calling BLAS from inside a Numba prange runs into OpenBLAS's OpenMP guard (one thread, a warning per
call). A row of at most a few thousand keys fits in cache, so the softmax is exact in one row pass and
needs no running rescaling; the matmuls stay on BLAS, as DESIGN.md section 6 asks.

Served from MIN_SCORES_PER_HEAD = 128 x 128 scores up: at T=64 (the 4x128 model) the reference was
faster (0.86x: per-chunk calls and the scalar exp cost more than the passes they save), at T=256 the
kernel is 1.36x faster (benchmarks/kernels.py, 2 cores). Smaller heads go to the reference.
"""
import contextlib
import math

import numpy as np
from numba import njit

from ..functional import ScaledDotProductAttention
from .common import TOLERANCE, compare_with_reference, forward_backward, median_ms, table_row, torch_or_none

CHUNK_BYTES = 16 << 20  # the (chunk, TQ, TK) score buffer; bounded so that it stays near the caches
MIN_SCORES_PER_HEAD = 128 * 128  # below this TQ * TK the reference is faster (measured, see above)


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def softmax_rows_forward(s, scale, offset, lse):
    """s: (C,TQ,TK) raw scores q k^T, overwritten by P; lse: (C,TQ) log-sum-exp of the scaled row.

    Row i sees keys j < min(TK, i + offset + 1) (offset = TK - TQ for causal, TK for none masked).
    """
    C, TQ, TK = s.shape
    for r in range(C * TQ):
        c, i = r // TQ, r % TQ
        row = s[c, i]
        n = min(TK, i + offset + 1)
        m = row[0] * scale
        for j in range(1, n):
            m = max(m, row[j] * scale)
        total = 0.0  # float64 accumulator also for float32 rows
        for j in range(n):
            e = math.exp(row[j] * scale - m)
            row[j] = e
            total += e
        for j in range(n):
            row[j] = row[j] / total
        for j in range(n, TK):
            row[j] = 0.0
        lse[c, i] = m + math.log(total)


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def softmax_rows_backward(s, dp, scale, offset, lse):
    """s: raw scores -> P (recomputed from lse); dp: dO V^T -> dS * scale = P (dP - rowsum(P dP)) scale."""
    C, TQ, TK = s.shape
    for r in range(C * TQ):
        c, i = r // TQ, r % TQ
        row, drow = s[c, i], dp[c, i]
        n = min(TK, i + offset + 1)
        row_lse = lse[c, i]
        dot = 0.0
        for j in range(n):
            p = math.exp(row[j] * scale - row_lse)
            row[j] = p
            dot += p * drow[j]
        for j in range(n):
            drow[j] = row[j] * (drow[j] - dot) * scale
        for j in range(n, TK):
            row[j] = 0.0
            drow[j] = 0.0


def _covered(q, k, v, mask, causal):
    arrays = (q, k, v)
    return (mask is None and all(type(a) is np.ndarray for a in arrays) and q.dtype in (np.float32, np.float64)
            and k.dtype == q.dtype and v.dtype == q.dtype and q.ndim >= 2 and q.shape[-2] > 0
            and k.shape[-2] > 0 and (not causal or k.shape[-2] >= q.shape[-2])
            and q.shape[-2] * k.shape[-2] >= MIN_SCORES_PER_HEAD)


def _chunk(BH, TQ, TK, itemsize):
    return max(1, min(BH, CHUNK_BYTES // max(TQ * TK * itemsize, 1)))


class NumbaAttention:
    """Kernel for ScaledDotProductAttention: no mask (causal or not), no dropout, NumPy float32/float64, TQ*TK large enough."""

    @staticmethod
    def forward(ctx, q, k, v, mask=None, causal=True, scale=1.0, dropout_p=0.0, rng=None):
        ctx.fallback = dropout_p > 0 or not _covered(q, k, v, mask, causal)   # attention dropout: the reference
        if ctx.fallback:
            return ScaledDotProductAttention.forward(ctx, q, k, v, mask, causal=causal, scale=scale,
                                                     dropout_p=dropout_p, rng=rng)
        TQ, TK, HS, HV = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
        q3, k3, v3 = q.reshape(-1, TQ, HS), k.reshape(-1, TK, HS), v.reshape(-1, TK, HV)
        BH, dtype = q3.shape[0], q.dtype
        offset = TK - TQ if causal else TK
        out = np.empty((BH, TQ, HV), dtype)
        lse = np.empty((BH, TQ), dtype)
        chunk = _chunk(BH, TQ, TK, dtype.itemsize)
        scores = np.empty((chunk, TQ, TK), dtype)
        for c0 in range(0, BH, chunk):
            c1 = min(c0 + chunk, BH)
            s = scores[:c1 - c0]
            np.matmul(q3[c0:c1], k3[c0:c1].swapaxes(1, 2), out=s)
            softmax_rows_forward(s, dtype.type(scale), offset, lse[c0:c1])
            np.matmul(s, v3[c0:c1], out=out[c0:c1])
        ctx.q3, ctx.k3, ctx.v3, ctx.lse, ctx.scale, ctx.offset = q3, k3, v3, lse, scale, offset
        ctx.shapes = q.shape, k.shape, v.shape
        return out.reshape(q.shape[:-1] + (HV,))

    @staticmethod
    def backward(ctx, dout):
        if ctx.fallback:
            return ScaledDotProductAttention.backward(ctx, dout)
        q3, k3, v3, lse = ctx.q3, ctx.k3, ctx.v3, ctx.lse
        (BH, TQ, HS), TK, dtype = q3.shape, k3.shape[1], q3.dtype
        do3 = dout.reshape(BH, TQ, v3.shape[2])
        dq, dk, dv = np.empty_like(q3), np.empty_like(k3), np.empty_like(v3)
        chunk = _chunk(BH, TQ, TK, dtype.itemsize)
        scores, dscores = np.empty((chunk, TQ, TK), dtype), np.empty((chunk, TQ, TK), dtype)
        for c0 in range(0, BH, chunk):
            c1 = min(c0 + chunk, BH)
            s, ds = scores[:c1 - c0], dscores[:c1 - c0]
            np.matmul(q3[c0:c1], k3[c0:c1].swapaxes(1, 2), out=s)
            np.matmul(do3[c0:c1], v3[c0:c1].swapaxes(1, 2), out=ds)
            # P = exp(S scale - lse);  dS = P * (dP - rowsum(dP * P)) * scale  (scale folded in for dq, dk)
            softmax_rows_backward(s, ds, dtype.type(ctx.scale), ctx.offset, lse[c0:c1])
            # dv = P^T dO, dq = dS K, dk = dS^T Q
            np.matmul(s.swapaxes(1, 2), do3[c0:c1], out=dv[c0:c1])
            np.matmul(ds, k3[c0:c1], out=dq[c0:c1])
            np.matmul(ds.swapaxes(1, 2), q3[c0:c1], out=dk[c0:c1])
        need = ctx.needs_input_grad
        q_shape, k_shape, v_shape = ctx.shapes
        return (dq.reshape(q_shape) if need[0] else None, dk.reshape(k_shape) if need[1] else None,
                dv.reshape(v_shape) if need[2] else None, None)


def _inputs(shape, dtype, seed=0, strided=False, TK=None):
    rng = np.random.default_rng(seed)
    B, NH, T, HS = shape
    kv_shape = (B, NH, TK or T, HS)
    if strided:  # the model's layout: (B, T, NH, HS) transposed to (B, NH, T, HS), not contiguous
        q = rng.standard_normal((B, T, NH, HS)).astype(dtype).transpose(0, 2, 1, 3)
    else:
        q = rng.standard_normal(shape).astype(dtype)
    return q, rng.standard_normal(kv_shape).astype(dtype), rng.standard_normal(kv_shape).astype(dtype)


VALIDATION_CASES = [  # (B, NH, T, HS), attributes, strided q, TK
    ((2, 3, 17, 8), dict(causal=True), False, None),
    ((1, 2, 64, 16), dict(causal=True), True, None),
    ((2, 1, 5, 3), dict(causal=False), False, 9),
    ((1, 2, 4, 8), dict(causal=True), False, 11),  # a KV-cache query block: aligned to the end of the keys
    ((1, 1, 1, 1), dict(causal=True), False, None),
    ((2, 2, 7, 4), dict(causal=True, mask=np.tril(np.ones((7, 7), bool))), False, None),  # mask: falls back
]


@contextlib.contextmanager
def every_size_served():
    """Lift the size gate, so that validation and benchmarks run the kernel on small shapes too."""
    global MIN_SCORES_PER_HEAD
    saved, MIN_SCORES_PER_HEAD = MIN_SCORES_PER_HEAD, 0
    try:
        yield
    finally:
        MIN_SCORES_PER_HEAD = saved


@every_size_served()
def validate():
    worst = 0.0
    for dtype in (np.float64, np.float32):
        for shape, attrs, strided, TK in VALIDATION_CASES:
            q, k, v = _inputs(shape, dtype, strided=strided, TK=TK)
            attrs = dict(attrs, scale=1 / math.sqrt(shape[-1]))
            mask = attrs.pop("mask", None)
            err = compare_with_reference(ScaledDotProductAttention, NumbaAttention, (q, k, v, mask), attrs,
                                         needs=(True, True, True, False))
            assert err <= TOLERANCE[np.dtype(dtype)], f"attention {shape} {attrs} {np.dtype(dtype).name}: {err}"
            worst = max(worst, err)
    return worst


@every_size_served()
def benchmark(shapes=((12, 4, 64, 32), (64, 6, 256, 64))):
    """Forward + backward of causal attention, float32, (B,NH,T,HS) of the two model configs."""
    rows, torch = [], torch_or_none()
    for shape in shapes:
        q, k, v = _inputs(shape, np.float32, strided=True)
        arrays, attrs = (q, k, v, None), dict(causal=True, scale=1 / math.sqrt(shape[-1]))
        needs = (True, True, True, False)
        t_numba = median_ms(forward_backward(NumbaAttention, arrays, attrs, needs), repeat=5)
        t_numpy = median_ms(forward_backward(ScaledDotProductAttention, arrays, attrs, needs), repeat=5)
        t_torch = None
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(a)).requires_grad_() for a in (q, k, v))

            def torch_step():
                torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True).sum().backward()

            t_torch = median_ms(torch_step, repeat=5)
        rows.append(table_row("attention fwd+bwd", shape, np.float32, t_numba, t_numpy, t_torch))
    return rows
