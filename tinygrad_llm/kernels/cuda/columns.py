"""Column sums of a (N, M) CUDA array in one pass over it (bias gradients, LayerNorm's dw and db), optionally
writing the bf16 bits of every element on the way (a bf16 product's dout: the conversion it needs anyway).

Deterministic, no atomics: a block takes 32 columns and a chunk of rows, each of its 8 warps every 8th row
of the chunk, a lane one column (a warp reads 32 neighbours: one 128-byte line a row); the block's sums go
to a (chunks, M) array of partials, summed by the same kernel over its rows until one row is left. The
order of every addition is fixed by the shape, so one input gives one result bit for bit.
"""
import cupy as cp
import numpy as np

from .runtime import Source, served

_SOURCE = Source(r"""
// part[blockIdx.y, c] = sum of a[r, c] over the rows r of chunk blockIdx.y (rows_per_chunk of them);
// bf (may be null): bf[r, c] = bf16(a[r, c]). Block (32, 8): lane threadIdx.x a column, warp threadIdx.y a row.
template<typename T>
__global__ void column_partials(const T* __restrict__ a, T* __restrict__ part, unsigned short* __restrict__ bf,
                                long long N, int M, long long rows_per_chunk) {
    __shared__ T sums[8][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    long long r0 = (long long)blockIdx.y * rows_per_chunk, r1 = min(r0 + rows_per_chunk, N);
    T acc = 0;
    if (c < M) {
        #pragma unroll 4
        for (long long r = r0 + threadIdx.y; r < r1; r += 8) {
            T v = a[r * M + c];
            acc += v;
            if (bf) bf[r * M + c] = f32_to_bf16((float)v);
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
""", ["column_partials"])

_MIN_ROWS_A_CHUNK = 64   # fewer rows a block than this: the partials' pass costs more than it saves
_BLOCKS = 132 * 8        # enough blocks in flight to keep every multiprocessor's loads queued


def _launch(a, part, bf, rows_per_chunk, chunks):
    N, M = a.shape
    _SOURCE("column_partials", a.dtype)((-(-M // 32), chunks), (32, 8),
                                        (a, part, np.uint64(0) if bf is None else bf, np.int64(N), np.int32(M),
                                         np.int64(rows_per_chunk)))


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
    out = cp.zeros(M, dtype=a.dtype) if N == 0 else None
    bf = bf16_out
    while out is None:
        tiles = -(-M // 32)
        chunks = max(1, min(-(-N // _MIN_ROWS_A_CHUNK), -(-_BLOCKS // tiles)))
        rows = -(-N // chunks)
        chunks = -(-N // rows)
        part = cp.empty((chunks, M), dtype=a.dtype)
        _launch(a, part, bf, rows, chunks)
        if chunks == 1:
            out = part.reshape(M)
        a, N, bf = part, chunks, None
    return out
