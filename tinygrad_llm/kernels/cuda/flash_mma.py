"""Flash attention on the tensor cores: bf16 q, k, v, float32 sums (derivation: docs/backward/flash_attention.md).

The same algorithm as flash_attention.py (an online softmax forward keeping only y and each row's
log-sum-exp; a backward that recomputes the probabilities tile by tile, one block per key tile, dQ added
atomically into float32 sums zeroed by the pass that computes rowsum(dy * y): dq itself when it is float32),
with every tile product on the tensor cores: the warp-level
`mma.sync.m16n8k16` instruction on bf16 operands with float32 accumulators, fed from shared memory by
`ldmatrix`. A block is 4 warps; each warp owns 16 rows of a 64-row tile (queries forward, keys backward).
The scores' accumulator fragments are laid out as the next product's operand fragments, so P (forward),
Pd and dS (backward) go from float32 registers to bf16 registers without touching shared memory; only
dS^T is written to shared memory once per tile pair, for dQ.

Numbers: q, k, v are bf16 (the products' operands under precision.py's bf16 policy); S, the softmax,
the log-sum-exp, dPd - D and every accumulator are float32; P, Pd and dS are rounded to bf16 (round to
nearest even) as the operands of their products, as the cuBLAS bf16 path (mixed.py) rounds them.
y, dy, dq, dk and dv are float32 ("float32" outputs: the autograd's tensors) or bf16 ("bfloat16": bf16
in and out, as a bf16 framework's attention). Head sizes: HEAD_SIZES; every row 16-byte aligned
(supported() checks the pointers and strides). Dropout: the same element index and hash as every other
attention path (flash_attention.py's docstring), so one seed gives one mask.

Launches only: nothing allocated inside forward/backward and no sync, so they capture in a CUDA graph.
"""
import os

import cupy as cp
import numpy as np

from .flash_attention import Layout, _pointers
from .flash_kernels import SOURCE as _FLASH_SOURCE

# TINYGRAD_LLM_FLASH_MMA (read at import, or set MMA): "1" (default): attention under bf16 autocast
# (mixed.SelfAttentionBF16Cuda) and float32 attention with TF32 on (attention.SelfAttentionCuda) run these
# kernels wherever they take the heads (supported()), keeping no (T, T) array; "0": never (the cuBLAS
# products around the softmax passes, or flash_attention.py where that path's rule picks it).
MMA = os.environ.get("TINYGRAD_LLM_FLASH_MMA", "1")
HEAD_SIZES = (32, 64)
# what the products take: "bfloat16" q, k, v (bf16 bits; m16n8k16); "tf32": float32 q, k, v rounded to tf32
# (m16n8k8); "float32": float32 q, k, v split as hi + lo tf32 parts, three tf32 products for each (a_lo b_hi +
# a_hi b_lo + a_hi b_hi, "3xTF32"), float32's accuracy on the tensor cores (the dropped a_lo b_lo is under 2^-22
# of the product)
KINDS = ("bfloat16", "tf32", "float32")     # exact: the head size is a template argument (no padding)
TILE = 64                 # queries (forward) or keys (backward) a block; 16 a warp
THREADS = 128
OUTPUTS = {"float32": "float", "bfloat16": "unsigned short"}

