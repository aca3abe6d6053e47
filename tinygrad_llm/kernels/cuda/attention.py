"""Attention on CUDA arrays: cuBLAS products around one fused masked-softmax pass each way (ops:
functional.ScaledDotProductAttention, and SelfAttention on the packed (B, T, 3C) qkv without unpacking).

Three paths: cuBLAS products around the softmax passes of attention_softmax.py (fastest at short T in strict
float32), and flash attention, keeping only the output and each row's log-sum-exp and recomputing the
probabilities in backward tile by tile (memory linear in T; use_flash picks it from long T on): on the tensor
cores (flash_mma.py: with TF32 on at every T, and 3xTF32 where flash is picked; heads of 32 or 64) or on the
CUDA cores (flash_attention.py: other head sizes, float64, split heads).

What the cuBLAS path keeps for backward (SAVE, SelfAttentionCuda): by default ("lse") only each row's
log-sum-exp: backward multiplies S = Q K^T again (the same cuBLAS calls on the same inputs) and one fused
pass rebuilds P = exp(S scale - lse) from it, so no (B, NH, T, T) array outlives its layer's forward or
backward (two live during one layer's backward). "p" keeps P and redraws Pd = P M / (1 - p) in backward;
"p+pd" keeps both, as this file did before. ScaledDotProductAttentionCuda (split heads, not the GPT's path)
always keeps P and Pd.

Attention dropout differs from the NumPy op by design: the op draws its mask with rng.random on the
host, which would cost more than the whole GPU step. Here each call takes one 63-bit seed from the same
generator and the softmax passes hash (seed, element) into the mask (runtime.HEADER's dropout_keep), so a
run stays reproducible from its seed but follows another (equally valid) trajectory than on the CPU.
"""
import os

import cupy as cp
import numpy as np

from ...functional import ScaledDotProductAttention, SelfAttention
from . import flash_attention, flash_mma
from .attention_softmax import dropout_probs, softmax_backward, softmax_backward_lse, softmax_forward
from .cublas import gemm_heads
from .runtime import dropout_seed_args, served

# TINYGRAD_LLM_FLASH (read at import, or set FLASH): "auto" (the rule), "1" (flash wherever the head size
# allows), "0" (never). The rule, from the H200 (benchmarks/RESULTS.md, "Flash attention"): flash from
# FLASH_MIN_T positions on with heads up to FLASH_MAX_FAST_HEAD, where it was faster
# (float32 T=4096: 9.6 ms against 12.2; T=2048 within 10% either way; T <= 1024 and heads of 128 at 2048:
# the cuBLAS path 17-80% faster); and wherever the (B, NH, T, T) arrays one cuBLAS-path call holds at once
# (tt_buffers(): 2, or 3 with SAVE "p+pd") would take more than FLASH_MEMORY_SHARE of the GPU's memory.
FLASH, FLASH_MIN_T, FLASH_MAX_FAST_HEAD, FLASH_MEMORY_SHARE = os.environ.get("TINYGRAD_LLM_FLASH", "auto"), 4096, 64, 0.25
_device_bytes = {}

# TINYGRAD_LLM_ATTENTION_SAVE (read at import, or set SAVE): what SelfAttentionCuda's cuBLAS path keeps for
# backward. "lse" (default): the rows' log-sum-exp; backward recomputes S = Q K^T (one more batched GEMM a
# layer) and rebuilds P and Pd in its softmax pass. "p": P; backward redraws Pd from P and the seed (one
# more pass a layer with dropout). "p+pd": P and Pd (no recomputation, two (B, NH, T, T) arrays kept a
# layer). Every choice gives the same numbers to rounding and the same dropout mask (same seed, same hash).
# Measured on the H200, 6x384 at T=256 (benchmarks/RESULTS.md, "Attention that keeps no probabilities"):
# "lse" takes the step's peak memory below PyTorch eager's at about the same step time.
SAVE = os.environ.get("TINYGRAD_LLM_ATTENTION_SAVE", "lse")
SAVE_CHOICES = ("lse", "p", "p+pd")


