"""Scaled dot-product attention on NumPy arrays: BLAS products on causal row blocks, Numba row passes
and NumPy's SIMD exp between them (op: functional.ScaledDotProductAttention; no mask, no dropout).

For a run of (batch, head) pairs at a time and the query rows in ROW_BLOCKS blocks (causal: block
[r0, r1) multiplies only the keys [0, r1 + TK - TQ) it can see, so 4 blocks do 62.5% of the score flops):

  forward   S = (scale Q) K^T (BLAS; the scale folded into the saved copy of q) -> Numba row pass:
            mask, row max, S - max -> np.exp in place -> row sums -> O = E V / sum (BLAS, normalising the
            (rows, HV) output rather than the (rows, keys) probabilities); lse = max + log sum
  backward  per row block: S = (scale Q) K^T, dP = dO V^T (BLAS) -> Numba pass S - lse, mask -> np.exp
            -> P -> Numba pass dS = P (dP - rowsum(P dP)) -> dQ = scale dS K (BLAS); then per key block
            [kend of block b-1, kend of block b), seen only by rows r0_b..: dV = P^T dO, dK = dS^T (scale Q)

Saved for backward: scale q, k, v and the per-row log-sum-exp (B,NH,TQ); the probabilities never
outlive a chunk, so attention's memory does not grow with TQ*TK per layer.

Why not one Numba loop with an online softmax (flash attention): Numba's loops reach a few GFLOP/s where
OpenBLAS's products reach ~100 (benchmarks/numba_matmul.py), and a row of a few thousand keys fits in
cache, so the softmax is exact in one row pass. The matmuls stay on BLAS. Figures: benchmarks/RESULTS.md.
"""
import numpy as np
from numba import njit

from ...functional import ScaledDotProductAttention
from . import threads
from .rows import row_max

CHUNK_BYTES = 4 << 20  # the (chunk, TQ, TK) score buffers; bounded so that they stay near the caches
ROW_BLOCKS, MIN_ROW_BLOCK = 4, 16  # causal: 4 row blocks of >= 16 rows measured best (fewer BLAS calls vs fewer flops)
# TQ * TK per head from which the work items are spread over threads: below it the hand-offs cost more
# than the work (the (64, 6, 256, 64) products are small for BLAS, and two threads calling it on one
# core each beat OpenBLAS's two threads on each product)
PARALLEL_MIN_SCORES = 128 * 128


def _covered(q, k, v, mask, causal):
    arrays = (q, k, v)
    return (mask is None and all(type(a) is np.ndarray for a in arrays) and q.dtype in (np.float32, np.float64)
            and k.dtype == q.dtype and v.dtype == q.dtype and q.ndim >= 2 and q.shape[-2] > 0
            and k.shape[-2] > 0 and (not causal or k.shape[-2] >= q.shape[-2]))


def _row_blocks(TQ, TK, causal, min_rows=None):
    """(r0, r1, kend): query rows [r0, r1) see keys [0, kend). Causal: row i sees keys <= i + TK - TQ, so
    a block needs keys up to r1 + TK - TQ; keys [kend of the block before, kend) are seen only by rows >= r0.
    ROW_BLOCKS blocks of at least min_rows rows (default MIN_ROW_BLOCK)."""
    if not causal:
        return [(0, TQ, TK)]
    offset, size = TK - TQ, max(MIN_ROW_BLOCK if min_rows is None else min_rows, -(-TQ // ROW_BLOCKS))
    return [(r0, min(r0 + size, TQ), min(r0 + size, TQ) + offset) for r0 in range(0, TQ, size)]


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True, nogil=True)
def max_shift_rows(s, r0, r1, kend, first, m):
    """s: (C, R, K) C-contiguous raw scores. Rows i in [r0, r1) see keys j < n = min(kend, i + first): each
    becomes s - rowmax (m[c, i - r0] = rowmax), keys [n, kend) become -inf, so that np.exp gives P's numerator."""
    C = s.shape[0]
    for c in range(C):
        for i in range(r0, r1):
            row = s[c, i]
            n = min(kend, i + first)
            mx = row_max(row, n)
            for jj in range(n):
                row[jj] = row[jj] - mx
            for jj in range(n, kend):
                row[jj] = -np.inf
            m[c, i - r0] = mx


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True, nogil=True)
def shift_rows(s, r0, r1, kend, first, shift):
    """As max_shift_rows with a given shift (the saved log-sum-exp): s - shift, masked keys -inf."""
    C = s.shape[0]
    for c in range(C):
        for i in range(r0, r1):
            row = s[c, i]
            n = min(kend, i + first)
            sh = shift[c, i]
            for j in range(n):
                row[j] = row[j] - sh
            for j in range(n, kend):
                row[j] = -np.inf


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True, nogil=True)
def grad_row(prow, drow, n, kend):
    """One row of softmax_grad_rows: drow[:kend] = dP -> prow (drow - rowsum(P dP)), the sum over keys [0, n)."""
    d0, d1, d2, d3 = 0.0, 0.0, 0.0, 0.0  # float64, four chains
    j = 0
    while j + 4 <= n:
        d0 += prow[j] * drow[j]
        d1 += prow[j + 1] * drow[j + 1]
        d2 += prow[j + 2] * drow[j + 2]
        d3 += prow[j + 3] * drow[j + 3]
        j += 4
    for jj in range(j, n):
        d0 += prow[jj] * drow[jj]
    d = (d0 + d1) + (d2 + d3)
    for jj in range(kend):
        drow[jj] = prow[jj] * (drow[jj] - d)


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True, nogil=True)
def softmax_grad_rows(ds, p, r0, r1, kend, first):
    """ds: dP = dO V^T -> dS = P (dP - rowsum(P dP)) for rows [r0, r1), keys [0, kend) (P is 0 on masked keys).

    Row i's keys all lie in its block, so the row sum is complete here; it is the reference's sum, not
    the algebraically equal dO . O, whose different rounding would leave noise where dS is exactly 0."""
    C = ds.shape[0]
    for c in range(C):
        for i in range(r0, r1):
            grad_row(p[c, i], ds[c, i], min(kend, i + first), kend)