SOURCE = _FLASH_SOURCE + r"""
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

// Forward: a block per 64 queries of one (b, h); warp w owns rows 16w..16w+15. y = softmax(scale q k^T) (dropped) v,
// lse = each row's log-sum-exp of its scaled scores (natural log).
template<typename O, int HD>
__global__ void __launch_bounds__(128) mma_flash_forward(MMA_ARGS, O* y, float* lse) {
    MMA_SETUP
    constexpr int LDS = HD + 8, KS = HD / 16;
    unsigned short *Qs = sm, *Ks = Qs + 64 * LDS, *Vs = Ks + 64 * LDS;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * 64;   // the longest causal rows first
    load_tile<HD>(Qs, q + in0, st, q0, T);
    __syncthreads();
    unsigned qa[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++) ldsm4(qa[kk], Qs + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
    float m[2] = {(float)NEG_INF, (float)NEG_INF}, l[2] = {0.f, 0.f}, o[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    const int row0 = q0 + warp * 16 + g, kend = causal ? min(T, q0 + 64) : T;
    for (int k0 = 0; k0 < kend; k0 += 64) {
        __syncthreads();
        load_tile<HD>(Ks, k + in0, st, k0, T);
        load_tile<HD>(Vs, v + in0, st, k0, T);
        __syncthreads();
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++)
#pragma unroll
            for (int n = 0; n < 4; n++) {   // keys 16n..16n+15 of the tile
                unsigned b[4];
                ldsm4(b, Ks + (n * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8);
                mma16816(s[2 * n], qa[kk], b[0], b[1]);
                mma16816(s[2 * n + 1], qa[kk], b[2], b[3]);
            }
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
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float p = s[j][e] == NEG_INF ? 0.f : exp2f(s[j][e] - m[e >> 1]);
                l[e >> 1] += p;
                if (has_drop) {
                    long long index = (bh * T + row0 + 8 * (e >> 1)) * (long long)T + k0 + 8 * j + 2 * t + (e & 1);
                    p = dropout_keep(seed, index, drop_p) ? p * drop_scale : 0.f;
                }
                s[j][e] = p;
            }
#pragma unroll
        for (int j = 0; j < HD / 8; j++) { o[j][0] *= alpha[0]; o[j][1] *= alpha[0]; o[j][2] *= alpha[1]; o[j][3] *= alpha[1]; }
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

// dK, dV of 64 keys of one (b, h) (warp w: keys 16w..16w+15), looping over the query tiles that see them; dQ's part
// from these keys added atomically to dq_acc (float32, zeroed before; element (b, h, t, d) at b ab + h ah + t at + d:
// dq itself when it is float32, else a scratch). D = rowsum(dy * y).
template<typename O, int HD>
__global__ void __launch_bounds__(128) mma_flash_backward(MMA_ARGS, const O* dy, const float* lse, const float* D,
                                                          O* dk, O* dv, float* dq_acc, long long ab, long long ah,
                                                          long long at) {
    MMA_SETUP
    constexpr int LDS = HD + 8, KS = HD / 16, LDT = 64 + 8;
    unsigned short *Ks = sm, *Vs = Ks + 64 * LDS, *Qs = Vs + 64 * LDS, *Ys = Qs + 64 * LDS, *St = Ys + 64 * LDS;
    float *Ls = (float*)(St + 64 * LDT), *Ds = Ls + 64;
    const int k0 = blockIdx.x * 64;
    load_tile<HD>(Ks, k + in0, st, k0, T);
    load_tile<HD>(Vs, v + in0, st, k0, T);
    __syncthreads();
    unsigned ka[KS][4], va[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        ldsm4(ka[kk], Ks + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
        ldsm4(va[kk], Vs + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
    }
    float gk[HD / 8][4], gv[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) gk[j][e] = gv[j][e] = 0.f;
    const int key0 = k0 + warp * 16 + g;
    for (int q0 = causal ? k0 : 0; q0 < T; q0 += 64) {
        __syncthreads();
        load_tile<HD>(Qs, q + in0, st, q0, T);
        load_tile<HD>(Ys, dy + out0, ot, q0, T);
        if (threadIdx.x < 64) {
            int qi = q0 + threadIdx.x;
            Ls[threadIdx.x] = qi < T ? lse[bh * T + qi] * 1.4426950408889634f : 0.f;
            Ds[threadIdx.x] = qi < T ? D[bh * T + qi] : 0.f;
        }
        __syncthreads();
        float s[8][4], dp[8][4];   // S^T = K Q^T and dPd^T = V dy^T: rows = this warp's keys, columns = queries
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.f;
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
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {   // element (key key0 + 8 (e / 2), query q0 + 8 j + 2 t + e % 2)
                int kj = key0 + 8 * (e >> 1), c = 8 * j + 2 * t + (e & 1), qi = q0 + c;
                bool ok = qi < T && kj < T && !(causal && kj > qi);
                float p = ok ? exp2f(s[j][e] * sl2 - Ls[c]) : 0.f, pd = p, dpd = dp[j][e];
                if (has_drop && ok) {
                    bool keep = dropout_keep(seed, (bh * T + qi) * (long long)T + kj, drop_p);
                    pd = keep ? p * drop_scale : 0.f;
                    dpd = keep ? dpd * drop_scale : 0.f;
                }
                dp[j][e] = p * (dpd - Ds[c]);   // dS^T
                s[j][e] = pd;                   // Pd^T
            }
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
#pragma unroll
        for (int j = 0; j < HD / 8; j++) gq[j][0] = gq[j][1] = gq[j][2] = gq[j][3] = 0.f;
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
// rows [r0, r0 + 64) of a float32 (T, HD) head matrix into dst[64][HD + 4] as tile_word<SPLIT>; zeros past T
template<int HD, bool SPLIT>
__device__ __forceinline__ void load_tile32(unsigned* dst, const float* src, long long st, int r0, int T) {
    constexpr int CH = HD / 4;
    for (int e = threadIdx.x; e < 64 * CH; e += 128) {
        int r = e / CH, c = e % CH;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r0 + r < T) x = *(const float4*)(src + (long long)(r0 + r) * st + c * 4);
        *(uint4*)(dst + r * (HD + 4) + c * 4) = make_uint4(tile_word<SPLIT>(x.x), tile_word<SPLIT>(x.y),
                                                           tile_word<SPLIT>(x.z), tile_word<SPLIT>(x.w));
    }
}
// row fragment (16 rows from r, 8 columns from c) of a row-major tile of tile_word<SPLIT> with row stride ld
template<bool SPLIT>
__device__ __forceinline__ void frag_a(unsigned (&hi)[4], unsigned (&lo)[4], const unsigned* m, int ld, int r, int c, int g, int t) {
    unsigned w[4] = {m[(r + g) * ld + c + t], m[(r + g + 8) * ld + c + t], m[(r + g) * ld + c + t + 4], m[(r + g + 8) * ld + c + t + 4]};
    if constexpr (SPLIT) operand<true>(hi, lo, __uint_as_float(w[0]), __uint_as_float(w[1]), __uint_as_float(w[2]), __uint_as_float(w[3]));
    else for (int i = 0; i < 4; i++) hi[i] = w[i];
}
// the 16x8 accumulator fragment c (rows g, g + 8; columns 2t, 2t + 1) as a row fragment of tf32 operands:
// element (row, column j) moves from lane 4 row + j / 2
template<bool SPLIT>
__device__ __forceinline__ void acc_to_frag(unsigned (&hi)[4], unsigned (&lo)[4], const float (&c)[4], int lane, int t) {
    int from = (lane & ~3) | (t >> 1), from2 = from + 2;
    float x0 = __shfl_sync(0xffffffff, c[0], from), x1 = __shfl_sync(0xffffffff, c[1], from);
    float y0 = __shfl_sync(0xffffffff, c[2], from), y1 = __shfl_sync(0xffffffff, c[3], from);
    float z0 = __shfl_sync(0xffffffff, c[0], from2), z1 = __shfl_sync(0xffffffff, c[1], from2);
    float w0 = __shfl_sync(0xffffffff, c[2], from2), w1 = __shfl_sync(0xffffffff, c[3], from2);
    operand<SPLIT>(hi, lo, t & 1 ? x1 : x0, t & 1 ? y1 : y0, t & 1 ? z1 : z0, t & 1 ? w1 : w0);
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
template<int HD, bool SPLIT>
__global__ void __launch_bounds__(128) tf32_flash_forward(TF32_ARGS, float* y, float* lse) {
    TF32_SETUP
    constexpr int LD = HD + 4;
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
            for (int n = 0; n < 8; n++)   // keys 8n..8n+7: b = K[key][d]
                mma_t<SPLIT>(s[n], qa[kk], ql[SPLIT ? kk : 0], Ks[(8 * n + g) * LD + 8 * kk + t], Ks[(8 * n + g) * LD + 8 * kk + t + 4]);
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
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
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float p = s[j][e] == NEG_INF ? 0.f : exp2f(s[j][e] - m[e >> 1]);
                l[e >> 1] += p;
                if (has_drop) {
                    long long index = (bh * T + row0 + 8 * (e >> 1)) * (long long)T + k0 + 8 * j + 2 * t + (e & 1);
                    p = dropout_keep(seed, index, drop_p) ? p * drop_scale : 0.f;
                }
                s[j][e] = p;
            }
#pragma unroll
        for (int j = 0; j < HD / 8; j++) { o[j][0] *= alpha[0]; o[j][1] *= alpha[0]; o[j][2] *= alpha[1]; o[j][3] *= alpha[1]; }
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {   // keys 8kk..8kk+7
            unsigned pa[4], pl[4];
            acc_to_frag<SPLIT>(pa, pl, s[kk], lane, t);
#pragma unroll
            for (int n = 0; n < HD / 8; n++)   // b = V[key][d]
                mma_t<SPLIT>(o[n], pa, pl, Vs[(8 * kk + t) * LD + 8 * n + g], Vs[(8 * kk + t + 4) * LD + 8 * n + g]);
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 2);
        int qi = row0 + 8 * r;
        if (qi >= T) continue;
        float inv = 1.f / l[r];
        float* yr = y + out0 + qi * ot;
#pragma unroll
        for (int j = 0; j < HD / 8; j++) store2(yr + 8 * j + 2 * t, o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
        if (t == 0) lse[bh * T + qi] = m[r] * 0.6931471805599453f + logf(l[r]);
    }
}

// The backward of mma_flash_backward with float32 q, k, v, dy, dq, dk, dv in tf32 products (m16n8k8); SPLIT: 3xTF32.
template<int HD, bool SPLIT>
__global__ void __launch_bounds__(128) tf32_flash_backward(TF32_ARGS, const float* dy, const float* lse, const float* D,
                                                           float* dk, float* dv, float* dq_acc, long long ab,
                                                           long long ah, long long at) {
    TF32_SETUP
    constexpr int LD = HD + 4, LDT = 64 + 4;
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
            for (int n = 0; n < 8; n++) {   // queries 8n..8n+7
                mma_t<SPLIT>(s[n], ka, kl, Qs[(8 * n + g) * LD + 8 * kk + t], Qs[(8 * n + g) * LD + 8 * kk + t + 4]);
                mma_t<SPLIT>(dp[n], va, vl, Ys[(8 * n + g) * LD + 8 * kk + t], Ys[(8 * n + g) * LD + 8 * kk + t + 4]);
            }
        }
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int kj = key0 + 8 * (e >> 1), c = 8 * j + 2 * t + (e & 1), qi = q0 + c;
                bool ok = qi < T && kj < T && !(causal && kj > qi);
                float p = ok ? exp2f(s[j][e] * sl2 - Ls[c]) : 0.f, pd = p, dpd = dp[j][e];
                if (has_drop && ok) {
                    bool keep = dropout_keep(seed, (bh * T + qi) * (long long)T + kj, drop_p);
                    pd = keep ? p * drop_scale : 0.f;
                    dpd = keep ? dpd * drop_scale : 0.f;
                }
                dp[j][e] = p * (dpd - Ds[c]);
                s[j][e] = pd;
            }
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {   // queries 8kk..8kk+7: dV += Pd^T dy, dK += dS^T q
            unsigned pa[4], pl[4], da[4], dl[4];
            acc_to_frag<SPLIT>(pa, pl, s[kk], lane, t);
            acc_to_frag<SPLIT>(da, dl, dp[kk], lane, t);
#pragma unroll
            for (int n = 0; n < HD / 8; n++) {
                mma_t<SPLIT>(gv[n], pa, pl, Ys[(8 * kk + t) * LD + 8 * n + g], Ys[(8 * kk + t + 4) * LD + 8 * n + g]);
                mma_t<SPLIT>(gk[n], da, dl, Qs[(8 * kk + t) * LD + 8 * n + g], Qs[(8 * kk + t + 4) * LD + 8 * n + g]);
            }
            *(uint2*)(St + (warp * 16 + g) * LDT + 8 * kk + 2 * t) = make_uint2(tile_word<SPLIT>(dp[kk][0]), tile_word<SPLIT>(dp[kk][1]));
            *(uint2*)(St + (warp * 16 + g + 8) * LDT + 8 * kk + 2 * t) = make_uint2(tile_word<SPLIT>(dp[kk][2]), tile_word<SPLIT>(dp[kk][3]));
        }
        __syncthreads();
        float gq[HD / 8][4];
#pragma unroll
        for (int j = 0; j < HD / 8; j++) gq[j][0] = gq[j][1] = gq[j][2] = gq[j][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < 8; kc++) {   // keys 8kc..8kc+7: a = dS[query][key] = St[key][query]
            int r = warp * 16 + g;
            unsigned a[4] = {St[(8 * kc + t) * LDT + r], St[(8 * kc + t) * LDT + r + 8],
                             St[(8 * kc + t + 4) * LDT + r], St[(8 * kc + t + 4) * LDT + r + 8]}, al[4];
            if constexpr (SPLIT) operand<true>(a, al, __uint_as_float(a[0]), __uint_as_float(a[1]), __uint_as_float(a[2]), __uint_as_float(a[3]));
#pragma unroll
            for (int n = 0; n < HD / 8; n++)
                mma_t<SPLIT>(gq[n], a, al, Ks[(8 * kc + t) * LD + 8 * n + g], Ks[(8 * kc + t + 4) * LD + 8 * n + g]);
        }
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
_modules = {}


def shared_bytes(name, HD, tf32=False):
    """Dynamic shared memory of a kernel: 64-row tiles of bf16 (row stride HD + 8) or tf32 (HD + 4), plus
    backward's dS^T tile and its 64 log-sum-exps and D values."""
    tile = TILE * (HD + 4) * 4 if tf32 else TILE * (HD + 8) * 2
    square = TILE * (TILE + 4) * 4 if tf32 else TILE * (TILE + 8) * 2
    return 3 * tile if name == "forward" else 4 * tile + square + 2 * TILE * 4


