"""LayerNorm on CUDA arrays, one warp a row (op: functional.LayerNorm): forward normalises and applies
w, b in one pass; backward forms dx in one pass and dw, db from per-block partial sums, added up
without atomics (deterministic).
"""
import cupy as cp
import numpy as np

from ...functional import LayerNorm
from .runtime import Source, served, warp_rows_launch

_SOURCE = Source(r"""
// x: (N, C) -> out (N, C), mean (N,), rstd (N,). w, b may be absent (has_w, has_b = 0). One warp a row.
template<typename T>
__global__ void layer_norm_forward(const T* x, const T* w, const T* b, T* out, T* mean, T* rstd,
                                   long long N, int C, T eps, int has_w, int has_b) {
    long long r = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= N) return;
    const T* xr = x + r * C;
    T sum = 0;
    for (int c = lane; c < C; c += 32) sum += xr[c];
    T mu = warp_sum(sum) / C;
    T sq = 0;
    for (int c = lane; c < C; c += 32) { T d = xr[c] - mu; sq += d * d; }
    T rs = 1 / sqrt(warp_sum(sq) / C + eps);
    T* o = out + r * C;
    for (int c = lane; c < C; c += 32) {
        T y = (xr[c] - mu) * rs;
        if (has_w) y = y * w[c];
        if (has_b) y = y + b[c];
        o[c] = y;
    }
    if (lane == 0) { mean[r] = mu; rstd[r] = rs; }
}

// dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dout w. Each block (WARPS warps) takes
// rows_per_block rows and writes its partial column sums of dout xhat and dout to dw_part/db_part
// (nblocks, C); the caller sums those over blocks (deterministic: no atomics).
template<typename T>
__global__ void layer_norm_backward(const T* dout, const T* x, const T* w, const T* mean, const T* rstd,
                                    T* dx, T* dw_part, T* db_part, long long N, int C, int rows_per_block,
                                    int has_w, int need_dx) {
    extern __shared__ unsigned char smem_raw[];
    T* acc = reinterpret_cast<T*>(smem_raw);          // (warps, 2, C)
    int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    T* acc_w = acc + (long long)warp * 2 * C;
    T* acc_b = acc_w + C;
    for (int c = lane; c < C; c += 32) { acc_w[c] = 0; acc_b[c] = 0; }
    long long first = (long long)blockIdx.x * rows_per_block;
    long long last = min(first + rows_per_block, N);
    for (long long r = first + warp; r < last; r += warps) {
        const T* g = dout + r * C;
        const T* xr = x + r * C;
        T mu = mean[r], rs = rstd[r];
        T s1 = 0, s2 = 0;
        for (int c = lane; c < C; c += 32) {
            T xhat = (xr[c] - mu) * rs;
            T dxhat = has_w ? g[c] * w[c] : g[c];
            s1 += dxhat; s2 += dxhat * xhat;
            acc_w[c] += g[c] * xhat;
            acc_b[c] += g[c];
        }
        if (need_dx) {
            T m1 = warp_sum(s1) / C, m2 = warp_sum(s2) / C;
            T* d = dx + r * C;
            for (int c = lane; c < C; c += 32) {
                T xhat = (xr[c] - mu) * rs;
                T dxhat = has_w ? g[c] * w[c] : g[c];
                d[c] = rs * (dxhat - m1 - xhat * m2);
            }
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        T sw = 0, sb = 0;
        for (int k = 0; k < warps; k++) { sw += acc[(long long)k * 2 * C + c]; sb += acc[(long long)k * 2 * C + C + c]; }
        dw_part[(long long)blockIdx.x * C + c] = sw;
        db_part[(long long)blockIdx.x * C + c] = sb;
    }
}
""", ["layer_norm_forward", "layer_norm_backward"])

_LN_WARPS = 4
_LN_ROWS_PER_BLOCK = 64


class LayerNormCuda:
    """LayerNorm over the last axis: one fused pass forward, one backward (+ a sum of per-block partials)."""

    @staticmethod
    def forward(ctx, x, w=None, b=None, eps=1e-5):
        C = x.shape[-1]
        smem = _LN_WARPS * 2 * C * x.dtype.itemsize
        ctx.reference = not served(x, w, b) or smem > 48 * 1024
        if ctx.reference:
            return LayerNorm.forward(ctx, x, w, b, eps=eps)
        x = cp.ascontiguousarray(x)
        N = x.size // C
        out = cp.empty_like(x)
        mean = cp.empty(N, dtype=x.dtype)
        rstd = cp.empty(N, dtype=x.dtype)
        dummy = x  # stands for an absent w or b (never read)
        grid, block = warp_rows_launch(N)
        _SOURCE("layer_norm_forward", x.dtype)(grid, block, (x, dummy if w is None else w, dummy if b is None else b,
                                                             out, mean, rstd, np.int64(N), np.int32(C), x.dtype.type(eps),
                                                             np.int32(w is not None), np.int32(b is not None)))
        ctx.x, ctx.w, ctx.mean, ctx.rstd, ctx.has_b = x, w, mean, rstd, b is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return LayerNorm.backward(ctx, dout)
        x, w = ctx.x, ctx.w
        C = x.shape[-1]
        N = x.size // C
        dout = cp.ascontiguousarray(dout)
        need = ctx.needs_input_grad
        blocks = -(-N // _LN_ROWS_PER_BLOCK)
        dx = cp.empty_like(x) if need[0] else x  # x stands in when dx is not wanted (never written)
        dw_part = cp.empty((blocks, C), dtype=x.dtype)
        db_part = cp.empty((blocks, C), dtype=x.dtype)
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dw = sum(dout * xhat),  db = sum(dout)
        _SOURCE("layer_norm_backward", x.dtype)(
            (blocks,), (32 * _LN_WARPS,),
            (dout, x, x if w is None else w, ctx.mean, ctx.rstd, dx, dw_part, db_part, np.int64(N), np.int32(C),
             np.int32(_LN_ROWS_PER_BLOCK), np.int32(w is not None), np.int32(bool(need[0]))),
            shared_mem=_LN_WARPS * 2 * C * x.dtype.itemsize)
        dw = dw_part.sum(axis=0) if w is not None and need[1] else None
        db = db_part.sum(axis=0) if ctx.has_b and need[2] else None
        return (dx if need[0] else None), dw, db
