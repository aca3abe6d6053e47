"""Attention on CUDA arrays: cuBLAS products around one fused masked-softmax pass each way (ops:
functional.ScaledDotProductAttention, and SelfAttention on the packed (B, T, 3C) qkv without unpacking).

Two paths (use_flash picks): cuBLAS products around the softmax passes below (fastest at short T), and
flash_attention.py, keeping only the output and each row's log-sum-exp and recomputing the probabilities in
backward tile by tile (memory linear in T; used from long T on).

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
from . import flash_attention
from .cublas import gemm_heads
from .runtime import Source, dropout_seed_args, served, warp_rows_launch

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
    """The flash path's attributes; the seed drawn as _softmax_forward draws it (a device seed in a step)."""
    ctx.causal, ctx.scale, ctx.drop_p, (ctx.seed_ptr, ctx.seed) = causal, scale, dropout_p, (
        dropout_seed_args(rng) if dropout_p > 0 else (np.uint64(0), np.uint64(0)))

# C: one row of the backward pass from lse (also compiled by mixed.py, for bf16 outputs)
LSE_BACKWARD_ROW = r"""
// The backward pass when the forward kept only lse (SAVE "lse"), row r. s: the raw scores q k^T again (only
// the keys j < n of each row are read: the causal products leave the rest unwritten); dp: dO V^T (= dPd).
// Writes pd = Pd = P * M (P without dropout) and ds = dS * scale as in attention_softmax_backward, both 0
// beyond n, through store() (O = T: in place over s and dp; mixed.py: bf16 bits). P = exp(s scale - lse) is
// the forward's softmax (lse = m + log(sum)), computed twice a row (for the row's dot, then for the writes)
// rather than stored; so is the mask's hash.
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
template<typename T, typename O>
__device__ __forceinline__ void lse_backward_row(const T* s, const T* lse, const T* dp, O* pd, O* ds, long long r,
                                                 int lane, int TQ, int TK, int offset, T scale,
                                                 unsigned long long seed, float drop_p, T drop_scale, int has_drop) {
    const T* srow = s + r * TK;
    const T* drow = dp + r * TK;
    O* prow = pd + r * TK;
    O* dsrow = ds + r * TK;
    int n = max(0, min(TK, (int)(r % TQ) + offset + 1));
    T l = n > 0 ? lse[r] : (T)0, keep_scale = has_drop ? drop_scale : (T)1;
    T dot = 0;
    for (int j = lane; j < n; j += 32) {
        bool keep = !has_drop || dropout_keep(seed, r * TK + j, drop_p);
        if (keep) dot += exp(srow[j] * scale - l) * drow[j] * keep_scale;
    }
    dot = warp_sum(dot);
    for (int j = lane; j < n; j += 32) {
        bool keep = !has_drop || dropout_keep(seed, r * TK + j, drop_p);
        T pj = exp(srow[j] * scale - l);
        T d = keep ? drow[j] * keep_scale : (T)0;
        store(prow + j, keep ? pj * keep_scale : (T)0);
        store(dsrow + j, pj * (d - dot) * scale);
    }
    for (int j = n + lane; j < TK; j += 32) { store(prow + j, (T)0); store(dsrow + j, (T)0); }
}
"""