# ---- the passes over one work item: batch entries [b0, b1) of head h ---------------------------------
# q, k, v, dout, out, dq, dk, dv are 4-D (B, NH, T, HS) arrays or views with a unit last stride: a
# permuted (B, T, NH, HS) layout (the model's rope path) is read in place, the products going to BLAS
# with the views' row strides. qs is q * scale, contiguous. Items of one call touch disjoint output rows,
# so they may run in any order or at once (threads.run_items).

def _forward_item(qs, k, v, out, lse, h, b0, b1, blocks, first):
    dtype = qs.dtype
    qh, kh, vh = qs[b0:b1, h], k[b0:b1, h], v[b0:b1, h]
    TK = kh.shape[1]
    nb, rows = b1 - b0, max(r1 - r0 for r0, r1, _ in blocks)
    buf = np.empty(nb * rows * TK, dtype)
    for r0, r1, kend in blocks:
        s = buf[:nb * (r1 - r0) * kend].reshape(nb, r1 - r0, kend)
        np.matmul(qh[:, r0:r1], kh[:, :kend].swapaxes(1, 2), out=s)
        m = np.empty((nb, r1 - r0), dtype)
        max_shift_rows(s, 0, r1 - r0, kend, r0 + first, m)
        np.exp(s, out=s)
        total = s.sum(axis=2)
        o = out[b0:b1, h, r0:r1]
        np.matmul(s, vh[:, :kend], out=o)
        o /= total[:, :, None]  # normalise the (rows, HV) output, not the (rows, kend) probabilities
        np.log(total, out=total)
        np.add(m, total, out=lse[b0:b1, h, r0:r1])


def _backward_item(qs, k, v, lse, dout, dq, dk, dv, h, b0, b1, blocks, first, scale):
    dtype = qs.dtype
    qc, kc, vc, doc, lc = qs[b0:b1, h], k[b0:b1, h], v[b0:b1, h], dout[b0:b1, h], lse[b0:b1, h]
    TQ, TK = qc.shape[1], kc.shape[1]
    sc, dsc = np.empty((b1 - b0, TQ, TK), dtype), np.empty((b1 - b0, TQ, TK), dtype)
    for r0, r1, kend in blocks:  # P = exp(S - lse), dS = P (dP - rowsum(P dP)), dq = dS K
        p, ds = sc[:, r0:r1, :kend], dsc[:, r0:r1, :kend]
        np.matmul(qc[:, r0:r1], kc[:, :kend].swapaxes(1, 2), out=p)
        shift_rows(sc, r0, r1, kend, first, lc)
        np.exp(p, out=p)
        np.matmul(doc[:, r0:r1], vc[:, :kend].swapaxes(1, 2), out=ds)
        softmax_grad_rows(dsc, sc, r0, r1, kend, first)
        np.matmul(ds, kc[:, :kend], out=dq[b0:b1, h, r0:r1])
    k0 = 0
    for r0, r1, kend in blocks:  # keys [k0, kend) are seen by rows r0.. only, all written above
        p, ds = sc[:, r0:, k0:kend], dsc[:, r0:, k0:kend]
        np.matmul(p.swapaxes(1, 2), doc[:, r0:], out=dv[b0:b1, h, k0:kend])
        np.matmul(ds.swapaxes(1, 2), qc[:, r0:], out=dk[b0:b1, h, k0:kend])
        k0 = kend
    dq[b0:b1, h] *= dtype.type(scale)  # S = scale Q K^T: dq = scale dS K; dk = dS^T (scale Q) = dS^T qs


