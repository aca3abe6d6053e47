"""Scaled dot-product attention, forward and backward: BLAS products on causal row blocks, Numba row
passes and NumPy's SIMD exp between them.

Reference: functional.ScaledDotProductAttention, which keeps the (B,NH,TQ,TK) probabilities for
backward and makes about ten NumPy passes over them (scale, mask, max, subtract, exp, sum, divide;
then dP * P, a row sum, a subtract, a multiply). Here, for a chunk of (batch, head) pairs at a time and
the query rows in ROW_BLOCKS blocks (causal: block [r0, r1) multiplies only the keys [0, r1 + TK - TQ)
it can see, so 4 blocks do 62.5% of the score flops; keys beyond a block are never touched):

  forward   S = (scale Q) K^T (BLAS; the scale folded into the saved copy of q) -> Numba row pass:
            mask, row max, S - max -> np.exp in place (SIMD) -> row sums -> O = E V / sum (BLAS, the
            normalisation on the (rows, HV) output, not the (rows, keys) probabilities); lse = max + log sum
  backward  per row block: S = (scale Q) K^T, dP = dO V^T (BLAS) -> Numba pass S - lse, mask -> np.exp
            -> P -> Numba pass dS = P (dP - rowsum(P dP)) -> dQ = scale dS K (BLAS); then per key block
            [kend of block b-1, kend of block b), seen only by rows r0_b..: dV = P^T dO, dK = dS^T (scale Q)

Saved for backward: scale q, k, v and the per-row log-sum-exp (B,NH,TQ); the probabilities never
outlive a chunk, so the memory of attention does not grow with TQ*TK per layer.

The exp is NumPy's: Numba calls the scalar libm exp per element (the former all-Numba row passes were
0.80-0.86x the reference), NumPy's loop is SIMD. Measured (benchmarks/kernels.py, float32 fwd+bwd,
2 cores, one process): (64,6,256,64) 204 ms vs reference 270 ms (1.32x; the former kernel 320 ms,
0.80x), torch 165 ms; (12,4,64,32) 1.40 ms vs reference 1.76 ms (1.26x; former 2.35 ms), torch
1.37 ms. So every size is served (MIN_SCORES_PER_HEAD = 0; the former gate was 128 x 128). Fewer,
larger row blocks do fewer BLAS calls, more blocks fewer flops: 4 blocks of >= 16 rows measured best
for both shapes (2-8 within noise at T=256, 1 block 10-15% slower).

Why not one all-Numba tiled loop with an online softmax (flash attention)? Measured on the 6x384 shapes:
Numba's loops reach a few GFLOP/s where OpenBLAS's batched products reach ~100 (matmul.py's rows), and
calling BLAS from inside a Numba prange runs into OpenBLAS's OpenMP guard (one thread, a warning per
call). A row of at most a few thousand keys fits in cache, so the softmax is exact in one row pass and
needs no running rescaling; the matmuls stay on BLAS, as DESIGN.md section 6 asks.
"""
import concurrent.futures
import contextlib
import math
import os

import numpy as np
from numba import njit

from ...functional import ScaledDotProductAttention
from .threads import (TOLERANCE, blas_threads, compare_with_reference, forward_backward, median_ms, table_row,
                     torch_or_none)

CHUNK_BYTES = 4 << 20  # the (chunk, TQ, TK) score buffers; bounded so that they stay near the caches
ROW_BLOCKS, MIN_ROW_BLOCK = 4, 16  # causal: TQ split in 4 row blocks of >= 16 rows (62.5% of the score flops)
MIN_SCORES_PER_HEAD = 0  # every size is served: the kernel beats the reference at T=64 too (see above)


def _covered(q, k, v, mask, causal):
    arrays = (q, k, v)
    return (mask is None and all(type(a) is np.ndarray for a in arrays) and q.dtype in (np.float32, np.float64)
            and k.dtype == q.dtype and v.dtype == q.dtype and q.ndim >= 2 and q.shape[-2] > 0
            and k.shape[-2] > 0 and (not causal or k.shape[-2] >= q.shape[-2])
            and q.shape[-2] * k.shape[-2] >= MIN_SCORES_PER_HEAD)