def save_mode():
    """SAVE, checked (a clear error naming the variable for anything else)."""
    mode = str(SAVE).strip().lower()
    if mode not in SAVE_CHOICES:
        raise ValueError(f"TINYGRAD_LLM_ATTENTION_SAVE must be lse, p or p+pd, got {SAVE!r}")
    return mode


def tt_buffers():
    """How many (B, NH, T, T) arrays one SelfAttentionCuda call on the cuBLAS path holds at its peak (its
    backward): the transient S and dS with "lse", the kept P and the transient dS with "p", P, Pd and dS
    with "p+pd"."""
    return 3 if save_mode() == "p+pd" else 2


def use_flash(B, NH, T, HS, dtype, buffers=None):
    """True when the flash kernels attend (B, NH, T, HS) heads of `dtype` (see FLASH); `buffers`: the
    (B, NH, T, T) arrays the cuBLAS path would hold at once (default tt_buffers(), SelfAttentionCuda's)."""
    mode = str(FLASH).strip().lower()
    if mode not in ("auto", "1", "0"):
        raise ValueError(f"TINYGRAD_LLM_FLASH must be auto, 1 or 0, got {FLASH!r}")
    if mode == "0" or HS > flash_attention.MAX_HEAD_SIZE:
        return False
    if mode == "1" or (T >= FLASH_MIN_T and HS <= FLASH_MAX_FAST_HEAD):
        return True
    device = cp.cuda.Device().id   # its memory is a device property: no stream work (graph capture is safe)
    if device not in _device_bytes:
        _device_bytes[device] = cp.cuda.runtime.getDeviceProperties(device)["totalGlobalMem"]
    return (tt_buffers() if buffers is None else buffers) * B * NH * T * T * np.dtype(dtype).itemsize > FLASH_MEMORY_SHARE * _device_bytes[device]


def _draw_seed(ctx, causal, scale, dropout_p, rng):
    """The flash path's attributes; the seed drawn as softmax_forward draws it (a device seed in a step)."""
    ctx.causal, ctx.scale, ctx.drop_p, (ctx.seed_ptr, ctx.seed) = causal, scale, dropout_p, (
        dropout_seed_args(rng) if dropout_p > 0 else (np.uint64(0), np.uint64(0)))

