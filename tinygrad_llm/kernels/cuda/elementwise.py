"""Elementwise ops on CUDA arrays (ops: tensor.Add, functional.GELU, functional.Dropout, functional.DropoutAdd).

Each formula is a device function in FORMULAS, written once and used twice: by the 16-byte vector
kernels (float4 / double2 loads and stores, for C-contiguous arrays on a 16-byte boundary; CuPy's
ElementwiseKernel moves one element a thread with generic indexing and measured several times slower on
the model's activations) and, through their preamble, by the ElementwiseKernels that serve every other
layout. Element e of the flat array gets the same result either way (dropout: the same hash of (seed, e)),
so DropoutAdd's x + mask * y is, bit for bit, Add of x and Dropout of y under the same seed.
"""
import cupy as cp
import numpy as np

from ...functional import GELU, Dropout, DropoutAdd
from ...tensor import Add
from .runtime import HEADER, Source, dropout_seed_args, served

FORMULAS = r"""
// GELU's tanh form: y = x (1 + t) / 2 with t = tanh(u), u = s (x + c x^3); *du = du/dx = s (1 + 3 c x^2)
template<typename T> __device__ __forceinline__ T gelu_tanh(T x, T* t_out, T* du) {
    const T c = 0.044715, s = 0.7978845608028654;  // sqrt(2/pi)
    T t = tanh(s * (x + c * x * x * x));
    *t_out = t;
    *du = s * (1 + 3 * c * x * x);
    return (T)0.5 * x * (1 + t);
}
// dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) du/dx)
template<typename T> __device__ __forceinline__ T gelu_tanh_grad(T x, T dout) {
    T t, du;
    gelu_tanh(x, &t, &du);
    return dout * ((T)0.5 * (1 + t) + (T)0.5 * x * (1 - t * t) * du);
}
// the exact form: Phi(x) = erfc(-x / sqrt2) / 2, which does not cancel in the left tail as 1 + erf does
template<typename T> __device__ __forceinline__ T normal_cdf(T x) { return (T)0.5 * erfc(-x * (T)0.7071067811865476); }
template<typename T> __device__ __forceinline__ T dropout_apply(T x, unsigned long long seed, float p, T scale,
                                                                 long long e) {
    return dropout_keep(seed, e, p) ? x * scale : (T)0;
}
// x + dropout_apply(y): the product rounded on its own (mul_rn, runtime.HEADER: never fused with the add into an
// FMA), so the sum is the unfused Dropout-then-Add's bit for bit
template<typename T> __device__ __forceinline__ T dropout_add_apply(T x, T y, unsigned long long seed, float p,
                                                                     T scale, long long e) {
    return x + (dropout_keep(seed, e, p) ? mul_rn(y, scale) : (T)0);
}
"""

_SOURCE = Source(FORMULAS + r"""
// out[e] = f(x[e], y[e], e) for e < n (y unread when BINARY is false), 16 bytes a load and a store, then
// the tail of n % W elements one at a time.
template<bool BINARY, typename T, typename F>
__device__ __forceinline__ void map16(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ out,
                                      long long n, F f) {
    typedef typename Lanes<T, 16 / sizeof(T)>::type V;   // runtime.HEADER
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

struct GeluTanh {
    template<typename T> __device__ T operator()(T x, T, long long) const { T t, du; return gelu_tanh(x, &t, &du); }
};
struct GeluTanhGrad {
    template<typename T> __device__ T operator()(T x, T dout, long long) const { return gelu_tanh_grad(x, dout); }
};
struct Sum {
    template<typename T> __device__ T operator()(T a, T b, long long) const { return a + b; }
};
template<typename T> struct DropoutMask {
    unsigned long long seed; float p; T scale;
    __device__ T operator()(T x, T, long long e) const { return dropout_apply(x, seed, p, scale, e); }
};
template<typename T> struct DropoutAddMask {
    unsigned long long seed; float p; T scale;
    __device__ T operator()(T x, T y, long long e) const { return dropout_add_apply(x, y, seed, p, scale, e); }
};

template<typename T>
__global__ void gelu_tanh_forward_v(const T* x, T* y, long long n) { map16<false>(x, x, y, n, GeluTanh()); }
// gelu_tanh_forward_v, and yb[e] = bf16(y[e])'s bits beside it (bf16 autocast: the operand of the product that
// reads y), in the same pass
template<typename T>
__global__ void gelu_tanh_forward_bf16_v(const T* x, T* y, unsigned short* yb, long long n) {
    constexpr int W = 16 / sizeof(T);
    long long stride = (long long)gridDim.x * blockDim.x, nv = n / W;
    GeluTanh f;
    for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < nv + (n - nv * W); v += stride) {
        if (v < nv) {   // runtime.HEADER's 16-byte lanes
            T e[W];
            load_lanes<W>(x + v * W, e);
            #pragma unroll
            for (int k = 0; k < W; k++) e[k] = f(e[k], (T)0, v * W + k);
            store_lanes<W>(y + v * W, e);
            store_bf16_lanes<W>(yb + v * W, e);
        } else {
            long long i = nv * W + (v - nv);
            T r = f(x[i], (T)0, i);
            y[i] = r;
            yb[i] = f32_to_bf16((float)r);
        }
    }
}
template<typename T>
__global__ void gelu_tanh_backward_v(const T* x, const T* dout, T* dx, long long n) { map16<true>(x, dout, dx, n, GeluTanhGrad()); }
template<typename T>
__global__ void add_v(const T* x, const T* y, T* out, long long n) { map16<true>(x, y, out, n, Sum()); }
template<typename T>
__global__ void dropout_v(const T* x, T* y, long long n, const unsigned long long* seed_ptr, unsigned long long seed,
                          float p, T scale) {
    map16<false>(x, x, y, n, DropoutMask<T>{dropout_seed(seed_ptr, seed), p, scale});
}
template<typename T>
__global__ void dropout_add_v(const T* x, const T* y, T* out, long long n, const unsigned long long* seed_ptr,
                              unsigned long long seed, float p, T scale) {
    map16<true>(x, y, out, n, DropoutAddMask<T>{dropout_seed(seed_ptr, seed), p, scale});
}
""", ["gelu_tanh_forward_v", "gelu_tanh_forward_bf16_v", "gelu_tanh_backward_v", "dropout_v", "add_v", "dropout_add_v"])