def _row_blocks(TQ, TK, causal):
    """(r0, r1, kend): query rows [r0, r1) see keys [0, kend). Causal: row i sees keys <= i + TK - TQ, so
    a block needs keys up to r1 + TK - TQ; keys [kend of the block before, kend) are seen only by rows >= r0."""
    if not causal:
        return [(0, TQ, TK)]
    offset, size = TK - TQ, max(MIN_ROW_BLOCK, -(-TQ // ROW_BLOCKS))
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
            m0, m1, m2, m3 = row[0], row[0], row[0], row[0]  # four chains: the max is not one long dependency
            # (kept in this file: Numba's disk cache does not notice edits to jitted functions in other files)
            j = 0
            while j + 4 <= n:
                m0, m1, m2, m3 = max(m0, row[j]), max(m1, row[j + 1]), max(m2, row[j + 2]), max(m3, row[j + 3])
                j += 4
            for jj in range(j, n):
                m0 = max(m0, row[jj])
            mx = max(max(m0, m1), max(m2, m3))
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
def softmax_grad_rows(ds, p, r0, r1, kend, first):
    """ds: dP = dO V^T -> dS = P (dP - rowsum(P dP)) for rows [r0, r1), keys [0, kend) (P is 0 on masked keys).

    Row i's keys all lie in its block, so the row sum is complete here; it is the reference's sum, not
    the algebraically equal dO . O, whose different rounding would leave noise where dS is exactly 0."""
    C = ds.shape[0]
    for c in range(C):
        for i in range(r0, r1):
            drow, prow = ds[c, i], p[c, i]
            n = min(kend, i + first)
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


# ---- the passes over one work item: batch entries [b0, b1) of head h ---------------------------------
# q, k, v, dout, out, dq, dk, dv are 4-D (B, NH, T, HS) arrays or views with a unit last stride: a
# permuted (B, T, NH, HS) layout (the model's rope path) is read in place, the products going to BLAS
# with the views' row strides. qs is q * scale, contiguous. Items of one call touch disjoint output rows,
# so they may run in any order or at once. (A kernel for SelfAttention that read q, k, v as such views
# of the packed (B, T, 3C) qkv and wrote y and dqkv in place measured no faster than SelfAttention's
# reference around this one: 157 vs 152 ms forward + backward at (64, 256, 1152), 1.43-1.60 vs 1.45 s a
# 6x384 step, its per-head products on strided rows costing what the copies save; it was dropped.)

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


# ---- threads -------------------------------------------------------------------------------------
# The (64, 6, 256, 64) products are small for BLAS (a few MFLOP each) and OpenBLAS's two threads on them
# reach ~85 GFLOP/s. Splitting the work items over THREADS Python threads, each calling BLAS on one
# thread (blas_threads(1)), measured 302 -> 182 ms for forward + backward at that shape (one process,
# medians of 12, a 16384x384x1536 GEMM before each call as in a training step); at (12, 4, 64, 32) it
# lost (1.9 -> 2.5-4.0 ms: thread hand-offs cost more than the work), hence the size gate. The row
# passes are nogil Numba functions; np.exp, np.matmul and the sums release the GIL as well.

def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))   # the cores this process may run on (taskset, containers)
    except AttributeError:                     # not Linux
        return os.cpu_count() or 1


THREADS = max(1, min(_usable_cores(), 8))
PARALLEL_MIN_SCORES = 128 * 128   # TQ * TK per head from which the items are spread over threads
_pool, _pool_size = None, 0


def _forget_pool_in_a_forked_child():
    global _pool
    _pool = None   # a fork copies the pool's bookkeeping but not its threads: a new one is made on demand


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_a_forked_child)