def _kernels(kind, output, HD):
    """{name: (function, shared bytes)} for the kind (KINDS), the output storage and the head size, compiled on
    first use."""
    key = (kind, output, HD)
    if key not in _modules:
        ctype, tf32 = OUTPUTS[output], kind != "bfloat16"
        if tf32:
            split = "true" if kind == "float32" else "false"
            exprs = {"forward": f"tf32_flash_forward<{HD}, {split}>", "backward": f"tf32_flash_backward<{HD}, {split}>"}
        else:
            exprs = {"forward": f"mma_flash_forward<{ctype}, {HD}>", "backward": f"mma_flash_backward<{ctype}, {HD}>"}
        exprs.update(rowdot=f"mma_rowdot_zero<{ctype}, {HD}>", dq_store=f"flash_dq_store<{ctype}>")
        module = cp.RawModule(code=SOURCE, options=("-std=c++17",), name_expressions=list(exprs.values()))
        found = {}
        for name, expr in exprs.items():
            fn, smem = module.get_function(expr), 0
            if name in ("forward", "backward"):
                smem = shared_bytes(name, HD, tf32)
                fn.max_dynamic_shared_size_bytes = smem
            found[name] = (fn, smem)
        _modules[key] = found
    return _modules[key]


def enabled():
    """MMA, checked: True for "1", False for "0", a clear error naming the variable for anything else."""
    mode = str(MMA).strip()
    if mode not in ("1", "0"):
        raise ValueError(f"TINYGRAD_LLM_FLASH_MMA must be 1 or 0, got {MMA!r}")
    return mode == "1"


