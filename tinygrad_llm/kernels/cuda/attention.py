"""CuPy kernels for device "cuda", each standing in for a NumPy reference it must equal.

    reference (functional.py / optim.py)   kernel here                what it fuses
    tensor.Add                             AddCuda                    x + y of one shape, 16 bytes a load (else CuPy's add)
    Linear                                 LinearCuda                 x w + b as one cuBLASLt matmul, the bias added in its
                                                                      epilogue (backward: the reference's products)
    SelfAttention                          SelfAttentionCuda          the same passes on the packed (B, T, 3C) qkv: cuBLAS
                                                                      pointer-array batched products (all heads in one call)
                                                                      read q, k, v and write y, dq, dk, dv in place (no
                                                                      unpacking copies); causal row blocks skip 1/4 of the flops
    ScaledDotProductAttention              CausalAttentionCuda        cuBLAS batched Q K^T, P V, ... around one
                                                                      fused masked-softmax pass (forward) and one
                                                                      dS = P (dP - rowsum(P dP)) scale pass (backward);
                                                                      attention dropout's mask hashed inside both passes
    LayerNorm                              LayerNormCuda              one warp a row: mean, rstd, normalise, affine;
                                                                      backward dx in one pass, dw/db from per-block sums
    CrossEntropy                           CrossEntropyCuda           one warp a row: max, log-sum-exp, nll; the mean is
                                                                      taken on the device (no host sync for the count)
    GELU                                   GELUCuda                   one elementwise pass each way; backward recomputes
    Dropout                                DropoutCuda                a counter-based hash draws the mask on the GPU from
                                                                      a seed taken from the caller's np.random.Generator;
                                                                      backward recomputes the mask (nothing saved)
    optim.adamw_update                     adamw_update_cuda          one elementwise pass over p, m, v
    optim.adamw_update_group               adamw_update_group_cuda    the same over every parameter of a group in one
                                                                      launch (a device table of pointers)
    optim.clip_grads                       clip_grads_cuda            global norm and clip coefficient as device scalars
                                                                      (no host sync), 2 multi-tensor launches

Why cuBLAS + a fused softmax rather than a hand-written flash-attention kernel: in float32 cuBLAS
reaches the GPU's FMA peak on the (T, HS) x (HS, T) products, and the one softmax pass is memory bound
either way; the (B, NH, T, T) probabilities are kept for backward (about 100 MB a layer at the
6x384, T=256, B=64 benchmark), which the GPU holds easily.

Dropout differs from the reference by design: the CPU reference draws its mask with rng.random on
the host, which for 6 M elements a call would cost more than the whole GPU step. Here each call takes
one 63-bit seed from the same generator, so a run stays reproducible from its seed, but its masks
are not the CPU's: GPU and CPU runs with dropout > 0 follow different (equally valid) trajectories.

Every kernel is written once for float and double (C++ templates), accumulates in its own dtype, and
is checked against its reference by tests/test_gpu.py. Importing this module needs CuPy; it is loaded
only through the guarded block in kernels/__init__.py.
"""
import ctypes
import ctypes.util
import math
import os

import cupy as cp
import numpy as np

from cupy.cuda import cublas

from ...functional import GELU, CrossEntropy, Dropout, LayerNorm, Linear, ScaledDotProductAttention, SelfAttention
from ...optim import adamw_update, adamw_update_group, clip_grads
from ...tensor import Add