_SOURCE = Source(r"""
// s: (rows, TK) raw scores q k^T, overwritten by P; lse: (rows,). Row r is query i = r % TQ, which
// sees keys j < min(TK, i + offset + 1) (offset = TK - TQ when causal, TK when not). One warp a row.
// With has_drop, pd (rows, TK) also gets P * M, M = keep(seed, r TK + j) / (1 - drop_p) (attention dropout).
template<typename T>
__global__ void attention_softmax_forward(T* s, T* lse, long long rows, int TQ, int TK, int offset, T scale,
                                          T* pd, const unsigned long long* seed_ptr, unsigned long long seed,
                                          float drop_p, T drop_scale, int has_drop) {
    long long r = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    T* row = s + r * TK;
    T* drow = pd + r * TK;
    int n = min(TK, (int)(r % TQ) + offset + 1);
    if (has_drop) seed = dropout_seed(seed_ptr, seed);
    if (n <= 0) {  // a query with no allowed key: zeros (as the reference)
        for (int j = lane; j < TK; j += 32) { row[j] = 0; if (has_drop) drow[j] = 0; }
        if (lane == 0) lse[r] = NEG_INF;
        return;
    }
    T m = NEG_INF;
    for (int j = lane; j < n; j += 32) m = max(m, row[j] * scale);
    m = warp_max(m);
    T total = 0;
    for (int j = lane; j < n; j += 32) { T e = exp(row[j] * scale - m); row[j] = e; total += e; }
    total = warp_sum(total);
    for (int j = lane; j < n; j += 32) {
        T pj = row[j] / total;
        row[j] = pj;
        if (has_drop) drow[j] = dropout_keep(seed, r * TK + j, drop_p) ? pj * drop_scale : (T)0;
    }
    for (int j = n + lane; j < TK; j += 32) { row[j] = 0; if (has_drop) drow[j] = 0; }
    if (lane == 0) lse[r] = m + log(total);
}

// p: probabilities (rows, TK); dp: dO V^T (= dPd), overwritten by dS * scale = P (dP - rowsum(P dP)) scale,
// where dP = dPd * M with has_drop (the forward's mask, recomputed from its seed), else dPd.
// Only the keys j < n that row r may see are read (P is 0 beyond them, and the products may have left
// dp unwritten there: SelfAttentionCuda skips the causal upper blocks); dS is 0 beyond them.
template<typename T>
__global__ void attention_softmax_backward(const T* p, T* dp, long long rows, int TQ, int TK, int offset, T scale,
                                           const unsigned long long* seed_ptr, unsigned long long seed,
                                           float drop_p, T drop_scale, int has_drop) {
    long long r = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const T* prow = p + r * TK;
    T* drow = dp + r * TK;
    int n = max(0, min(TK, (int)(r % TQ) + offset + 1));
    if (has_drop) seed = dropout_seed(seed_ptr, seed);
    T dot = 0;
    for (int j = lane; j < n; j += 32) {
        T d = drow[j];
        if (has_drop) { d = dropout_keep(seed, r * TK + j, drop_p) ? d * drop_scale : (T)0; drow[j] = d; }
        dot += prow[j] * d;
    }
    dot = warp_sum(dot);
    for (int j = lane; j < n; j += 32) drow[j] = prow[j] * (drow[j] - dot) * scale;
    for (int j = n + lane; j < TK; j += 32) drow[j] = 0;
}

""" + LSE_BACKWARD_ROW + r"""
// s overwritten by Pd, dp by dS * scale (lse_backward_row in place). One warp a row.
template<typename T>
__global__ void attention_softmax_backward_lse(T* s, const T* lse, T* dp, long long rows, int TQ, int TK,
                                               int offset, T scale, const unsigned long long* seed_ptr,
                                               unsigned long long seed, float drop_p, T drop_scale, int has_drop) {
    long long r = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    if (r >= rows) return;
    if (has_drop) seed = dropout_seed(seed_ptr, seed);
    lse_backward_row(s, lse, dp, s, dp, r, threadIdx.x & 31, TQ, TK, offset, scale, seed, drop_p, drop_scale, has_drop);
}

// Pd = P * M (SAVE "p"): the forward's dropped probabilities again from P (n elements) and the seed
// (element i of P is element i of the hash's index, as in attention_softmax_forward).
template<typename T>
__global__ void attention_dropout_probs(const T* p, T* pd, long long n, const unsigned long long* seed_ptr,
                                        unsigned long long seed, float drop_p, T drop_scale) {
    seed = dropout_seed(seed_ptr, seed);
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride)
        pd[i] = dropout_keep(seed, i, drop_p) ? p[i] * drop_scale : (T)0;
}
""", ["attention_softmax_forward", "attention_softmax_backward", "attention_softmax_backward_lse",
      "attention_dropout_probs"])


def _softmax_forward(ctx, s, TQ, TK, causal, scale, dropout_p, rng, keep_p=True):
    """The masked-softmax pass over the raw scores s (..., TQ, TK), in place; returns (Pd, lse): Pd the
    dropped probabilities (P itself without dropout), lse (rows,) each row's log-sum-exp of the scaled
    scores. keep_p: s becomes P and Pd is a new array (with dropout); else s becomes Pd (P is lost). Keeps
    in ctx what the backward passes need: scale, causal, the dropout seed."""
    T = s.dtype.type
    ctx.scale, ctx.causal = scale, causal
    ctx.drop_p, ctx.drop_scale = np.float32(dropout_p), T(1 / (1 - dropout_p))
    ctx.has_drop = np.int32(dropout_p > 0)
    # a draw of rng, or the step's device seed
    ctx.seed_ptr, ctx.seed = dropout_seed_args(rng) if dropout_p > 0 else (np.uint64(0), np.uint64(0))
    pd = cp.empty_like(s) if dropout_p > 0 and keep_p else s
    rows = s.size // TK
    lse = cp.empty(rows, dtype=s.dtype)
    grid, block = warp_rows_launch(rows)
    _SOURCE("attention_softmax_forward", s.dtype)(grid, block, (s, lse, np.int64(rows), np.int32(TQ), np.int32(TK),
                                                                np.int32(TK - TQ if causal else TK), T(scale), pd,
                                                                ctx.seed_ptr, ctx.seed, ctx.drop_p, ctx.drop_scale, ctx.has_drop))
    return pd, lse


