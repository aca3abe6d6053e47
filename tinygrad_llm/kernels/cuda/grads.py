"""The leaves' gradients on CUDA arrays, in one launch each way (ops: leaf_grads.copy_arrays, add_arrays; and
zero_arrays, a CUDA graph's kept gradients zeroed at the start of its step): optim.py's multi-tensor scheme (a
device table of the arrays' pointers, each thread finding its array by binary search), so that a step writes the
gradients of every parameter with one kernel instead of one a parameter. Lists the kernels do not take (one
array, mixed dtypes, strided views, memory shared between a target and another array) go array by array.
"""
import cupy as cp
import numpy as np

from .optim import FIND_TENSOR, _multi_launch, _multi_served, _table
from .runtime import Source

_SOURCE = Source(FIND_TENSOR + r"""
// MODE 0: ptrs[n + t][k] = ptrs[t][k] (copy_arrays; operands: source, copy); 1: ptrs[t][k] += ptrs[n + t][k]
// (add_arrays; operands: target, source); 2: ptrs[t][k] = 0 (zero_arrays).
template<typename T, int MODE>
__global__ void multi_grads(const unsigned long long* ptrs, const long long* offsets, int n) {
    extern __shared__ long long off_s[];
    for (int t = threadIdx.x; t <= n; t += blockDim.x) off_s[t] = offsets[t];
    __syncthreads();
    long long total = off_s[n];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        int t = find_tensor(off_s, n, i);
        long long k = i - off_s[t];
        T* first = reinterpret_cast<T*>(ptrs[t]);   // MODE 0: the source; else the target
        if (MODE == 0) reinterpret_cast<T*>(ptrs[n + t])[k] = first[k];
        else if (MODE == 1) first[k] += reinterpret_cast<const T*>(ptrs[n + t])[k];
        else first[k] = (T)0;
    }
}
""", ["multi_grads<{T}, 0>", "multi_grads<{T}, 1>", "multi_grads<{T}, 2>"])


def _served(*lists):
    """Two or more C-contiguous float arrays of one dtype a list, all CuPy arrays on the current device, lists of
    one length and sizes: one multi-tensor launch takes them."""
    device, first = cp.cuda.Device().id, lists[0]
    return (len(first) >= 2 and all(len(arrays) == len(first) for arrays in lists)
            and all(isinstance(a, cp.ndarray) and a.device.id == device for arrays in lists for a in arrays)
            and all(a.size == b.size for arrays in lists[1:] for a, b in zip(first, arrays)) and _multi_served(*lists))


def _launch(mode, *lists):
    ptrs, offsets = _table(*lists)
    total, n = sum(a.size for a in lists[0]), len(lists[0])
    if total:
        _multi_launch(f"multi_grads<{{T}}, {mode}>", lists[0][0].dtype, total, n, (ptrs, offsets, np.int32(n)),
                      source=_SOURCE)


def _sharing(targets, sources):
    """True when a target's memory overlaps another target's or a source's (threads would race)."""
    ends, shared = [0, 0], False   # the furthest end so far of any array, and of any target
    for start, end, target in sorted((a.data.ptr, a.data.ptr + a.nbytes, i < len(targets))
                                     for i, a in enumerate(targets + sources) if a.nbytes):
        shared = shared or start < ends[0 if target else 1]
        ends = [max(ends[0], end), max(ends[1], end) if target else ends[1]]
    return shared


def copy_arrays_cuda(arrays):
    """leaf_grads.copy_arrays in one launch (the first gradients of every parameter); other lists array by array."""
    from ...leaf_grads import copy_arrays
    if not _served(arrays):
        return copy_arrays(arrays)
    copies = [cp.empty_like(a) for a in arrays]
    _launch(0, arrays, copies)
    return copies


def add_arrays_cuda(targets, sources):
    """leaf_grads.add_arrays in one launch (gradients added into kept or accumulated ones); other lists array
    by array."""
    from ...leaf_grads import add_arrays
    if (not _served(targets, sources) or any(t.shape != s.shape for t, s in zip(targets, sources))
            or _sharing(targets, sources)):
        return add_arrays(targets, sources)
    _launch(1, targets, sources)


def zero_arrays(arrays):
    """a[...] = 0 for every array, in one launch where one takes them (a CUDA graph's kept gradients)."""
    if _served(arrays):
        return _launch(2, arrays)
    for a in arrays:
        a.fill(0)
