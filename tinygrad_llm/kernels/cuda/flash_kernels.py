"""The C++ source of flash_attention.py's kernels (forward, the backward's rowsum(dy * y), dK/dV and dQ),
templated over the storage type (float, double, bfloat16 as 16-bit words), the padded head size HD and
the tile sizes BQ x BK; kept apart from the launchers so each file stays short. Derivation:
docs/backward/flash_attention.md.
"""
from .runtime import HEADER

SOURCE = HEADER + r"""
__device__ __forceinline__ float ld_s(const float* p) { return *p; }
__device__ __forceinline__ double ld_s(const double* p) { return *p; }
__device__ __forceinline__ float ld_s(const unsigned short* p) { return __uint_as_float(((unsigned)*p) << 16); }
__device__ __forceinline__ void st_s(float* p, float x) { *p = x; }
__device__ __forceinline__ void st_s(double* p, double x) { *p = x; }
__device__ __forceinline__ void st_s(unsigned short* p, float x) {   // bfloat16, round to nearest even
    unsigned u = __float_as_uint(x);
    *p = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)0x7fc0 : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
template<typename S> struct Math { typedef float T; };   // the arithmetic type: double for double, else float
template<> struct Math<double> { typedef double T; };

// N values from shared memory at p: 16-byte loads where N fills them (p is then 16-byte aligned)
template<int N, typename A> __device__ __forceinline__ void vload(const A* p, A* out) {
    constexpr int W = 16 / sizeof(A);
#pragma unroll
    for (int i = 0; i < N; i += (N % W == 0 ? W : 1)) {
        if constexpr (N % W != 0) out[i] = p[i];
        else if constexpr (sizeof(A) == 4) { float4 v = *(const float4*)(p + i); out[i] = v.x; out[i + 1] = v.y; out[i + 2] = v.z; out[i + 3] = v.w; }
        else { double2 v = *(const double2*)(p + i); out[i] = v.x; out[i + 1] = v.y; }
    }
}

// acc[i][j] += sum_k a[i lda + k] b[k ldb + j]: a row-major (this thread's R rows), b k-major (its C columns)
template<int R, int C, int K, typename A>
__device__ __forceinline__ void tile_mma(A (&acc)[R][C], const A* a, int lda, const A* b, int ldb) {
    constexpr int W = 16 / sizeof(A);
#pragma unroll 2
    for (int k = 0; k < K; k += W) {
        A av[R][W], bv[W][C];
#pragma unroll
        for (int i = 0; i < R; i++) vload<W>(a + i * lda + k, av[i]);
#pragma unroll
        for (int w = 0; w < W; w++) vload<C>(b + (k + w) * ldb, bv[w]);
#pragma unroll
        for (int w = 0; w < W; w++)
#pragma unroll
            for (int i = 0; i < R; i++)
#pragma unroll
                for (int j = 0; j < C; j++) acc[i][j] += av[i][w] * bv[w][j];
    }
}

// acc[i][j] += sum_k a[k lda + i] b[k ldb + j]: a k-major (this thread's R rows contiguous), b k-major
template<int R, int C, int K, typename A>
__device__ __forceinline__ void tile_mma_t(A (&acc)[R][C], const A* a, int lda, const A* b, int ldb) {
#pragma unroll 4
    for (int k = 0; k < K; k++) {
        A av[R], bv[C];
        vload<R>(a + k * lda, av);
        vload<C>(b + k * ldb, bv);
#pragma unroll
        for (int i = 0; i < R; i++)
#pragma unroll
            for (int j = 0; j < C; j++) acc[i][j] += av[i] * bv[j];
    }
}

// rows [r0, r0 + R) of a (T, HS) head matrix into shared memory, times mul, zero past T and HS:
// row-major [r][d] (row stride HD + 4) or transposed [d][r] (row stride R + 4)
template<int R, int HD, bool TRANSPOSED, typename S, typename A>
__device__ __forceinline__ void load_rows(A* dst, const S* src, long long st, int r0, int T, int HS, A mul) {
    for (int e = threadIdx.x; e < R * HD; e += 256) {
        int r = e / HD, d = e % HD;
        A x = (r0 + r < T && d < HS) ? (A)ld_s(src + (long long)(r0 + r) * st + d) * mul : (A)0;
        if (TRANSPOSED) dst[d * (R + 4) + r] = x; else dst[r * (HD + 4) + d] = x;
    }
}

__device__ __forceinline__ float group16_max(float x) { for (int o = 8; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o)); return x; }
__device__ __forceinline__ double group16_max(double x) { for (int o = 8; o > 0; o >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffff, x, o)); return x; }
template<typename A> __device__ __forceinline__ A group16_sum(A x) { for (int o = 8; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o); return x; }

#define FLASH_ARGS const S* q, const S* k, const S* v, int NH, int T, int HS, long long sb, long long sh, long long st, \
    long long ob, long long oh, long long ot, A scale, int causal, const unsigned long long* seed_ptr, unsigned long long seed, \
    float drop_p, A drop_scale, int has_drop
#define FLASH_SETUP int tx = threadIdx.x & 15, ty = threadIdx.x >> 4; if (has_drop) seed = dropout_seed(seed_ptr, seed); \
    long long bh = blockIdx.y; long long in0 = (bh / NH) * sb + (bh % NH) * sh, out0 = (bh / NH) * ob + (bh % NH) * oh; \
    extern __shared__ __align__(16) unsigned char smem_raw[]; A* smem = (A*)smem_raw;

// Forward: one block a query tile of one (b, h); y = softmax(scale q k^T) (dropped) v, lse = log-sum-exp of each row.
template<typename S, int HD, int BQ, int BK, typename A = typename Math<S>::T>
__global__ void __launch_bounds__(256) flash_forward(FLASH_ARGS, S* y, A* lse) {
    FLASH_SETUP
    constexpr int RQ = BQ / 16, CK = BK / 16, CD = HD / 16, LD = HD + 4;
    A *Qs = smem, *Kt = Qs + BQ * LD, *Vs = Kt + HD * (BK + 4), *Ps = Vs + BK * LD;
    int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;        // the longest causal rows first
    load_rows<BQ, HD, false>(Qs, q + in0, st, q0, T, HS, scale);
    A m[RQ], l[RQ], o[RQ][CD];
#pragma unroll
    for (int i = 0; i < RQ; i++) { m[i] = NEG_INF; l[i] = 0; for (int j = 0; j < CD; j++) o[i][j] = 0; }
    int kend = causal ? min(T, q0 + BQ) : T;
    for (int k0 = 0; k0 < kend; k0 += BK) {
        __syncthreads();
        load_rows<BK, HD, true>(Kt, k + in0, st, k0, T, HS, (A)1);
        load_rows<BK, HD, false>(Vs, v + in0, st, k0, T, HS, (A)1);
        __syncthreads();
        A s[RQ][CK] = {};
        tile_mma<RQ, CK, HD>(s, Qs + ty * RQ * LD, LD, Kt + tx * CK, BK + 4);
#pragma unroll
        for (int i = 0; i < RQ; i++) {
            int qi = q0 + ty * RQ + i;
            A tmax = NEG_INF;
#pragma unroll
            for (int j = 0; j < CK; j++) {
                int kj = k0 + tx * CK + j;
                if (kj >= T || (causal && kj > qi)) s[i][j] = NEG_INF;
                tmax = max(tmax, s[i][j]);
            }
            A mnew = max(m[i], group16_max(tmax));
            A alpha = mnew == NEG_INF ? (A)1 : exp(m[i] - mnew);
            m[i] = mnew; l[i] *= alpha;
#pragma unroll
            for (int j = 0; j < CD; j++) o[i][j] *= alpha;
#pragma unroll
            for (int j = 0; j < CK; j++) {
                int kj = k0 + tx * CK + j;
                A p = s[i][j] == NEG_INF ? (A)0 : exp(s[i][j] - mnew);
                l[i] += p;
                if (has_drop) p = dropout_keep(seed, (bh * T + qi) * (long long)T + kj, drop_p) ? p * drop_scale : (A)0;
                Ps[(ty * RQ + i) * (BK + 4) + tx * CK + j] = p;
            }
        }
        __syncthreads();
        tile_mma<RQ, CD, BK>(o, Ps + ty * RQ * (BK + 4), BK + 4, Vs + tx * CD, LD);
    }
#pragma unroll
    for (int i = 0; i < RQ; i++) {
        int qi = q0 + ty * RQ + i;
        A total = group16_sum(l[i]);
        if (qi >= T) continue;
#pragma unroll
        for (int j = 0; j < CD; j++)
            if (tx * CD + j < HS) st_s(y + out0 + qi * ot + tx * CD + j, o[i][j] / total);
        if (tx == 0) lse[bh * T + qi] = m[i] + log(total);
    }
}

// D[(b NH + h) T + t] = sum_d dy[b, h, t, d] y[b, h, t, d]: one warp a row
template<typename S, typename A = typename Math<S>::T>
__global__ void flash_rowdot(const S* y, const S* dy, A* D, int NH, int T, int HS, long long ob, long long oh, long long ot, long long rows) {
    long long r = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    long long bh = r / T, at = (bh / NH) * ob + (bh % NH) * oh + (r % T) * ot;
    A total = 0;
    for (int d = lane; d < HS; d += 32) total += (A)ld_s(y + at + d) * (A)ld_s(dy + at + d);
    total = warp_sum(total);
    if (lane == 0) D[r] = total;
}

// dq[b, h, t, d] = acc[(b NH + h) T + t, d] in the storage type: after the FUSED backward
template<typename S, typename A = typename Math<S>::T>
__global__ void flash_dq_store(const A* acc, S* dq, int NH, int T, int HS, long long sb, long long sh, long long st, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long r = i / HS, bh = r / T;
    st_s(dq + (bh / NH) * sb + (bh % NH) * sh + (r % T) * st + i % HS, acc[i]);
}

// P and dS of one (query, key) element from its scores s (scaled) and dPd = dy v^T: returns Pd, sets ds
template<typename A>
__device__ __forceinline__ A recompute(A s, A dpd, A lse, A D, bool ok, long long index, int has_drop,
                                       unsigned long long seed, float drop_p, A drop_scale, A& ds) {
    A p = ok ? exp(s - lse) : (A)0, pd = p;
    if (has_drop) {
        bool keep = dropout_keep(seed, index, drop_p);
        pd = keep ? p * drop_scale : (A)0;
        dpd = keep ? dpd * drop_scale : (A)0;
    }
    ds = p * (dpd - D);
    return pd;
}

// dK, dV of one key tile: loops over the query tiles that see it. dq/dk/dv use the input's strides.
// FUSED: also dQ, its part from this key tile added (atomically) to dq_acc ((B NH T, HS), zeroed before).
template<typename S, int HD, int BQ, int BK, bool FUSED, typename A = typename Math<S>::T>
__global__ void __launch_bounds__(256) flash_backward_kv(FLASH_ARGS, const S* dy, const A* lse, const A* D, S* dk, S* dv,
                                                         A* dq_acc) {
    FLASH_SETUP
    constexpr int RK = BK / 16, CQ = BQ / 16, CD = HD / 16, LD = HD + 4;
    A *Ks = smem, *Vs = Ks + BK * LD, *Qs = Vs + BK * LD, *Ys = Qs + BQ * LD, *Qt = Ys + BQ * LD,
      *Yt = Qt + HD * (BQ + 4), *Ss = Yt + HD * (BQ + 4), *Ls = Ss + BK * (BQ + 4), *Ds = Ls + BQ;
    int k0 = blockIdx.x * BK;                          // causal: the first key tiles have the most rows
    load_rows<BK, HD, false>(Ks, k + in0, st, k0, T, HS, scale);
    load_rows<BK, HD, false>(Vs, v + in0, st, k0, T, HS, (A)1);
    A gk[RK][CD] = {}, gv[RK][CD] = {};
    for (int q0 = causal ? k0 / BQ * BQ : 0; q0 < T; q0 += BQ) {
        __syncthreads();
        load_rows<BQ, HD, false>(Qs, q + in0, st, q0, T, HS, (A)1);
        load_rows<BQ, HD, true>(Qt, q + in0, st, q0, T, HS, (A)1);
        load_rows<BQ, HD, false>(Ys, dy + out0, ot, q0, T, HS, (A)1);
        load_rows<BQ, HD, true>(Yt, dy + out0, ot, q0, T, HS, (A)1);
        for (int i = threadIdx.x; i < BQ; i += 256) { Ls[i] = q0 + i < T ? lse[bh * T + q0 + i] : (A)0; Ds[i] = q0 + i < T ? D[bh * T + q0 + i] : (A)0; }
        __syncthreads();
        A s[RK][CQ] = {}, dp[RK][CQ] = {};
        tile_mma<RK, CQ, HD>(s, Ks + ty * RK * LD, LD, Qt + tx * CQ, BQ + 4);    // S^T
        tile_mma<RK, CQ, HD>(dp, Vs + ty * RK * LD, LD, Yt + tx * CQ, BQ + 4);   // dPd^T
#pragma unroll
        for (int i = 0; i < RK; i++)
#pragma unroll
            for (int j = 0; j < CQ; j++) {
                int kj = k0 + ty * RK + i, qi = q0 + tx * CQ + j;
                bool ok = qi < T && kj < T && !(causal && kj > qi);
                A ds;
                A pd = recompute(s[i][j], dp[i][j], Ls[tx * CQ + j], Ds[tx * CQ + j], ok,
                                 (bh * T + qi) * (long long)T + kj, has_drop, seed, drop_p, drop_scale, ds);
                Ss[(ty * RK + i) * (BQ + 4) + tx * CQ + j] = pd;
                dp[i][j] = ds;
            }
        __syncthreads();
        tile_mma<RK, CD, BQ>(gv, Ss + ty * RK * (BQ + 4), BQ + 4, Ys + tx * CD, LD);   // dV += Pd^T dy
        __syncthreads();
#pragma unroll
        for (int i = 0; i < RK; i++)
#pragma unroll
            for (int j = 0; j < CQ; j++) Ss[(ty * RK + i) * (BQ + 4) + tx * CQ + j] = dp[i][j];
        __syncthreads();
        tile_mma<RK, CD, BQ>(gk, Ss + ty * RK * (BQ + 4), BQ + 4, Qs + tx * CD, LD);   // dK += dS^T q
        if constexpr (FUSED) {   // dQ (rows ty CQ ..) += dS (scale k): Ks holds scale k
            A gq[CQ][CD] = {};
            tile_mma_t<CQ, CD, BK>(gq, Ss + ty * CQ, BQ + 4, Ks + tx * CD, LD);
#pragma unroll
            for (int i = 0; i < CQ; i++) {
                int qi = q0 + ty * CQ + i;
#pragma unroll
                for (int j = 0; j < CD; j++)
                    if (qi < T && tx * CD + j < HS) atomicAdd(dq_acc + (bh * T + qi) * HS + tx * CD + j, gq[i][j]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < RK; i++) {
        int kj = k0 + ty * RK + i;
        if (kj >= T) continue;
#pragma unroll
        for (int j = 0; j < CD; j++)
            if (tx * CD + j < HS) {
                st_s(dk + in0 + kj * st + tx * CD + j, gk[i][j] * scale);
                st_s(dv + in0 + kj * st + tx * CD + j, gv[i][j]);
            }
    }
}

// dQ of one query tile: loops over the key tiles it sees.
template<typename S, int HD, int BQ, int BK, typename A = typename Math<S>::T>
__global__ void __launch_bounds__(256) flash_backward_q(FLASH_ARGS, const S* dy, const A* lse, const A* D, S* dq) {
    FLASH_SETUP
    constexpr int RQ = BQ / 16, CK = BK / 16, CD = HD / 16, LD = HD + 4;
    A *Qs = smem, *Ys = Qs + BQ * LD, *Ks = Ys + BQ * LD, *Kt = Ks + BK * LD, *Vt = Kt + HD * (BK + 4),
      *Ss = Vt + HD * (BK + 4);
    int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;
    load_rows<BQ, HD, false>(Qs, q + in0, st, q0, T, HS, scale);
    load_rows<BQ, HD, false>(Ys, dy + out0, ot, q0, T, HS, (A)1);
    A rl[RQ], rd[RQ], gq[RQ][CD] = {};
    for (int i = 0, qi = q0 + ty * RQ; i < RQ; i++, qi++) { rl[i] = qi < T ? lse[bh * T + qi] : (A)0; rd[i] = qi < T ? D[bh * T + qi] : (A)0; }
    int kend = causal ? min(T, q0 + BQ) : T;
    for (int k0 = 0; k0 < kend; k0 += BK) {
        __syncthreads();
        load_rows<BK, HD, false>(Ks, k + in0, st, k0, T, HS, (A)1);
        load_rows<BK, HD, true>(Kt, k + in0, st, k0, T, HS, (A)1);
        load_rows<BK, HD, true>(Vt, v + in0, st, k0, T, HS, (A)1);
        __syncthreads();
        A s[RQ][CK] = {}, dp[RQ][CK] = {};
        tile_mma<RQ, CK, HD>(s, Qs + ty * RQ * LD, LD, Kt + tx * CK, BK + 4);
        tile_mma<RQ, CK, HD>(dp, Ys + ty * RQ * LD, LD, Vt + tx * CK, BK + 4);
#pragma unroll
        for (int i = 0; i < RQ; i++)
#pragma unroll
            for (int j = 0; j < CK; j++) {
                int qi = q0 + ty * RQ + i, kj = k0 + tx * CK + j;
                bool ok = qi < T && kj < T && !(causal && kj > qi);
                A ds;
                recompute(s[i][j], dp[i][j], rl[i], rd[i], ok, (bh * T + qi) * (long long)T + kj, has_drop, seed,
                          drop_p, drop_scale, ds);
                Ss[(ty * RQ + i) * (BK + 4) + tx * CK + j] = ds;
            }
        __syncthreads();
        tile_mma<RQ, CD, BK>(gq, Ss + ty * RQ * (BK + 4), BK + 4, Ks + tx * CD, LD);   // dQ += dS k
    }
#pragma unroll
    for (int i = 0; i < RQ; i++) {
        int qi = q0 + ty * RQ + i;
        if (qi >= T) continue;
#pragma unroll
        for (int j = 0; j < CD; j++)
            if (tx * CD + j < HS) st_s(dq + in0 + qi * st + tx * CD + j, gq[i][j] * scale);
    }
}
"""
