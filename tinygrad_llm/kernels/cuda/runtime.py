"""What every CUDA kernel file shares: compiling a C++ source once per dtype, launch shapes, the
library loader for what CuPy does not bind, and the C helpers (warp reductions, dropout's hash; and for the
tensor-core kernels, TENSOR_CORE: a shared-memory address, zeroed accumulators, the tf32 product).

A kernel file holds its C++ source beside its launcher and compiles it with `Source(code, names)`:
the shared helpers (HEADER) are prepended, each kernel is a template over float and double, and a dtype
is compiled the first time a kernel of that dtype is launched (then cached on disk by CuPy).
ElementwiseKernels that need a helper get HEADER as their preamble, so every formula is written once.
"""
import contextlib
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

// 2^x on the special-function unit, results under 2^-126 flushed to zero, 2^-inf = 0. exp2f computes the same
// unit's value, and for x < -126 squares 2^(x/2) to return a subnormal: four more instructions on every score
// of the flash kernels.
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// float32 -> bf16 bits, rounded to nearest even; NaN stays a (quiet) NaN
__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// Dropout's keep decision for element i under seed, recomputable from (seed, i): backward draws the forward's
// mask again. Used by attention's softmax passes, the flash kernels and every dropout kernel, so one seed gives
// one mask everywhere. 32-bit arithmetic only (a 64-bit multiply costs the GPU three instructions, and the
// flash kernels decide every score): i's low word offset by the seed goes through two xorshift-multiply
// rounds (the constants of Wellons's "lowbias32", each round a bijection of 32 bits), i's high word (zero
// below 2^32 elements) added between them, so each run of 2^32 elements gets a distinct mask. The top 24
// bits are a uniform k / 2^24, kept when k / 2^24 >= p, i.e. k >= ceil(p 2^24).
__device__ __forceinline__ bool dropout_keep(unsigned long long seed, long long i, float p) {
    unsigned int x = ((unsigned int)i ^ (unsigned int)seed) + (unsigned int)(seed >> 32) * 0x9E3779B9U;
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x += (unsigned int)((unsigned long long)i >> 32) * 0x9E3779B9U;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return (x >> 8) >= (unsigned int)ceilf(p * 16777216.0f);
}

