"""What every CUDA kernel file shares: compiling a C++ source once per dtype, launch shapes, the
library loader for what CuPy does not bind, and the C helpers (warp reductions, dropout's hash).

A kernel file holds its C++ source beside its launcher and compiles it with `Source(code, names)`:
the shared helpers (HEADER) are prepended, each kernel is a template over float and double, and a dtype
is compiled the first time a kernel of that dtype is launched (then cached on disk by CuPy).
ElementwiseKernels that need a helper get HEADER as their preamble, so every formula is written once.
"""
import ctypes
import ctypes.util

import cupy as cp
import numpy as np

HEADER = r"""
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
// [0, 1), keep when u >= p. Recomputable from (seed, i): backward draws the forward's mask again. Used by
// attention's softmax passes and by every dropout kernel, so one seed gives one mask everywhere.
__device__ __forceinline__ bool dropout_keep(unsigned long long seed, long long i, float p) {
    unsigned long long z = seed + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f) >= p;
}

// The seed a dropout call hashes with. seed_ptr null: `seed` itself (drawn on the host from the caller's
// generator). Else the step's 63-bit base in device memory (runtime.DeviceSeeds) and `seed` the call's index
// in the step, mixed once: a captured CUDA graph reads the base anew at every replay.
__device__ __forceinline__ unsigned long long dropout_seed(const unsigned long long* seed_ptr,
                                                           unsigned long long seed) {
    if (seed_ptr == 0) return seed;
    unsigned long long z = seed_ptr[0] + (seed + 1) * 0xD1B54A32D192ED03ULL;
    z = (z ^ (z >> 32)) * 0xBF58476D1CE4E5B9ULL;
    return (z ^ (z >> 29)) & 0x7FFFFFFFFFFFFFFFULL;
}
"""

CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


class Source:
    """A C++ source of templated kernels, compiled with HEADER for one dtype the first time it is needed."""

    def __init__(self, code, names):
        self.code, self.names, self.modules = HEADER + code, tuple(names), {}

    def __call__(self, name, dtype):
        """The compiled kernel `name` for float or double."""
        ctype = CTYPES[np.dtype(dtype)]
        module = self.modules.get(ctype)
        if module is None:
            module = self.modules[ctype] = cp.RawModule(code=self.code, options=("-std=c++17",),
                                                        name_expressions=[f"{n}<{ctype}>" for n in self.names])
        return module.get_function(f"{name}<{ctype}>")


def served(*arrays):
    """True when every array is float32/float64 (other dtypes take the op's own path)."""
    return all(a is None or np.dtype(a.dtype) in CTYPES for a in arrays)


WARP_ROWS_BLOCK = 256  # threads a block in the one-warp-a-row kernels: 8 rows a block


def warp_rows_launch(rows):
    """(grid, block) for a kernel that gives each of `rows` rows one warp."""
    return (int(-(-rows * 32 // WARP_ROWS_BLOCK)),), (WARP_ROWS_BLOCK,)


def load_library(name):
    """lib<name> as CuPy already has it loaded (found in /proc/self/maps: pip-installed CUDA libraries are
    not on the linker's path), else wherever the linker finds it."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if f"/lib{name}.so" in line})
    except OSError:
        paths = []
    return ctypes.CDLL(paths[0] if paths else ctypes.util.find_library(name) or f"lib{name}.so")


class OnFirstUse:
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