def supported(HS, pointers=(), strides=(), output="float32", kind="bfloat16"):
    """True when the `kind` kernels (KINDS) take heads of size HS whose inputs and `output` arrays start at
    `pointers` (byte addresses) with `strides` (element strides): every row of a head must start 16 bytes
    aligned (the tiles load 16 bytes a thread). The tf32 and float32 kinds write float32 only."""
    if HS not in HEAD_SIZES or output not in OUTPUTS or kind not in KINDS:
        return False
    if kind != "bfloat16" and output != "float32":
        return False
    return all(int(p) % 16 == 0 for p in pointers) and all(int(s) % 8 == 0 for s in strides)


def packed_supported(qkv, n_head, output="float32", kind=None):
    """supported() for the packed (B, T, 3C) qkv (C-contiguous: uint16 bf16 bits, or float32) and (B, T, C)
    outputs; kind (default: _kind(qkv)) must suit qkv's dtype."""
    B, T, C3 = qkv.shape
    C, kind = C3 // 3, kind or _kind(qkv)
    if (qkv.dtype == np.uint16) != (kind == "bfloat16") or qkv.dtype not in (np.uint16, np.float32):
        return False
    return C % n_head == 0 and supported(C // n_head, (qkv.data.ptr,), (C3, C), output, kind)


def _layout(B, NH, T, HS, inputs, outputs):
    return Layout("bfloat16", B, NH, T, HS, inputs, outputs)


def forward(layout, q, k, v, y, lse, causal=True, scale=1.0, seed=0, dropout_p=0.0, seed_ptr=0, output="float32",
            kind="bfloat16"):
    """y (layout's output strides, `output` storage) and lse (B NH T float32) from q, k, v (pointers to bf16
    for kind bfloat16, else to float32)."""
    fn, smem = _kernels(kind, output, layout.HS)["forward"]
    fn((-(-layout.T // TILE), layout.B * layout.NH), (THREADS,),
       layout.args(q, k, v, causal, scale, seed, dropout_p, seed_ptr) + _pointers(y, lse), shared_mem=smem)


def backward(layout, q, k, v, y, dy, lse, D, dq, dk, dv, work, causal=True, scale=1.0, seed=0, dropout_p=0.0,
             seed_ptr=0, output="float32", kind="bfloat16"):
    """dq, dk, dv (`output` storage, the input strides) from dy and the forward's y and lse; D: scratch of
    B NH T float32 (gets rowsum(dy * y)); work: with bfloat16 outputs, scratch of B NH T HS float32 for dQ's
    sums (float32 dq is summed into in place; work may be None then). The same arguments as the forward, or
    the mask differs. Launches only: a first pass writes D and zeroes dQ's sums, the kernel adds into them,
    and with bfloat16 outputs a last pass rounds them into dq."""
    found = _kernels(kind, output, layout.HS)
    B, NH, T, HS = layout.B, layout.NH, layout.T, layout.HS
    rows = B * NH * T
    if output == "float32":
        acc, acc_strides = dq, layout.inputs
    elif work is None:
        raise ValueError("flash_mma: backward with bfloat16 outputs needs work, scratch of B NH T HS float32")
    else:
        acc, acc_strides = work, (NH * T * HS, T * HS, HS)
    acc_strides = tuple(np.int64(s) for s in acc_strides)
    threads = rows * (HS // 4)
    found["rowdot"][0]((-(-threads // 256),), (256,), (*_pointers(y, dy, D, acc), np.int32(NH), np.int32(T),
                                                       *(np.int64(s) for s in layout.outputs), *acc_strides,
                                                       np.int64(rows)))
    fn, smem = found["backward"]
    fn((-(-T // TILE), B * NH), (THREADS,),
       layout.args(q, k, v, causal, scale, seed, dropout_p, seed_ptr) + _pointers(dy, lse, D, dk, dv, acc) + acc_strides,
       shared_mem=smem)
    if output != "float32":
        n = rows * HS
        found["dq_store"][0]((-(-n // 256),), (256,), (*_pointers(work, dq), np.int32(NH), np.int32(T), np.int32(HS),
                                                       *(np.int64(s) for s in layout.inputs), np.int64(n)))


def _kind(qkv):
    """The kind a qkv's dtype takes by default: bfloat16 for uint16 bits, tf32 for float32."""
    return "bfloat16" if qkv.dtype == np.uint16 else "tf32"


def self_attention_forward(qkv, n_head, causal, scale, seed, dropout_p, seed_ptr=0, output="float32", kind=None):
    """The packed (B, T, 3C) qkv (a C-contiguous CuPy array: uint16 bf16 bits, or float32) -> (y (B, T, C) of
    `output` (uint16 bits for bfloat16), lse (B NH T float32)); kind (KINDS) defaults to _kind(qkv)."""
    B, T, C3 = qkv.shape
    C, kind = C3 // 3, kind or _kind(qkv)
    layout, size = _layout(*_packed(B, T, C, n_head)), qkv.dtype.itemsize
    y = cp.empty((B, T, C), dtype=np.float32 if output == "float32" else np.uint16)
    lse = cp.empty(B * n_head * T, dtype=np.float32)
    p = qkv.data.ptr
    forward(layout, p, p + C * size, p + 2 * C * size, y.data.ptr, lse.data.ptr, causal, scale, seed, dropout_p,
            seed_ptr, output, kind)
    return y, lse


def self_attention_backward(qkv, y, lse, dy, n_head, causal, scale, seed, dropout_p, seed_ptr=0, output="float32",
                            kind=None):
    """dqkv (B, T, 3C) of `output` from the forward's qkv, y, lse and dy (B, T, C) of `output`, contiguous; the
    forward's kind."""
    B, T, C3 = qkv.shape
    C, kind = C3 // 3, kind or _kind(qkv)
    layout, size = _layout(*_packed(B, T, C, n_head)), qkv.dtype.itemsize
    out_size = 4 if output == "float32" else 2
    dqkv = cp.empty((B, T, C3), dtype=np.float32 if output == "float32" else np.uint16)
    D = cp.empty_like(lse)
    work = None if output == "float32" else cp.empty(lse.size * (C // n_head), dtype=np.float32)
    p, g = qkv.data.ptr, dqkv.data.ptr
    backward(layout, p, p + C * size, p + 2 * C * size, y.data.ptr, dy.data.ptr, lse.data.ptr, D.data.ptr, g,
             g + C * out_size, g + 2 * C * out_size, None if work is None else work.data.ptr, causal, scale, seed,
             dropout_p, seed_ptr, output, kind)
    return dqkv


def _packed(B, T, C, NH):
    """Layout arguments of a packed qkv: q, k, v column blocks of (B, T, 3C); y, dy (B, T, C)."""
    HS = C // NH
    return B, NH, T, HS, (T * 3 * C, HS, 3 * C), (T * C, HS, C)
