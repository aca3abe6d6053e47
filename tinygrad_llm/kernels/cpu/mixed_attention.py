"""functional.SelfAttention with bf16 products and float32 softmax on NumPy arrays (precision.py's policy),
under precision.autocast("bfloat16"): the float kernel's plan (attention.py: causal row blocks, Numba row
passes, NumPy's exp), with its four BLAS products made MKL bf16 GEMMs with float32 sums (mkl.py):

  forward   qkv -> bf16 once (one flat pass; q, k, v are read in place as (B, NH, T, HS) views of it, row
            stride 3C); S = scale Q K^T (the scale as the GEMM's alpha) -> mask, row max, exp (float32)
            -> E to bf16 -> Y = E V / rowsum(E), written straight into the (B, T, C) output's head columns
  backward  dO -> bf16 once; per row block: P = exp(scale Q K^T - lse), dP = dO V^T -> dS = P (dP -
            rowsum(P dP)) (float32), P and dS to bf16 in that same pass -> dQ = scale dS K; per key block:
            dV = P^T dO, dK = scale dS^T Q, each written straight into the (B, T, 3C) gradient's columns

A work item is a run of batch entries with every head: each row block's Python calls (the batched products,
the Numba passes, NumPy's exp) cover all heads at once (mkl.batched steps over both leading axes), which at
4x128 (T=64) cut the calls per step fourfold.

Saved for backward: the bf16 qkv (half the bytes of the float32 one) and the per-row log-sum-exp. Attention
dropout (dropout_p > 0) is not covered: it runs the float32 attention, products included.
"""
import numpy as np
from numba import njit

from ...functional import SelfAttention
from . import mkl, threads
from .attention import CHUNK_BYTES, PARALLEL_MIN_SCORES, _row_blocks, max_shift_rows, shift_rows, softmax_grad_rows
from .mixed import bits, to_bf16


@njit(parallel=False, error_model="numpy", cache=True, nogil=True)
def _to_bf16_3d(x, y):
    """y = bf16 bits of x, both (A, R, K) arrays or views of any strides (float32 -> uint16)."""
    A, R, K = x.shape
    for a in range(A):
        for r in range(R):
            for j in range(K):
                b = np.uint32(np.float32(x[a, r, j]).view(np.uint32))
                if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                    y[a, r, j] = np.uint16((b >> np.uint32(16)) | np.uint32(0x40))
                else:
                    y[a, r, j] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))
                                           >> np.uint32(16))


@njit(parallel=False, error_model="numpy", cache=True, nogil=True)
def _softmax_grad_bits(ds, p, dsb, pb, r0, r1, kend, first):
    """attention.softmax_grad_rows (dP -> dS in ds, rows [r0, r1), keys [0, kend)) a (batch, head) pair at a
    time, and the bf16 bits of P and dS in pb and dsb while those rows are still in cache (the same
    arithmetic, so the same bits as the separate passes). All four (A, TQ, TK), C-contiguous."""
    for c in range(ds.shape[0]):
        softmax_grad_rows(ds[c:c + 1], p[c:c + 1], r0, r1, kend, first)
        for i in range(r0, r1):
            bits(p[c, i, :kend], pb[c, i, :kend])
            bits(ds[c, i, :kend], dsb[c, i, :kend])


