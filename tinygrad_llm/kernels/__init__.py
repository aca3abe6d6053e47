"""Numba kernels for the CPU, registered with the backend in place of their NumPy references.

Importing this package (the backend does it on the first dispatch) registers, for device "cpu":

    functional.ScaledDotProductAttention -> attention.NumbaAttention   (no mask; causal or not)
    functional.LayerNorm, RMSNorm        -> layer_norm.NumbaLayerNorm, NumbaRMSNorm
    functional.CrossEntropy              -> cross_entropy.NumbaCrossEntropy
    functional.GELU, SwiGLU              -> gelu.NumbaGELU, NumbaSwiGLU (same-shape gate and up)
    functional.Embedding                 -> embedding.NumbaEmbedding  (scatter-add backward)
    optim.adamw_update                   -> adamw.numba_adamw_update

Each kernel file holds the Numba functions, the kernel, validate() against the reference and
benchmark(); every kernel falls back to its reference for inputs it does not cover. matmul.py is
measured, not registered: BLAS wins the model's shapes (see that file). Without Numba nothing is
registered and everything runs on the NumPy references; TINYGRAD_LLM_KERNELS=0 does the same.
Compiled code is cached on disk (__pycache__), so only the first start pays for compilation.
"""
from .. import backend

try:
    import numba  # noqa: F401
except ImportError:  # pragma: no cover - depends on the machine
    numba = None

KERNEL_MODULES = ("adamw", "attention", "cross_entropy", "embedding", "gelu", "layer_norm", "matmul")


def _register():
    from .. import functional, optim
    from .adamw import numba_adamw_update
    from .attention import NumbaAttention
    from .cross_entropy import NumbaCrossEntropy
    from .embedding import NumbaEmbedding
    from .gelu import NumbaGELU, NumbaSwiGLU
    from .layer_norm import NumbaLayerNorm, NumbaRMSNorm

    for reference, kernel in [(functional.ScaledDotProductAttention, NumbaAttention),
                              (functional.LayerNorm, NumbaLayerNorm), (functional.RMSNorm, NumbaRMSNorm),
                              (functional.CrossEntropy, NumbaCrossEntropy), (functional.GELU, NumbaGELU),
                              (functional.SwiGLU, NumbaSwiGLU), (functional.Embedding, NumbaEmbedding),
                              (optim.adamw_update, numba_adamw_update)]:
        backend.register_kernel(reference, "cpu", kernel)


if numba is not None:
    _register()
