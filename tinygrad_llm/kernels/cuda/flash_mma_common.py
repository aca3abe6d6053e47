"""The C++ helpers of flash_mma.py's kernels: shared-memory matrix loads (ldmatrix), the tensor-core
products (mma.sync: bf16 m16n8k16, tf32 m16n8k8), bf16 and tf32 rounding, the split of a float32 into two
tf32 parts (3xTF32), the tiles' loaders, the backward's first pass (rowsum(dy * y), dQ's sums zeroed), the
kernels' argument lists, and the steps the bf16 and tf32 kernels share (the online softmax of a score tile,
the output rows, Pd and dS of a tile, dQ's atomic sums, dk and dv). Kept apart from the launchers so each file
stays short; the kernels are in flash_mma_bf16.py and flash_mma_tf32.py.
"""

SOURCE = r"""
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
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
__device__ __forceinline__ uint4 eight_bf16(const unsigned short* p) { return *(const uint4*)p; }
__device__ __forceinline__ uint4 eight_bf16(const float* p) {
    float4 a = *(const float4*)p, b = *(const float4*)(p + 4);
    return make_uint4(pack_bf16(a.x, a.y), pack_bf16(a.z, a.w), pack_bf16(b.x, b.y), pack_bf16(b.z, b.w));
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
// the row of dq_acc (strides ab, ah, at) zeroed for the backward kernel's atomic sums.
template<typename O, int HD>
__global__ void mma_rowdot_zero(const O* y, const O* dy, float* D, float* dq_acc, int NH, int T, long long ob,
                                long long oh, long long ot, long long ab, long long ah, long long at, long long rows) {
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
    }
#pragma unroll
    for (int m = L / 2; m > 0; m >>= 1) total += __shfl_xor_sync(0xffffffff, total, m);
    if (live && c == 0) D[r] = total;
}

// rows [r0, r0 + 64) of a (T, HD) head matrix (row stride st elements) into dst[64][HD + 8] as bf16; zeros past T
template<int HD, typename S>
__device__ __forceinline__ void load_tile(unsigned short* dst, const S* src, long long st, int r0, int T) {
    constexpr int CH = HD / 8;
    for (int e = threadIdx.x; e < 64 * CH; e += 128) {
        int r = e / CH, c = e % CH;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (r0 + r < T) x = eight_bf16(src + (long long)(r0 + r) * st + c * 8);
        *(uint4*)(dst + r * (HD + 8) + c * 8) = x;
    }
}

#define MMA_ARGS const unsigned short* q, const unsigned short* k, const unsigned short* v, int NH, int T, int HS, \
    long long sb, long long sh, long long st, long long ob, long long oh, long long ot, float scale, int causal, \
    const unsigned long long* seed_ptr, unsigned long long seed, float drop_p, float drop_scale, int has_drop
#define MMA_SETUP if (has_drop) seed = dropout_seed(seed_ptr, seed); \
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3; \
    const long long bh = blockIdx.y, in0 = (bh / NH) * sb + (bh % NH) * sh, out0 = (bh / NH) * ob + (bh % NH) * oh; \
    const float sl2 = scale * 1.4426950408889634f; \
    extern __shared__ __align__(16) unsigned short sm[];

// ---- TF32: float32 q, k, v rounded to tf32 (round to nearest, ties away) as the mma operands ----
__device__ __forceinline__ unsigned to_tf32(float x) { unsigned r; asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x)); return r; }
// c (16x8 float32) += a (16x8 tf32, row fragments) b (8x8 tf32, column fragments b0 b1)
__device__ __forceinline__ void mma1688(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// x = hi + lo + (under 2^-22 |x|): hi = tf32(x), lo = tf32(x - hi) (x - hi is exact in float32)
__device__ __forceinline__ void split_tf32(float x, unsigned& hi, unsigned& lo) {
    hi = to_tf32(x);
    lo = to_tf32(x - __uint_as_float(hi));
}
// the operand words of a tile: float32 bits kept whole for SPLIT (split where read), else rounded to tf32 once
template<bool SPLIT> __device__ __forceinline__ unsigned tile_word(float x) { return SPLIT ? __float_as_uint(x) : to_tf32(x); }
// c += a b: SPLIT (3xTF32, float32's accuracy): a_lo b_hi + a_hi b_lo + a_hi b_hi, b's words split here; else one
// tf32 product (a_lo unused)
template<bool SPLIT>
__device__ __forceinline__ void mma_t(float (&c)[4], const unsigned (&ah)[4], const unsigned (&al)[4], unsigned b0, unsigned b1) {
    if constexpr (SPLIT) {
        unsigned h0, l0, h1, l1;
        split_tf32(__uint_as_float(b0), h0, l0);
        split_tf32(__uint_as_float(b1), h1, l1);
        mma1688(c, al, h0, h1);
        mma1688(c, ah, l0, l1);
        mma1688(c, ah, h0, h1);
    } else {
        mma1688(c, ah, b0, b1);
    }
}
// four operand values as (hi, lo) fragments (SPLIT) or tf32 fragments in hi
template<bool SPLIT>
__device__ __forceinline__ void operand(unsigned (&hi)[4], unsigned (&lo)[4], float x0, float x1, float x2, float x3) {
    float x[4] = {x0, x1, x2, x3};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if constexpr (SPLIT) split_tf32(x[i], hi[i], lo[i]); else hi[i] = to_tf32(x[i]);
    }
}
// The tf32 tiles: 64 rows of HD tile words at row stride HD + 8 words, 8-word column blocks swapped in pairs on rows
// with bit 2 set (sw32). The kernels take each 8-wide k block of a product in the order k = 2t, 2t + 1 for the
// fragments' slots t, t + 4 (a sum over k does not depend on its order, as long as both operands agree), so
// that a lane's two words of a row fragment are neighbours (one 8-byte load), and an accumulator's columns 2t,
// 2t + 1 are already the lane's operand slots (no shuffles). With the stride (8 mod 32 banks) and the swap,
// both ways of reading a tile (8-byte row pairs; single words from rows 2t and 2t + 1) hit 32 distinct banks.
__device__ __forceinline__ int sw32(int row, int col, int ld) { return row * ld + (col ^ ((row & 4) << 1)); }
// rows [r0, r0 + 64) of a float32 (T, HD) head matrix into dst (sw32, stride HD + 8) as tile_word<SPLIT>; zeros past T
template<int HD, bool SPLIT>
__device__ __forceinline__ void load_tile32(unsigned* dst, const float* src, long long st, int r0, int T) {
    constexpr int CH = HD / 4;
    for (int e = threadIdx.x; e < 64 * CH; e += 128) {
        int r = e / CH, c = e % CH;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r0 + r < T) x = *(const float4*)(src + (long long)(r0 + r) * st + c * 4);
        *(uint4*)(dst + sw32(r, c * 4, HD + 8)) = make_uint4(tile_word<SPLIT>(x.x), tile_word<SPLIT>(x.y),
                                                             tile_word<SPLIT>(x.z), tile_word<SPLIT>(x.w));
    }
}
// row fragment (16 rows from r, the 8 k columns from c) of a sw32 tile: slots t, t + 4 are columns c + 2t, c + 2t + 1
template<bool SPLIT>
__device__ __forceinline__ void frag_a(unsigned (&hi)[4], unsigned (&lo)[4], const unsigned* m, int ld, int r, int c, int g, int t) {
    uint2 x = *(const uint2*)(m + sw32(r + g, c + 2 * t, ld)), y = *(const uint2*)(m + sw32(r + g + 8, c + 2 * t, ld));
    if constexpr (SPLIT) operand<true>(hi, lo, __uint_as_float(x.x), __uint_as_float(y.x), __uint_as_float(x.y), __uint_as_float(y.y));
    else { hi[0] = x.x; hi[1] = y.x; hi[2] = x.y; hi[3] = y.y; }
}
// column fragment of B = M^T (b[k][n] = M[n][k]): n row of the tile, the 8 k columns from c (slots as frag_a)
__device__ __forceinline__ uint2 frag_bt(const unsigned* m, int ld, int n, int c, int t) {
    return *(const uint2*)(m + sw32(n, c + 2 * t, ld));
}
// column fragment of B = M (b[k][n] = M[k][n]): k rows c + 2t and c + 2t + 1 of the tile, column n
__device__ __forceinline__ uint2 frag_b(const unsigned* m, int ld, int c, int n, int t) {
    return make_uint2(m[sw32(c + 2 * t, n, ld)], m[sw32(c + 2 * t + 1, n, ld)]);
}
// the 16x8 accumulator fragment c (rows g, g + 8; columns 2t, 2t + 1) as a row fragment of tf32 operands in the
// k order above: slot t is column 2t, slot t + 4 column 2t + 1
template<bool SPLIT>
__device__ __forceinline__ void acc_to_frag(unsigned (&hi)[4], unsigned (&lo)[4], const float (&c)[4]) {
    operand<SPLIT>(hi, lo, c[0], c[2], c[1], c[3]);
}

#define TF32_ARGS const float* q, const float* k, const float* v, int NH, int T, int HS, \
    long long sb, long long sh, long long st, long long ob, long long oh, long long ot, float scale, int causal, \
    const unsigned long long* seed_ptr, unsigned long long seed, float drop_p, float drop_scale, int has_drop
#define TF32_SETUP if (has_drop) seed = dropout_seed(seed_ptr, seed); \
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3; \
    const long long bh = blockIdx.y, in0 = (bh / NH) * sb + (bh % NH) * sh, out0 = (bh / NH) * ob + (bh % NH) * oh; \
    const float sl2 = scale * 1.4426950408889634f; \
    extern __shared__ __align__(16) unsigned smw[];

// ---- what the bf16 and tf32 kernels share ----
// The online softmax step of one 16 x 64 score tile s (accumulator layout: a lane holds rows row0 and row0 + 8,
// keys k0 + 8 j + 2 t and + 1): masks, scales to base 2, moves the rows' maxima m and sums l on, rescales o, and
// leaves P (dropped) in s for the product with V.
template<int HD>
__device__ __forceinline__ void softmax_tile(float (&s)[8][4], float (&m)[2], float (&l)[2], float (&o)[HD / 8][4], int k0,
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
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float p = exp2_ftz(s[j][e] - mb[e >> 1]);
            l[e >> 1] += p;
            if (has_drop) {
                long long index = (bh * T + row0 + 8 * (e >> 1)) * (long long)T + k0 + 8 * j + 2 * t + (e & 1);
                p = dropout_keep(seed, index, drop_p) ? p * drop_scale : 0.f;
            }
            s[j][e] = p;
        }
#pragma unroll
    for (int j = 0; j < HD / 8; j++) { o[j][0] *= alpha[0]; o[j][1] *= alpha[0]; o[j][2] *= alpha[1]; o[j][3] *= alpha[1]; }
}
// After the last key tile: y's rows row0 and row0 + 8 = o / l, and their log-sum-exp (natural log).
template<typename O, int HD>
__device__ __forceinline__ void finish_rows(const float (&o)[HD / 8][4], const float (&m)[2], float (&l)[2], O* y,
        long long out0, long long ot, float* lse, long long bh, int row0, int t, int T) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 2);
        int qi = row0 + 8 * r;
        if (qi >= T) continue;
        float inv = 1.f / l[r];
        O* yr = y + out0 + qi * ot;
#pragma unroll
        for (int j = 0; j < HD / 8; j++) store2(yr + 8 * j + 2 * t, o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
        if (t == 0) lse[bh * T + qi] = m[r] * 0.6931471805599453f + logf(l[r]);
    }
}
// Pd^T and dS^T of one 16 keys x 64 queries tile, in place of S^T (s) and dPd^T (dp): element (key0 + 8 (e / 2),
// q0 + 8 j + 2 t + e % 2); Ls, Ds: the 64 queries' log-sum-exp (base 2) and rowsum(dy * y).
__device__ __forceinline__ void grad_tile(float (&s)[8][4], float (&dp)[8][4], const float* Ls, const float* Ds, int key0,
        int q0, int t, int T, int causal, float sl2, long long bh, int has_drop, unsigned long long seed, float drop_p,
        float drop_scale) {
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {   // element (key key0 + 8 (e / 2), query q0 + 8 j + 2 t + e % 2)
            int kj = key0 + 8 * (e >> 1), c = 8 * j + 2 * t + (e & 1), qi = q0 + c;
            bool ok = qi < T && kj < T && !(causal && kj > qi);
            float p = ok ? exp2_ftz(s[j][e] * sl2 - Ls[c]) : 0.f, pd = p, dpd = dp[j][e];
            if (has_drop && ok) {
                bool keep = dropout_keep(seed, (bh * T + qi) * (long long)T + kj, drop_p);
                pd = keep ? p * drop_scale : 0.f;
                dpd = keep ? dpd * drop_scale : 0.f;
            }
            dp[j][e] = p * (dpd - Ds[c]);   // dS^T
            s[j][e] = pd;                   // Pd^T
        }
}
// dQ's rows q0 + 16 warp + g (and + 8) += gq scale, atomically (dq_acc's strides ab, ah, at)
template<int HD>
__device__ __forceinline__ void add_dq(const float (&gq)[HD / 8][4], float* dq_acc, long long bh, int NH, long long ab,
        long long ah, long long at, int q0, int warp, int g, int t, int T, float scale) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int qi = q0 + warp * 16 + g + 8 * r;
        if (qi >= T) continue;
        float* acc = dq_acc + (bh / NH) * ab + (bh % NH) * ah + qi * at + 2 * t;
#pragma unroll
        for (int j = 0; j < HD / 8; j++) {
            atomicAdd(acc + 8 * j, gq[j][2 * r] * scale);
            atomicAdd(acc + 8 * j + 1, gq[j][2 * r + 1] * scale);
        }
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
