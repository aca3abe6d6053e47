"""LayerNorm, GELU and DropoutAdd under precision.autocast("bfloat16") on CUDA arrays
(precision.BF16_COPY_PRODUCERS): float32 arithmetic, the float32 kernels' results to the bit (layer_norm.py,
elementwise.py: the same kernels or the same formulas, more stores), and in the same pass what the bf16 product
that reads the result next would otherwise make in a pass of its own:

    LayerNorm forward     out, and bf16(out): c_attn's, c_fc's or the LM head's operand
    GELU forward          y, and bf16(y): the MLP's c_proj's operand
    GELU backward         dx, bf16(dx) and dx's column sums: c_fc's dout and bias gradient
    DropoutAdd backward   dy = dout * mask, bf16(dy) and dy's column sums: c_proj's (attention's or the
                          MLP's) dout and bias gradient

The copies (and sums) are handed over through precision.offer_copy, and mixed.LinearBF16Cuda takes them: the
float32 -> bf16 pass over those arrays (a read of 4 bytes a value, a write of 2 and a launch, each) is gone,
and a backward's result is not read again for its bias gradient. The backward passes' sums are columns.py's
(PARTIALS: the same blocks, the same order), so a bias gradient equals column_sums of the gradient bit for
bit, as the product would have summed it. LayerNorm's input gradient joins the residual stream: nothing to
offer. Offers are kept only inside a precision.weight_copies region (a training step's); outside one the
backward passes run the float32 kernels. A product without a bias takes the copy and leaves the sums; an
offer nothing takes (a consumer that is not a product) costs its 2-byte store and the sums' small partials, and
is kept, with its array, until the region ends.

Covered: float32 CuPy arrays (forward GELU: the tanh form, C-contiguous and 16-byte aligned; backward GELU and
DropoutAdd: C-contiguous, 16-byte aligned, the last axis a multiple of 4, GELU's tanh form); anything else runs
the float32 kernel (or the op) unchanged and offers nothing.
"""
import cupy as cp
import numpy as np

from ... import backend, precision
from ...functional import DropoutAdd
from .columns import BLOCK, PARTIALS, fused_column_sums, vector
from .elementwise import FORMULAS, DropoutAddCuda, GELUCuda
from .layer_norm import LayerNormCuda
from .runtime import Source

_SOURCE = Source(FORMULAS + PARTIALS + r"""
template<typename T> struct GeluTanhGradAt {
    const T* x; const T* dout;
    template<int W> __device__ __forceinline__ void at(long long i, T (&v)[W]) const {
        T xs[W];
        load_lanes<W>(x + i, xs);
        load_lanes<W>(dout + i, v);
#pragma unroll
        for (int k = 0; k < W; k++) v[k] = gelu_tanh_grad(xs[k], v[k]);
    }
};
template<typename T> struct DropoutAt {
    const T* g; unsigned long long seed; float p; T scale;
    template<int W> __device__ __forceinline__ void at(long long i, T (&v)[W]) const {
        load_lanes<W>(g + i, v);
#pragma unroll
        for (int k = 0; k < W; k++) v[k] = dropout_apply(v[k], seed, p, scale, i + k);
    }
};
// dx = GELU'(x) dout (tanh form), its bf16 bits and its column partials (columns.py's partials(), 16 bytes a lane)
template<typename T>
__global__ void gelu_tanh_backward_columns(const T* __restrict__ x, const T* __restrict__ dout, T* dx, T* part,
                                           unsigned short* bf, long long N, int M, long long rows_per_chunk) {
    partials<T, true>(GeluTanhGradAt<T>{x, dout}, dx, part, bf, N, M, rows_per_chunk);
}
// dy = dout * mask (dropout's, element i of the forward's y), its bf16 bits and its column partials
template<typename T>
__global__ void dropout_columns(const T* __restrict__ g, T* dy, T* part, unsigned short* bf, long long N, int M,
                                long long rows_per_chunk, const unsigned long long* seed_ptr, unsigned long long seed,
                                float p, T scale) {
    partials<T, true>(DropoutAt<T>{g, dropout_seed(seed_ptr, seed), p, scale}, dy, part, bf, N, M, rows_per_chunk);
}
""", ["gelu_tanh_backward_columns", "dropout_columns"])


