"""The TF32 and 3xTF32 kernels of flash_mma.py (float32 q, k, v; m16n8k8 products; float32 outputs): one tf32
product per tile product, or with SPLIT three (a_lo b_hi + a_hi b_lo + a_hi b_hi: float32's accuracy), and their
helpers (tf32 rounding and split, the tiles in shared memory and their fragments; SPLIT tiles hold
each value split once, as loaded). Derivation: docs/backward/flash_attention.md; the helpers shared with the
bf16 kernels: flash_mma_common.py.
"""

SOURCE = r"""
// ---- TF32: float32 q, k, v rounded to tf32 (round to nearest, ties away) as the mma operands ----
__device__ __forceinline__ unsigned to_tf32(float x) { unsigned r; asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x)); return r; }
// x = hi + lo + (under 2^-22 |x|): hi = tf32(x), lo = tf32(x - hi) (x - hi is exact in float32)
__device__ __forceinline__ void split_tf32(float x, unsigned& hi, unsigned& lo) {
    hi = to_tf32(x);
    lo = to_tf32(x - __uint_as_float(hi));
}
// the words of backward's dS^T tile: float32 bits kept whole for SPLIT (split where read), else rounded to tf32 once
template<bool SPLIT> __device__ __forceinline__ unsigned tile_word(float x) { return SPLIT ? __float_as_uint(x) : to_tf32(x); }
// c += a b: SPLIT (3xTF32, float32's accuracy): a_lo b_hi + a_hi b_lo + a_hi b_hi; else one tf32 product (a_lo, b_lo
// unused). b, bl: the column fragment's hi and lo words
template<bool SPLIT>
__device__ __forceinline__ void mma_t(float (&c)[4], const unsigned (&ah)[4], const unsigned (&al)[4], uint2 b, uint2 bl) {
    if constexpr (SPLIT) {
        mma1688(c, al, b.x, b.y);
        mma1688(c, ah, bl.x, bl.y);
    }
    mma1688(c, ah, b.x, b.y);
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
// A SPLIT tile holds each value split once, where it is loaded: the hi words, then 64 ld words later the lo words
// (its fragments then need no splitting at each use: 4 warps read a tile, several times each). Else tf32 words.
// rows [r0, r0 + 64) of a float32 (T, HD) head matrix into dst (sw32, stride HD + 8); zeros past T
template<int HD, bool SPLIT>
__device__ __forceinline__ void load_tile32(unsigned* dst, const float* src, long long st, int r0, int T) {
    constexpr int CH = HD / 4, LD = HD + 8;
    for (int e = threadIdx.x; e < 64 * CH; e += 128) {
        int r = e / CH, c = e % CH;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r0 + r < T) x = *(const float4*)(src + (long long)(r0 + r) * st + c * 4);
        unsigned h[4], l[4];
        operand<SPLIT>(h, l, x.x, x.y, x.z, x.w);
        *(uint4*)(dst + sw32(r, c * 4, LD)) = make_uint4(h[0], h[1], h[2], h[3]);
        if constexpr (SPLIT) *(uint4*)(dst + 64 * LD + sw32(r, c * 4, LD)) = make_uint4(l[0], l[1], l[2], l[3]);
    }
}
// row fragment (16 rows from r, the 8 k columns from c) of a sw32 tile: slots t, t + 4 are columns c + 2t, c + 2t + 1
template<bool SPLIT>
__device__ __forceinline__ void frag_a(unsigned (&hi)[4], unsigned (&lo)[4], const unsigned* m, int ld, int r, int c, int g, int t) {
#pragma unroll
    for (int part = 0; part < (SPLIT ? 2 : 1); part++) {
        const unsigned* p = m + part * 64 * ld;
        uint2 x = *(const uint2*)(p + sw32(r + g, c + 2 * t, ld)), y = *(const uint2*)(p + sw32(r + g + 8, c + 2 * t, ld));
        unsigned (&f)[4] = part ? lo : hi;
        f[0] = x.x; f[1] = y.x; f[2] = x.y; f[3] = y.y;
    }
}
// column fragment (hi words b, lo words bl for SPLIT) of B = M^T (b[k][n] = M[n][k]): n row of the tile, the 8 k
// columns from c (slots as frag_a)
template<bool SPLIT>
__device__ __forceinline__ void frag_bt(uint2& b, uint2& bl, const unsigned* m, int ld, int n, int c, int t) {
    b = *(const uint2*)(m + sw32(n, c + 2 * t, ld));
    if constexpr (SPLIT) bl = *(const uint2*)(m + 64 * ld + sw32(n, c + 2 * t, ld)); else bl = b;
}
// column fragment of B = M (b[k][n] = M[k][n]): k rows c + 2t and c + 2t + 1 of the tile, column n
template<bool SPLIT>
__device__ __forceinline__ void frag_b(uint2& b, uint2& bl, const unsigned* m, int ld, int c, int n, int t) {
    b = make_uint2(m[sw32(c + 2 * t, n, ld)], m[sw32(c + 2 * t + 1, n, ld)]);
    if constexpr (SPLIT) bl = make_uint2(m[64 * ld + sw32(c + 2 * t, n, ld)], m[64 * ld + sw32(c + 2 * t + 1, n, ld)]);
    else bl = b;
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

// The forward of mma_flash_forward with float32 q, k, v, y in tf32 products (m16n8k8); SPLIT: 3xTF32 products.
// TF32: three blocks a multiprocessor (at most 168 registers; 178 unbounded, which left room for two)
template<int HD, bool SPLIT>
__global__ void __launch_bounds__(128, SPLIT ? 1 : 3) tf32_flash_forward(TF32_ARGS, float* y, float* lse) {
    TF32_SETUP
    constexpr int LD = HD + 8, TW = (SPLIT ? 2 : 1) * 64 * LD;   // the tiles (sw32 layout) and their words
    unsigned *Qs = smw, *Ks = Qs + TW, *Vs = Ks + TW;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * 64;
    load_tile32<HD, SPLIT>(Qs, q + in0, st, q0, T);
    __syncthreads();
    unsigned qa[HD / 8][4], ql[SPLIT ? HD / 8 : 1][4];
#pragma unroll
    for (int kk = 0; kk < HD / 8; kk++) frag_a<SPLIT>(qa[kk], ql[SPLIT ? kk : 0], Qs, LD, warp * 16, kk * 8, g, t);
    float m[2] = {(float)NEG_INF, (float)NEG_INF}, l[2] = {0.f, 0.f}, o[HD / 8][4];
    zero(o);
    const int row0 = q0 + warp * 16 + g, kend = causal ? min(T, q0 + 64) : T;
    for (int k0 = 0; k0 < kend; k0 += 64) {
        __syncthreads();
        load_tile32<HD, SPLIT>(Ks, k + in0, st, k0, T);
        load_tile32<HD, SPLIT>(Vs, v + in0, st, k0, T);
        __syncthreads();
        float s[8][4];
        zero(s);
#pragma unroll
        for (int kk = 0; kk < HD / 8; kk++)
#pragma unroll
            for (int n = 0; n < 8; n++) {   // keys 8n..8n+7: b = K^T, b[d][key] = K[key][d]
                uint2 b, bl;
                frag_bt<SPLIT>(b, bl, Ks, LD, 8 * n + g, 8 * kk, t);
                mma_t<SPLIT>(s[n], qa[kk], ql[SPLIT ? kk : 0], b, bl);
            }
        softmax_tile<HD>(s, m, l, o, k0, row0, t, T, causal, sl2, bh, has_drop, seed, drop_p, drop_scale);
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {   // keys 8kk..8kk+7
            unsigned pa[4], pl[4];
            acc_to_frag<SPLIT>(pa, pl, s[kk]);
#pragma unroll
            for (int n = 0; n < HD / 8; n++) {   // b = V[key][d]
                uint2 b, bl;
                frag_b<SPLIT>(b, bl, Vs, LD, 8 * kk, 8 * n + g, t);
                mma_t<SPLIT>(o[n], pa, pl, b, bl);
            }
        }
    }
    finish_rows<float, HD>(o, m, l, y, out0, ot, lse, bh, row0, t, T);
}

// The backward of mma_flash_backward with float32 q, k, v, dy, dq, dk, dv in tf32 products (m16n8k8); SPLIT: 3xTF32.
template<int HD, bool SPLIT>
__global__ void __launch_bounds__(128) tf32_flash_backward(TF32_ARGS, const float* dy, const float* lse, const float* D,
                                                           float* dk, float* dv, float* dq_acc, long long ab,
                                                           long long ah, long long at) {
    TF32_SETUP
    constexpr int LD = HD + 8, LDT = 64 + 8, TW = (SPLIT ? 2 : 1) * 64 * LD;   // every tile, St included: sw32 layout
    unsigned *Ks = smw, *Vs = Ks + TW, *Qs = Vs + TW, *Ys = Qs + TW, *St = Ys + TW;
    float *Ls = (float*)(St + 64 * LDT), *Ds = Ls + 64;
    const int k0 = blockIdx.x * 64;
    load_tile32<HD, SPLIT>(Ks, k + in0, st, k0, T);
    load_tile32<HD, SPLIT>(Vs, v + in0, st, k0, T);
    float gk[HD / 8][4], gv[HD / 8][4];
    zero(gk);
    zero(gv);
    const int key0 = k0 + warp * 16 + g;
    for (int q0 = causal ? k0 : 0; q0 < T; q0 += 64) {
        __syncthreads();
        load_tile32<HD, SPLIT>(Qs, q + in0, st, q0, T);
        load_tile32<HD, SPLIT>(Ys, dy + out0, ot, q0, T);
        if (threadIdx.x < 64) {
            int qi = q0 + threadIdx.x;
            Ls[threadIdx.x] = qi < T ? lse[bh * T + qi] * 1.4426950408889634f : 0.f;
            Ds[threadIdx.x] = qi < T ? D[bh * T + qi] : 0.f;
        }
        __syncthreads();
        float s[8][4], dp[8][4];
        zero(s);
        zero(dp);
#pragma unroll
        for (int kk = 0; kk < HD / 8; kk++) {
            unsigned ka[4], kl[4], va[4], vl[4];
            frag_a<SPLIT>(ka, kl, Ks, LD, warp * 16, kk * 8, g, t);
            frag_a<SPLIT>(va, vl, Vs, LD, warp * 16, kk * 8, g, t);
#pragma unroll
            for (int n = 0; n < 8; n++) {   // queries 8n..8n+7: b = Q^T, then dy^T
                uint2 bq, bql, by, byl;
                frag_bt<SPLIT>(bq, bql, Qs, LD, 8 * n + g, 8 * kk, t);
                frag_bt<SPLIT>(by, byl, Ys, LD, 8 * n + g, 8 * kk, t);
                mma_t<SPLIT>(s[n], ka, kl, bq, bql);
                mma_t<SPLIT>(dp[n], va, vl, by, byl);
            }
        }
        grad_tile(s, dp, Ls, Ds, key0, q0, t, T, causal, sl2, bh, has_drop, seed, drop_p, drop_scale);
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {   // queries 8kk..8kk+7: dV += Pd^T dy, dK += dS^T q
            unsigned pa[4], pl[4], da[4], dl[4];
            acc_to_frag<SPLIT>(pa, pl, s[kk]);
            acc_to_frag<SPLIT>(da, dl, dp[kk]);
#pragma unroll
            for (int n = 0; n < HD / 8; n++) {
                uint2 by, byl, bq, bql;
                frag_b<SPLIT>(by, byl, Ys, LD, 8 * kk, 8 * n + g, t);
                frag_b<SPLIT>(bq, bql, Qs, LD, 8 * kk, 8 * n + g, t);
                mma_t<SPLIT>(gv[n], pa, pl, by, byl);
                mma_t<SPLIT>(gk[n], da, dl, bq, bql);
            }
            *(uint2*)(St + sw32(warp * 16 + g, 8 * kk + 2 * t, LDT)) = make_uint2(tile_word<SPLIT>(dp[kk][0]), tile_word<SPLIT>(dp[kk][1]));
            *(uint2*)(St + sw32(warp * 16 + g + 8, 8 * kk + 2 * t, LDT)) = make_uint2(tile_word<SPLIT>(dp[kk][2]), tile_word<SPLIT>(dp[kk][3]));
        }
        __syncthreads();
        float gq[HD / 8][4];
        zero(gq);
#pragma unroll
        for (int kc = 0; kc < 8; kc++) {   // keys 8kc..8kc+7: a = dS[query][key] = St[key][query] (slots as frag_a)
            int r = warp * 16 + g, k0 = 8 * kc + 2 * t;
            unsigned a[4] = {St[sw32(k0, r, LDT)], St[sw32(k0, r + 8, LDT)], St[sw32(k0 + 1, r, LDT)],
                             St[sw32(k0 + 1, r + 8, LDT)]}, al[4];
            if constexpr (SPLIT) operand<true>(a, al, __uint_as_float(a[0]), __uint_as_float(a[1]), __uint_as_float(a[2]), __uint_as_float(a[3]));
#pragma unroll
            for (int n = 0; n < HD / 8; n++) {   // b = K[key][d]
                uint2 b, bl;
                frag_b<SPLIT>(b, bl, Ks, LD, 8 * kc, 8 * n + g, t);
                mma_t<SPLIT>(gq[n], a, al, b, bl);
            }
        }
        add_dq<HD>(gq, dq_acc, bh, NH, ab, ah, at, q0, warp, g, t, T, scale);
    }
    store_kv<float, HD>(gk, gv, dk, dv, in0, st, key0, t, T, scale);
}
"""
