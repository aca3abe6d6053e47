"""The AdamW update and gradient clipping on CUDA arrays (ops: optim.adamw_update, adamw_update_group,
clip_grads).

One parameter: an ElementwiseKernel over p, g, m, v. A parameter group, and clipping: multi-tensor
kernels that walk every array of the group in one launch, from a device table of the arrays' pointers
(rebuilt only when a pointer changes): a launch per parameter costs the host more than most updates.
MULTI_TENSOR = False (or TINYGRAD_LLM_MULTI_TENSOR=0) goes back to one launch per array. The update
formula is the device function adamw_step, used by both kernels.
"""
import math
import os

import cupy as cp
import numpy as np

from ...optim import adamw_update, adamw_update_group, clip_grads
from .runtime import CTYPES, Source, served

_ADAMW_STEP = r"""
// optim.adamw_update on one element: the same formulas in the same order
template<typename T>
__device__ __forceinline__ void adamw_step(T& p, T g, T& m, T& v, T decay, T one_minus_beta1, T beta2,
                                           T one_minus_beta2, T sqrt_bias_correction2, T eps, T step_size) {
    T pv = p * decay;
    T mv = m + one_minus_beta1 * (g - m);
    T vv = v * beta2;
    vv = vv + one_minus_beta2 * g * g;
    T denom = sqrt(vv) / sqrt_bias_correction2 + eps;
    p = pv - step_size * (mv / denom);
    m = mv;
    v = vv;
}
"""

_SOURCE = Source(_ADAMW_STEP + r"""
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

// optim.adamw_update over every tensor of a group (operands p, g, m, v).
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
        adamw_step(reinterpret_cast<T*>(ptrs[t])[e], reinterpret_cast<const T*>(ptrs[n + t])[e],
                   reinterpret_cast<T*>(ptrs[2 * n + t])[e], reinterpret_cast<T*>(ptrs[3 * n + t])[e], decay,
                   one_minus_beta1, beta2, one_minus_beta2, sqrt_bias_correction2, eps, step_size);
    }
}
""", ["multi_sum_squares", "multi_scale", "multi_adamw"])

_adamw = cp.ElementwiseKernel(
    "T g, T decay, T one_minus_beta1, T beta2, T one_minus_beta2, T sqrt_bias_correction2, T eps, T step_size",
    "T p, T m, T v",
    "adamw_step(p, g, m, v, decay, one_minus_beta1, beta2, one_minus_beta2, sqrt_bias_correction2, eps, step_size);",
    "tinygrad_llm_adamw", preamble=_ADAMW_STEP)


def _scalars(dtype, lr, beta1, beta2, eps, weight_decay, step):
    """The kernels' scalar arguments in the parameters' dtype (as NumPy's weak scalars keep the op's)."""
    T = np.dtype(dtype).type
    return (T(1 - lr * weight_decay), T(1 - beta1), T(beta2), T(1 - beta2), T(math.sqrt(1 - beta2 ** step)), T(eps),
            T(lr / (1 - beta1 ** step)))


def adamw_update_cuda(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """optim.adamw_update in one pass over p, m, v (in place)."""
    if not served(p):
        return adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
    _adamw(g, *_scalars(p.dtype, lr, beta1, beta2, eps, weight_decay, step), p, m, v)


MULTI_TENSOR = os.environ.get("TINYGRAD_LLM_MULTI_TENSOR", "1") != "0"
_MT_BLOCK = 512
_tables = {}   # key (pointers and sizes) -> (ptrs, offsets) on the device; a few kept (groups, clipping)


def _multi_served(*lists):
    """One float dtype, C-contiguous arrays, all on the current device: the multi-tensor kernels apply."""
    first = lists[0][0]
    return (MULTI_TENSOR and np.dtype(first.dtype) in CTYPES and len(lists[0]) < 4096
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
    _SOURCE(name, dtype)((blocks,), (_MT_BLOCK,), args, shared_mem=(n + 1) * 8)
    return blocks


def adamw_update_group_cuda(ps, gs, ms, vs, lr, beta1, beta2, eps, weight_decay, step):
    """optim.adamw_update_group: every (p, g, m, v) of a group in one kernel launch, in place."""
    if not ps:
        return
    if not _multi_served(ps, gs, ms, vs):
        return adamw_update_group(ps, gs, ms, vs, lr, beta1, beta2, eps, weight_decay, step)
    ptrs, offsets = _table(ps, gs, ms, vs)
    total = sum(p.size for p in ps)
    _multi_launch("multi_adamw", ps[0].dtype, total, len(ps),
                  (ptrs, offsets, np.int32(len(ps)), *_scalars(ps[0].dtype, lr, beta1, beta2, eps, weight_decay, step)))


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