_SOURCE = r"""
#define NEG_INF (-__longlong_as_double(0x7ff0000000000000LL))  // -inf without math.h (NVRTC)
__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}
__device__ __forceinline__ double warp_sum(double x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
    return x;
}
__device__ __forceinline__ double warp_max(double x) {
    for (int o = 16; o > 0; o >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffff, x, o));
    return x;
}

// Dropout's keep decision for element i under seed: splitmix64 of (seed, i), 24 bits to a uniform u in
// [0, 1), keep when u >= p. The same hash as the tinygrad_llm_dropout ElementwiseKernel below, so that
// kernel applied to ones gives the mask used here (tests/test_gpu.py relies on it).
__device__ __forceinline__ bool dropout_keep(unsigned long long seed, long long i, float p) {
    unsigned long long z = seed + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f) >= p;
}

// s: (rows, TK) raw scores q k^T, overwritten by P; lse: (rows,). Row r is query i = r % TQ, which
// sees keys j < min(TK, i + offset + 1) (offset = TK - TQ when causal, TK when not). One warp a row.
// With has_drop, pd (rows, TK) also gets P * M, M = keep(seed, r TK + j) / (1 - drop_p) (attention dropout).
template<typename T>
__global__ void attention_softmax_forward(T* s, T* lse, long long rows, int TQ, int TK, int offset, T scale,
                                          T* pd, unsigned long long seed, float drop_p, T drop_scale, int has_drop) {
    long long r = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    T* row = s + r * TK;
    T* drow = pd + r * TK;
    int n = min(TK, (int)(r % TQ) + offset + 1);
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
template<typename T>
// Only the keys j < n that row r may see are read (P is 0 beyond them, and the products may have left
// dp unwritten there: SelfAttentionCuda skips the causal upper blocks); dS is 0 beyond them.
__global__ void attention_softmax_backward(const T* p, T* dp, long long rows, int TQ, int TK, int offset, T scale,
                                           unsigned long long seed, float drop_p, T drop_scale, int has_drop) {
    long long r = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const T* prow = p + r * TK;
    T* drow = dp + r * TK;
    int n = max(0, min(TK, (int)(r % TQ) + offset + 1));
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

// Multi-tensor kernels (one launch for a whole parameter group). ptrs: n device pointers per operand,
// operand-major (ptrs[a * n + t]); offsets: (n + 1,) running element counts. Each thread finds its
// tensor by binary search over the offsets (held in shared memory).
__device__ __forceinline__ int find_tensor(const long long* off, int n, long long i) {
    int lo = 0, hi = n - 1;
    while (lo < hi) { int mid = (lo + hi + 1) >> 1; if (off[mid] <= i) lo = mid; else hi = mid - 1; }
    return lo;
}

// partial[block] = sum of g^2 over the block's elements of every tensor (accumulated in double).
template<typename T>
__global__ void multi_sum_squares(const unsigned long long* ptrs, const long long* offsets, int n, double* partial) {
    extern __shared__ long long off_s[];
    for (int t = threadIdx.x; t <= n; t += blockDim.x) off_s[t] = offsets[t];
    __syncthreads();
    long long total = off_s[n];
    double acc = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        int t = find_tensor(off_s, n, i);
        T g = reinterpret_cast<const T*>(ptrs[t])[i - off_s[t]];
        acc += (double)g * (double)g;
    }
    acc = warp_sum(acc);
    __shared__ double warp_part[32];
    if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
        double x = threadIdx.x < (blockDim.x >> 5) ? warp_part[threadIdx.x] : 0;
        x = warp_sum(x);
        if (threadIdx.x == 0) partial[blockIdx.x] = x;
    }
}

// g *= coef[0] for every tensor (coef a device scalar: the host never reads it).
template<typename T>
__global__ void multi_scale(const unsigned long long* ptrs, const long long* offsets, int n, const T* coef) {
    extern __shared__ long long off_s[];
    for (int t = threadIdx.x; t <= n; t += blockDim.x) off_s[t] = offsets[t];
    __syncthreads();
    long long total = off_s[n];
    T c = coef[0];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        int t = find_tensor(off_s, n, i);
        reinterpret_cast<T*>(ptrs[t])[i - off_s[t]] *= c;
    }
}

// optim.adamw_update over every tensor of a group (operands p, g, m, v), the same formulas in the same order.
template<typename T>
__global__ void multi_adamw(const unsigned long long* ptrs, const long long* offsets, int n, T decay, T one_minus_beta1,
                            T beta2, T one_minus_beta2, T sqrt_bias_correction2, T eps, T step_size) {
    extern __shared__ long long off_s[];
    for (int t = threadIdx.x; t <= n; t += blockDim.x) off_s[t] = offsets[t];
    __syncthreads();
    long long total = off_s[n];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        int t = find_tensor(off_s, n, i);
        long long e = i - off_s[t];
        T* p = reinterpret_cast<T*>(ptrs[t]) + e;
        T g = reinterpret_cast<const T*>(ptrs[n + t])[e];
        T* m = reinterpret_cast<T*>(ptrs[2 * n + t]) + e;
        T* v = reinterpret_cast<T*>(ptrs[3 * n + t]) + e;
        T pv = *p * decay;
        T mv = *m + one_minus_beta1 * (g - *m);
        T vv = *v * beta2;
        vv = vv + one_minus_beta2 * g * g;
        T denom = sqrt(vv) / sqrt_bias_correction2 + eps;
        *p = pv - step_size * (mv / denom);
        *m = mv;
        *v = vv;
    }
}

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

// logits (N, V), targets (N,) -> nll (N,) (0 where ignored), lse (N,). One warp a row.
template<typename T>
__global__ void cross_entropy_forward(const T* logits, const long long* targets, T* nll, T* lse,
                                      long long N, int V, long long ignore_index) {
    long long r = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= N) return;
    const T* x = logits + r * V;
    T m = NEG_INF;
    for (int j = lane; j < V; j += 32) m = max(m, x[j]);
    m = warp_max(m);
    T total = 0;
    for (int j = lane; j < V; j += 32) total += exp(x[j] - m);
    total = warp_sum(total);
    if (lane == 0) {
        T l = m + log(total);
        long long t = targets[r];
        lse[r] = l;
        nll[r] = (t == ignore_index) ? (T)0 : l - x[t];
    }
}

// Elementwise passes over contiguous arrays, 16 bytes a load and a store (float4 / double2): CuPy's
// ElementwiseKernel moves one element a thread with generic indexing and measured ~2.5x slower than
// this on the 6x384 GELU and dropout. Element e of the flat array is handled exactly as the
// ElementwiseKernels below handle it (same formula, same dropout hash of (seed, e)).
template<typename T> struct Vec16;
template<> struct Vec16<float> { typedef float4 type; };
template<> struct Vec16<double> { typedef double2 type; };

// out[e] = f(x[e], y[e], e) for e < n (y unread when BINARY is false), 16 bytes a load and a store, then
// the tail of n % W elements one at a time.
template<bool BINARY, typename T, typename F>
__device__ __forceinline__ void map16(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ out,
                                      long long n, F f) {
    typedef typename Vec16<T>::type V;
    const int W = sizeof(V) / sizeof(T);
    long long stride = (long long)gridDim.x * blockDim.x, nv = n / W;
    for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < nv + (n - nv * W); v += stride) {
        if (v < nv) {
            V a = reinterpret_cast<const V*>(x)[v], b;
            if (BINARY) b = reinterpret_cast<const V*>(y)[v];
            T* e = reinterpret_cast<T*>(&a);
            const T* g = reinterpret_cast<const T*>(&b);
            #pragma unroll
            for (int k = 0; k < W; k++) e[k] = f(e[k], BINARY ? g[k] : (T)0, v * W + k);
            reinterpret_cast<V*>(out)[v] = a;
        } else {
            long long i = nv * W + (v - nv);
            out[i] = f(x[i], BINARY ? y[i] : (T)0, i);
        }
    }
}

template<typename T> __device__ __forceinline__ T gelu_tanh_f(T x, T* t_out) {
    const T c = 0.044715, s = 0.7978845608028654;  // sqrt(2/pi)
    T t = tanh(s * (x + c * x * x * x));
    *t_out = t;
    return (T)0.5 * x * (1 + t);
}

struct GeluTanh {
    template<typename T> __device__ T operator()(T x, T, long long) const { T t; return gelu_tanh_f(x, &t); }
};
struct GeluTanhGrad {   // dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 c x^2)),  t = tanh(u)
    template<typename T> __device__ T operator()(T x, T dout, long long) const {
        const T c = 0.044715, s = 0.7978845608028654;
        T t;
        gelu_tanh_f(x, &t);
        return dout * ((T)0.5 * (1 + t) + (T)0.5 * x * (1 - t * t) * s * (1 + 3 * c * x * x));
    }
};
struct Sum {
    template<typename T> __device__ T operator()(T a, T b, long long) const { return a + b; }
};
template<typename T> struct DropoutMask {
    unsigned long long seed; float p; T scale;
    __device__ T operator()(T x, T, long long e) const { return dropout_keep(seed, e, p) ? x * scale : (T)0; }
};

template<typename T>
__global__ void gelu_tanh_forward_v(const T* x, T* y, long long n) { map16<false>(x, x, y, n, GeluTanh()); }
template<typename T>
__global__ void gelu_tanh_backward_v(const T* x, const T* dout, T* dx, long long n) { map16<true>(x, dout, dx, n, GeluTanhGrad()); }
template<typename T>
__global__ void add_v(const T* x, const T* y, T* out, long long n) { map16<true>(x, y, out, n, Sum()); }
template<typename T>
__global__ void dropout_v(const T* x, T* y, long long n, unsigned long long seed, float p, T scale) {
    map16<false>(x, x, y, n, DropoutMask<T>{seed, p, scale});
}
"""

_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_module = None


