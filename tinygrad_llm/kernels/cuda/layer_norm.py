"""LayerNorm on CUDA arrays, one warp a row (op: functional.LayerNorm): forward normalises and applies
w, b in one pass; backward reads x and dout once (each lane keeps its columns of the row in registers),
writes dx, and sums dw, db over its rows in registers: per-block partials, added up by columns.column_sums
without atomics (deterministic). Rows wider than 1024 take the op's own path.

x's gradient usually meets the residual stream's there (a block's input feeds both its LayerNorm and the
residual sum): backward takes the gradient already pending at x (tensor.Function: sums_pending) and writes
dx + pending, one more read in the pass that writes dx instead of the autograd's separate add (a read of
both, a write, a launch). The add is rounded on its own, never fused with the product before it, so the sum
has the separate add's bits.
"""
import cupy as cp
import numpy as np

from ...functional import LayerNorm
from .columns import column_sums, vector
from .runtime import Source, served, warp_rows_launch

_LN_SLOTS = (1, 2, 4, 8, 12, 16, 24, 32)   # backward's V instances: columns a lane holds (C <= 32 V)
_LN_VEC_SLOTS = (1, 2, 3, 4, 6, 8, 12, 16)   # with 16-byte lanes: C <= 32 V W (W = 4 float32, 2 float64)

_SOURCE = Source(r"""
// x: (N, C) -> out (N, C), mean (N,), rstd (N,); ob (N, C), unless null: bf16(out)'s bits (bf16 autocast: the
// operand of the product that reads out). w, b may be absent (has_w, has_b = 0). One warp a row.
template<typename T>
__global__ void layer_norm_forward(const T* x, const T* w, const T* b, T* out, T* mean, T* rstd,
                                   unsigned short* ob, long long N, int C, T eps, int has_w, int has_b) {
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
        if (ob) ob[r * C + c] = f32_to_bf16((float)y);
    }
    if (lane == 0) { mean[r] = mu; rstd[r] = rs; }
}

// dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) (+ res, unless null), dxhat = dout w. One warp a row, lane
// l holding, in registers, W neighbouring columns from (l + 32 k) W on (k < V; C <= 32 V W; W = 16 / sizeof(T) with
// VEC: 16-byte loads and stores, rows 16-byte aligned and C a multiple of W; else 1): x and dout are read once, dx
// written once. Each warp sums dout xhat and dout over its rows in registers; the block adds its warps' sums in a
// fixed order and writes them to part[blockIdx.x] = (dw partial (C), db partial (C)); columns.column_sums adds the
// blocks'. dx is computed with runtime.HEADER's *_rn operations, so the kernel's copies with and without res
// compute the same bits before the residual's add (add_rn: the separate add's bits).
// float32 rows of which a lane holds at most 48 bytes (C = 384) run three blocks a multiprocessor (at most 80
// registers: 96 unbounded left room for two; C = 384's instance then spills 16 bytes, and still ran 0.112 -> 0.084
// ms for (16384, 384) with the residual on an H200). Wider rows, and float64, would spill more and keep two.
template<typename T, int V, bool VEC>
__global__ void __launch_bounds__(256, sizeof(T) == 4 && (VEC ? 16 * V : 4 * V) <= 48 ? 3 : 1)
layer_norm_backward(const T* __restrict__ dout, const T* __restrict__ x, const T* __restrict__ w, const T* mean,
                    const T* rstd, const T* res, T* __restrict__ dx, T* __restrict__ part, long long N, int C,
                    int has_w, int need_dx) {
    constexpr int W = VEC ? 16 / sizeof(T) : 1;
    extern __shared__ unsigned char smem_raw[];
    T* red = reinterpret_cast<T*>(smem_raw);            // (2, C)
    int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    T aw[V][W], ab[V][W], wv[V][W];
    #pragma unroll
    for (int k = 0; k < V; k++) {
        int c0 = (lane + 32 * k) * W;
        #pragma unroll
        for (int e = 0; e < W; e++) { aw[k][e] = 0; ab[k][e] = 0; wv[k][e] = (T)1; }
        if (has_w && c0 < C) load_lanes<W>(w + c0, wv[k]);
    }
    for (long long r = (long long)blockIdx.x * warps + warp; r < N; r += (long long)gridDim.x * warps) {
        T xh[V][W], g[V][W];
        T mu = mean[r], rs = rstd[r], s1 = 0, s2 = 0;
        #pragma unroll
        for (int k = 0; k < V; k++) {
            int c0 = (lane + 32 * k) * W;
            #pragma unroll
            for (int e = 0; e < W; e++) { xh[k][e] = 0; g[k][e] = 0; }
            if (c0 < C) { load_lanes<W>(x + r * C + c0, xh[k]); load_lanes<W>(dout + r * C + c0, g[k]); }
            #pragma unroll
            for (int e = 0; e < W; e++) {
                if (c0 < C) xh[k][e] = (xh[k][e] - mu) * rs;
                T dxhat = g[k][e] * wv[k][e];
                s1 += dxhat; s2 += dxhat * xh[k][e];
                aw[k][e] += g[k][e] * xh[k][e]; ab[k][e] += g[k][e];
            }
        }
        if (need_dx) {
            T m1 = warp_sum(s1) / C, m2 = warp_sum(s2) / C;
            #pragma unroll
            for (int k = 0; k < V; k++) {
                int c0 = (lane + 32 * k) * W;
                if (c0 >= C) continue;
                T d[W], rv[W];
                if (res) load_lanes<W>(res + r * C + c0, rv);
                #pragma unroll
                for (int e = 0; e < W; e++) {
                    d[e] = mul_rn(rs, fma_rn(-xh[k][e], m2, fma_rn(g[k][e], wv[k][e], -m1)));   // as written
                    if (res) d[e] = add_rn(d[e], rv[e]);
                }
                store_lanes<W>(dx + r * C + c0, d);
            }
        }
    }
    for (int i = 0; i < warps; i++) {   // warp 0's sums, then warp 1's added, ...: a fixed order
        if (warp == i) {
            #pragma unroll
            for (int k = 0; k < V; k++) {
                int c0 = (lane + 32 * k) * W;
                #pragma unroll
                for (int e = 0; e < W; e++) {
                    int c = c0 + e;
                    if (c >= C) continue;
                    red[c] = (i ? red[c] : (T)0) + aw[k][e];
                    red[C + c] = (i ? red[C + c] : (T)0) + ab[k][e];
                }
            }
        }
        __syncthreads();
    }
    for (int c = threadIdx.x; c < 2 * C; c += blockDim.x) part[(long long)blockIdx.x * 2 * C + c] = red[c];
}
""", ["layer_norm_forward"] + [f"layer_norm_backward<{{T}}, {v}, false>" for v in _LN_SLOTS]
   + [f"layer_norm_backward<{{T}}, {v}, true>" for v in _LN_VEC_SLOTS])

