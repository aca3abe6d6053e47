"""The C++ of gemm_3xtf32.py: the 3xTF32 GEMM kernel (tiles through a cp.async ring, tf32 splits as fragments are
read, m16n8k8 products summed per k tile and promoted into float32 sums) and the sum of its split-k slices.
"""

from .runtime import TENSOR_CORE

SOURCE = TENSOR_CORE + r"""
// x = hi + lo: hi is x rounded to tf32's 11 significant bits (half up in magnitude: add half a tf32 unit, clear
// the 13 low bits), lo = x - hi exactly (|lo| <= 2^-11 |x|), of which the tensor cores read the top 19 bits
// (truncated: off by under 2^-10 |lo| <= 2^-21 |x|). Inf and NaN inputs give NaN lo words, so NaN results; so do
// finite values within half a tf32 unit of float32's largest (|x| >= (2 - 2^-11) 2^127: hi rounds to infinity).
__device__ __forceinline__ void split(float x, unsigned& hi, unsigned& lo) {
    hi = (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
    lo = __float_as_uint(x - __uint_as_float(hi));
}

constexpr int BK = 32;
// a tile's words: k-contiguous (R rows of BK, stride BK + 8) or R-contiguous (BK rows of R, stride R + 4)
template<int R, bool KCONTIG> struct Tile {
    static constexpr int LD = KCONTIG ? BK + 8 : R + 4;
    static constexpr int WORDS = KCONTIG ? R * LD : BK * LD;
    // rows [r0, r0 + R) x k [k0, k0 + BK) of a matrix whose element (r, k) is src[r * ld + k] (KCONTIG) or
    // src[k * ld + r], into dst; zeros past rows or kend
    static __device__ __forceinline__ void load(float* dst, const float* src, long long ld, int r0, int rows, int k0,
                                                int kend) {
        constexpr int CHUNKS = R * BK / 4, PER_ROW = KCONTIG ? BK / 4 : R / 4;
        static_assert(CHUNKS % 256 == 0, "whole rounds of 256 threads");
#pragma unroll
        for (int it = 0; it < CHUNKS / 256; it++) {
            int e = threadIdx.x + 256 * it, i = e / PER_ROW, j = (e % PER_ROW) * 4;   // tile row i, its words j..j+3
            int r = KCONTIG ? r0 + i : r0 + j, k = KCONTIG ? k0 + j : k0 + i;
            bool live = r < rows && k < kend;
            const float* p = live ? (KCONTIG ? src + (long long)r * ld + k : src + (long long)k * ld + r) : src;
            cp16(dst + i * LD + j, p, live ? 16 : 0);
        }
    }
    // the hi and lo parts of the values at (r, k = kb + 2t) and (r, kb + 2t + 1)
    static __device__ __forceinline__ void pair(const float* s, int r, int kb, int t, unsigned (&h)[2], unsigned (&l)[2]) {
        float x0, x1;
        if constexpr (KCONTIG) { float2 v = *(const float2*)(s + r * LD + kb + 2 * t); x0 = v.x; x1 = v.y; }
        else { x0 = s[(kb + 2 * t) * LD + r]; x1 = s[(kb + 2 * t + 1) * LD + r]; }
        split(x0, h[0], l[0]);
        split(x1, h[1], l[1]);
    }
};

// C (M x N, row stride ldc) = op(A) op(B) (+ bias) (+ beta C): A's element (m, k) at a[m lda + k], or a[k lda + m]
// when TA; B's (k, n) at b[k ldb + n], or b[n ldb + k] when TB. blockIdx.z: the k slice [z kslice, (z + 1) kslice);
// with gridDim.z > 1 the slice's sums go to part + z M N (row stride N), bias and beta left to gemm3x_sum.
template<int BM, int BN, int WM, int WN, int STAGES, bool TA, bool TB>
__global__ void __launch_bounds__(256) gemm3x(const float* a, const float* b, float* c, int M, int N, int K,
                                              long long lda, long long ldb, long long ldc, const float* bias,
                                              float beta, int kslice, float* part) {
    using TileA = Tile<BM, !TA>;
    using TileB = Tile<BN, TB>;
    constexpr int MT = WM / 16, NT = WN / 8, WARPS_N = BN / WN;
    static_assert((BM / WM) * WARPS_N == 8, "8 warps a block");
    extern __shared__ __align__(16) float smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;
    const int kbeg = blockIdx.z * kslice, kend = min(K, kbeg + kslice), ktiles = (kend - kbeg + BK - 1) / BK;
    float acc[MT][NT][4];
    zero(acc);
    auto stage = [&](int s) { return smem + s * (TileA::WORDS + TileB::WORDS); };
    auto fill = [&](int kt) {
        if (kt < ktiles) {
            float* s = stage(kt % STAGES);
            TileA::load(s, a, lda, m0, M, kbeg + kt * BK, kend);
            TileB::load(s + TileA::WORDS, b, ldb, n0, N, kbeg + kt * BK, kend);
        }
        cp_commit();   // (an empty group past the end keeps wait_group's count)
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) fill(s);
    for (int kt = 0; kt < ktiles; kt++) {
        cp_wait<STAGES - 2>();
        __syncthreads();          // tile kt is in; every warp is done with the stage fill() overwrites next
        fill(kt + STAGES - 1);
        const float *As = stage(kt % STAGES), *Bs = As + TileA::WORDS;
        float tacc[MT][NT][4];   // this k tile's sums
        zero(tacc);
#pragma unroll
        for (int kb = 0; kb < BK; kb += 8) {
            unsigned ah[MT][4], al[MT][4], bh[NT][2], bl[NT][2];
#pragma unroll
            for (int i = 0; i < MT; i++) {   // slots: a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
                unsigned h0[2], l0[2], h1[2], l1[2];
                TileA::pair(As, wm + 16 * i + g, kb, t, h0, l0);
                TileA::pair(As, wm + 16 * i + g + 8, kb, t, h1, l1);
                ah[i][0] = h0[0]; ah[i][1] = h1[0]; ah[i][2] = h0[1]; ah[i][3] = h1[1];
                al[i][0] = l0[0]; al[i][1] = l1[0]; al[i][2] = l0[1]; al[i][3] = l1[1];
            }
#pragma unroll
            for (int j = 0; j < NT; j++) TileB::pair(Bs, wn + 8 * j + g, kb, t, bh[j], bl[j]);
#pragma unroll
            for (int i = 0; i < MT; i++)
#pragma unroll
                for (int j = 0; j < NT; j++) {   // the small terms first
                    mma1688(tacc[i][j], al[i], bh[j][0], bh[j][1]);
                    mma1688(tacc[i][j], ah[i], bl[j][0], bl[j][1]);
                    mma1688(tacc[i][j], ah[i], bh[j][0], bh[j][1]);
                }
        }
        // the tile's sums into the running sums, rounded to nearest: the tensor cores' own additions truncate, and
        // kept to one k tile (12 products a fragment) their error does not build up along k
#pragma unroll
        for (int i = 0; i < MT; i++)
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc[i][j][e] += tacc[i][j][e];
    }
    cp_wait<0>();
    const bool partial = gridDim.z > 1;
    float* out = partial ? part + (long long)blockIdx.z * M * N : c;
    const long long ld = partial ? N : ldc;
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < NT; j++) {
            int col = n0 + wn + 8 * j + 2 * t;
            if (col >= N) continue;   // (N is a multiple of 4: col + 1 < N too)
            float2 add = make_float2(0.f, 0.f);
            if (!partial && bias) add = *(const float2*)(bias + col);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int row = m0 + wm + 16 * i + g + 8 * h;
                if (row >= M) continue;
                float2 v = make_float2(acc[i][j][2 * h] + add.x, acc[i][j][2 * h + 1] + add.y);
                float2* p = (float2*)(out + row * ld + col);
                if (!partial && beta != 0.f) { float2 o = *p; v.x += beta * o.x; v.y += beta * o.y; }
                *p = v;
            }
        }
}

// C = sum over z < S of part[z] (M x N, row stride N; in order z = 0, 1, ...) (+ bias) (+ beta C), 4 columns a thread
__global__ void gemm3x_sum(const float* part, float* c, int M, int N, long long ldc, const float* bias, float beta, int S) {
    long long i = (blockIdx.x * (long long)blockDim.x + threadIdx.x) * 4, total = (long long)M * N;
    if (i >= total) return;
    int row = (int)(i / N), col = (int)(i % N);
    float4 v = *(const float4*)(part + i);
    for (int z = 1; z < S; z++) {
        float4 w = *(const float4*)(part + z * total + i);
        v.x += w.x; v.y += w.y; v.z += w.z; v.w += w.w;
    }
    if (bias) { float4 q = *(const float4*)(bias + col); v.x += q.x; v.y += q.y; v.z += q.z; v.w += q.w; }
    float4* p = (float4*)(c + row * ldc + col);
    if (beta != 0.f) { float4 o = *p; v.x += beta * o.x; v.y += beta * o.y; v.z += beta * o.z; v.w += beta * o.w; }
    *p = v;
}
"""