def _kernel(name, dtype):
    """The compiled kernel `name` for float or double; the module compiles on first use (then cached by CuPy)."""
    global _module
    if _module is None:
        _module = cp.RawModule(code=_SOURCE, options=("-std=c++17",), name_expressions=[
            f"{kernel}<{ctype}>" for kernel in ("attention_softmax_forward", "attention_softmax_backward",
                                                "layer_norm_forward", "layer_norm_backward", "cross_entropy_forward",
                                                "multi_sum_squares", "multi_scale", "multi_adamw",
                                                "gelu_tanh_forward_v", "gelu_tanh_backward_v", "dropout_v", "add_v")
            for ctype in _CTYPES.values()])
    return _module.get_function(f"{name}<{_CTYPES[np.dtype(dtype)]}>")


def _served(*arrays):
    """True when every array is float32/float64 (other dtypes take the reference path)."""
    return all(a is None or np.dtype(a.dtype) in _CTYPES for a in arrays)


_WARP_ROWS_BLOCK = 256  # threads a block in the one-warp-a-row kernels: 8 rows a block


def _warp_rows_launch(rows):
    return (int(-(-rows * 32 // _WARP_ROWS_BLOCK)),), (_WARP_ROWS_BLOCK,)


# ---- attention -----------------------------------------------------------------------------------

def _softmax_forward(ctx, s, TQ, TK, causal, scale, dropout_p, rng):
    """The masked-softmax pass over the raw scores s (..., TQ, TK), in place (s becomes P); returns Pd (P
    itself without dropout). Keeps in ctx what _softmax_backward needs: scale, causal, the dropout seed."""
    T = s.dtype.type
    ctx.scale, ctx.causal = scale, causal
    ctx.seed, ctx.drop_p, ctx.drop_scale = np.uint64(0), np.float32(dropout_p), T(1 / (1 - dropout_p))
    ctx.has_drop = np.int32(dropout_p > 0)
    pd = s
    if dropout_p > 0:
        ctx.seed = np.uint64(rng.integers(0, 2 ** 63))
        pd = cp.empty_like(s)
    rows = s.size // TK
    lse = cp.empty(rows, dtype=s.dtype)
    grid, block = _warp_rows_launch(rows)
    _kernel("attention_softmax_forward", s.dtype)(grid, block, (s, lse, np.int64(rows), np.int32(TQ), np.int32(TK),
                                                                np.int32(TK - TQ if causal else TK), T(scale), pd,
                                                                ctx.seed, ctx.drop_p, ctx.drop_scale, ctx.has_drop))
    return pd


def _softmax_backward(ctx, p, ds, TQ, TK):
    """ds (..., TQ, TK) = dPd, overwritten by dS * scale (the forward's mask recomputed from its seed)."""
    rows = ds.size // TK
    grid, block = _warp_rows_launch(rows)
    _kernel("attention_softmax_backward", ds.dtype)(grid, block, (p, ds, np.int64(rows), np.int32(TQ), np.int32(TK),
                                                                  np.int32(TK - TQ if ctx.causal else TK),
                                                                  ds.dtype.type(ctx.scale), ctx.seed, ctx.drop_p,
                                                                  ctx.drop_scale, ctx.has_drop))


class CausalAttentionCuda:
    """ScaledDotProductAttention with causal or no mask: cuBLAS products around fused softmax passes.

    An explicit boolean mask takes the reference path (it is rare: the model never passes one).
    Attention dropout (dropout_p > 0): the softmax pass also writes Pd = P * M, M drawn on the GPU by a
    counter-based hash from one 63-bit seed of the caller's generator (as DropoutCuda); backward
    recomputes M from the seed inside its softmax pass (P and Pd are kept, M is not).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask=None, causal=True, scale=1.0, dropout_p=0.0, rng=None):
        ctx.reference = mask is not None or not _served(q, k, v) or dropout_p == 1
        if ctx.reference:
            return ScaledDotProductAttention.forward(ctx, q, k, v, mask, causal=causal, scale=scale,
                                                     dropout_p=dropout_p, rng=rng)
        TQ, TK = q.shape[-2], k.shape[-2]
        s = cp.matmul(q, k.swapaxes(-1, -2))                    # (..., TQ, TK), fresh and contiguous
        pd = _softmax_forward(ctx, s, TQ, TK, causal, scale, dropout_p, rng)
        ctx.q, ctx.k, ctx.v, ctx.p, ctx.pd = q, k, v, s, pd
        return cp.matmul(pd, v)

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return ScaledDotProductAttention.backward(ctx, dout)
        q, k, v, p = ctx.q, ctx.k, ctx.v, ctx.p
        need = ctx.needs_input_grad
        # dv = Pd^T dO, dP = (dO V^T) * M, dS = P * (dP - rowsum(dP * P)) * scale, dq = dS K, dk = dS^T Q
        dv = cp.matmul(ctx.pd.swapaxes(-1, -2), dout) if need[2] else None
        ds = cp.matmul(dout, v.swapaxes(-1, -2))
        _softmax_backward(ctx, p, ds, ds.shape[-2], ds.shape[-1])
        dq = cp.matmul(ds, k) if need[0] else None
        dk = cp.matmul(ds.swapaxes(-1, -2), q) if need[1] else None
        return dq, dk, dv, None


# ---- linear: the bias added by cuBLASLt's epilogue -------------------------------------------------
# out = x w + b as one cuBLASLt matmul with the BIAS epilogue (the bias is added to the product's tile
# before it is stored), as torch's addmm does, instead of a GEMM and then a pass over out reading and
# writing it again (about 1.6 ms of a 6x384 step's 37 ms). CuPy has no cuBLASLt binding, so it is
# called through ctypes; anything missing (the library, an algorithm for the shape) takes the reference.

def _load_library(name):
    """lib<name> as CuPy already has it loaded (found in /proc/self/maps: pip-installed CUDA libraries are
    not on the linker's path), else wherever the linker finds it."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if f"/lib{name}.so" in line})
    except OSError:
        paths = []
    return ctypes.CDLL(paths[0] if paths else ctypes.util.find_library(name) or f"lib{name}.so")


class _HeuristicResult(ctypes.Structure):   # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_LT_DESC_EPILOGUE, _LT_DESC_BIAS_POINTER = 7, 8          # cublasLtMatmulDescAttributes_t
_LT_EPILOGUE_BIAS = 4                                     # cublasLtEpilogue_t
_LT_PREF_MAX_WORKSPACE_BYTES = 1                          # cublasLtMatmulPreferenceAttributes_t
_LT_WORKSPACE_BYTES = 32 << 20


class _Lt:
    """A cuBLASLt handle and, per (rows, in, out, dtype, compute type), a descriptor and an algorithm."""

    def __init__(self):
        self.lib = _load_library("cublasLt")
        self.handle = ctypes.c_void_p()
        self._check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.workspace = cp.empty(_LT_WORKSPACE_BYTES, dtype=np.uint8)
        self.plans = {}

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def _layout(self, dtype, rows, cols, ld):
        layout = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), ctypes.c_int(_CUDA_TYPE[dtype]),
                                                        ctypes.c_uint64(rows), ctypes.c_uint64(cols), ctypes.c_int64(ld)),
                    "cublasLtMatrixLayoutCreate")
        return layout

    def plan(self, N, K, M, dtype):
        """Column-major D (M, N) = W (M, K) X (K, N) + bias (M,): row-major out (N, M) = x (N, K) w (K, M) + b."""
        compute = _compute_type(dtype)
        key = (N, K, M, dtype, compute)
        if key not in self.plans:
            if len(self.plans) >= 256:   # e.g. generation without a KV cache: a new N every token
                self.plans.clear()       # (the descriptors are a few hundred bytes of host memory each)
            try:
                self.plans[key] = self._make_plan(N, K, M, dtype, compute)
            except RuntimeError:         # a shape cuBLASLt will not describe: the reference takes it
                self.plans[key] = None
        return self.plans[key]

    def _make_plan(self, N, K, M, dtype, compute):
        lib, desc, pref = self.lib, ctypes.c_void_p(), ctypes.c_void_p()
        self._check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), ctypes.c_int(compute),
                                                 ctypes.c_int(_CUDA_TYPE[dtype])), "cublasLtMatmulDescCreate")
        epilogue = ctypes.c_uint32(_LT_EPILOGUE_BIAS)
        self._check(lib.cublasLtMatmulDescSetAttribute(desc, _LT_DESC_EPILOGUE, ctypes.byref(epilogue),
                                                       ctypes.c_size_t(4)),
                    "cublasLtMatmulDescSetAttribute(EPILOGUE)")
        a, b, d = self._layout(dtype, M, K, M), self._layout(dtype, K, N, K), self._layout(dtype, M, N, M)
        self._check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
        size = ctypes.c_uint64(_LT_WORKSPACE_BYTES)
        self._check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _LT_PREF_MAX_WORKSPACE_BYTES,
                                                             ctypes.byref(size), ctypes.c_size_t(8)),
                    "cublasLtMatmulPreferenceSetAttribute")
        result, count = _HeuristicResult(), ctypes.c_int(0)
        status = lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, a, b, d, d, pref, 1, ctypes.byref(result),
                                                    ctypes.byref(count))
        lib.cublasLtMatmulPreferenceDestroy(pref)
        return (desc, a, b, d, result) if status == 0 and count.value > 0 else None

    def linear(self, x2, w, bias, out, plan):
        desc, a, b, d, result = plan
        pointer = ctypes.c_void_p(bias.data.ptr)
        self._check(self.lib.cublasLtMatmulDescSetAttribute(desc, _LT_DESC_BIAS_POINTER, ctypes.byref(pointer),
                                                            ctypes.c_size_t(ctypes.sizeof(pointer))),
                    "cublasLtMatmulDescSetAttribute(BIAS)")
        dtype = np.dtype(x2.dtype)
        self._check(self.lib.cublasLtMatmul(
            self.handle, desc, ctypes.c_void_p(_ONE[dtype].ctypes.data), ctypes.c_void_p(w.data.ptr), a,
            ctypes.c_void_p(x2.data.ptr), b, ctypes.c_void_p(_ZERO[dtype].ctypes.data), ctypes.c_void_p(out.data.ptr), d,
            ctypes.c_void_p(out.data.ptr), d, ctypes.byref(result.algo), ctypes.c_void_p(self.workspace.data.ptr),
            ctypes.c_size_t(_LT_WORKSPACE_BYTES), ctypes.c_void_p(cp.cuda.get_current_stream().ptr)), "cublasLtMatmul")