_PREAMBLE = HEADER + FORMULAS
_gelu_tanh_forward = cp.ElementwiseKernel("T x", "T y", "T t, du; y = gelu_tanh(x, &t, &du);",
                                          "tinygrad_llm_gelu_tanh_forward", preamble=_PREAMBLE)
_gelu_tanh_backward = cp.ElementwiseKernel("T x, T dout", "T dx", "dx = gelu_tanh_grad(x, dout);",
                                           "tinygrad_llm_gelu_tanh_backward", preamble=_PREAMBLE)
_gelu_exact_forward = cp.ElementwiseKernel("T x", "T y", "y = x * normal_cdf(x);", "tinygrad_llm_gelu_exact_forward",
                                           preamble=_PREAMBLE)
_gelu_exact_backward = cp.ElementwiseKernel(   # dx = dout * (Phi(x) + x phi(x)), phi(x) = exp(-x^2/2) / sqrt(2 pi)
    "T x, T dout", "T dx", "dx = dout * (normal_cdf(x) + x * exp((T)-0.5 * x * x) * (T)0.3989422804014327);",
    "tinygrad_llm_gelu_exact_backward", preamble=_PREAMBLE)
_dropout_apply = cp.ElementwiseKernel(   # seed_ptr: 0, or runtime.DeviceSeeds' base (then seed is the call's index)
    "T x, uint64 seed, float32 p, T scale, uint64 seed_ptr", "T y",
    "y = dropout_apply(x, dropout_seed((const unsigned long long*)seed_ptr, seed), p, scale, (long long)i);",
    "tinygrad_llm_dropout", preamble=_PREAMBLE)
_dropout_add_apply = cp.ElementwiseKernel(
    "T x, T y, uint64 seed, float32 p, T scale, uint64 seed_ptr", "T out",
    "out = dropout_add_apply(x, y, dropout_seed((const unsigned long long*)seed_ptr, seed), p, scale, (long long)i);",
    "tinygrad_llm_dropout_add", preamble=_PREAMBLE)

_VEC_BLOCK = 256


def _vectorized(*arrays):
    """The 16-byte vector kernels apply: C-contiguous arrays starting on a 16-byte boundary."""
    return all(a.flags.c_contiguous and a.data.ptr % 16 == 0 for a in arrays)


