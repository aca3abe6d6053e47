"""The AdamW update and gradient clipping on CUDA arrays (ops: optim.adamw_update, adamw_update_group,
clip_grads).

One parameter: an ElementwiseKernel over p, g, m, v. A parameter group, and clipping: multi-tensor
kernels that walk every array of the group in one launch, from a device table of the arrays' pointers
(rebuilt only when a pointer changes): a launch per parameter costs the host more than most updates.
MULTI_TENSOR = False (or TINYGRAD_LLM_MULTI_TENSOR=0) goes back to one launch per array. The update
formula is the device function adamw_step, used by both kernels.
"""
import contextlib
import math
import os

import cupy as cp
import numpy as np

from ...optim import adamw_update, adamw_update_group, clip_grads
from . import runtime
from .runtime import CTYPES, Source, register_cache, served

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

FIND_TENSOR = r"""
// Multi-tensor kernels (one launch for a whole parameter group). ptrs: n device pointers per operand,
// operand-major (ptrs[a * n + t]); offsets: (n + 1,) running element counts. Each thread finds its
// tensor by binary search over the offsets (held in shared memory).
__device__ __forceinline__ int find_tensor(const long long* off, int n, long long i) {
    int lo = 0, hi = n - 1;
    while (lo < hi) { int mid = (lo + hi + 1) >> 1; if (off[mid] <= i) lo = mid; else hi = mid - 1; }
    return lo;
}
"""

_SOURCE = Source(_ADAMW_STEP + FIND_TENSOR + r"""
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

// optim.adamw_update over every tensor of a group (operands p, g, m, v). The learning rate and the step count
// are lr and step, or schedule[0] and schedule[1] when schedule is given (a CUDA graph's replays read them
// there; schedule[2] != 0 skips the update, as the eager step stops before it on a non-finite gradient norm);
// the scalars derived from them are worked out in double, as optim.adamw_update does on the host.
template<typename T>
__global__ void multi_adamw(const unsigned long long* ptrs, const long long* offsets, int n, const double* schedule,
                            double lr, double step, double beta1, double beta2, double eps, double weight_decay) {
    if (schedule != 0 && schedule[2] != 0) return;   // the whole grid leaves: no barrier is left waiting
    extern __shared__ long long off_s[];
    for (int t = threadIdx.x; t <= n; t += blockDim.x) off_s[t] = offsets[t];
    if (schedule != 0) { lr = schedule[0]; step = schedule[1]; }
    T decay = (T)(1 - lr * weight_decay), one_minus_beta1 = (T)(1 - beta1), b2 = (T)beta2,
      one_minus_beta2 = (T)(1 - beta2), sqrt_bias_correction2 = (T)sqrt(1 - pow(beta2, step)),
      step_size = (T)(lr / (1 - pow(beta1, step))), e = (T)eps;
    __syncthreads();
    long long total = off_s[n];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        int t = find_tensor(off_s, n, i);
        long long k = i - off_s[t];
        adamw_step(reinterpret_cast<T*>(ptrs[t])[k], reinterpret_cast<const T*>(ptrs[n + t])[k],
                   reinterpret_cast<T*>(ptrs[2 * n + t])[k], reinterpret_cast<T*>(ptrs[3 * n + t])[k],
                   decay, one_minus_beta1, b2, one_minus_beta2, sqrt_bias_correction2, e, step_size);
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
_tables = register_cache({})   # key (pointers and sizes) -> (ptrs, offsets) on the device; a few kept (groups, clipping)
_schedule = None   # a device float64 (2,) array [lr, step] that multi_adamw reads instead of its arguments


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
        return cached[:2]
    if len(_tables) >= 16 and not runtime.capturing:
        _tables.clear()
    n = len(lists[0])
    host = (np.array(key[1:1 + len(lists) * n], dtype=np.uint64),
            np.concatenate([[0], np.cumsum([a.size for a in lists[0]])]).astype(np.int64))
    if not runtime.capturing:
        with runtime.default_pool():
            entry = tuple(cp.asarray(values) for values in host)   # CuPy stages the copy itself
        _tables[key] = entry
        return entry
    # inside a graph's capture (a fallback: the step's tables are normally built on its warm-up steps): a
    # copy node from pinned host memory, kept with the table, since every replay reads it again. Eager steps
    # never take this path: a pinned block handed back while its copy is still queued could be rewritten.
    entry = []
    for values in host:
        pinned = cp.cuda.alloc_pinned_memory(values.nbytes)
        np.frombuffer(pinned, dtype=values.dtype, count=values.size)[:] = values
        with runtime.default_pool():
            device = cp.empty(values.size, dtype=values.dtype)
        cp.cuda.runtime.memcpyAsync(device.data.ptr, pinned.ptr, values.nbytes, cp.cuda.runtime.memcpyHostToDevice,
                                    cp.cuda.get_current_stream().ptr)
        entry += [device, pinned]
    _tables[key] = (entry[0], entry[2], entry[1], entry[3])
    return entry[0], entry[2]


def _multi_launch(name, dtype, total, n, args, max_blocks=None, source=None):
    blocks = max(1, min(-(-total // _MT_BLOCK), max_blocks or 132 * 16))
    (source or _SOURCE)(name, dtype)((blocks,), (_MT_BLOCK,), args, shared_mem=(n + 1) * 8)
    return blocks


def adamw_update_group_cuda(ps, gs, ms, vs, lr, beta1, beta2, eps, weight_decay, step):
    """optim.adamw_update_group: every (p, g, m, v) of a group in one kernel launch, in place."""
    if not ps:
        return
    if not _multi_served(ps, gs, ms, vs):
        return adamw_update_group(ps, gs, ms, vs, lr, beta1, beta2, eps, weight_decay, step)
    ptrs, offsets = _table(ps, gs, ms, vs)
    total = sum(p.size for p in ps)
    f = np.float64
    schedule = np.uint64(0) if _schedule is None else _schedule
    _multi_launch("multi_adamw", ps[0].dtype, total, len(ps),
                  (ptrs, offsets, np.int32(len(ps)), schedule, f(lr), f(step), f(beta1), f(beta2), f(eps), f(weight_decay)))


@contextlib.contextmanager
def device_schedule(schedule):
    """While inside, the group update reads the learning rate and step count from `schedule` (a device float64
    (3,) array [lr, step, skip]), not from its arguments: a CUDA graph's replays then follow the schedule;
    skip != 0 leaves every parameter and moment as it was."""
    global _schedule
    previous, _schedule = _schedule, schedule
    try:
        yield
    finally:
        _schedule = previous


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