class _OnFirstUse:
    """A ctypes library wrapper made on the first call; None (the reason kept in .error) where it cannot be."""

    def __init__(self, make):
        self.make, self.value, self.error = make, None, None

    def __call__(self):
        if self.value is None and self.error is None:
            try:
                self.value = self.make()
            except (OSError, AttributeError, RuntimeError) as e:
                self.error = repr(e)
        return self.value


lt = _OnFirstUse(_Lt)


class LinearCuda:
    """functional.Linear with the bias added in the GEMM's epilogue (cuBLASLt); backward is the reference's."""

    @staticmethod
    def forward(ctx, x, w, b=None):
        plan, lib = None, lt()
        if (b is not None and _served(x, w, b) and x.dtype == w.dtype == b.dtype and lib is not None and w.ndim == 2
                and x.ndim >= 1 and x.shape[-1] == w.shape[0] and b.shape == (w.shape[1],)):
            x = cp.ascontiguousarray(x)
            w, b = cp.ascontiguousarray(w), cp.ascontiguousarray(b)
            K, M = w.shape
            x2 = x.reshape(-1, K)
            if x2.shape[0] > 0 and all(a.data.ptr % 16 == 0 for a in (x2, w, b)):
                plan = lib.plan(x2.shape[0], K, M, np.dtype(x.dtype))
        if plan is None:
            return Linear.forward(ctx, x, w, b)
        out = cp.empty(x.shape[:-1] + (M,), dtype=x.dtype)
        lib.linear(x2, w, b, out, plan)
        ctx.x, ctx.w, ctx.has_b = x, w, True
        return out

    backward = staticmethod(Linear.backward)


# ---- self-attention on the packed qkv -------------------------------------------------------------

_ONE = {np.dtype(np.float32): np.array(1, np.float32), np.dtype(np.float64): np.array(1, np.float64)}
_ZERO = {np.dtype(np.float32): np.array(0, np.float32), np.dtype(np.float64): np.array(0, np.float64)}
_CUDA_TYPE = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}   # cudaDataType CUDA_R_32F, CUDA_R_64F


def _compute_type(dtype):
    """cuBLAS compute type of CuPy's own float32/float64 matmuls (so backend.set_tf32 applies here too)."""
    if np.dtype(dtype) == np.float64:
        return cublas.CUBLAS_COMPUTE_64F
    from cupy._core import _routines_linalg as linalg
    tf32 = linalg.get_compute_type(np.dtype(np.float32)) == linalg.COMPUTE_TYPE_TF32
    return cublas.CUBLAS_COMPUTE_32F_FAST_TF32 if tf32 else cublas.CUBLAS_COMPUTE_32F


