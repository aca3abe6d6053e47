"""functional.SelfAttention with bf16 products and float32 softmax on NumPy arrays (precision.py's policy),
under precision.autocast("bfloat16"): the float kernel's plan (attention.py: causal row blocks), with its four
products made bf16 GEMMs with float32 sums (MKL's, mkl.py, or oneDNN's, dnnl.py: bf16_gemm.py picks) and its
row passes fused (mixed_attention_passes.py):

  forward   qkv -> bf16 q, k, v as contiguous (B, NH, T, HS) arrays in one pass (split_heads; the products
            then read rows of stride HS, not head views of the packed qkv with row stride 3C); per row block:
            S = scale Q K^T (the scale as the GEMM's alpha) -> one row pass (softmax_bits): mask, row max,
            exp (float32), row sum, E's bf16 bits -> Y = E V / rowsum(E), written straight into the (B, T, C)
            output's head columns
  backward  dO -> bf16 (B, NH, T, HS) the same way; per row block: S = scale Q K^T, dP = dO V^T -> one row
            pass (grad_bits): P = exp(S - lse), dS = P (dP - rowsum(P dP)) (float32), the bf16 bits of P and
            dS -> dQ = scale dS K; per key block: dV = P^T dO, dK = scale dS^T Q, each written straight into
            the (B, T, 3C) gradient's columns

A work item is a run of batch entries with every head: each row block's Python calls (the batched products,
the Numba pass) cover all heads at once (mkl.batched steps over both leading axes; dnnl.batched is one oneDNN
call), which at 4x128 (T=64) cut the calls per step fourfold. The float32 scores live for one row block only
(the backward keeps the item's bf16 P and dS for the key-block products).

Saved for backward: the bf16 q, k, v (half the bytes of the float32 qkv) and the per-row log-sum-exp.
Attention dropout (dropout_p > 0) is not covered: it runs the float32 attention, products included.
"""
import threading

import numpy as np

from ...functional import SelfAttention
from . import bf16_gemm, threads
from .attention import PARALLEL_MIN_SCORES, _row_blocks
from .mixed import PARALLEL_MIN_VALUES
from .mixed_attention_passes import grad_bits, softmax_bits, split_heads

# A work item's buffers: (forward) a row block's float32 scores and their bf16 bits, (backward) the item's bf16
# P and dS and a row block's float32 scores and dP, every head of a run of batch entries. Each item costs ~20
# Python calls (products, passes), so few large items beat cache-sized ones: with null products at 6x384 on
# this project's 2-core EPYC (benchmarks/attention_bf16.py --null-gemm --chunk-kib), backward 144-156 ms a call
# at 4 MiB (64 items), 95-108 at 8, 82-100 at 16, 87-98 at 32; forward flat from 4 MiB. The row passes are
# compute-bound (about 2 ns a score here), so their data coming from L3 rather than L2 costs little.
CHUNK_BYTES = 16 << 20
# Causal row blocks of at least 64 rows (the float32 kernel's: 16): at T=64 one block, four times fewer MKL and
# Python calls for the masked quarter's flops, which the AMX Xeon's 4x128 step measured faster (RESULTS.md).
MIN_ROW_BLOCK = 64
_local = threading.local()


