"""LayerNorm and GELU under precision.autocast("bfloat16") on CUDA arrays (precision.BF16_COPY_PRODUCERS):
float32 arithmetic, the float32 kernels' results to the bit (layer_norm.py, elementwise.py: the same kernels,
one more store), and in the same pass the bf16 copy of the output for the bf16 product that reads it next:
LayerNorm's output is c_attn's, c_fc's or the LM head's operand, GELU's c_proj's. The copies are handed over
through precision.offer_copy and mixed.LinearBF16Cuda takes them, so the separate float32 -> bf16 pass over
those activations (one read of 4 bytes and a launch, for each) is gone; the bf16 copy is what that product
saves for its backward anyway. Backward is the float32 kernels': LayerNorm's input gradient joins the residual
stream, and GELU's is c_fc's dout, whose column sums (c_fc's bias gradient) are taken in the pass that
converts it (mixed.py), so a copy of it would save nothing.

Covered: float32 CuPy arrays (GELU: the tanh form, C-contiguous and 16-byte aligned); anything else runs the
float32 kernel (or the op) unchanged and offers nothing.
"""
from ... import precision
from .elementwise import GELUCuda
from .layer_norm import LayerNormCuda


class LayerNormBF16Cuda:
    """LayerNormCuda, its output's bf16 copy offered to the next product (module docstring)."""

    @staticmethod
    def forward(ctx, x, w=None, b=None, eps=1e-5):
        out, copy = LayerNormCuda.forward_copy(ctx, x, w, b, eps, bf16_copy=True)
        if copy is not None:
            precision.offer_copy(out, copy)
        return out

    backward = staticmethod(LayerNormCuda.backward)


class GELUBF16Cuda:
    """GELUCuda, its output's bf16 copy offered to the next product (module docstring)."""

    @staticmethod
    def forward(ctx, x, approximate="none"):
        y, copy = GELUCuda.forward_copy(ctx, x, approximate, bf16_copy=True)
        if copy is not None:
            precision.offer_copy(y, copy)
        return y

    backward = staticmethod(GELUCuda.backward)