def _softmax_backward(ctx, p, ds, TQ, TK):
    """ds (..., TQ, TK) = dPd, overwritten by dS * scale (the forward's mask recomputed from its seed)."""
    rows = ds.size // TK
    grid, block = warp_rows_launch(rows)
    _SOURCE("attention_softmax_backward", ds.dtype)(grid, block, (p, ds, np.int64(rows), np.int32(TQ), np.int32(TK),
                                                                  np.int32(TK - TQ if ctx.causal else TK),
                                                                  ds.dtype.type(ctx.scale), ctx.seed_ptr, ctx.seed, ctx.drop_p,
                                                                  ctx.drop_scale, ctx.has_drop))


def _softmax_backward_lse(ctx, s, lse, ds, TQ, TK):
    """s (..., TQ, TK) = the raw scores again, overwritten by Pd; ds = dPd, overwritten by dS * scale;
    lse: the forward's (_softmax_forward)."""
    rows = ds.size // TK
    grid, block = warp_rows_launch(rows)
    _SOURCE("attention_softmax_backward_lse", ds.dtype)(grid, block, (s, lse, ds, np.int64(rows), np.int32(TQ),
                                                                      np.int32(TK), np.int32(TK - TQ if ctx.causal else TK),
                                                                      ds.dtype.type(ctx.scale), ctx.seed_ptr, ctx.seed,
                                                                      ctx.drop_p, ctx.drop_scale, ctx.has_drop))


def _dropout_probs(ctx, p, out):
    """out = Pd = P * M (the forward's mask from its seed); P itself (out untouched) without dropout."""
    if not ctx.has_drop:
        return p
    blocks = max(1, min(-(-p.size // 256), 132 * 16))
    _SOURCE("attention_dropout_probs", p.dtype)((blocks,), (256,), (p, out, np.int64(p.size), ctx.seed_ptr, ctx.seed,
                                                                  ctx.drop_p, ctx.drop_scale))
    return out


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
        pd, _ = _softmax_forward(ctx, s, TQ, TK, causal, scale, dropout_p, rng)
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
        _softmax_backward(ctx, p, ds, ds.shape[-2], ds.shape[-1])
        dq = cp.matmul(ds, k) if need[0] else None
        dk = cp.matmul(ds.swapaxes(-1, -2), q) if need[1] else None
        return dq, dk, dv, None


# Causal: the queries in ROW_BLOCKS blocks, each multiplied only with the keys it can see (2 blocks: 3/4 of
# the flops). With all heads in one call (gemm_heads) 2 blocks measured best; with a call per head the
# halved products ran less efficiently than the flops they saved (benchmarks/RESULTS.md).
ROW_BLOCKS = 2


def _blocks(T, causal):
    """[(r0, r1)]: query rows [r0, r1) see keys [0, r1) when causal (keys [0, T) when not); causally the
    keys [r0, r1) are seen only by the rows [r0, T)."""
    if not causal:
        return [(0, T)]
    size = -(-T // ROW_BLOCKS)
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
        ctx.flash = use_flash(B, NH, T, HS, qkv.dtype)
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
        pd, lse = _softmax_forward(ctx, s, T, T, causal, scale, dropout_p, rng, keep_p=ctx.save != "lse")
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
            _softmax_backward_lse(ctx, s, ctx.lse, ds, T, T)
            dv(s)
            del s
        else:                   # Pd kept, or drawn again from P into ds before dPd overwrites it
            p = ctx.p
            dv(ctx.pd if ctx.save == "p+pd" else _dropout_probs(ctx, p, ds))
            dpd()
            _softmax_backward(ctx, p, ds, T, T)
        for r0, r1 in blocks:
            kend = r1 if causal else T
            gemm_heads(dtype, B, NH, r1 - r0, HS, kend, ds0 + r0 * T * size, T, *ss, q0 + C * size, C3, *qs,
                        g0 + r0 * C3 * size, C3, *qs)                                                        # dQ
        for k0, k1 in blocks:
            first = k0 if causal else 0
            gemm_heads(dtype, B, NH, k1 - k0, HS, T - first, ds0 + (first * T + k0) * size, T, *ss,
                        q0 + first * C3 * size, C3, *qs, g0 + (k0 * C3 + C) * size, C3, *qs, trans_a=True)   # dK
        return dqkv
