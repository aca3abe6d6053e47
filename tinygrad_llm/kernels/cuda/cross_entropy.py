"""Softmax + cross-entropy on CUDA arrays, one warp a row (op: functional.CrossEntropy): max, log-sum-exp
and nll in one pass; "mean" divides by the count of counted targets on the device, so the host never
waits for it. Backward is one elementwise pass that recomputes the probabilities from the saved lse.
"""
import cupy as cp
import numpy as np

from ...functional import CrossEntropy
from .runtime import Source, served, warp_rows_launch

_SOURCE = Source(r"""
// logits (N, V), targets (N,) -> nll (N,) (0 where ignored), lse (N,). One warp a row.
template<typename T>
__global__ void cross_entropy_forward(const T* logits, const long long* targets, T* nll, T* lse,
                                      long long N, int V, long long ignore_index) {
    long long r = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= N) return;
    const T* x = logits + r * V;
    T m = NEG_INF;
    for (int j = lane; j < V; j += 32) m = max(m, x[j]);
    m = warp_max(m);
    T total = 0;
    for (int j = lane; j < V; j += 32) total += exp(x[j] - m);
    total = warp_sum(total);
    if (lane == 0) {
        T l = m + log(total);
        long long t = targets[r];
        lse[r] = l;
        nll[r] = (t == ignore_index) ? (T)0 : l - x[t];
    }
}
""", ["cross_entropy_forward"])

_cross_entropy_backward = cp.ElementwiseKernel(
    "raw T logits, raw T lse, raw int64 targets, raw T dout, int64 dout_stride, raw T scale, int64 V, int64 ignore",
    "T dx",
    """
    long long row = i / V, j = i % V;
    long long t = targets[row];
    if (t == ignore) {
        dx = 0;
    } else {
        T p = exp(logits[i] - lse[row]);
        dx = (p - (j == t ? (T)1 : (T)0)) * (dout[row * dout_stride] * scale[0]);
    }
    """,
    "tinygrad_llm_cross_entropy_backward")


class CrossEntropyCuda:
    """Softmax + cross-entropy in one warp pass a row; "mean" divides by the count on the device."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index=-100, reduction="mean"):
        ctx.reference = not served(logits)
        if ctx.reference:
            return CrossEntropy.forward(ctx, logits, targets, ignore_index=ignore_index, reduction=reduction)
        V = logits.shape[-1]
        x = cp.ascontiguousarray(logits).reshape(-1, V)
        t = cp.asarray(targets).reshape(-1).astype(cp.int64, copy=False)
        N = x.shape[0]
        nll = cp.empty(N, dtype=x.dtype)
        lse = cp.empty(N, dtype=x.dtype)
        grid, block = warp_rows_launch(N)
        _SOURCE("cross_entropy_forward", x.dtype)(grid, block, (x, t, nll, lse, np.int64(N), np.int32(V),
                                                                np.int64(ignore_index)))
        if reduction == "mean":
            # dividing on the device keeps the host from waiting for the count
            count = (t != ignore_index).sum()
            scale = (1 / cp.maximum(count, 1)).astype(x.dtype)
        else:
            scale = cp.ones((), dtype=x.dtype)
        ctx.x, ctx.t, ctx.lse, ctx.scale = x, t, lse, scale.reshape(1)
        ctx.ignore_index, ctx.reduction, ctx.shape = ignore_index, reduction, logits.shape
        if reduction == "none":
            return nll.reshape(targets.shape)
        return (nll.sum() * scale).astype(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return CrossEntropy.backward(ctx, dout)
        x = ctx.x
        dout = cp.ascontiguousarray(dout, dtype=x.dtype).reshape(-1)
        stride = 1 if ctx.reduction == "none" else 0
        dx = cp.empty_like(x)
        # dlogits = (softmax(logits) - onehot(target)) * dout * scale, zero on ignored rows
        _cross_entropy_backward(x, ctx.lse, ctx.t, dout, stride, ctx.scale, x.shape[1], ctx.ignore_index, dx)
        return dx.reshape(ctx.shape), None


