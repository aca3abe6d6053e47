"""Column sums of a (N, M) CUDA array in one pass over it (bias gradients, LayerNorm's dw and db), optionally
writing the bf16 bits of every element on the way (a bf16 product's dout: the conversion it needs anyway).

Deterministic, no atomics: a block takes 32 columns and a chunk of rows, each of its 8 warps every 8th row
of the chunk, a lane one column (a warp reads 32 neighbours: one 128-byte line a row); the block's sums go
to a (chunks, M) array of partials, summed by the same kernel over its rows until one row is left. The
order of every addition is fixed by the shape, so one input gives one result bit for bit.

The first pass is a device function over any elementwise formula (PARTIALS), so a kernel that computes a
gradient can sum its columns as it writes it: elementwise values in, the same partials out
(fused_column_sums), the same sums as column_sums of the values it wrote, bit for bit.
"""
import cupy as cp
import numpy as np

from .runtime import Source, served

# partials(f, out, part, bf, N, M, rows_per_chunk): v = f(i) for element i = r M + c of the (N, M) values;
# part[blockIdx.y, c] = sum of v over the rows r of chunk blockIdx.y (rows_per_chunk of them); out (may be null):
# out[i] = v; bf (may be null): bf[i] = bf16(v). Block (32, 8): lane threadIdx.x a column, warp threadIdx.y a
# row. The sums are added with __fadd_rn / __dadd_rn, which the compiler never contracts with f's last product
# into an FMA: the sums of a computed v are those of v as stored.
PARTIALS = r"""
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
template<typename T, typename F>
__device__ __forceinline__ void partials(F f, T* __restrict__ out, T* __restrict__ part,
                                         unsigned short* __restrict__ bf, long long N, int M, long long rows_per_chunk) {
    __shared__ T sums[8][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    long long r0 = (long long)blockIdx.y * rows_per_chunk, r1 = min(r0 + rows_per_chunk, N);
    T acc = 0;
    if (c < M) {
        #pragma unroll 4
        for (long long r = r0 + threadIdx.y; r < r1; r += 8) {
            long long i = r * M + c;
            T v = f(i);
            acc = add_rn(acc, v);
            if (out) out[i] = v;
            if (bf) bf[i] = f32_to_bf16((float)v);
        }
    }
    sums[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < M) {
        T s = 0;
        for (int k = 0; k < 8; k++) s += sums[k][threadIdx.x];
        part[(long long)blockIdx.y * M + c] = s;
    }
}
"""

_SOURCE = Source(PARTIALS + r"""
template<typename T> struct Load {
    const T* a;
    __device__ __forceinline__ T operator()(long long i) const { return a[i]; }
};
// the column sums' pass over an array a: part as above, bf (may be null) = bf16(a)
template<typename T>
__global__ void column_partials(const T* __restrict__ a, T* __restrict__ part, unsigned short* __restrict__ bf,
                                long long N, int M, long long rows_per_chunk) {
    partials<T>(Load<T>{a}, (T*)nullptr, part, bf, N, M, rows_per_chunk);
}
""", ["column_partials"])

_MIN_ROWS_A_CHUNK = 64   # fewer rows a block than this: the partials' pass costs more than it saves
_BLOCKS = 132 * 8        # enough blocks in flight to keep every multiprocessor's loads queued
BLOCK = (32, 8)          # the threads of a partials() block


def plan(N, M):
    """(rows a chunk, chunks) of the first pass over (N, M) values; its grid is (ceil(M / 32), chunks)."""
    tiles = -(-M // 32)
    chunks = max(1, min(-(-N // _MIN_ROWS_A_CHUNK), -(-_BLOCKS // tiles)))
    rows = -(-N // chunks)
    return rows, -(-N // rows)


def fused_column_sums(launch, N, M, dtype):
    """(M,) the column sums of (N, M) values a kernel computes with PARTIALS' partials(): launch(part, rows,
    chunks) runs it with a (chunks, M) `part` array as plan(N, M) says; its partials are then summed as
    column_sums sums its own, so the result is column_sums of the values, bit for bit."""
    if N == 0:
        return cp.zeros(M, dtype=dtype)
    rows, chunks = plan(N, M)
    part = cp.empty((chunks, M), dtype=dtype)
    launch(part, rows, chunks)
    return part.reshape(M) if chunks == 1 else column_sums(part)


def column_sums(a, bf16_out=None):
    """(N, M) float32/float64 -> (M,) the column sums, summed in the array's own dtype. bf16_out: a uint16
    (N, M) array that receives bf16(a)'s bits (round to nearest even) in the same pass (float32 only)."""
    if not (served(a) and a.ndim == 2):
        raise TypeError(f"column_sums takes a 2-D float32/float64 CUDA array, got {a.dtype} {a.shape}")
    if bf16_out is not None and (a.dtype != np.float32 or bf16_out.dtype != np.uint16 or bf16_out.shape != a.shape
                                 or not bf16_out.flags.c_contiguous):
        raise TypeError(f"column_sums: bf16_out must be a C-contiguous uint16 array of shape {a.shape}")
    a = cp.ascontiguousarray(a)
    N, M = a.shape

    def launch(part, rows, chunks):
        _SOURCE("column_partials", a.dtype)((-(-M // 32), chunks), BLOCK,
                                            (a, part, np.uint64(0) if bf16_out is None else bf16_out, np.int64(N),
                                             np.int32(M), np.int64(rows)))

    return fused_column_sums(launch, N, M, a.dtype)
