"""The C++ helpers of flash_mma.py's kernels: shared-memory matrix loads (ldmatrix), the bf16 tensor-core
product (mma.sync m16n8k16), bf16 rounding, the bf16 tiles' asynchronous loaders, the backward's first pass
(rowsum(dy * y), dQ's sums zeroed, dy's bf16 copy), the stored dropout mask's layout, the bf16 kernels' argument
list, and the steps the bf16 and tf32 kernels share (the online softmax of a score tile, the output rows, Pd and
dS of a tile, dQ's atomic sums, dk and dv). Kept apart from the launchers so each file stays short; the kernels
are in flash_mma_bf16.py and flash_mma_tf32.py (which holds the tf32 helpers: tf32 rounding and the 3xTF32 split,
the tf32 tiles and their fragments; the m16n8k8 product is runtime.TENSOR_CORE's).
"""

from .runtime import TENSOR_CORE

SOURCE = TENSOR_CORE + r"""
// four 8x8 bf16 matrices from shared memory (lane l gives row l % 8 of matrix l / 8); .trans: transposed
__device__ __forceinline__ void ldsm4(unsigned (&r)[4], const unsigned short* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm4t(unsigned (&r)[4], const unsigned short* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
// c (16x8 float32) += a (16x16 bf16, row-major fragments) b (16x8 bf16, column fragments b0 b1)
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// bf16(lo) in the low half, bf16(hi) in the high half, each rounded to nearest even
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ void store2(float* p, float a, float b) { *(float2*)p = make_float2(a, b); }
__device__ __forceinline__ void store2(unsigned short* p, float a, float b) { *(unsigned*)p = pack_bf16(a, b); }

__device__ __forceinline__ float4 four(const float* p) { return *(const float4*)p; }
__device__ __forceinline__ float4 four(const unsigned short* p) {
    uint2 u = *(const uint2*)p;
    return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                       __uint_as_float(u.y & 0xffff0000u));
}
// Backward's first pass, HD / 4 threads a row (b, h, t): D[(b NH + h) T + t] = sum_d dy y (4 elements a thread), and
// the row of dq_acc (strides ab, ah, at) zeroed for the backward kernel's atomic sums. For the bf16 kernels (lse not
// null): D[rows + r] = lse[r] in base 2, and (dyb not null) dy's bf16 bits into dyb (dy's strides).
template<typename O, int HD>
__global__ void mma_rowdot_zero(const O* y, const O* dy, float* D, float* dq_acc, unsigned short* dyb, const float* lse,
                                int NH, int T, long long ob, long long oh, long long ot, long long ab, long long ah,
                                long long at, long long rows) {
    constexpr int L = HD / 4;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x, r = i / L;
    int c = (int)(i % L) * 4;
    bool live = r < rows;
    long long bh = live ? r / T : 0, tt = live ? r % T : 0;
    float total = 0.f;
    if (live) {
        long long o = (bh / NH) * ob + (bh % NH) * oh + tt * ot + c;
        float4 a = four(y + o), b = four(dy + o);
        total = a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
        *(float4*)(dq_acc + (bh / NH) * ab + (bh % NH) * ah + tt * at + c) = make_float4(0.f, 0.f, 0.f, 0.f);
        if (dyb) *(uint2*)(dyb + o) = make_uint2(pack_bf16(b.x, b.y), pack_bf16(b.z, b.w));
    }
#pragma unroll
    for (int m = L / 2; m > 0; m >>= 1) total += __shfl_xor_sync(0xffffffff, total, m);
    if (live && c == 0) {
        D[r] = total;
        if (lse) D[rows + r] = lse[r] * 1.4426950408889634f;
    }
}

// rows [r0, r0 + 64) of a (T, HD) bf16 head matrix (row stride st elements) into dst[64][HD + 8] through cp.async
// (16 bytes a copy; zeros past T; commit and wait are the caller's)
template<int HD>
__device__ __forceinline__ void async_tile(unsigned short* dst, const unsigned short* src, long long st, int r0, int T) {
    constexpr int CH = HD / 8;
#pragma unroll
    for (int e = threadIdx.x; e < 64 * CH; e += 128) {
        int r = e / CH, c = e % CH;
        bool in = r0 + r < T;
        cp16(dst + r * (HD + 8) + c * 8, src + (long long)(in ? r0 + r : r0) * st + c * 8, in ? 16 : 0);
    }
}
// A query tile of the bf16 backward through cp.async into dst: q[64][HD + 8] and dy[64][HD + 8] (bf16 rows
// [r0, r0 + 64), strides sq and sy), then D[64] and L[64] (float32, a value a row; 128 threads; zeros past T), then
// (bits not null) the 128 words of the tile pair's keep block.
template<int HD>
__device__ __forceinline__ void async_queries(unsigned short* dst, const unsigned short* q, long long sq,
        const unsigned short* dy, long long sy, const float* D, const float* L, const unsigned* bits, int r0, int T) {
    async_tile<HD>(dst, q, sq, r0, T);
    async_tile<HD>(dst + 64 * (HD + 8), dy, sy, r0, T);
    const int i = threadIdx.x & 63;
    const bool in = r0 + i < T;
    float* f = (float*)(dst + 128 * (HD + 8));
    cp4(f + threadIdx.x, (threadIdx.x < 64 ? D : L) + (in ? r0 + i : r0), in ? 4 : 0);
    if (bits && threadIdx.x < 32) cp16(f + 128 + 4 * threadIdx.x, bits + 4 * threadIdx.x, 16);
}

#define MMA_ARGS const unsigned short* q, const unsigned short* k, const unsigned short* v, int NH, int T, int HS, \
    long long sb, long long sh, long long st, long long ob, long long oh, long long ot, float scale, int causal, \
    const unsigned long long* seed_ptr, unsigned long long seed, float drop_p, float drop_scale, int has_drop
#define MMA_SETUP if (has_drop) seed = dropout_seed(seed_ptr, seed); \
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3; \
    const long long bh = blockIdx.x, in0 = (bh / NH) * sb + (bh % NH) * sh, out0 = (bh / NH) * ob + (bh % NH) * oh; \
    const float sl2 = scale * 1.4426950408889634f; \
    extern __shared__ __align__(16) unsigned short sm[];

// ---- what the bf16 and tf32 kernels share ----
// The online softmax step of one 16 x 64 score tile s (accumulator layout: a lane holds rows row0 and row0 + 8,
// keys k0 + 8 j + 2 t and + 1): masks, scales to base 2, moves the rows' maxima m and sums l on, rescales o, and
// leaves P (dropped) in s for the product with V. Returns the dropout's keep bits of the lane's 32 elements, element
// s[j][e] at bit 4 j + e (zero without dropout): the word mma_flash_forward stores at keep_block.
template<int HD>
__device__ __forceinline__ unsigned softmax_tile(float (&s)[8][4], float (&m)[2], float (&l)[2], float (&o)[HD / 8][4], int k0,
        int row0, int t, int T, int causal, float sl2, long long bh, int has_drop, unsigned long long seed, float drop_p,
        float drop_scale) {
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {   // element (row0 + 8 (e / 2), k0 + 8 j + 2 t + e % 2)
            int kj = k0 + 8 * j + 2 * t + (e & 1), qi = row0 + 8 * (e >> 1);
            float x = s[j][e] * sl2;
            if (kj >= T || (causal && kj > qi)) x = NEG_INF;
            s[j][e] = x;
            mx[e >> 1] = fmaxf(mx[e >> 1], x);
        }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 2));
        alpha[r] = mx[r] == NEG_INF ? 1.f : exp2f(m[r] - mx[r]);
        m[r] = mx[r];
        l[r] *= alpha[r];
    }
    const float mb[2] = {m[0] == NEG_INF ? 0.f : m[0], m[1] == NEG_INF ? 0.f : m[1]};   // a masked score's x - mb: -inf
    unsigned bits = 0;
    if (has_drop) {   // unrolled 4 times, not 32: all 32 hashes were computed first and held (CUDA 13: 168 registers)
        const long long base = (bh * T + row0) * (long long)T + k0 + 2 * t;
#pragma unroll 4
        for (int i = 0; i < 32; i++)   // element s[i / 4][i % 4]
            bits |= (unsigned)dropout_keep(seed, base + ((i & 2) ? 8LL * T : 0LL) + 8 * (i >> 2) + (i & 1), drop_p) << i;
    }
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float p = exp2_ftz(s[j][e] - mb[e >> 1]);
            l[e >> 1] += p;
            if (has_drop) p = (bits >> (4 * j + e)) & 1u ? p * drop_scale : 0.f;
            s[j][e] = p;
        }
#pragma unroll
    for (int j = 0; j < HD / 8; j++) { o[j][0] *= alpha[0]; o[j][1] *= alpha[0]; o[j][2] *= alpha[1]; o[j][3] *= alpha[1]; }
    return bits;
}
// The bf16 kernels' stored dropout mask, a 512-byte block of 128 words for each (b, h, query tile, key tile): word
// 32 w + lane is softmax_tile's keep bits of warp w's lane. The backward's lane (g, t) of warp w needs, for its
// element (key 16 w + g + 8 (e / 2), query 8 j + 2 t + e % 2), the forward's element (query 16 (j / 2) + 8 (j % 2) +
// 2 t + e % 2, key 8 (2 w + e / 2) + g): word 32 (j / 2) + 4 (2 t + e % 2) + g / 2, bit 8 w + 4 (e / 2) + 2 (j % 2) +
// g % 2. keep_words reads the eight words a lane takes from a block in shared memory, each shifted right by
// 8 w + g % 2; keep_bit picks element (j, e) from them.
__device__ __forceinline__ long long keep_block(long long bh, int qt, int kt, int tiles) {
    return ((bh * tiles + qt) * tiles + kt) * 128;
}
__device__ __forceinline__ void keep_words(unsigned (&w)[4][2], const unsigned* block, int warp, int g, int t) {
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int b = 0; b < 2; b++) w[a][b] = block[32 * a + 4 * (2 * t + b) + (g >> 1)] >> (8 * warp + (g & 1));
}
__device__ __forceinline__ bool keep_bit(const unsigned (&w)[4][2], int j, int e) {
    return (w[j >> 1][e & 1] >> (4 * (e >> 1) + 2 * (j & 1))) & 1u;
}
// After the last key tile: y's rows row0 and row0 + 8 = o / l, and their log-sum-exp (natural log).
template<typename O, int HD>
__device__ __forceinline__ void finish_rows(const float (&o)[HD / 8][4], const float (&m)[2], float (&l)[2], O* y,
        long long out0, long long ot, float* lse, long long bh, int row0, int t, int T, unsigned short* yb = nullptr) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 2);
        int qi = row0 + 8 * r;
        if (qi >= T) continue;
        float inv = 1.f / l[r];
        O* yr = y + out0 + qi * ot;
#pragma unroll
        for (int j = 0; j < HD / 8; j++) {
            float a = o[j][2 * r] * inv, b = o[j][2 * r + 1] * inv;
            store2(yr + 8 * j + 2 * t, a, b);
            if (yb) store2(yb + out0 + qi * ot + 8 * j + 2 * t, a, b);   // y's bf16 copy (float32 y only)
        }
        if (t == 0) lse[bh * T + qi] = m[r] * 0.6931471805599453f + logf(l[r]);
    }
}
// Pd^T and dS^T of one 16 keys x 64 queries tile, in place of S^T (s) and dPd^T (dp): element (key0 + 8 (e / 2),
// q0 + 8 j + 2 t + e % 2); Ls, Ds: the 64 queries' log-sum-exp (base 2) and rowsum(dy * y). words (BITS): the
// forward's keep bits (keep_words) in place of the hash.
template<bool BITS = false>
__device__ __forceinline__ void grad_tile(float (&s)[8][4], float (&dp)[8][4], const float* Ls, const float* Ds, int key0,
        int q0, int t, int T, int causal, float sl2, long long bh, int has_drop, unsigned long long seed, float drop_p,
        float drop_scale, const unsigned (&words)[4][2] = {}) {
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {   // element (key key0 + 8 (e / 2), query q0 + 8 j + 2 t + e % 2)
            int kj = key0 + 8 * (e >> 1), c = 8 * j + 2 * t + (e & 1), qi = q0 + c;
            bool ok = qi < T && kj < T && !(causal && kj > qi);
            float p = ok ? exp2_ftz(s[j][e] * sl2 - Ls[c]) : 0.f, pd = p, dpd = dp[j][e];
            if (has_drop && ok) {
                bool keep = BITS ? keep_bit(words, j, e) : dropout_keep(seed, (bh * T + qi) * (long long)T + kj, drop_p);
                pd = keep ? p * drop_scale : 0.f;
                dpd = keep ? dpd * drop_scale : 0.f;
            }
            dp[j][e] = p * (dpd - Ds[c]);   // dS^T
            s[j][e] = pd;                   // Pd^T
        }
}
// dQ's rows q0 + 16 warp + g (and + 8) += gq scale, atomically (dq_acc's strides ab, ah, at; rows 16-byte
// aligned). A lane holds two neighbouring columns of each row; neighbours t and t ^ 1 swap halves (a shuffle) so
// that even t holds four columns of row g and odd t four of row g + 8: one 16-byte atomic add (sm_90, CUDA 12.1 on)
// instead of four 4-byte ones (earlier GPUs or compilers).
template<int HD>
__device__ __forceinline__ void add_dq(const float (&gq)[HD / 8][4], float* dq_acc, long long bh, int NH, long long ab,
        long long ah, long long at, int q0, int warp, int g, int t, int T, float scale) {
    const bool odd = t & 1;
    const int qi = q0 + warp * 16 + g + (odd ? 8 : 0);
    float* acc = dq_acc + (bh / NH) * ab + (bh % NH) * ah + (long long)qi * at + 2 * (t & ~1);
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
        float o0 = __shfl_xor_sync(0xffffffff, odd ? gq[j][0] : gq[j][2], 1);
        float o1 = __shfl_xor_sync(0xffffffff, odd ? gq[j][1] : gq[j][3], 1);
        float a0 = (odd ? o0 : gq[j][0]) * scale, a1 = (odd ? o1 : gq[j][1]) * scale;
        float a2 = (odd ? gq[j][2] : o0) * scale, a3 = (odd ? gq[j][3] : o1) * scale;
        if (qi >= T) continue;
#if __CUDA_ARCH__ >= 900 && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 1))
        asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" :: "l"(acc + 8 * j), "f"(a0), "f"(a1), "f"(a2),
                     "f"(a3) : "memory");
#else
        atomicAdd(acc + 8 * j, a0); atomicAdd(acc + 8 * j + 1, a1); atomicAdd(acc + 8 * j + 2, a2);
        atomicAdd(acc + 8 * j + 3, a3);
#endif
    }
}
// At the end: dk (times scale) and dv of the keys key0 and key0 + 8
template<typename O, int HD>
__device__ __forceinline__ void store_kv(const float (&gk)[HD / 8][4], const float (&gv)[HD / 8][4], O* dk, O* dv,
        long long in0, long long st, int key0, int t, int T, float scale) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int kj = key0 + 8 * r;
        if (kj >= T) continue;
#pragma unroll
        for (int j = 0; j < HD / 8; j++) {
            store2(dk + in0 + kj * st + 8 * j + 2 * t, gk[j][2 * r] * scale, gk[j][2 * r + 1] * scale);
            store2(dv + in0 + kj * st + 8 * j + 2 * t, gv[j][2 * r], gv[j][2 * r + 1]);
        }
    }
}
"""