def _gemm(dtype, batch, M, N, K, a, lda, stride_a, b, ldb, stride_b, c, ldc, stride_c, trans_a=False, trans_b=False):
    """C[i] = op(A[i]) op(B[i]) for i < batch, every matrix row-major with its own row stride (ld) and its
    own batch stride, all in elements; a, b, c are device pointers. op(A) is M x K (A stored K x M when
    trans_a), op(B) K x N, C M x N. One cuBLAS strided-batched call: row-major C = A B is column-major
    C^T = B^T A^T, so B goes first. Strided views (a head's columns inside qkv) are read in place."""
    dtype = np.dtype(dtype)
    t = _CUDA_TYPE[dtype]
    cublas.gemmStridedBatchedEx(
        cp.cuda.device.get_cublas_handle(), cublas.CUBLAS_OP_T if trans_b else cublas.CUBLAS_OP_N,
        cublas.CUBLAS_OP_T if trans_a else cublas.CUBLAS_OP_N, N, M, K, _ONE[dtype].ctypes.data,
        b, t, ldb, stride_b, a, t, lda, stride_a, _ZERO[dtype].ctypes.data, c, t, ldc, stride_c, batch,
        _compute_type(dtype), cublas.CUBLAS_GEMM_DEFAULT)


class _BatchedGemm:
    """cublasGemmBatchedEx through ctypes (CuPy binds only the strided-batched GEMMs), on a handle of its own."""

    def __init__(self):
        self.lib = _load_library("cublas")
        self.handle = ctypes.c_void_p()
        status = self.lib.cublasCreate_v2(ctypes.byref(self.handle))
        if status != 0:
            raise RuntimeError(f"cublasCreate failed with status {status}")

    def __call__(self, op_a, op_b, m, n, k, alpha, a_array, a_type, lda, b_array, b_type, ldb, beta, c_array, c_type,
                 ldc, count, compute):
        c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
        self.lib.cublasSetStream_v2(self.handle, c_void_p(cp.cuda.get_current_stream().ptr))
        status = self.lib.cublasGemmBatchedEx(
            self.handle, c_int(op_a), c_int(op_b), c_int(m), c_int(n), c_int(k), c_void_p(alpha), c_void_p(a_array),
            c_int(a_type), c_int(lda), c_void_p(b_array), c_int(b_type), c_int(ldb), c_void_p(beta), c_void_p(c_array),
            c_int(c_type), c_int(ldc), c_int(count), c_int(compute), c_int(-1))   # -1: CUBLAS_GEMM_DEFAULT
        if status != 0:
            raise RuntimeError(f"cublasGemmBatchedEx failed with status {status}")


batched_gemm = _OnFirstUse(_BatchedGemm)


HEADS_IN_ONE_CALL = True
_pointer_tables = {}   # operand bases and strides -> device array of the B*NH matrices' pointers (A, B, C)


def _gemm_heads(dtype, B, NH, M, N, K, a, lda, a_b, a_h, b, ldb, b_b, b_h, c, ldc, c_b, c_h,
                trans_a=False, trans_b=False):
    """_gemm for every (batch, head) pair at once: matrix (i, h) of an operand starts at
    base + i * stride_b + h * stride_h (elements). Heads inside qkv (stride HS) and batches (stride T*3C)
    are not one stride apart, so this is cuBLAS's pointer-array batched GEMM: one call for all B*NH
    products. The pointer table is built on the host and kept, keyed by the bases: CuPy's pool hands
    the same blocks out step after step, so the steady state uploads nothing. HEADS_IN_ONE_CALL = False,
    or no libcublas to load: one strided-batched call per head."""
    gemm = batched_gemm() if HEADS_IN_ONE_CALL else None
    if gemm is None:
        size = np.dtype(dtype).itemsize
        for h in range(NH):
            _gemm(dtype, B, M, N, K, a + h * a_h * size, lda, a_b, b + h * b_h * size, ldb, b_b, c + h * c_h * size,
                  ldc, c_b, trans_a=trans_a, trans_b=trans_b)
        return
    dtype = np.dtype(dtype)
    key = (dtype, B, NH, a, a_b, a_h, b, b_b, b_h, c, c_b, c_h)
    table = _pointer_tables.get(key)
    if table is None:
        if len(_pointer_tables) >= 1024:
            _pointer_tables.clear()
        i, h = np.arange(B, dtype=np.uint64)[:, None], np.arange(NH, dtype=np.uint64)[None, :]
        size = np.uint64(dtype.itemsize)
        ptrs = [(np.uint64(base) + (i * np.uint64(sb) + h * np.uint64(sh)) * size).ravel()
                for base, sb, sh in ((a, a_b, a_h), (b, b_b, b_h), (c, c_b, c_h))]
        table = _pointer_tables[key] = cp.asarray(np.concatenate(ptrs))
    n, t, p0 = B * NH, _CUDA_TYPE[dtype], table.data.ptr
    # row-major C = A B is column-major C^T = B^T A^T: B's pointers go first
    gemm(1 if trans_b else 0, 1 if trans_a else 0, N, M, K, _ONE[dtype].ctypes.data, p0 + 8 * n, t, ldb, p0, t, lda,
         _ZERO[dtype].ctypes.data, p0 + 16 * n, t, ldc, n, _compute_type(dtype))