def _items(B, NH, rows, TK, itemsize):
    """(h, b0, b1) work items: per head, runs of batch entries whose (rows, TK) scores fit CHUNK_BYTES."""
    per = max(1, min(B, CHUNK_BYTES // max(rows * TK * itemsize, 1)))
    return [(h, b0, min(b0 + per, B)) for h in range(NH) for b0 in range(0, B, per)]


def _heads_merged(*arrays):
    """(B, NH, ...) arrays as (B*NH, 1, ...) views when all are C-contiguous (so that a work item is a run
    over every (batch, head) pair and each np.matmul call covers many of them), else unchanged."""
    if all(a.flags.c_contiguous for a in arrays):
        return [a.reshape((a.shape[0] * a.shape[1], 1) + a.shape[2:]) for a in arrays]
    return list(arrays)


def attention_forward(q, k, v, causal, scale, out, lse):
    """Fill out (B,NH,TQ,HV) and lse (B,NH,TQ) (arrays or views) from q, k, v; returns qs = q * scale."""
    TQ, TK, dtype = q.shape[2], k.shape[2], q.dtype
    qs = np.empty(q.shape, dtype)
    np.multiply(q, dtype.type(scale), out=qs)  # the scale folded into q, contiguous
    q_saved = qs
    qs, k, v, out, lse = _heads_merged(qs, k, v, out, lse)
    B, NH = qs.shape[:2]
    blocks = _row_blocks(TQ, TK, causal)
    first = TK - TQ + 1 if causal else TK  # row i sees keys j < i + first
    rows = max(r1 - r0 for r0, r1, _ in blocks)
    items = _items(B, NH, rows, TK, dtype.itemsize)
    threads.run_items(lambda h, b0, b1: _forward_item(qs, k, v, out, lse, h, b0, b1, blocks, first), items,
                      TQ * TK >= PARALLEL_MIN_SCORES)
    return q_saved


def attention_backward(qs, k, v, lse, dout, dq, dk, dv, causal, scale):
    """Fill dq, dk, dv (arrays or views of q's, k's, v's shapes) from the forward's qs and lse and dout."""
    TQ, TK = qs.shape[2], k.shape[2]
    qs, k, v, lse, dout, dq, dk, dv = _heads_merged(qs, k, v, lse, dout, dq, dk, dv)
    B, NH = qs.shape[:2]
    blocks = _row_blocks(TQ, TK, causal)
    first = TK - TQ + 1 if causal else TK
    items = _items(B, NH, TQ, TK, qs.dtype.itemsize)
    threads.run_items(lambda h, b0, b1: _backward_item(qs, k, v, lse, dout, dq, dk, dv, h, b0, b1, blocks, first,
                                                       scale), items, TQ * TK >= PARALLEL_MIN_SCORES)


def _as_4d(a):
    """(..., T, HS) -> (B, NH, T, HS): a view (one leading axis made of all the others, or added)."""
    if a.ndim == 4:
        return a
    if a.ndim == 2:
        return a[None, None]
    return a.reshape((-1,) + a.shape[-3:]) if a.ndim > 4 else a[None]


class ScaledDotProductAttentionNumba:
    """Kernel for ScaledDotProductAttention: no mask (causal or not), no dropout, NumPy float32/float64."""

    @staticmethod
    def forward(ctx, q, k, v, mask=None, causal=True, scale=1.0, dropout_p=0.0, rng=None):
        ctx.reference = dropout_p > 0 or not _covered(q, k, v, mask, causal)   # attention dropout: the reference
        if ctx.reference:
            return ScaledDotProductAttention.forward(ctx, q, k, v, mask, causal=causal, scale=scale,
                                                     dropout_p=dropout_p, rng=rng)
        q4, k4, v4 = _as_4d(q), _as_4d(k), _as_4d(v)
        out = np.empty(q4.shape[:3] + (v4.shape[3],), q.dtype)
        lse = np.empty(q4.shape[:3], q.dtype)
        ctx.qs = attention_forward(q4, k4, v4, causal, scale, out, lse)
        ctx.k, ctx.v, ctx.lse, ctx.scale, ctx.causal = k4, v4, lse, scale, causal
        ctx.shapes = q.shape, k.shape, v.shape
        return out.reshape(q.shape[:-1] + (v.shape[-1],))

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return ScaledDotProductAttention.backward(ctx, dout)
        qs, k, v = ctx.qs, ctx.k, ctx.v
        dq, dk, dv = np.empty(qs.shape, qs.dtype), np.empty(k.shape, qs.dtype), np.empty(v.shape, qs.dtype)
        attention_backward(qs, k, v, ctx.lse, _as_4d(dout.reshape(ctx.shapes[0][:-1] + (v.shape[-1],))), dq, dk, dv,
                           ctx.causal, ctx.scale)
        need = ctx.needs_input_grad
        q_shape, k_shape, v_shape = ctx.shapes
        return (dq.reshape(q_shape) if need[0] else None, dk.reshape(k_shape) if need[1] else None,
                dv.reshape(v_shape) if need[2] else None, None)
