"""The bf16 kernels of flash_mma.py (bf16 q, k, v; m16n8k16 products fed by ldmatrix; float32 or bf16 outputs).
Derivation: docs/backward/flash_attention.md; the helpers they use: flash_mma_common.py.
"""

SOURCE = r"""
// Forward: a block per 64 queries of one (b, h); warp w owns rows 16w..16w+15. y = softmax(scale q k^T) (dropped) v,
// lse = each row's log-sum-exp of its scaled scores (natural log); yb (unless null; float32 y only): y's bf16 bits;
// keep_bits (unless null, with dropout): the mask, for the backward (keep_block). The key and value tiles come
// through two shared-memory buffers: the next pair is copied (cp.async) while this one is multiplied.
template<typename O, int HD>
__global__ void __launch_bounds__(128) mma_flash_forward(MMA_ARGS, O* y, float* lse, unsigned short* yb,
                                                         unsigned* keep_bits) {
    MMA_SETUP
    constexpr int LDS = HD + 8, KS = HD / 16;
    unsigned short *Qs = sm, *KV = Qs + 64 * LDS;   // buffer i's keys at KV + 128 i LDS, its values after them
    const int qt = gridDim.y - 1 - blockIdx.y, q0 = qt * 64;   // the longest causal rows first
    const int row0 = q0 + warp * 16 + g, kend = causal ? min(T, q0 + 64) : T;
    auto fetch = [&](int i, int r0) {   // keys and values [r0, r0 + 64) into buffer i
        async_tile<HD>(KV + i * 128 * LDS, k + in0, st, r0, T);
        async_tile<HD>(KV + i * 128 * LDS + 64 * LDS, v + in0, st, r0, T);
    };
    async_tile<HD>(Qs, q + in0, st, q0, T);
    fetch(0, 0);
    cp_commit();
    cp_wait<0>();
    __syncthreads();
    unsigned qa[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++) ldsm4(qa[kk], Qs + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
    float m[2] = {(float)NEG_INF, (float)NEG_INF}, l[2] = {0.f, 0.f}, o[HD / 8][4];
    zero(o);
    for (int k0 = 0, buf = 0; k0 < kend; k0 += 64, buf ^= 1) {
        if (k0 > 0) {   // this pair landed, and every warp is done with the other buffer
            cp_wait<0>();
            __syncthreads();
        }
        if (k0 + 64 < kend) {
            fetch(buf ^ 1, k0 + 64);
            cp_commit();
        }
        const unsigned short *Ks = KV + buf * 128 * LDS, *Vs = Ks + 64 * LDS;
        float s[8][4];
        zero(s);
#pragma unroll
        for (int kk = 0; kk < KS; kk++)
#pragma unroll
            for (int n = 0; n < 4; n++) {   // keys 16n..16n+15 of the tile
                unsigned b[4];
                ldsm4(b, Ks + (n * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8);
                mma16816(s[2 * n], qa[kk], b[0], b[1]);
                mma16816(s[2 * n + 1], qa[kk], b[2], b[3]);
            }
        unsigned kept = softmax_tile<HD>(s, m, l, o, k0, row0, t, T, causal, sl2, bh, has_drop, seed, drop_p, drop_scale);
        if (keep_bits) keep_bits[keep_block(bh, qt, k0 / 64, gridDim.y) + threadIdx.x] = kept;
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {   // keys 16kk..16kk+15: P's fragments are the scores' accumulators
            unsigned pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                              pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int n = 0; n < HD / 16; n++) {
                unsigned b[4];
                ldsm4t(b, Vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + n * 16 + (lane >> 4) * 8);
                mma16816(o[2 * n], pa, b[0], b[1]);
                mma16816(o[2 * n + 1], pa, b[2], b[3]);
            }
        }
    }
    finish_rows<O, HD>(o, m, l, y, out0, ot, lse, bh, row0, t, T, yb);
}

// dK, dV of 64 keys of one (b, h) (warp w: keys 16w..16w+15), looping over the query tiles that see them; dQ's part
// from these keys added atomically to dq_acc (float32, zeroed before; element (b, h, t, d) at b ab + h ah + t at + d:
// dq itself when it is float32, else a scratch). dyb: dy's bf16 bits (dy's strides); LD: rowsum(dy * y) for the
// B NH T rows, then their log-sum-exps in base 2; BITS: dropout's mask from keep_bits (the forward's), not the hash.
// Each query tile's q, dy, lse, D (and keep block) come through two shared-memory buffers: the next tile's are copied
// (cp.async) while this one's are multiplied.
template<typename O, int HD, bool BITS>
__global__ void __launch_bounds__(128) mma_flash_backward(MMA_ARGS, const unsigned short* dyb, const float* LD,
                                                          const unsigned* keep_bits, O* dk, O* dv, float* dq_acc,
                                                          long long ab, long long ah, long long at) {
    MMA_SETUP
    constexpr int LDS = HD + 8, KS = HD / 16, LDT = 64 + 8;
    constexpr int BUF = 128 * LDS + 2 * 64 * 2 + 128 * 2;   // a buffer: q, dy (bf16), D, L (float32), keep block
    unsigned short *Ks = sm, *Vs = Ks + 64 * LDS, *St = Vs + 64 * LDS, *QY = St + 64 * LDT;
    const int kt = blockIdx.y, k0 = kt * 64, first = causal ? k0 : 0;   // the longest causal key tiles first
    const long long rows = (long long)gridDim.x * T;
    auto fetch = [&](int i, int r0) {   // query tile [r0, r0 + 64) into buffer i
        async_queries<HD>(QY + i * BUF, q + in0, st, dyb + out0, ot, LD + bh * T, LD + rows + bh * T,
                          BITS ? keep_bits + keep_block(bh, r0 / 64, kt, gridDim.y) : nullptr, r0, T);
    };
    async_tile<HD>(Ks, k + in0, st, k0, T);
    async_tile<HD>(Vs, v + in0, st, k0, T);
    fetch(0, first);
    cp_commit();
    cp_wait<0>();
    __syncthreads();
    unsigned ka[KS][4], va[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        ldsm4(ka[kk], Ks + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
        ldsm4(va[kk], Vs + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
    }
    float gk[HD / 8][4], gv[HD / 8][4];
    zero(gk);
    zero(gv);
    const int key0 = k0 + warp * 16 + g;
    for (int q0 = first, buf = 0; q0 < T; q0 += 64, buf ^= 1) {
        if (q0 > first) {   // this tile landed, and every warp is done with the other buffer and with St
            cp_wait<0>();
            __syncthreads();
        }
        if (q0 + 64 < T) {
            fetch(buf ^ 1, q0 + 64);
            cp_commit();
        }
        const unsigned short *Qs = QY + buf * BUF, *Ys = Qs + 64 * LDS;
        const float *Ds = (const float*)(Ys + 64 * LDS), *Ls = Ds + 64;
        unsigned words[4][2];
        if (BITS) keep_words(words, (const unsigned*)(Ls + 64), warp, g, t);
        float s[8][4], dp[8][4];   // S^T = K Q^T and dPd^T = V dy^T: rows = this warp's keys, columns = queries
        zero(s);
        zero(dp);
#pragma unroll
        for (int kk = 0; kk < KS; kk++)
#pragma unroll
            for (int n = 0; n < 4; n++) {
                int at = (n * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8;
                unsigned b[4];
                ldsm4(b, Qs + at);
                mma16816(s[2 * n], ka[kk], b[0], b[1]);
                mma16816(s[2 * n + 1], ka[kk], b[2], b[3]);
                ldsm4(b, Ys + at);
                mma16816(dp[2 * n], va[kk], b[0], b[1]);
                mma16816(dp[2 * n + 1], va[kk], b[2], b[3]);
            }
        grad_tile<BITS>(s, dp, Ls, Ds, key0, q0, t, T, causal, sl2, bh, has_drop, seed, drop_p, drop_scale, words);
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {   // queries 16kk..16kk+15: dV += Pd^T dy, dK += dS^T q
            unsigned pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                              pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            unsigned da[4] = {pack_bf16(dp[2 * kk][0], dp[2 * kk][1]), pack_bf16(dp[2 * kk][2], dp[2 * kk][3]),
                              pack_bf16(dp[2 * kk + 1][0], dp[2 * kk + 1][1]), pack_bf16(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
            for (int n = 0; n < HD / 16; n++) {
                int at = (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + n * 16 + (lane >> 4) * 8;
                unsigned b[4];
                ldsm4t(b, Ys + at);
                mma16816(gv[2 * n], pa, b[0], b[1]);
                mma16816(gv[2 * n + 1], pa, b[2], b[3]);
                ldsm4t(b, Qs + at);
                mma16816(gk[2 * n], da, b[0], b[1]);
                mma16816(gk[2 * n + 1], da, b[2], b[3]);
            }
            // dS^T as bf16 into St[key][query], for dQ below
            *(unsigned*)(St + (warp * 16 + g) * LDT + 16 * kk + 2 * t) = da[0];
            *(unsigned*)(St + (warp * 16 + g + 8) * LDT + 16 * kk + 2 * t) = da[1];
            *(unsigned*)(St + (warp * 16 + g) * LDT + 16 * kk + 8 + 2 * t) = da[2];
            *(unsigned*)(St + (warp * 16 + g + 8) * LDT + 16 * kk + 8 + 2 * t) = da[3];
        }
        __syncthreads();
        float gq[HD / 8][4];   // dQ rows q0 + 16w.. of this warp += dS (these 64 keys) k
        zero(gq);
#pragma unroll
        for (int kc = 0; kc < 4; kc++) {
            unsigned a[4];
            ldsm4t(a, St + (kc * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDT + warp * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int n = 0; n < HD / 16; n++) {
                unsigned b[4];
                ldsm4t(b, Ks + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + n * 16 + (lane >> 4) * 8);
                mma16816(gq[2 * n], a, b[0], b[1]);
                mma16816(gq[2 * n + 1], a, b[2], b[3]);
            }
        }
        add_dq<HD>(gq, dq_acc, bh, NH, ab, ah, at, q0, warp, g, t, T, scale);
    }
    store_kv<O, HD>(gk, gv, dk, dv, in0, st, key0, t, T, scale);
}
"""