# Causal: the queries in ROW_BLOCKS blocks, each multiplied only with the keys it can see (2 blocks: 3/4 of
# the flops). Measured on the H200 at 6x384, B=64, T=256 (gpu_train.py --steps 30, ours / PyTorch): with one
# call per head, 1 block 5.18 ms of attention kernels a step and 2 blocks 5.75 ms (halved products run less
# efficiently, and twice as many); with all heads in one call (_gemm_heads), 1 block 1.005x and 2 blocks
# 0.993x, per-head calls 1.033x.
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
    pair (_gemm_heads) that reads q, k, v as strided column blocks of qkv (row stride 3C) and writes the
    output, and dq, dk, dv, straight into their columns of y (B, T, C) and dqkv (B, T, 3C): no copies. Causal: the query rows
    go in ROW_BLOCKS blocks, and a block multiplies only the keys it can see (the softmax passes zero
    the rest of its rows), so the products do 3/4 of the full flops. The scores are (B, NH, T, T) as in
    CausalAttentionCuda, with the same softmax passes, so attention dropout draws the same mask from
    the same seed.
    """

    @staticmethod
    def forward(ctx, qkv, n_head, causal=True, scale=1.0, dropout_p=0.0, rng=None):
        ctx.reference = not _served(qkv) or dropout_p == 1
        if ctx.reference:
            return SelfAttention.forward(ctx, qkv, n_head, causal=causal, scale=scale, dropout_p=dropout_p, rng=rng)
        qkv = cp.ascontiguousarray(qkv)
        B, T, C3 = qkv.shape
        C, NH = C3 // 3, n_head
        HS = C // NH
        dtype, size = qkv.dtype, qkv.dtype.itemsize
        s = cp.empty((B, NH, T, T), dtype=dtype)
        y = cp.empty((B, T, C), dtype=dtype)
        # strides (elements): qkv (B, T, 3C) batch T*3C, head HS; scores (B, NH, T, T) batch NH*T*T, head T*T;
        # y (B, T, C) batch T*C, head HS
        q0, s0, blocks = qkv.data.ptr, s.data.ptr, _blocks(T, causal)
        qs, ss, ys = (T * C3, HS), (NH * T * T, T * T), (T * C, HS)
        for r0, r1 in blocks:   # S[b, h, r0:r1, :kend] = Q[b, h, r0:r1] K[b, h, :kend]^T
            kend = r1 if causal else T
            _gemm_heads(dtype, B, NH, r1 - r0, kend, HS, q0 + r0 * C3 * size, C3, *qs, q0 + C * size, C3, *qs,
                        s0 + r0 * T * size, T, *ss, trans_b=True)
        pd = _softmax_forward(ctx, s, T, T, causal, scale, dropout_p, rng)
        for r0, r1 in blocks:   # Y[b, r0:r1, h] = Pd[b, h, r0:r1, :kend] V[b, h, :kend]
            kend = r1 if causal else T
            _gemm_heads(dtype, B, NH, r1 - r0, HS, kend, pd.data.ptr + r0 * T * size, T, *ss, q0 + 2 * C * size, C3,
                        *qs, y.data.ptr + r0 * C * size, C, *ys)
        ctx.qkv, ctx.p, ctx.pd, ctx.n_head = qkv, s, pd, NH
        return y

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return SelfAttention.backward(ctx, dout)
        qkv, p, pd, NH, causal = ctx.qkv, ctx.p, ctx.pd, ctx.n_head, ctx.causal
        dout = cp.ascontiguousarray(dout)
        B, T, C3 = qkv.shape
        C = C3 // 3
        HS = C // NH
        dtype, size = qkv.dtype, qkv.dtype.itemsize
        q0, d0, pd0 = qkv.data.ptr, dout.data.ptr, pd.data.ptr
        dqkv = cp.empty_like(qkv)
        ds = cp.empty_like(p)
        g0, ds0, blocks = dqkv.data.ptr, ds.data.ptr, _blocks(T, causal)
        qs, ss, ys = (T * C3, HS), (NH * T * T, T * T), (T * C, HS)
        # dv = Pd^T dO, dP = (dO V^T) * M, dS = P * (dP - rowsum(dP * P)) * scale, dq = dS K, dk = dS^T Q;
        # causal: keys [k0, k1) are seen only by rows [k0, T), so dV and dK of that key block sum over those rows
        for k0, k1 in blocks:
            first = k0 if causal else 0
            _gemm_heads(dtype, B, NH, k1 - k0, HS, T - first, pd0 + (first * T + k0) * size, T, *ss,
                        d0 + first * C * size, C, *ys, g0 + (k0 * C3 + 2 * C) * size, C3, *qs, trans_a=True)   # dV
        for r0, r1 in blocks:
            kend = r1 if causal else T
            _gemm_heads(dtype, B, NH, r1 - r0, kend, HS, d0 + r0 * C * size, C, *ys, q0 + 2 * C * size, C3, *qs,
                        ds0 + r0 * T * size, T, *ss, trans_b=True)                                           # dPd
        _softmax_backward(ctx, p, ds, T, T)
        for r0, r1 in blocks:
            kend = r1 if causal else T
            _gemm_heads(dtype, B, NH, r1 - r0, HS, kend, ds0 + r0 * T * size, T, *ss, q0 + C * size, C3, *qs,
                        g0 + r0 * C3 * size, C3, *qs)                                                        # dQ
        for k0, k1 in blocks:
            first = k0 if causal else 0
            _gemm_heads(dtype, B, NH, k1 - k0, HS, T - first, ds0 + (first * T + k0) * size, T, *ss,
                        q0 + first * C3 * size, C3, *qs, g0 + (k0 * C3 + C) * size, C3, *qs, trans_a=True)   # dK
        return dqkv


# ---- layer norm ----------------------------------------------------------------------------------

_LN_WARPS = 4
_LN_ROWS_PER_BLOCK = 64


class LayerNormCuda:
    """LayerNorm over the last axis: one fused pass forward, one backward (+ a sum of per-block partials)."""

    @staticmethod
    def forward(ctx, x, w=None, b=None, eps=1e-5):
        C = x.shape[-1]
        smem = _LN_WARPS * 2 * C * x.dtype.itemsize
        ctx.reference = not _served(x, w, b) or smem > 48 * 1024
        if ctx.reference:
            return LayerNorm.forward(ctx, x, w, b, eps=eps)
        x = cp.ascontiguousarray(x)
        N = x.size // C
        out = cp.empty_like(x)
        mean = cp.empty(N, dtype=x.dtype)
        rstd = cp.empty(N, dtype=x.dtype)
        dummy = x  # stands for an absent w or b (never read)
        grid, block = _warp_rows_launch(N)
        _kernel("layer_norm_forward", x.dtype)(grid, block, (x, dummy if w is None else w, dummy if b is None else b,
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
        _kernel("layer_norm_backward", x.dtype)(
            (blocks,), (32 * _LN_WARPS,),
            (dout, x, x if w is None else w, ctx.mean, ctx.rstd, dx, dw_part, db_part, np.int64(N), np.int32(C),
             np.int32(_LN_ROWS_PER_BLOCK), np.int32(w is not None), np.int32(bool(need[0]))),
            shared_mem=_LN_WARPS * 2 * C * x.dtype.itemsize)
        dw = dw_part.sum(axis=0) if w is not None and need[1] else None
        db = db_part.sum(axis=0) if ctx.has_b and need[2] else None
        return (dx if need[0] else None), dw, db


# ---- softmax + cross-entropy ---------------------------------------------------------------------

_cross_entropy_backward = cp.ElementwiseKernel(
    "raw T logits, raw T lse, raw int64 targets, raw T dout, int64 dout_stride, raw T scale, int64 V, int64 ignore",
    "T dx",
    """
    long long row = i / V, j = i % V;
    long long t = targets[row];
    if (t == ignore) {
        dx = 0;
    } else {
        T p = exp(logits[i] - lse[row]);
        dx = (p - (j == t ? (T)1 : (T)0)) * (dout[row * dout_stride] * scale[0]);
    }
    """,
    "tinygrad_llm_cross_entropy_backward")


class CrossEntropyCuda:
    """Softmax + cross-entropy in one warp pass a row; "mean" divides by the count on the device."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index=-100, reduction="mean"):
        ctx.reference = not _served(logits)
        if ctx.reference:
            return CrossEntropy.forward(ctx, logits, targets, ignore_index=ignore_index, reduction=reduction)
        V = logits.shape[-1]
        x = cp.ascontiguousarray(logits).reshape(-1, V)
        t = cp.asarray(targets).reshape(-1).astype(cp.int64, copy=False)
        N = x.shape[0]
        nll = cp.empty(N, dtype=x.dtype)
        lse = cp.empty(N, dtype=x.dtype)
        grid, block = _warp_rows_launch(N)
        _kernel("cross_entropy_forward", x.dtype)(grid, block, (x, t, nll, lse, np.int64(N), np.int32(V),
                                                                np.int64(ignore_index)))
        if reduction == "mean":
            # dividing on the device keeps the host from waiting for the count
            count = (t != ignore_index).sum()
            scale = (1 / cp.maximum(count, 1)).astype(x.dtype)
        else:
            scale = cp.ones((), dtype=x.dtype)
        ctx.x, ctx.t, ctx.lse, ctx.scale = x, t, lse, scale.reshape(1)
        ctx.ignore_index, ctx.reduction, ctx.shape = ignore_index, reduction, logits.shape
        if reduction == "none":
            return nll.reshape(targets.shape)
        return (nll.sum() * scale).astype(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return CrossEntropy.backward(ctx, dout)
        x = ctx.x
        dout = cp.ascontiguousarray(dout, dtype=x.dtype).reshape(-1)
        stride = 1 if ctx.reduction == "none" else 0
        dx = cp.empty_like(x)
        # dlogits = (softmax(logits) - onehot(target)) * dout * scale, zero on ignored rows
        _cross_entropy_backward(x, ctx.lse, ctx.t, dout, stride, ctx.scale, x.shape[1], ctx.ignore_index, dx)
        return dx.reshape(ctx.shape), None


# ---- GELU ----------------------------------------------------------------------------------------

_GELU_TANH = """
    const T c = 0.044715, s = 0.7978845608028654;  // sqrt(2/pi)
    T t = tanh(s * (x + c * x * x * x));
"""
_gelu_tanh_forward = cp.ElementwiseKernel("T x", "T y", _GELU_TANH + "y = (T)0.5 * x * (1 + t);",
                                          "tinygrad_llm_gelu_tanh_forward")
_gelu_tanh_backward = cp.ElementwiseKernel(
    "T x, T dout", "T dx",
    _GELU_TANH + "dx = dout * ((T)0.5 * (1 + t) + (T)0.5 * x * (1 - t * t) * s * (1 + 3 * c * x * x));",
    "tinygrad_llm_gelu_tanh_backward")
_GELU_EXACT = "T cdf = (T)0.5 * erfc(-x * (T)0.7071067811865476);"
_gelu_exact_forward = cp.ElementwiseKernel("T x", "T y", _GELU_EXACT + "y = x * cdf;", "tinygrad_llm_gelu_exact_forward")
_gelu_exact_backward = cp.ElementwiseKernel(
    "T x, T dout", "T dx",
    _GELU_EXACT + "dx = dout * (cdf + x * exp((T)-0.5 * x * x) * (T)0.3989422804014327);",  # 1/sqrt(2 pi)
    "tinygrad_llm_gelu_exact_backward")


_VEC_BLOCK = 256


def _vectorized(*arrays):
    """The 16-byte vector kernels apply: C-contiguous arrays starting on a 16-byte boundary."""
    return all(a.flags.c_contiguous and a.data.ptr % 16 == 0 for a in arrays)


def _vector_launch(name, n, dtype, args):
    lanes = 16 // np.dtype(dtype).itemsize
    work = n // lanes + n % lanes
    blocks = max(1, min(-(-work // _VEC_BLOCK), 132 * 16))
    _kernel(name, dtype)((blocks,), (_VEC_BLOCK,), args)


class AddCuda:
    """tensor.Add: x + y of one shape, 16 bytes at a time (the residual stream's adds); else CuPy's add."""

    @staticmethod
    def forward(ctx, x, y):
        if (x.shape != y.shape or x.dtype != y.dtype or not _served(x) or not hasattr(y, "flags")
                or not _vectorized(x, y)):
            return Add.forward(ctx, x, y)
        ctx.shapes = x.shape, y.shape
        out = cp.empty_like(x)
        _vector_launch("add_v", x.size, x.dtype, (x, y, out, np.int64(x.size)))
        return out

    backward = staticmethod(Add.backward)


class GELUCuda:
    """GELU (tanh or exact) in one elementwise pass; backward recomputes from x (only x is saved)."""

    @staticmethod
    def forward(ctx, x, approximate="none"):
        ctx.reference = not _served(x)
        if ctx.reference:
            return GELU.forward(ctx, x, approximate=approximate)
        ctx.x, ctx.approximate = x, approximate
        if approximate == "tanh" and _vectorized(x):
            y = cp.empty_like(x)
            _vector_launch("gelu_tanh_forward_v", x.size, x.dtype, (x, y, np.int64(x.size)))
            return y
        return (_gelu_tanh_forward if approximate == "tanh" else _gelu_exact_forward)(x)

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return GELU.backward(ctx, dout)
        # tanh: dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)); exact: dout * (Phi + x phi)
        if ctx.approximate == "tanh" and _vectorized(ctx.x, dout):
            dx = cp.empty_like(ctx.x)
            _vector_launch("gelu_tanh_backward_v", dx.size, dx.dtype, (ctx.x, dout, dx, np.int64(dx.size)))
            return dx
        return (_gelu_tanh_backward if ctx.approximate == "tanh" else _gelu_exact_backward)(ctx.x, dout)


# ---- dropout -------------------------------------------------------------------------------------

_dropout_apply = cp.ElementwiseKernel(
    "T x, uint64 seed, float32 p, T scale", "T y",
    """
    // splitmix64 of (seed, element index): an independent uniform number per element, recomputable
    unsigned long long z = seed + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    float u = (float)(z >> 40) * (1.0f / 16777216.0f);   // 24 random bits in [0, 1)
    y = u >= p ? x * scale : (T)0;
    """,
    "tinygrad_llm_dropout")


def _dropout(x, seed, p, scale):
    """_dropout_apply(x, ...), 16 bytes at a time where x allows (the same mask: the same hash of (seed, e))."""
    if not _vectorized(x):
        return _dropout_apply(x, seed, p, scale)
    y = cp.empty_like(x)
    _vector_launch("dropout_v", x.size, x.dtype, (x, y, np.int64(x.size), seed, p, scale))
    return y


class DropoutCuda:
    """Inverted dropout with the mask drawn on the GPU from one seed of the caller's generator."""

    @staticmethod
    def forward(ctx, x, p=0.5, rng=None):
        ctx.reference = p == 1 or not _served(x)
        if ctx.reference:
            return Dropout.forward(ctx, x, p=p, rng=rng)
        ctx.seed, ctx.p = np.uint64(rng.integers(0, 2 ** 63)), np.float32(p)
        ctx.scale = x.dtype.type(1 / (1 - p))
        return _dropout(x, ctx.seed, ctx.p, ctx.scale)

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return Dropout.backward(ctx, dout)
        # dx = dout * mask, the same mask: same seed, same element indices
        return _dropout(dout, ctx.seed, ctx.p, ctx.scale)


# ---- AdamW ---------------------------------------------------------------------------------------

_adamw = cp.ElementwiseKernel(
    "T g, T decay, T one_minus_beta1, T beta2, T one_minus_beta2, T sqrt_bias_correction2, T eps, T step_size",
    "T p, T m, T v",
    """
    p = p * decay;
    m = m + one_minus_beta1 * (g - m);
    v = v * beta2;
    v = v + one_minus_beta2 * g * g;
    T denom = sqrt(v) / sqrt_bias_correction2 + eps;
    p = p - step_size * (m / denom);
    """,
    "tinygrad_llm_adamw")


def adamw_update_cuda(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """optim.adamw_update in one pass over p, m, v (in place), same formulas in the same order."""
    if not _served(p):
        return adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
    T = p.dtype.type
    _adamw(g, T(1 - lr * weight_decay), T(1 - beta1), T(beta2), T(1 - beta2), T(math.sqrt(1 - beta2 ** step)), T(eps),
           T(lr / (1 - beta1 ** step)), p, m, v)


# ---- multi-tensor: a whole parameter group in one launch -------------------------------------------
# A launch per parameter costs the host ~10-20 us of CuPy call overhead; the 6x384 model has 76
# parameters, and clipping + AdamW took ~4 launches each. These kernels take a device table of the
# arrays' pointers instead (rebuilt only when a pointer changes) and walk all elements at once.
# MULTI_TENSOR = False (or TINYGRAD_LLM_MULTI_TENSOR=0) goes back to one launch per array.

MULTI_TENSOR = os.environ.get("TINYGRAD_LLM_MULTI_TENSOR", "1") != "0"
_MT_BLOCK = 512
_tables = {}   # key (pointers and sizes) -> (ptrs, offsets) on the device; a few kept (groups, clipping)


def _multi_served(*lists):
    """One float dtype, C-contiguous arrays, all on the current device: the multi-tensor kernels apply."""
    first = lists[0][0]
    return (MULTI_TENSOR and np.dtype(first.dtype) in _CTYPES and len(lists[0]) < 4096
            and all(a.dtype == first.dtype and a.flags.c_contiguous for arrays in lists for a in arrays))


def _table(*lists):
    """Device arrays (ptrs (len(lists) * n,) uint64, offsets (n + 1,) int64) for these operand lists.

    Cached by the pointers themselves: CuPy's pool hands the gradients the same blocks step after step,
    so the steady state copies nothing to the device."""
    key = (len(lists),) + tuple(a.data.ptr for arrays in lists for a in arrays) + tuple(a.size for a in lists[0])
    cached = _tables.get(key)
    if cached is not None:
        return cached
    if len(_tables) >= 16:
        _tables.clear()
    n = len(lists[0])
    ptrs = cp.asarray(np.array(key[1:1 + len(lists) * n], dtype=np.uint64))
    offsets = cp.asarray(np.concatenate([[0], np.cumsum([a.size for a in lists[0]])]).astype(np.int64))
    _tables[key] = (ptrs, offsets)
    return ptrs, offsets


def _multi_launch(name, dtype, total, n, args, max_blocks=None):
    blocks = max(1, min(-(-total // _MT_BLOCK), max_blocks or 132 * 16))
    _kernel(name, dtype)((blocks,), (_MT_BLOCK,), args, shared_mem=(n + 1) * 8)
    return blocks


def adamw_update_group_cuda(ps, gs, ms, vs, lr, beta1, beta2, eps, weight_decay, step):
    """optim.adamw_update_group: every (p, g, m, v) of a group in one kernel launch, in place."""
    if not ps:
        return
    if not _multi_served(ps, gs, ms, vs):
        return adamw_update_group(ps, gs, ms, vs, lr, beta1, beta2, eps, weight_decay, step)
    T = ps[0].dtype.type
    ptrs, offsets = _table(ps, gs, ms, vs)
    total = sum(p.size for p in ps)
    _multi_launch("multi_adamw", ps[0].dtype, total, len(ps),
                  (ptrs, offsets, np.int32(len(ps)), T(1 - lr * weight_decay), T(1 - beta1), T(beta2), T(1 - beta2),
                   T(math.sqrt(1 - beta2 ** step)), T(eps), T(lr / (1 - beta1 ** step))))


_clip_coef = cp.ElementwiseKernel(
    "float64 sum_sq, float64 max_norm", "T total, T coef",
    "double t = sqrt(sum_sq); total = (T)t; coef = (T)fmin(max_norm / (t + 1e-6), 1.0);",
    "tinygrad_llm_clip_coef")


def clip_grads_cuda(grads, max_norm):
    """optim.clip_grads without a host sync: the norm and min(1, max_norm / (norm + 1e-6)) stay on the
    device (sum of squares accumulated in float64), every g is scaled by it (by 1 when under max_norm)."""
    if not _multi_served(grads):
        return clip_grads(grads, max_norm)
    dtype, n = grads[0].dtype, len(grads)
    ptrs, offsets = _table(grads)
    total = sum(g.size for g in grads)
    partial = cp.empty(max(1, min(-(-total // _MT_BLOCK), 132 * 4)), dtype=np.float64)
    _multi_launch("multi_sum_squares", dtype, total, n, (ptrs, offsets, np.int32(n), partial), max_blocks=partial.size)
    norm, coef = _clip_coef(partial.sum(), np.float64(max_norm), cp.empty((), dtype), cp.empty((), dtype))
    _multi_launch("multi_scale", dtype, total, n, (ptrs, offsets, np.int32(n), coef))
    return norm


KERNELS = {Add: AddCuda, Linear: LinearCuda, ScaledDotProductAttention: CausalAttentionCuda, SelfAttention: SelfAttentionCuda, LayerNorm: LayerNormCuda, CrossEntropy: CrossEntropyCuda,
           GELU: GELUCuda, Dropout: DropoutCuda, adamw_update: adamw_update_cuda,
           adamw_update_group: adamw_update_group_cuda, clip_grads: clip_grads_cuda}


def register():
    """Serve every kernel above for arrays on device "cuda"."""
    from ..backend import register_kernel
    for reference, kernel in KERNELS.items():
        register_kernel(reference, "cuda", kernel)