_LN_WARPS = 8                # warps a block in backward (rows in flight a block)
_LN_BLOCKS = 132 * 4         # blocks in backward at most: each warp then takes N / (8 * 528) rows


class LayerNormCuda:
    """LayerNorm over the last axis: one fused pass forward, one backward (+ a sum of per-block partials);
    backward adds the gradient pending at x into dx (module docstring)."""

    sums_pending = (0,)

    @staticmethod
    def forward(ctx, x, w=None, b=None, eps=1e-5):
        return LayerNormCuda.forward_copy(ctx, x, w, b, eps)[0]

    @staticmethod
    def forward_copy(ctx, x, w=None, b=None, eps=1e-5, bf16_copy=False):
        """(out, None), or with bf16_copy and float32 x, (out, bf16(out)'s bits as uint16) from the same pass."""
        C = x.shape[-1]
        ctx.reference = not served(x, w, b) or C > 32 * _LN_SLOTS[-1]
        if ctx.reference:
            return LayerNorm.forward(ctx, x, w, b, eps=eps), None
        x = cp.ascontiguousarray(x)
        w, b = (None if a is None else cp.ascontiguousarray(a) for a in (w, b))   # the kernels index them densely
        N = x.size // C
        out = cp.empty_like(x)
        copy = cp.empty(x.shape, dtype=np.uint16) if bf16_copy and x.dtype == np.float32 else None
        mean = cp.empty(N, dtype=x.dtype)
        rstd = cp.empty(N, dtype=x.dtype)
        dummy = x  # stands for an absent w or b (never read)
        grid, block = warp_rows_launch(N)
        _SOURCE("layer_norm_forward", x.dtype)(grid, block, (x, dummy if w is None else w, dummy if b is None else b,
                                                             out, mean, rstd, np.uint64(0 if copy is None else copy.data.ptr),
                                                             np.int64(N), np.int32(C), x.dtype.type(eps),
                                                             np.int32(w is not None), np.int32(b is not None)))
        ctx.x, ctx.w, ctx.mean, ctx.rstd, ctx.has_b = x, w, mean, rstd, b is not None
        return out, copy

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return LayerNorm.backward(ctx, dout)
        x, w = ctx.x, ctx.w
        C = x.shape[-1]
        N = x.size // C
        dout = cp.ascontiguousarray(dout)
        need = ctx.needs_input_grad
        blocks = max(1, min(-(-N // _LN_WARPS), _LN_BLOCKS))
        res = _take_pending(ctx, x) if need[0] else None
        dx = cp.empty_like(x) if need[0] else x  # x stands in when dx is not wanted (never written)
        lanes = 16 // x.dtype.itemsize   # 16 bytes a load where every row allows it
        vec = vector(C, *(a for a in (dout, x, dx, res, w) if a is not None))
        slots = next(v for v in (_LN_VEC_SLOTS if vec else _LN_SLOTS) if 32 * v * (lanes if vec else 1) >= C)
        part = cp.empty((blocks, 2 * C), dtype=x.dtype)
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) (+ res),  dw = sum(dout * xhat),  db = sum(dout)
        _SOURCE(f"layer_norm_backward<{{T}}, {slots}, {'true' if vec else 'false'}>", x.dtype)(
            (blocks,), (32 * _LN_WARPS,),
            (dout, x, x if w is None else w, ctx.mean, ctx.rstd, np.uint64(0 if res is None else res.data.ptr), dx,
             part, np.int64(N), np.int32(C), np.int32(w is not None), np.int32(bool(need[0]))),
            shared_mem=2 * C * x.dtype.itemsize)
        want_w, want_b = w is not None and need[1], ctx.has_b and need[2]
        sums = column_sums(part) if want_w or want_b else None
        return (dx if need[0] else None), (sums[:C] if want_w else None), (sums[C:] if want_b else None)


def _take_pending(ctx, x):
    """The gradient pending at x, taken from the autograd's offer (ctx.pending, tensor.Function) when the kernel
    can add it: a CuPy array of x's dtype and shape (made C-contiguous). None otherwise: the autograd adds it."""
    pending = getattr(ctx, "pending", {}).get(0)
    if not isinstance(pending, cp.ndarray) or pending.dtype != x.dtype or pending.shape != x.shape:
        return None
    return cp.ascontiguousarray(ctx.pending.pop(0))
