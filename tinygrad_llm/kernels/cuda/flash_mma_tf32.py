"""The TF32 and 3xTF32 kernels of flash_mma.py (float32 q, k, v; m16n8k8 products; float32 outputs): one tf32
product per tile product, or with SPLIT three (a_lo b_hi + a_hi b_lo + a_hi b_hi: float32's accuracy).
Derivation: docs/backward/flash_attention.md; the helpers they use: flash_mma_common.py.
"""

SOURCE = r"""
// The forward of mma_flash_forward with float32 q, k, v, y in tf32 products (m16n8k8); SPLIT: 3xTF32 products.
// TF32: three blocks a multiprocessor (at most 168 registers; 178 unbounded, which left room for two)
template<int HD, bool SPLIT>
__global__ void __launch_bounds__(128, SPLIT ? 1 : 3) tf32_flash_forward(TF32_ARGS, float* y, float* lse) {
    TF32_SETUP
    constexpr int LD = HD + 8;   // the tiles: sw32 layout (flash_mma_common.py)
    unsigned *Qs = smw, *Ks = Qs + 64 * LD, *Vs = Ks + 64 * LD;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * 64;
    load_tile32<HD, SPLIT>(Qs, q + in0, st, q0, T);
    __syncthreads();
    unsigned qa[HD / 8][4], ql[SPLIT ? HD / 8 : 1][4];
#pragma unroll
    for (int kk = 0; kk < HD / 8; kk++) frag_a<SPLIT>(qa[kk], ql[SPLIT ? kk : 0], Qs, LD, warp * 16, kk * 8, g, t);
    float m[2] = {(float)NEG_INF, (float)NEG_INF}, l[2] = {0.f, 0.f}, o[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    const int row0 = q0 + warp * 16 + g, kend = causal ? min(T, q0 + 64) : T;
    for (int k0 = 0; k0 < kend; k0 += 64) {
        __syncthreads();
        load_tile32<HD, SPLIT>(Ks, k + in0, st, k0, T);
        load_tile32<HD, SPLIT>(Vs, v + in0, st, k0, T);
        __syncthreads();
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 8; kk++)
#pragma unroll
            for (int n = 0; n < 8; n++) {   // keys 8n..8n+7: b = K^T, b[d][key] = K[key][d]
                uint2 b = frag_bt(Ks, LD, 8 * n + g, 8 * kk, t);
                mma_t<SPLIT>(s[n], qa[kk], ql[SPLIT ? kk : 0], b.x, b.y);
            }
        softmax_tile<HD>(s, m, l, o, k0, row0, t, T, causal, sl2, bh, has_drop, seed, drop_p, drop_scale);
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {   // keys 8kk..8kk+7
            unsigned pa[4], pl[4];
            acc_to_frag<SPLIT>(pa, pl, s[kk]);
#pragma unroll
            for (int n = 0; n < HD / 8; n++) {   // b = V[key][d]
                uint2 b = frag_b(Vs, LD, 8 * kk, 8 * n + g, t);
                mma_t<SPLIT>(o[n], pa, pl, b.x, b.y);
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
    constexpr int LD = HD + 8, LDT = 64 + 8;   // every tile, St included: sw32 layout (flash_mma_common.py)
    unsigned *Ks = smw, *Vs = Ks + 64 * LD, *Qs = Vs + 64 * LD, *Ys = Qs + 64 * LD, *St = Ys + 64 * LD;
    float *Ls = (float*)(St + 64 * LDT), *Ds = Ls + 64;
    const int k0 = blockIdx.x * 64;
    load_tile32<HD, SPLIT>(Ks, k + in0, st, k0, T);
    load_tile32<HD, SPLIT>(Vs, v + in0, st, k0, T);
    float gk[HD / 8][4], gv[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) gk[j][e] = gv[j][e] = 0.f;
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
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 8; kk++) {
            unsigned ka[4], kl[4], va[4], vl[4];
            frag_a<SPLIT>(ka, kl, Ks, LD, warp * 16, kk * 8, g, t);
            frag_a<SPLIT>(va, vl, Vs, LD, warp * 16, kk * 8, g, t);
#pragma unroll
            for (int n = 0; n < 8; n++) {   // queries 8n..8n+7: b = Q^T, then dy^T
                uint2 bq = frag_bt(Qs, LD, 8 * n + g, 8 * kk, t), by = frag_bt(Ys, LD, 8 * n + g, 8 * kk, t);
                mma_t<SPLIT>(s[n], ka, kl, bq.x, bq.y);
                mma_t<SPLIT>(dp[n], va, vl, by.x, by.y);
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
                uint2 by = frag_b(Ys, LD, 8 * kk, 8 * n + g, t), bq = frag_b(Qs, LD, 8 * kk, 8 * n + g, t);
                mma_t<SPLIT>(gv[n], pa, pl, by.x, by.y);
                mma_t<SPLIT>(gk[n], da, dl, bq.x, bq.y);
            }
            *(uint2*)(St + sw32(warp * 16 + g, 8 * kk + 2 * t, LDT)) = make_uint2(tile_word<SPLIT>(dp[kk][0]), tile_word<SPLIT>(dp[kk][1]));
            *(uint2*)(St + sw32(warp * 16 + g + 8, 8 * kk + 2 * t, LDT)) = make_uint2(tile_word<SPLIT>(dp[kk][2]), tile_word<SPLIT>(dp[kk][3]));
        }
        __syncthreads();
        float gq[HD / 8][4];
#pragma unroll
        for (int j = 0; j < HD / 8; j++) gq[j][0] = gq[j][1] = gq[j][2] = gq[j][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < 8; kc++) {   // keys 8kc..8kc+7: a = dS[query][key] = St[key][query] (slots as frag_a)
            int r = warp * 16 + g, k0 = 8 * kc + 2 * t;
            unsigned a[4] = {St[sw32(k0, r, LDT)], St[sw32(k0, r + 8, LDT)], St[sw32(k0 + 1, r, LDT)],
                             St[sw32(k0 + 1, r + 8, LDT)]}, al[4];
            if constexpr (SPLIT) operand<true>(a, al, __uint_as_float(a[0]), __uint_as_float(a[1]), __uint_as_float(a[2]), __uint_as_float(a[3]));
#pragma unroll
            for (int n = 0; n < HD / 8; n++) {   // b = K[key][d]
                uint2 b = frag_b(Ks, LD, 8 * kc, 8 * n + g, t);
                mma_t<SPLIT>(gq[n], a, al, b.x, b.y);
            }
        }
        add_dq<HD>(gq, dq_acc, bh, NH, ab, ah, at, q0, warp, g, t, T, scale);
    }
    store_kv<float, HD>(gk, gv, dk, dv, in0, st, key0, t, T, scale);
}
"""