def _heads(a, parts, NH):
    """(B, T, parts*C) -> `parts` (B, NH, T, HS) views (q, k, v or one), unit last stride, row stride parts*C."""
    B, T, W = a.shape
    split = a.reshape(B, T, parts, NH, W // parts // NH)
    return [split[:, :, i].transpose(0, 2, 1, 3) for i in range(parts)]


def _batch_items(B, entry_bytes, parallel):
    """(b0, b1) work items: runs of batch entries whose score buffers (entry_bytes an entry, every head) fit
    CHUNK_BYTES; when they are spread over threads, as many items as a multiple of threads.THREADS."""
    per = max(1, min(B, CHUNK_BYTES // max(entry_bytes, 1)))
    n = -(-B // per)
    if parallel and threads.THREADS > 1:
        n = min(B, -(-n // threads.THREADS) * threads.THREADS)
    per = -(-B // n)
    return [(b0, min(b0 + per, B)) for b0 in range(0, B, per)]


def _forward_item(q, k, v, y, lse, b0, b1, blocks, first, scale):
    """Batch entries [b0, b1), every head: the Python calls of a row block cover all heads at once."""
    qh, kh, vh = q[b0:b1], k[b0:b1], v[b0:b1]
    nb, NH, TK = b1 - b0, kh.shape[1], kh.shape[2]
    rows = max(r1 - r0 for r0, r1, _ in blocks)
    buf, bbuf = np.empty(nb * NH * rows * TK, np.float32), np.empty(nb * NH * rows * TK, np.uint16)
    for r0, r1, kend in blocks:
        shape = (nb, NH, r1 - r0, kend)
        s4 = buf[:nb * NH * (r1 - r0) * kend].reshape(shape)
        mkl.batched(qh[:, :, r0:r1], kh[:, :, :kend].swapaxes(2, 3), s4, alpha=scale)
        s = s4.reshape(nb * NH, r1 - r0, kend)
        m = np.empty((nb * NH, r1 - r0), np.float32)
        max_shift_rows(s, 0, r1 - r0, kend, r0 + first, m)
        np.exp(s, out=s)
        total = s.sum(axis=2)
        e = bbuf[:s.size].reshape(s.shape)
        _to_bf16_3d(s, e)
        o = y[b0:b1, :, r0:r1]
        mkl.batched(e.reshape(shape), vh[:, :, :kend], o)
        o /= total.reshape(nb, NH, r1 - r0, 1)
        np.log(total, out=total)
        np.add(m.reshape(nb, NH, -1), total.reshape(nb, NH, -1), out=lse[b0:b1, :, r0:r1])


def _backward_item(q, k, v, lse, do, dq, dk, dv, b0, b1, blocks, first, scale):
    """Batch entries [b0, b1), every head; the Numba passes see the (entries x heads) as one axis."""
    qc, kc, vc, doc = q[b0:b1], k[b0:b1], v[b0:b1], do[b0:b1]
    nb, NH, TQ, TK = b1 - b0, qc.shape[1], qc.shape[2], kc.shape[2]
    lc = lse[b0:b1].reshape(nb * NH, TQ)
    sc, dsc = np.empty((nb, NH, TQ, TK), np.float32), np.empty((nb, NH, TQ, TK), np.float32)
    pb, dsb = np.empty((nb, NH, TQ, TK), np.uint16), np.empty((nb, NH, TQ, TK), np.uint16)
    s3, ds3 = sc.reshape(nb * NH, TQ, TK), dsc.reshape(nb * NH, TQ, TK)
    pb3, dsb3 = pb.reshape(nb * NH, TQ, TK), dsb.reshape(nb * NH, TQ, TK)
    for r0, r1, kend in blocks:  # P = exp(S - lse), dS = P (dP - rowsum(P dP)), dq = scale dS K
        mkl.batched(qc[:, :, r0:r1], kc[:, :, :kend].swapaxes(2, 3), sc[:, :, r0:r1, :kend], alpha=scale)
        shift_rows(s3, r0, r1, kend, first, lc)
        p = s3[:, r0:r1, :kend]
        np.exp(p, out=p)
        mkl.batched(doc[:, :, r0:r1], vc[:, :, :kend].swapaxes(2, 3), dsc[:, :, r0:r1, :kend])
        _softmax_grad_bits(ds3, s3, dsb3, pb3, r0, r1, kend, first)
        mkl.batched(dsb[:, :, r0:r1, :kend], kc[:, :, :kend], dq[b0:b1, :, r0:r1], alpha=scale)
    k0 = 0
    for r0, r1, kend in blocks:  # keys [k0, kend) are seen by rows r0.. only, all written above
        mkl.batched(pb[:, :, r0:, k0:kend].swapaxes(2, 3), doc[:, :, r0:], dv[b0:b1, :, k0:kend])
        mkl.batched(dsb[:, :, r0:, k0:kend].swapaxes(2, 3), qc[:, :, r0:], dk[b0:b1, :, k0:kend], alpha=scale)
        k0 = kend


class SelfAttentionBF16Mkl:
    """functional.SelfAttention on the packed (B, T, 3C) qkv with bf16 products (MKL, float32 sums) and
    float32 softmax. NumPy float32 and no dropout; anything else takes the op itself (float32 products)."""

    @staticmethod
    def forward(ctx, qkv, n_head, causal=True, scale=1.0, dropout_p=0.0, rng=None):
        ctx.reference = not (type(qkv) is np.ndarray and qkv.dtype == np.float32 and dropout_p == 0
                             and qkv.shape[1] > 0 and qkv.shape[0] > 0 and qkv.shape[2] > 0)
        if ctx.reference:
            return SelfAttention.forward(ctx, qkv, n_head, causal=causal, scale=scale, dropout_p=dropout_p, rng=rng)
        B, T, C3 = qkv.shape
        qkv_b = to_bf16(qkv)
        q, k, v = _heads(qkv_b, 3, n_head)
        y = np.empty((B, T, C3 // 3), np.float32)
        lse = np.empty((B, n_head, T), np.float32)
        blocks = _row_blocks(T, T, causal)
        first = 1 if causal else T
        rows = max(r1 - r0 for r0, r1, _ in blocks)
        yh = _heads(y, 1, n_head)[0]
        parallel = T * T >= PARALLEL_MIN_SCORES
        threads.run_items(lambda b0, b1: _forward_item(q, k, v, yh, lse, b0, b1, blocks, first, scale),
                          _batch_items(B, n_head * rows * T * 4, parallel), parallel)
        ctx.qkv_b, ctx.lse, ctx.n_head, ctx.causal, ctx.scale = qkv_b, lse, n_head, causal, scale
        return y

    # derivation: docs/backward/self_attention.md (and docs/backward/attention.md)
    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return SelfAttention.backward(ctx, dout)
        qkv_b, NH = ctx.qkv_b, ctx.n_head
        B, T, C3 = qkv_b.shape
        q, k, v = _heads(qkv_b, 3, NH)
        do = _heads(to_bf16(np.ascontiguousarray(dout, dtype=np.float32).reshape(B, T, C3 // 3)), 1, NH)[0]
        dqkv = np.empty((B, T, C3), np.float32)
        dq, dk, dv = _heads(dqkv, 3, NH)
        blocks = _row_blocks(T, T, ctx.causal)
        first = 1 if ctx.causal else T
        parallel = T * T >= PARALLEL_MIN_SCORES
        threads.run_items(lambda b0, b1: _backward_item(q, k, v, ctx.lse, do, dq, dk, dv, b0, b1, blocks, first,
                                                        ctx.scale),
                          _batch_items(B, NH * T * T * 4, parallel), parallel)
        return dqkv