def _with_copy_and_sums(name, inputs, tail=()):
    """(..., M) float32 values that kernel `name` computes from `inputs` (arrays of their shape), offered with
    their bf16 copy and column sums for the product that takes them next."""
    shape = inputs[0].shape
    M = shape[-1]
    N = inputs[0].size // M
    out, copy = cp.empty(shape, dtype=np.float32), cp.empty(shape, dtype=np.uint16)
    sums = fused_column_sums(lambda part, rows, grid: _SOURCE(name, np.float32)(
        grid, BLOCK, (*inputs, out, part, copy, np.int64(N), np.int32(M), np.int64(rows), *tail)), N, M, np.float32,
        vec=True)
    precision.offer_copy(out, copy, sums=sums)
    return out


def _covered(*arrays):
    """The fused backward passes take float32 CuPy arrays of one shape, C-contiguous on 16-byte boundaries,
    the last axis a multiple of 4 (columns.vector: 16 bytes a lane)."""
    return (all(isinstance(a, cp.ndarray) and a.dtype == np.float32 and a.shape == arrays[0].shape for a in arrays)
            and arrays[0].ndim >= 1 and arrays[0].size > 0 and vector(arrays[0].shape[-1], *arrays))


class LayerNormBF16Cuda:
    """LayerNormCuda, its output's bf16 copy offered to the next product (module docstring)."""

    sums_pending = (0,)   # backward adds the gradient pending at x into dx (layer_norm.py)

    @staticmethod
    def forward(ctx, x, w=None, b=None, eps=1e-5):
        out, copy = LayerNormCuda.forward_copy(ctx, x, w, b, eps, bf16_copy=True)
        if copy is not None:
            precision.offer_copy(out, copy)
        return out

    backward = staticmethod(LayerNormCuda.backward)


class GELUBF16Cuda:
    """GELUCuda, its output's bf16 copy offered to the next product; backward (tanh form) offers its input
    gradient's copy and column sums (module docstring)."""

    @staticmethod
    def forward(ctx, x, approximate="none"):
        y, copy = GELUCuda.forward_copy(ctx, x, approximate, bf16_copy=True)
        if copy is not None:
            precision.offer_copy(y, copy)
        return y

    # derivation: docs/backward/gelu.md
    @staticmethod
    def backward(ctx, dout):
        if ctx.reference or ctx.approximate != "tanh" or not precision.collecting() or not _covered(ctx.x, dout):
            return GELUCuda.backward(ctx, dout)
        return _with_copy_and_sums("gelu_tanh_backward_columns", (ctx.x, dout))


class DropoutAddBF16Cuda:
    """DropoutAddCuda; backward offers dy's bf16 copy and column sums (module docstring)."""

    @staticmethod
    def forward(ctx, x, y, p=0.5, rng=None):
        if not backend.kernels_enabled():   # the op's own masks (its generator draws), as without autocast
            ctx.reference = True
            return DropoutAdd.forward(ctx, x, y, p=p, rng=rng)
        return DropoutAddCuda.forward(ctx, x, y, p=p, rng=rng)

    # derivation: docs/backward/dropout_and_dropout_add.md
    @staticmethod
    def backward(ctx, dout):
        if ctx.reference or not ctx.needs_input_grad[1] or not precision.collecting() or not _covered(dout):
            return DropoutAddCuda.backward(ctx, dout)
        # dx = dout; dy = dout * mask: the forward's seed, the same element indices
        dy = _with_copy_and_sums("dropout_columns", (dout,), (ctx.seed_ptr, ctx.seed, ctx.p, ctx.scale))
        return (dout if ctx.needs_input_grad[0] else None), dy
