"""Column sums of a (N, M) CUDA array in one pass over it (bias gradients, LayerNorm's dw and db), optionally
writing the bf16 bits of every element on the way (a bf16 product's dout: the conversion it needs anyway).

Deterministic, no atomics: a block takes 32 lanes' columns and a chunk of rows, each of its 8 warps every 8th
row of the chunk; a lane takes 16 bytes of a row (4 float32 or 2 float64 columns: a warp reads 512 neighbouring
bytes a row) where the rows allow it (C-contiguous, 16-byte aligned, M a multiple of that), else one column.
The block's sums go to a (chunks, M) array of partials, which the same kernel then sums in one more launch (a
block a column group, taking every chunk). The order of every addition is fixed by the shape (and that choice),
so one input gives one result bit for bit.

The first pass is a device function over any elementwise formula (PARTIALS), so a kernel that computes a
gradient can sum its columns as it writes it: elementwise values in, the same partials out
(fused_column_sums), the same sums as column_sums of the values it wrote, bit for bit.
"""
import cupy as cp
import numpy as np

from .runtime import Source, served

# partials<T, VEC>(f, out, part, bf, N, M, rows_per_chunk): the values are (N, M), element i = r M + c; a lane
# takes W = VEC ? 16 / sizeof(T) : 1 neighbouring columns, and f.at<W>(i, v) gives the W values from element i on.
# part[blockIdx.y, c] = sum of v over the rows r of chunk blockIdx.y (rows_per_chunk of them); out (may be null):
# out[i] = v; bf (may be null): bf[i] = bf16(v). Block (32, 8): lane threadIdx.x W columns, warp threadIdx.y a row
# in 8. The sums are added with add_rn (runtime.HEADER: __fadd_rn, __dadd_rn), never contracted with f's last product
# into an FMA: the sums of a computed v are those of v as stored. VEC needs M % W == 0 and 16-byte aligned rows.
PARTIALS = r"""
template<typename T, bool VEC, typename F>
__device__ __forceinline__ void partials(F f, T* __restrict__ out, T* __restrict__ part,
                                         unsigned short* __restrict__ bf, long long N, int M, long long rows_per_chunk) {
    constexpr int W = VEC ? 16 / sizeof(T) : 1;
    __shared__ T sums[8][32 * W + 1];
    int c = (blockIdx.x * 32 + threadIdx.x) * W;
    long long r0 = (long long)blockIdx.y * rows_per_chunk, r1 = min(r0 + rows_per_chunk, N);
    T acc[W];
#pragma unroll
    for (int k = 0; k < W; k++) acc[k] = 0;
    if (c < M) {
        #pragma unroll 4
        for (long long r = r0 + threadIdx.y; r < r1; r += 8) {
            long long i = r * M + c;
            T v[W];
            f.template at<W>(i, v);
#pragma unroll
            for (int k = 0; k < W; k++) acc[k] = add_rn(acc[k], v[k]);
            if (out) store_lanes<W>(out + i, v);
            if (bf) store_bf16_lanes<W>(bf + i, v);
        }
    }
#pragma unroll
    for (int k = 0; k < W; k++) sums[threadIdx.y][threadIdx.x * W + k] = acc[k];
    __syncthreads();
    if (threadIdx.y == 0 && c < M) {
#pragma unroll
        for (int k = 0; k < W; k++) {
            T s = 0;
            for (int j = 0; j < 8; j++) s += sums[j][threadIdx.x * W + k];
            part[(long long)blockIdx.y * M + c + k] = s;
        }
    }
}
"""

_SOURCE = Source(PARTIALS + r"""
template<typename T> struct Load {
    const T* a;
    template<int W> __device__ __forceinline__ void at(long long i, T (&v)[W]) const { load_lanes<W>(a + i, v); }
};
// the column sums' pass over an array a: part as above, bf (may be null) = bf16(a)
template<typename T, bool VEC>
__global__ void column_partials(const T* __restrict__ a, T* __restrict__ part, unsigned short* __restrict__ bf,
                                long long N, int M, long long rows_per_chunk) {
    partials<T, VEC>(Load<T>{a}, (T*)nullptr, part, bf, N, M, rows_per_chunk);
}
""", ["column_partials<{T}, false>", "column_partials<{T}, true>"])

_MIN_ROWS_A_CHUNK = 64   # fewer rows a block than this: the partials' pass costs more than it saves
_BLOCKS = 132 * 8        # enough blocks in flight to keep every multiprocessor's loads queued
BLOCK = (32, 8)          # the threads of a partials() block


def vector(M, *arrays):
    """Whether a lane takes 16 bytes of a row: C-contiguous arrays on 16-byte boundaries, M a multiple of the lanes."""
    return all(a.flags.c_contiguous and a.data.ptr % 16 == 0 and M % (16 // a.itemsize) == 0 for a in arrays)


def plan(N, M, lanes):
    """(rows a chunk, chunks, grid) of the first pass over (N, M) values, a thread taking `lanes` columns."""
    tiles = -(-M // (32 * lanes))
    chunks = max(1, min(-(-N // _MIN_ROWS_A_CHUNK), -(-_BLOCKS // tiles)))
    rows = -(-N // chunks)
    chunks = -(-N // rows)
    return rows, chunks, (tiles, chunks)


def fused_column_sums(launch, N, M, dtype, vec):
    """(M,) the column sums of (N, M) values a kernel computes with PARTIALS' partials<T, vec>(): launch(part,
    rows, grid) runs it with a (chunks, M) `part` array as plan() says; its partials are then summed as
    column_sums sums its own, so the result is column_sums of the values (vector(M, values) == vec), bit for bit."""
    if N == 0:
        return cp.zeros(M, dtype=dtype)
    lanes = 16 // np.dtype(dtype).itemsize if vec else 1
    rows, chunks, grid = plan(N, M, lanes)
    part = cp.empty((chunks, M), dtype=dtype)
    launch(part, rows, grid)
    if chunks == 1:
        return part.reshape(M)
    # the chunks' partials in one more launch: one block a column group takes every chunk (at most _BLOCKS rows)
    out = cp.empty((1, M), dtype=dtype)
    _SOURCE(f"column_partials<{{T}}, {'true' if vec else 'false'}>", dtype)(
        (grid[0], 1), BLOCK, (part, out, np.uint64(0), np.int64(chunks), np.int32(M), np.int64(chunks)))
    return out.reshape(M)


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
    vec = vector(M, a)
    if vec and bf16_out is not None and bf16_out.data.ptr % 8:   # 8-byte stores; a lane a column would sum otherwise
        raise TypeError("column_sums: bf16_out must start on an 8-byte boundary where a's rows take 16-byte lanes")

    def launch(part, rows, grid):
        _SOURCE(f"column_partials<{{T}}, {'true' if vec else 'false'}>", a.dtype)(
            grid, BLOCK, (a, part, np.uint64(0) if bf16_out is None else bf16_out, np.int64(N), np.int32(M),
                          np.int64(rows)))

    return fused_column_sums(launch, N, M, a.dtype, vec)
