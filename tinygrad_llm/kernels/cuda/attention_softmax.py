"""The masked-softmax passes of attention's cuBLAS path (kernels/cuda/attention.py), one warp a row: forward
over the raw scores (P or Pd in place, each row's log-sum-exp), and the backward passes: from a kept P, from
the scores recomputed with the log-sum-exp (attention.SAVE "lse"), and Pd drawn again from P ("p").

Attention dropout hashes (seed, element) into the mask (runtime.HEADER's dropout_keep), so every pass draws the
forward's mask again from its seed.
"""
import cupy as cp
import numpy as np

from .runtime import Source, dropout_seed_args, warp_rows_launch

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


def softmax_forward(ctx, s, TQ, TK, causal, scale, dropout_p, rng, keep_p=True):
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


def softmax_backward(ctx, p, ds, TQ, TK):
    """ds (..., TQ, TK) = dPd, overwritten by dS * scale (the forward's mask recomputed from its seed)."""
    rows = ds.size // TK
    grid, block = warp_rows_launch(rows)
    _SOURCE("attention_softmax_backward", ds.dtype)(grid, block, (p, ds, np.int64(rows), np.int32(TQ), np.int32(TK),
                                                                  np.int32(TK - TQ if ctx.causal else TK),
                                                                  ds.dtype.type(ctx.scale), ctx.seed_ptr, ctx.seed, ctx.drop_p,
                                                                  ctx.drop_scale, ctx.has_drop))


def softmax_backward_lse(ctx, s, lse, ds, TQ, TK):
    """s (..., TQ, TK) = the raw scores again, overwritten by Pd; ds = dPd, overwritten by dS * scale;
    lse: the forward's (softmax_forward)."""
    rows = ds.size // TK
    grid, block = warp_rows_launch(rows)
    _SOURCE("attention_softmax_backward_lse", ds.dtype)(grid, block, (s, lse, ds, np.int64(rows), np.int32(TQ),
                                                                      np.int32(TK), np.int32(TK - TQ if ctx.causal else TK),
                                                                      ds.dtype.type(ctx.scale), ctx.seed_ptr, ctx.seed,
                                                                      ctx.drop_p, ctx.drop_scale, ctx.has_drop))


def dropout_probs(ctx, p, out):
    """out = Pd = P * M (the forward's mask from its seed); P itself (out untouched) without dropout."""
    if not ctx.has_drop:
        return p
    blocks = max(1, min(-(-p.size // 256), 132 * 16))
    _SOURCE("attention_dropout_probs", p.dtype)((blocks,), (256,), (p, out, np.int64(p.size), ctx.seed_ptr, ctx.seed,
                                                                  ctx.drop_p, ctx.drop_scale))
    return out