def _item_buffers(*layout):
    """Arrays of the given (shape, dtype)s for a work item, cut (64-byte aligned) from this thread's scratch
    buffer, which is kept for the next item and call when it is at most 2 CHUNK_BYTES: buffers allocated per
    item are mapped afresh and each page faulted in on its first write (on this project's 2-core VM a third
    of the forward's row passes' time at 6x384, 25 of 83 ms a call)."""
    sizes = [int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in layout]
    starts = np.cumsum([0] + [-(-n // 64) * 64 for n in sizes])
    buf = getattr(_local, "buf", None)
    if starts[-1] > 2 * CHUNK_BYTES:
        buf = np.empty(starts[-1], np.uint8)
    elif buf is None or buf.size < starts[-1]:
        buf = _local.buf = np.empty(starts[-1], np.uint8)
    return [buf[a:a + n].view(dtype).reshape(shape) for (shape, dtype), a, n in zip(layout, starts, sizes)]


def _split(x, parts, NH):
    """float32 (B, T, parts*NH*HS) -> its bf16 bits as `parts` contiguous (B, NH, T, HS) arrays (one pass,
    split by batch entries over the threads when large)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    B, T, W = x.shape
    out = np.empty((parts, B, NH, T, W // parts // NH), np.uint16)
    n = threads.THREADS if x.size >= PARALLEL_MIN_VALUES and B > 1 else 1
    cuts = [B * i // n for i in range(n + 1)]
    threads.run_items(lambda b0, b1: split_heads(x, out, b0, b1), list(zip(cuts, cuts[1:])), n > 1, blas=False)
    return list(out)


def _heads(a, parts, NH):
    """(B, T, parts*C) -> `parts` (B, NH, T, HS) views (q, k, v or one), unit last stride, row stride parts*C."""
    B, T, W = a.shape
    split = a.reshape(B, T, parts, NH, W // parts // NH)
    return [split[:, :, i].transpose(0, 2, 1, 3) for i in range(parts)]


def _batch_items(B, entry_bytes, parallel):
    """(b0, b1) work items: runs of batch entries whose buffers (entry_bytes an entry, every head) fit
    CHUNK_BYTES, of sizes differing by at most one; when they are spread over threads, as many items as a
    multiple of threads.THREADS (at most B)."""
    n = -(-B // max(1, min(B, CHUNK_BYTES // max(entry_bytes, 1))))
    if parallel and threads.THREADS > 1:
        n = min(B, -(-n // threads.THREADS) * threads.THREADS)
    cuts = [B * i // n for i in range(n + 1)]
    return list(zip(cuts, cuts[1:]))


def _forward_item(batched, q, k, v, y, lse, b0, b1, blocks, first, scale):
    """Batch entries [b0, b1), every head: the Python calls of a row block cover all heads at once; batched is
    mkl.batched or dnnl.batched (bf16_gemm.library())."""
    qh, kh, vh = q[b0:b1], k[b0:b1], v[b0:b1]
    nb, NH, TQ, TK = b1 - b0, kh.shape[1], qh.shape[2], kh.shape[2]
    lc = lse[b0:b1].reshape(nb * NH, TQ)
    size = nb * NH * max(r1 - r0 for r0, r1, _ in blocks) * TK
    buf, bbuf = _item_buffers(((size,), np.float32), ((size,), np.uint16))
    for r0, r1, kend in blocks:
        shape = (nb, NH, r1 - r0, kend)
        s4, e4 = buf[:np.prod(shape)].reshape(shape), bbuf[:np.prod(shape)].reshape(shape)
        batched(qh[:, :, r0:r1], kh[:, :, :kend].swapaxes(2, 3), s4, alpha=scale)
        softmax_bits(s4.reshape(nb * NH, r1 - r0, kend), e4.reshape(nb * NH, r1 - r0, kend), lc, r0, first)
        batched(e4, vh[:, :, :kend], y[b0:b1, :, r0:r1])


def _backward_item(batched, q, k, v, lse, do, dq, dk, dv, b0, b1, blocks, first, scale):
    """Batch entries [b0, b1), every head; the Numba pass sees the (entries x heads) as one axis."""
    qc, kc, vc, doc = q[b0:b1], k[b0:b1], v[b0:b1], do[b0:b1]
    nb, NH, TQ, TK = b1 - b0, qc.shape[1], qc.shape[2], kc.shape[2]
    lc = lse[b0:b1].reshape(nb * NH, TQ)
    size = nb * NH * max(r1 - r0 for r0, r1, _ in blocks) * TK
    buf, pb, dsb = _item_buffers(((2, size), np.float32), ((nb, NH, TQ, TK), np.uint16), ((nb, NH, TQ, TK), np.uint16))
    pb3, dsb3 = pb.reshape(nb * NH, TQ, TK), dsb.reshape(nb * NH, TQ, TK)
    for r0, r1, kend in blocks:  # P = exp(S - lse), dS = P (dP - rowsum(P dP)), dq = scale dS K
        shape = (nb, NH, r1 - r0, kend)
        s4, dp4 = buf[0, :np.prod(shape)].reshape(shape), buf[1, :np.prod(shape)].reshape(shape)
        batched(qc[:, :, r0:r1], kc[:, :, :kend].swapaxes(2, 3), s4, alpha=scale)
        batched(doc[:, :, r0:r1], vc[:, :, :kend].swapaxes(2, 3), dp4)
        grad_bits(s4.reshape(nb * NH, r1 - r0, kend), dp4.reshape(nb * NH, r1 - r0, kend), lc, pb3, dsb3, r0, first)
        batched(dsb[:, :, r0:r1, :kend], kc[:, :, :kend], dq[b0:b1, :, r0:r1], alpha=scale)
    k0 = 0
    for r0, r1, kend in blocks:  # keys [k0, kend) are seen by rows r0.. only, all written above
        batched(pb[:, :, r0:, k0:kend].swapaxes(2, 3), doc[:, :, r0:], dv[b0:b1, :, k0:kend])
        batched(dsb[:, :, r0:, k0:kend].swapaxes(2, 3), qc[:, :, r0:], dk[b0:b1, :, k0:kend], alpha=scale)
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
        batched = bf16_gemm.library().batched   # MKL's or oneDNN's (TINYGRAD_LLM_CPU_BF16_GEMM), or why neither
        q, k, v = _split(qkv, 3, n_head)
        y = np.empty((B, T, C3 // 3), np.float32)
        lse = np.empty((B, n_head, T), np.float32)
        blocks = _row_blocks(T, T, causal, MIN_ROW_BLOCK)
        first = 1 if causal else T
        rows = max(r1 - r0 for r0, r1, _ in blocks)
        yh = _heads(y, 1, n_head)[0]
        parallel = T * T >= PARALLEL_MIN_SCORES
        threads.run_items(lambda b0, b1: _forward_item(batched, q, k, v, yh, lse, b0, b1, blocks, first, scale),
                          _batch_items(B, n_head * rows * T * 6, parallel), parallel, blas=False)
        ctx.qkv_heads, ctx.lse, ctx.n_head, ctx.causal, ctx.scale = (q, k, v), lse, n_head, causal, scale
        ctx.batched = batched
        return y

    # derivation: docs/backward/self_attention.md (and docs/backward/attention.md)
    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return SelfAttention.backward(ctx, dout)
        (q, k, v), NH = ctx.qkv_heads, ctx.n_head
        B, _, T, HS = q.shape
        do = _split(np.reshape(dout, (B, T, NH * HS)), 1, NH)[0]
        dqkv = np.empty((B, T, 3 * NH * HS), np.float32)
        dq, dk, dv = _heads(dqkv, 3, NH)
        blocks = _row_blocks(T, T, ctx.causal, MIN_ROW_BLOCK)
        first = 1 if ctx.causal else T
        rows = max(r1 - r0 for r0, r1, _ in blocks)
        parallel = T * T >= PARALLEL_MIN_SCORES
        threads.run_items(lambda b0, b1: _backward_item(ctx.batched, q, k, v, ctx.lse, do, dq, dk, dv, b0, b1, blocks,
                                                        first, ctx.scale),
                          _batch_items(B, NH * T * (4 * T + 8 * rows), parallel), parallel, blas=False)
        return dqkv