def _vector_launch(name, n, dtype, args):
    lanes = 16 // np.dtype(dtype).itemsize
    work = n // lanes + n % lanes
    blocks = max(1, min(-(-work // _VEC_BLOCK), 132 * 16))
    _SOURCE(name, dtype)((blocks,), (_VEC_BLOCK,), args)


class AddCuda:
    """tensor.Add: x + y of one shape, 16 bytes at a time (the residual stream's adds); else CuPy's add."""

    @staticmethod
    def forward(ctx, x, y):
        if (x.shape != y.shape or x.dtype != y.dtype or not served(x) or not hasattr(y, "flags")
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
        return GELUCuda.forward_copy(ctx, x, approximate)[0]

    @staticmethod
    def forward_copy(ctx, x, approximate="none", bf16_copy=False):
        """(y, None), or with bf16_copy on the tanh form's float32 vector path, (y, bf16(y)'s bits as uint16)
        written in the same pass."""
        ctx.reference = not served(x)
        if ctx.reference:
            return GELU.forward(ctx, x, approximate=approximate), None
        ctx.x, ctx.approximate = x, approximate
        if approximate == "tanh" and _vectorized(x):
            y = cp.empty_like(x)
            if bf16_copy and x.dtype == np.float32:
                copy = cp.empty(x.shape, dtype=np.uint16)
                _vector_launch("gelu_tanh_forward_bf16_v", x.size, x.dtype, (x, y, copy, np.int64(x.size)))
                return y, copy
            _vector_launch("gelu_tanh_forward_v", x.size, x.dtype, (x, y, np.int64(x.size)))
            return y, None
        return (_gelu_tanh_forward if approximate == "tanh" else _gelu_exact_forward)(x), None

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return GELU.backward(ctx, dout)
        # tanh: dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) du/dx); exact: dout * (Phi + x phi) (FORMULAS)
        if ctx.approximate == "tanh" and _vectorized(ctx.x, dout):
            dx = cp.empty_like(ctx.x)
            _vector_launch("gelu_tanh_backward_v", dx.size, dx.dtype, (ctx.x, dout, dx, np.int64(dx.size)))
            return dx
        return (_gelu_tanh_backward if ctx.approximate == "tanh" else _gelu_exact_backward)(ctx.x, dout)


def _dropout(x, seed_ptr, seed, p, scale):
    """_dropout_apply(x, ...), 16 bytes at a time where x allows (the same mask: the same hash of (seed, e))."""
    if not _vectorized(x):
        return _dropout_apply(x, seed, p, scale, seed_ptr)
    y = cp.empty_like(x)
    _vector_launch("dropout_v", x.size, x.dtype, (x, y, np.int64(x.size), seed_ptr, seed, p, scale))
    return y


class DropoutCuda:
    """Inverted dropout with the mask drawn on the GPU from one seed of the caller's generator (inside
    runtime.device_seeds: from the step's base in device memory, so a captured graph draws new masks)."""

    @staticmethod
    def forward(ctx, x, p=0.5, rng=None):
        ctx.reference = p == 1 or not served(x)
        if ctx.reference:
            return Dropout.forward(ctx, x, p=p, rng=rng)
        (ctx.seed_ptr, ctx.seed), ctx.p = dropout_seed_args(rng), np.float32(p)
        ctx.scale = x.dtype.type(1 / (1 - p))
        return _dropout(x, ctx.seed_ptr, ctx.seed, ctx.p, ctx.scale)

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return Dropout.backward(ctx, dout)
        # dx = dout * mask, the same mask: same seed, same element indices
        return _dropout(dout, ctx.seed_ptr, ctx.seed, ctx.p, ctx.scale)


class DropoutAddCuda:
    """x + dropout(y) in one pass: DropoutCuda's seed (drawn the same way, one draw a call) and mask on y,
    added to x as the element is written, so the result is AddCuda(x, DropoutCuda(y)) bit for bit."""

    @staticmethod
    def forward(ctx, x, y, p=0.5, rng=None):
        ctx.reference = p == 1 or not served(x, y) or x.shape != y.shape or x.dtype != y.dtype
        if ctx.reference:
            return DropoutAdd.forward(ctx, x, y, p=p, rng=rng)
        (ctx.seed_ptr, ctx.seed), ctx.p = dropout_seed_args(rng), np.float32(p)
        ctx.scale = y.dtype.type(1 / (1 - p))
        if not _vectorized(x, y):
            return _dropout_add_apply(x, y, ctx.seed, ctx.p, ctx.scale, ctx.seed_ptr)
        out = cp.empty_like(y)
        _vector_launch("dropout_add_v", y.size, y.dtype,
                       (x, y, out, np.int64(y.size), ctx.seed_ptr, ctx.seed, ctx.p, ctx.scale))
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return DropoutAdd.backward(ctx, dout)
        # dx = dout; dy = dout * mask, DropoutCuda.backward's kernel with the forward's seed
        need = ctx.needs_input_grad
        return (dout if need[0] else None,
                _dropout(dout, ctx.seed_ptr, ctx.seed, ctx.p, ctx.scale) if need[1] else None)