def _run_items(fn, items, parallel):
    """fn(*item) for every item: in this thread, or spread over THREADS threads (OpenBLAS on one each).

    Every share is finished before this returns or raises (no thread still writes into the outputs or
    calls BLAS after it), and an exception in this thread's share is raised before a worker's."""
    global _pool, _pool_size
    if not parallel or THREADS < 2 or len(items) < 2:
        for item in items:
            fn(*item)
        return
    if _pool is None or _pool_size != THREADS - 1:
        _pool_size = THREADS - 1
        _pool = concurrent.futures.ThreadPoolExecutor(_pool_size, thread_name_prefix="tinygrad_llm-attention")
    shares = [items[i::THREADS] for i in range(THREADS)]
    with blas_threads(1):
        futures = [_pool.submit(lambda share=share: [fn(*item) for item in share]) for share in shares[1:]]
        try:
            for item in shares[0]:
                fn(*item)
        finally:
            concurrent.futures.wait(futures)
    for future in futures:
        future.result()   # a worker's exception, raised here once all have finished


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
    _run_items(lambda h, b0, b1: _forward_item(qs, k, v, out, lse, h, b0, b1, blocks, first), items,
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
    _run_items(lambda h, b0, b1: _backward_item(qs, k, v, lse, dout, dq, dk, dv, h, b0, b1, blocks, first, scale),
               items, TQ * TK >= PARALLEL_MIN_SCORES)


def _as_4d(a):
    """(..., T, HS) -> (B, NH, T, HS): a view (one leading axis made of all the others, or added)."""
    if a.ndim == 4:
        return a
    if a.ndim == 2:
        return a[None, None]
    return a.reshape((-1,) + a.shape[-3:]) if a.ndim > 4 else a[None]


class NumbaAttention:
    """Kernel for ScaledDotProductAttention: no mask (causal or not), no dropout, NumPy float32/float64."""

    @staticmethod
    def forward(ctx, q, k, v, mask=None, causal=True, scale=1.0, dropout_p=0.0, rng=None):
        ctx.fallback = dropout_p > 0 or not _covered(q, k, v, mask, causal)   # attention dropout: the reference
        if ctx.fallback:
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
        if ctx.fallback:
            return ScaledDotProductAttention.backward(ctx, dout)
        qs, k, v = ctx.qs, ctx.k, ctx.v
        dq, dk, dv = np.empty(qs.shape, qs.dtype), np.empty(k.shape, qs.dtype), np.empty(v.shape, qs.dtype)
        attention_backward(qs, k, v, ctx.lse, _as_4d(dout.reshape(ctx.shapes[0][:-1] + (v.shape[-1],))), dq, dk, dv,
                           ctx.causal, ctx.scale)
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


@contextlib.contextmanager
def row_blocks_of(size):
    """Causal row blocks of `size` rows (the last one shorter when it does not divide TQ), for tests."""
    global ROW_BLOCKS, MIN_ROW_BLOCK
    saved, (ROW_BLOCKS, MIN_ROW_BLOCK) = (ROW_BLOCKS, MIN_ROW_BLOCK), (1 << 30, size)
    try:
        yield
    finally:
        ROW_BLOCKS, MIN_ROW_BLOCK = saved


@contextlib.contextmanager
def spread_over_threads(threads):
    """Spread the work items of every size over `threads` threads (tests and validation: the size gate off)."""
    global THREADS, PARALLEL_MIN_SCORES
    saved, (THREADS, PARALLEL_MIN_SCORES) = (THREADS, PARALLEL_MIN_SCORES), (threads, 0)
    try:
        yield
    finally:
        THREADS, PARALLEL_MIN_SCORES = saved


@every_size_served()
def validate():
    """Every case with the default row blocks, then with blocks of 1, 3 and 5 rows (5 and 3 do not divide
    T = 17 or 64: a short last block; TQ = 4 of TK = 11: blocks offset from the keys)."""
    worst = 0.0
    for dtype, rows in [(np.float64, None), (np.float32, None), (np.float64, 1), (np.float64, 5), (np.float32, 3)]:
        for shape, attrs, strided, TK in VALIDATION_CASES:
            q, k, v = _inputs(shape, dtype, strided=strided, TK=TK)
            attrs = dict(attrs, scale=1 / math.sqrt(shape[-1]))
            mask = attrs.pop("mask", None)
            with row_blocks_of(rows) if rows else contextlib.nullcontext():
                err = compare_with_reference(ScaledDotProductAttention, NumbaAttention, (q, k, v, mask), attrs,
                                             needs=(True, True, True, False))
            assert err <= TOLERANCE[np.dtype(dtype)], f"attention {shape} {attrs} {np.dtype(dtype).name} rows {rows}: {err}"
            worst = max(worst, err)
    # the work items spread over 2 and 3 threads whatever their size (OpenBLAS on one thread each)
    for dtype, threads in [(np.float64, 2), (np.float32, 3)]:
        for shape, attrs, strided, TK in VALIDATION_CASES:
            q, k, v = _inputs(shape, dtype, strided=strided, TK=TK)
            attrs = dict(attrs, scale=1 / math.sqrt(shape[-1]))
            mask = attrs.pop("mask", None)
            with spread_over_threads(threads):
                err = compare_with_reference(ScaledDotProductAttention, NumbaAttention, (q, k, v, mask), attrs,
                                             needs=(True, True, True, False))
            assert err <= TOLERANCE[np.dtype(dtype)], f"attention {shape} {attrs} threads {threads}: {err}"
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