// each operation rounded on its own, as written: nvcc never contracts these with a neighbour into an FMA (or splits
// an FMA), so a formula written with them gives the same bits in every kernel that inlines it
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
// W values of T moved as one load or store (16 bytes: float4, double2), and W float32 values as bf16 bits
template<typename T, int W> struct Lanes;
template<typename T> struct Lanes<T, 1> { typedef T type; };
template<> struct Lanes<float, 4> { typedef float4 type; };
template<> struct Lanes<double, 2> { typedef double2 type; };
template<int W, typename T> __device__ __forceinline__ void load_lanes(const T* p, T (&v)[W]) {
    typename Lanes<T, W>::type a = *reinterpret_cast<const typename Lanes<T, W>::type*>(p);
    const T* e = reinterpret_cast<const T*>(&a);
#pragma unroll
    for (int k = 0; k < W; k++) v[k] = e[k];
}
template<int W, typename T> __device__ __forceinline__ void store_lanes(T* p, const T (&v)[W]) {
    typename Lanes<T, W>::type a;
    T* e = reinterpret_cast<T*>(&a);
#pragma unroll
    for (int k = 0; k < W; k++) e[k] = v[k];
    *reinterpret_cast<typename Lanes<T, W>::type*>(p) = a;
}
template<int W, typename T> struct Bf16Lanes {
    static __device__ __forceinline__ void store(unsigned short* p, const T (&v)[W]) {
#pragma unroll
        for (int k = 0; k < W; k++) p[k] = f32_to_bf16((float)v[k]);
    }
};
template<> struct Bf16Lanes<4, float> {   // 8 bytes in one store
    static __device__ __forceinline__ void store(unsigned short* p, const float (&v)[4]) {
        *reinterpret_cast<uint2*>(p) = make_uint2(f32_to_bf16(v[0]) | ((unsigned)f32_to_bf16(v[1]) << 16),
                                                  f32_to_bf16(v[2]) | ((unsigned)f32_to_bf16(v[3]) << 16));
    }
};
template<int W, typename T> __device__ __forceinline__ void store_bf16_lanes(unsigned short* p, const T (&v)[W]) {
    Bf16Lanes<W, T>::store(p, v);
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

# What the tensor-core kernels share (flash_mma*.py, gemm_3xtf32_kernels.py): a shared-memory address for PTX,
# asynchronous copies into shared memory, and the tf32 product. Prepended to those sources only.
TENSOR_CORE = r"""
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// 16 bytes global -> shared, bypassing L1; bytes = 0 writes zeros (a chunk past the matrix)
__device__ __forceinline__ void cp16(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_addr(dst)), "l"(src), "r"(bytes));
}
// 4 bytes global -> shared; bytes = 0 writes zeros
__device__ __forceinline__ void cp4(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(smem_addr(dst)), "l"(src), "r"(bytes));
}
// the copies issued so far form a group; wait until at most N groups are still in flight
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template<int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N)); }
// accumulator fragments (4 floats a lane each) set to zero
template<int N> __device__ __forceinline__ void zero(float (&a)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; j++) a[j][0] = a[j][1] = a[j][2] = a[j][3] = 0.f;
}
template<int M, int N> __device__ __forceinline__ void zero(float (&a)[M][N][4]) {
#pragma unroll
    for (int i = 0; i < M; i++) zero(a[i]);
}
// c (16x8 float32) += a (16x8 tf32, row fragments) b (8x8 tf32, column fragments b0 b1)
__device__ __forceinline__ void mma1688(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
"""

CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


class Source:
    """A C++ source of templated kernels, compiled with HEADER for one dtype the first time it is needed."""

    def __init__(self, code, names):
        self.code, self.names, self.modules = HEADER + code, tuple(names), {}

    def __call__(self, name, dtype):
        """The compiled kernel `name` (as in `names`) for float or double."""
        ctype = CTYPES[np.dtype(dtype)]
        module = self.modules.get(ctype)
        if module is None:
            module = self.modules[ctype] = cp.RawModule(code=self.code, options=("-std=c++17",),
                                                        name_expressions=[_instance(n, ctype) for n in self.names])
        return module.get_function(_instance(name, ctype))


def _instance(name, ctype):
    """A kernel's template instance: `name<float>`, or for a name with its own arguments
    (`kernel<{T}, 8>`), those with {T} the dtype's C type."""
    return name.format(T=ctype) if "<" in name else f"{name}<{ctype}>"


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




# ---- dropout seeds in device memory (a CUDA graph replays the same kernel arguments every step) -----------

class DeviceSeeds:
    """One 63-bit base a step, kept in device memory; the k-th dropout call of the step hashes with
    dropout_seed(base, k) (HEADER). The host draws the base from the run's generator and writes it before
    the step (eager) or before the graph's replay, so eager and captured steps draw the same masks."""

    def __init__(self, count=1):
        with default_pool():
            self.words = cp.zeros(count, dtype=np.uint64)   # one base a micro-batch
        self.slot, self.calls = 0, 0

    def draw(self, rng):
        """Host bases for every slot from rng (one integers() call a slot, as a step draws them)."""
        return np.array([rng.integers(0, 2 ** 63) for _ in range(self.words.size)], dtype=np.uint64)


_seeds = None   # the DeviceSeeds that dropout kernels read while device_seeds() is active


@contextlib.contextmanager
def device_seeds(seeds, slot=0):
    """While inside, every dropout kernel takes its seed from seeds.words[slot] on the device (call k of the
    block: dropout_seed(base, k)), ignoring the generator it is handed."""
    global _seeds
    previous, _seeds = _seeds, seeds
    seeds.slot, seeds.calls = slot, 0
    try:
        yield seeds
    finally:
        _seeds = previous


def dropout_seed_args(rng):
    """(seed_ptr, seed) for a dropout kernel: (0, a 63-bit draw of rng) normally; inside device_seeds, (a
    pointer to the step's base, the call's index)."""
    if _seeds is None:
        return np.uint64(0), np.uint64(rng.integers(0, 2 ** 63))
    k = _seeds.calls
    _seeds.calls += 1
    return np.uint64(_seeds.words.data.ptr + 8 * _seeds.slot), np.uint64(k)


# ---- what a captured graph must keep alive -----------------------------------------------------------

_caches = []   # dicts of device arrays that kernel files keep (pointer tables, ones vectors)


@contextlib.contextmanager
def default_pool():
    """Inside, allocations come from CuPy's default memory pool whatever allocator is current. What a kernel
    cache or a library handle keeps (tables, ones vectors, workspaces) is made here: made inside a CUDA
    graph's private pool (cuda_graph.py), it would dangle once that graph and its pool are gone."""
    with cp.cuda.using_allocator(cp.get_default_memory_pool().malloc):
        yield


def register_cache(cache):
    """A kernel file's dict of device arrays: a captured graph keeps every array in it at capture alive,
    since an entry dropped later would hand its memory to another array while the graph still reads it."""
    _caches.append(cache)
    return cache


def cached_arrays():
    """Every array (device, or pinned host memory a captured copy reads) the registered caches hold now
    (a graph takes these references at capture)."""
    out = []
    for cache in _caches:
        for value in cache.values():
            out.extend(value if isinstance(value, tuple) else (value,))
    return out


capturing = False   # set by cuda_graph.CudaGraphStep while it captures: caches must not copy from the host then
