"""functional.SelfAttention with bf16 products and float32 softmax on NumPy arrays (precision.py's policy),
under precision.autocast("bfloat16"): the float kernel's plan (attention.py: causal row blocks, Numba row
passes, NumPy's exp), with its four BLAS products made MKL bf16 GEMMs with float32 sums (mkl.py):

  forward   qkv -> bf16 once (one flat pass; q, k, v are read in place as (B, NH, T, HS) views of it, row
            stride 3C); S = scale Q K^T (the scale as the GEMM's alpha) -> mask, row max, exp (float32)
            -> E to bf16 -> Y = E V / rowsum(E), written straight into the (B, T, C) output's head columns
  backward  dO -> bf16 once; per row block: P = exp(scale Q K^T - lse), dP = dO V^T -> dS = P (dP -
            rowsum(P dP)) (float32) -> P and dS to bf16 -> dQ = scale dS K; per key block: dV = P^T dO,
            dK = scale dS^T Q, each written straight into the (B, T, 3C) gradient's columns

Saved for backward: the bf16 qkv (half the bytes of the float32 one) and the per-row log-sum-exp. Attention
dropout (dropout_p > 0) is not covered: it runs the float32 attention, products included.
"""
import numpy as np
from numba import njit

from ...functional import SelfAttention
from . import mkl, threads
from .attention import PARALLEL_MIN_SCORES, _items, _row_blocks, max_shift_rows, shift_rows, softmax_grad_rows
from .mixed import to_bf16


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


def _heads(a, parts, NH):
    """(B, T, parts*C) -> `parts` (B, NH, T, HS) views (q, k, v or one), unit last stride, row stride parts*C."""
    B, T, W = a.shape
    split = a.reshape(B, T, parts, NH, W // parts // NH)
    return [split[:, :, i].transpose(0, 2, 1, 3) for i in range(parts)]


def _forward_item(q, k, v, y, lse, h, b0, b1, blocks, first, scale):
    qh, kh, vh = q[b0:b1, h], k[b0:b1, h], v[b0:b1, h]
    nb, TK = b1 - b0, kh.shape[1]
    rows = max(r1 - r0 for r0, r1, _ in blocks)
    buf, bbuf = np.empty(nb * rows * TK, np.float32), np.empty(nb * rows * TK, np.uint16)
    for r0, r1, kend in blocks:
        s = buf[:nb * (r1 - r0) * kend].reshape(nb, r1 - r0, kend)
        mkl.batched(qh[:, r0:r1], kh[:, :kend].swapaxes(1, 2), s, alpha=scale)
        m = np.empty((nb, r1 - r0), np.float32)
        max_shift_rows(s, 0, r1 - r0, kend, r0 + first, m)
        np.exp(s, out=s)
        total = s.sum(axis=2)
        e = bbuf[:s.size].reshape(s.shape)
        _to_bf16_3d(s, e)
        o = y[b0:b1, h, r0:r1]
        mkl.batched(e, vh[:, :kend], o)
        o /= total[:, :, None]
        np.log(total, out=total)
        np.add(m, total, out=lse[b0:b1, h, r0:r1])


def _backward_item(q, k, v, lse, do, dq, dk, dv, h, b0, b1, blocks, first, scale):
    qc, kc, vc, doc, lc = q[b0:b1, h], k[b0:b1, h], v[b0:b1, h], do[b0:b1, h], lse[b0:b1, h]
    nb, TQ, TK = b1 - b0, qc.shape[1], kc.shape[1]
    sc, dsc = np.empty((nb, TQ, TK), np.float32), np.empty((nb, TQ, TK), np.float32)
    pb, dsb = np.empty((nb, TQ, TK), np.uint16), np.empty((nb, TQ, TK), np.uint16)
    for r0, r1, kend in blocks:  # P = exp(S - lse), dS = P (dP - rowsum(P dP)), dq = scale dS K
        p, ds = sc[:, r0:r1, :kend], dsc[:, r0:r1, :kend]
        mkl.batched(qc[:, r0:r1], kc[:, :kend].swapaxes(1, 2), p, alpha=scale)
        shift_rows(sc, r0, r1, kend, first, lc)
        np.exp(p, out=p)
        mkl.batched(doc[:, r0:r1], vc[:, :kend].swapaxes(1, 2), ds)
        softmax_grad_rows(dsc, sc, r0, r1, kend, first)
        _to_bf16_3d(p, pb[:, r0:r1, :kend])
        _to_bf16_3d(ds, dsb[:, r0:r1, :kend])
        mkl.batched(dsb[:, r0:r1, :kend], kc[:, :kend], dq[b0:b1, h, r0:r1], alpha=scale)
    k0 = 0
    for r0, r1, kend in blocks:  # keys [k0, kend) are seen by rows r0.. only, all written above
        mkl.batched(pb[:, r0:, k0:kend].swapaxes(1, 2), doc[:, r0:], dv[b0:b1, h, k0:kend])
        mkl.batched(dsb[:, r0:, k0:kend].swapaxes(1, 2), qc[:, r0:], dk[b0:b1, h, k0:kend], alpha=scale)
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
        threads.run_items(lambda h, b0, b1: _forward_item(q, k, v, yh, lse, h, b0, b1, blocks, first, scale),
                          _items(B, n_head, rows, T, 4), T * T >= PARALLEL_MIN_SCORES)
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
        threads.run_items(lambda h, b0, b1: _backward_item(q, k, v, ctx.lse, do, dq, dk, dv, h, b0, b1, blocks,
                                                           first, ctx.scale),
                          _items(B, NH, T, T, 4), T * T >= PARALLEL_MIN_SCORES)
        return dqkv