class ScaledDotProductAttentionCuda:
    """ScaledDotProductAttention with causal or no mask: cuBLAS products around fused softmax passes.

    An explicit boolean mask takes the reference path (the model never passes one). Dropout: the softmax
    pass also writes Pd = P * M, M hashed from one seed (as DropoutCuda); backward recomputes M from it.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask=None, causal=True, scale=1.0, dropout_p=0.0, rng=None):
        ctx.reference = mask is not None or not served(q, k, v) or dropout_p == 1
        if ctx.reference:
            return ScaledDotProductAttention.forward(ctx, q, k, v, mask, causal=causal, scale=scale,
                                                     dropout_p=dropout_p, rng=rng)
        TQ, TK = q.shape[-2], k.shape[-2]
        ctx.flash = (q.ndim == 4 and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype
                     and use_flash(*q.shape, q.dtype, buffers=3))   # keeps P and Pd, and dS in backward
        if ctx.flash:   # (B, NH, T, HS) heads, contiguous
            _draw_seed(ctx, causal, scale, dropout_p, rng)
            ctx.qkv = [cp.ascontiguousarray(a) for a in (q, k, v)]
            ctx.y = cp.empty_like(ctx.qkv[0])
            strides = (q[0].size, q[0, 0].size, q.shape[-1])
            ctx.layout = flash_attention.Layout(q.dtype.name, *q.shape, strides, strides)
            ctx.lse = cp.empty(q.size // q.shape[-1], dtype=ctx.layout.math)
            flash_attention.forward(ctx.layout, *(a.data.ptr for a in ctx.qkv), ctx.y.data.ptr, ctx.lse.data.ptr,
                                    causal, scale, ctx.seed, dropout_p, ctx.seed_ptr)
            return ctx.y
        s = cp.matmul(q, k.swapaxes(-1, -2))                    # (..., TQ, TK), fresh and contiguous
        pd, _ = softmax_forward(ctx, s, TQ, TK, causal, scale, dropout_p, rng)
        ctx.q, ctx.k, ctx.v, ctx.p, ctx.pd = q, k, v, s, pd
        return cp.matmul(pd, v)

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return ScaledDotProductAttention.backward(ctx, dout)
        if ctx.flash:
            dout, grads = cp.ascontiguousarray(dout), [cp.empty_like(a) for a in ctx.qkv]
            work = cp.empty(ctx.y.size, dtype=ctx.lse.dtype)   # dQ's sums (with FUSED_DQ)
            flash_attention.backward(ctx.layout, *(a.data.ptr for a in ctx.qkv), ctx.y.data.ptr, dout.data.ptr,
                                     ctx.lse.data.ptr, cp.empty_like(ctx.lse).data.ptr, *(g.data.ptr for g in grads),
                                     ctx.causal, ctx.scale, ctx.seed, ctx.drop_p, work.data.ptr, ctx.seed_ptr)
            return (*grads, None)
        q, k, v, p = ctx.q, ctx.k, ctx.v, ctx.p
        need = ctx.needs_input_grad
        # dv = Pd^T dO, dP = (dO V^T) * M, dS = P * (dP - rowsum(dP * P)) * scale, dq = dS K, dk = dS^T Q
        dv = cp.matmul(ctx.pd.swapaxes(-1, -2), dout) if need[2] else None
        ds = cp.matmul(dout, v.swapaxes(-1, -2))
        softmax_backward(ctx, p, ds, ds.shape[-2], ds.shape[-1])
        dq = cp.matmul(ds, k) if need[0] else None
        dk = cp.matmul(ds.swapaxes(-1, -2), q) if need[1] else None
        return dq, dk, dv, None


# Causal: the queries in ROW_BLOCKS blocks, each multiplied only with the keys it can see (2 blocks: 3/4 of
# the flops). With all heads in one call (gemm_heads) 2 blocks measured best; with a call per head the
# halved products ran less efficiently than the flops they saved (benchmarks/RESULTS.md).
ROW_BLOCKS = 2


def _blocks(T, causal):
    """[(r0, r1)]: query rows [r0, r1) see keys [0, r1) when causal (keys [0, T) when not); causally the
    keys [r0, r1) are seen only by the rows [r0, T). Every r0 is a multiple of 8, so a block's first element
    of a (T, T) array starts 16 bytes into it times a whole number (bf16 or wider): cuBLAS's pointer-array
    batched GEMM cannot see the pointers' alignment, and a bf16 block starting 4 bytes off (T=150: row 75)
    was seen failing with a misaligned address on the H200."""
    if not causal:
        return [(0, T)]
    size = -(-T // ROW_BLOCKS)
    size = -(-size // 8) * 8
    return [(r0, min(r0 + size, T)) for r0 in range(0, T, size)]


class SelfAttentionCuda:
    """functional.SelfAttention on the packed (B, T, 3C) qkv without unpacking it.

    The reference copies qkv into (3, B, NH, T, HS) and merges the output heads with another copy (and
    backward two more). Here each product is one cuBLAS pointer-array batched GEMM over every (batch, head)
    pair (gemm_heads) that reads q, k, v as strided column blocks of qkv (row stride 3C) and writes the
    output, and dq, dk, dv, straight into their columns of y (B, T, C) and dqkv (B, T, 3C): no copies. Causal: the query rows
    go in ROW_BLOCKS blocks, and a block multiplies only the keys it can see (the softmax passes zero
    the rest of its rows), so the products do 3/4 of the full flops. The scores are (B, NH, T, T) as in
    ScaledDotProductAttentionCuda, with the same softmax passes, so attention dropout draws the same mask from
    the same seed.

    Kept for backward (SAVE): with "lse" qkv and the rows' log-sum-exp (B*NH*T values); the scores array
    is freed when forward returns, and backward multiplies S again into a transient array that its softmax
    pass turns into Pd while it turns dPd into dS. With "p" qkv and P; with "p+pd" qkv, P and Pd.
    """

    @staticmethod
    def forward(ctx, qkv, n_head, causal=True, scale=1.0, dropout_p=0.0, rng=None):
        ctx.reference = not served(qkv) or dropout_p == 1
        if ctx.reference:
            return SelfAttention.forward(ctx, qkv, n_head, causal=causal, scale=scale, dropout_p=dropout_p, rng=rng)
        qkv = cp.ascontiguousarray(qkv)
        B, T, C3 = qkv.shape
        C, NH = C3 // 3, n_head
        HS = C // NH
        flash = use_flash(B, NH, T, HS, qkv.dtype)
        ctx.mma = flash_mma.float32_kind(qkv, NH, flash)
        if ctx.mma:   # on the tensor cores, no (T, T) array (flash_mma.py)
            _draw_seed(ctx, causal, scale, dropout_p, rng)
            y, ctx.lse = flash_mma.self_attention_forward(qkv, NH, causal, scale, ctx.seed, dropout_p, ctx.seed_ptr,
                                                          kind=ctx.mma)
            ctx.qkv, ctx.y, ctx.n_head, ctx.flash = qkv, y, NH, False
            return y
        ctx.flash = flash
        if ctx.flash:
            _draw_seed(ctx, causal, scale, dropout_p, rng)
            y, ctx.lse = flash_attention.self_attention_forward(qkv, NH, causal, scale, ctx.seed, dropout_p,
                                                                seed_ptr=ctx.seed_ptr)
            ctx.qkv, ctx.y, ctx.n_head = qkv, y, NH
            return y
        dtype, size = qkv.dtype, qkv.dtype.itemsize
        s = cp.empty((B, NH, T, T), dtype=dtype)
        y = cp.empty((B, T, C), dtype=dtype)
        # strides (elements): qkv (B, T, 3C) batch T*3C, head HS; scores (B, NH, T, T) batch NH*T*T, head T*T;
        # y (B, T, C) batch T*C, head HS
        q0, s0, blocks = qkv.data.ptr, s.data.ptr, _blocks(T, causal)
        qs, ss, ys = (T * C3, HS), (NH * T * T, T * T), (T * C, HS)
        for r0, r1 in blocks:   # S[b, h, r0:r1, :kend] = Q[b, h, r0:r1] K[b, h, :kend]^T
            kend = r1 if causal else T
            gemm_heads(dtype, B, NH, r1 - r0, kend, HS, q0 + r0 * C3 * size, C3, *qs, q0 + C * size, C3, *qs,
                        s0 + r0 * T * size, T, *ss, trans_b=True)
        ctx.save = save_mode()
        pd, lse = softmax_forward(ctx, s, T, T, causal, scale, dropout_p, rng, keep_p=ctx.save != "lse")
        for r0, r1 in blocks:   # Y[b, r0:r1, h] = Pd[b, h, r0:r1, :kend] V[b, h, :kend]
            kend = r1 if causal else T
            gemm_heads(dtype, B, NH, r1 - r0, HS, kend, pd.data.ptr + r0 * T * size, T, *ss, q0 + 2 * C * size, C3,
                        *qs, y.data.ptr + r0 * C * size, C, *ys)
        ctx.qkv, ctx.n_head = qkv, NH
        if ctx.save == "lse":
            ctx.lse = lse
        else:
            ctx.p, ctx.pd = s, (pd if ctx.save == "p+pd" else None)
        return y

    @staticmethod
    def _scores(ctx, qkv, s, B, NH, T, C, HS):
        """s = Q K^T again (the forward's products on the same blocks)."""
        C3, dtype, size = 3 * C, qkv.dtype, qkv.dtype.itemsize
        q0, s0, qs, ss = qkv.data.ptr, s.data.ptr, (T * C3, HS), (NH * T * T, T * T)
        for r0, r1 in _blocks(T, ctx.causal):
            kend = r1 if ctx.causal else T
            gemm_heads(dtype, B, NH, r1 - r0, kend, HS, q0 + r0 * C3 * size, C3, *qs, q0 + C * size, C3, *qs,
                       s0 + r0 * T * size, T, *ss, trans_b=True)

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return SelfAttention.backward(ctx, dout)
        if ctx.mma:
            return flash_mma.self_attention_backward(ctx.qkv, ctx.y, ctx.lse, cp.ascontiguousarray(dout), ctx.n_head,
                                                     ctx.causal, ctx.scale, ctx.seed, ctx.drop_p, ctx.seed_ptr,
                                                     kind=ctx.mma)
        if ctx.flash:
            return flash_attention.self_attention_backward(ctx.qkv, ctx.y, ctx.lse, cp.ascontiguousarray(dout), ctx.n_head,
                                                           ctx.causal, ctx.scale, ctx.seed, ctx.drop_p,
                                                           seed_ptr=ctx.seed_ptr)
        qkv, NH, causal = ctx.qkv, ctx.n_head, ctx.causal
        dout = cp.ascontiguousarray(dout)
        B, T, C3 = qkv.shape
        C = C3 // 3
        HS = C // NH
        dtype, size = qkv.dtype, qkv.dtype.itemsize
        q0, d0 = qkv.data.ptr, dout.data.ptr
        dqkv = cp.empty_like(qkv)
        ds = cp.empty((B, NH, T, T), dtype=dtype)
        g0, ds0, blocks = dqkv.data.ptr, ds.data.ptr, _blocks(T, causal)
        qs, ss, ys = (T * C3, HS), (NH * T * T, T * T), (T * C, HS)

        def dv(pd):   # causal: keys [k0, k1) are seen only by rows [k0, T), so dV of that key block sums over those
            for k0, k1 in blocks:
                first = k0 if causal else 0
                gemm_heads(dtype, B, NH, k1 - k0, HS, T - first, pd.data.ptr + (first * T + k0) * size, T, *ss,
                           d0 + first * C * size, C, *ys, g0 + (k0 * C3 + 2 * C) * size, C3, *qs, trans_a=True)

        def dpd():
            for r0, r1 in blocks:
                kend = r1 if causal else T
                gemm_heads(dtype, B, NH, r1 - r0, kend, HS, d0 + r0 * C * size, C, *ys, q0 + 2 * C * size, C3, *qs,
                           ds0 + r0 * T * size, T, *ss, trans_b=True)

        # dv = Pd^T dO, dP = (dO V^T) * M, dS = P * (dP - rowsum(dP * P)) * scale, dq = dS K, dk = dS^T Q
        if ctx.save == "lse":   # S again; one pass: S -> Pd (P = exp(S scale - lse)), dPd -> dS
            s = cp.empty_like(ds)
            SelfAttentionCuda._scores(ctx, qkv, s, B, NH, T, C, HS)
            dpd()
            softmax_backward_lse(ctx, s, ctx.lse, ds, T, T)
            dv(s)
            del s
        else:                   # Pd kept, or drawn again from P into ds before dPd overwrites it
            p = ctx.p
            dv(ctx.pd if ctx.save == "p+pd" else dropout_probs(ctx, p, ds))
            dpd()
            softmax_backward(ctx, p, ds, T, T)
        for r0, r1 in blocks:
            kend = r1 if causal else T
            gemm_heads(dtype, B, NH, r1 - r0, HS, kend, ds0 + r0 * T * size, T, *ss, q0 + C * size, C3, *qs,
                        g0 + r0 * C3 * size, C3, *qs)                                                        # dQ
        for k0, k1 in blocks:
            first = k0 if causal else 0
            gemm_heads(dtype, B, NH, k1 - k0, HS, T - first, ds0 + (first * T + k0) * size, T, *ss,
                        q0 + first * C3 * size, C3, *qs, g0 + (k0 * C3 + C) * size, C3, *qs, trans_a=True)   # dK
        return dqkv
