"""Numba kernels for the CPU, registered with the backend in place of their NumPy references.

Importing this package (the backend does it on the first dispatch) registers, for device "cpu",
only the kernels that measured faster than their reference (benchmarks/kernels.py):

    functional.ScaledDotProductAttention -> attention.NumbaAttention  (no mask, no dropout; every size)
    functional.CrossEntropy              -> cross_entropy.NumbaCrossEntropy
    functional.LayerNorm, RMSNorm        -> layer_norm.NumbaLayerNorm, NumbaRMSNorm
    functional.GELU, SwiGLU              -> gelu.NumbaGELU (tanh form; the erf form's kernel lost to its
                                            reference and is not served), NumbaSwiGLU (same shapes)
    functional.Embedding                 -> embedding.NumbaEmbedding  (scatter-add backward)
    optim.adamw_update                   -> adamw.numba_adamw_update
    optim.adamw_update_group             -> adamw.numba_adamw_update_group  (16 parameters per call)

Each kernel file holds the Numba functions, the kernel, validate() against the reference and
benchmark(); every kernel falls back to its reference for inputs it does not cover. Measured and not
registered: matmul.py (BLAS wins every model shape by 20-100x).

Numba's exp is a scalar libm call, NumPy's np.exp a SIMD loop, so attention and cross-entropy run
their exp as np.exp in place between Numba passes (as gelu.py does for tanh). Measured float32
fwd+bwd, kernel vs reference (benchmarks/kernels.py, 2 cores, one process):
attention (causal row blocks, only the visible keys multiplied) 1.26x at (12,4,64,32), formerly
0.74-0.86x and not served below 128 x 128 scores, and 1.32x at (64,6,256,64), formerly 0.80-0.85x;
cross-entropy 1.92x at (768,65), 2.14x at (16384,65), 1.27x at (2048,50257), formerly 0.27-0.48x
and not registered. Training step, ours/PyTorch (benchmarks/train_step.py, same process): 4x128
1.14x -> 1.09x, 6x384 1.18x -> 1.10x. Later, layer_norm's vectorised row sums, the group AdamW and
the one-pass float32 GELU (alternating runs of the code without and with them): 4x128 38 -> 35 ms
(1.04x -> 0.96x in quiet pairs), 6x384 7.3-7.9 s -> 6.9-7.4 s (1.03-1.15x -> 0.97-1.04x; PyTorch's own
step varies from 6.9 to 11.6 s between runs here). Where the rest goes: benchmarks/profile_step.py.

Every kernel is compiled with error_model="numpy": division by zero gives inf/nan as in NumPy (and
the references) instead of Python's ZeroDivisionError check, whose branch kept LLVM from vectorising
the loops (AdamW went from 0.6x to 4.4x the reference with it).

Every Numba function is serial (parallel=False). With Numba's thread pool (OpenMP) beside OpenBLAS's on
2 cores, each pool's idle threads hold the cores the other's next call needs: the 4x128 training step
took 420 ms with 2 Numba threads, 82 ms with 1, 66 ms with no kernels; the 6x384 step 11.2 s, 10.4 s,
11.8 s (same process, PyTorch on the same 2 cores). NumPy's own elementwise loops, which the kernels
replace, are single-threaded too. The one exception is attention on heads of >= 128 x 128 scores: its
work items run on Python threads with OpenBLAS set to one thread for the duration (attention.py,
common.blas_threads), (64,6,256,64) forward + backward 204-209 -> 132-139 ms; with it and OpenBLAS's
idle threads spinning only ~1.5 ms (tinygrad_llm/__init__.py), the 6x384 step is 0.95-0.97x PyTorch's.

Without Numba nothing is registered and everything runs on the NumPy references;
TINYGRAD_LLM_KERNELS=0 does the same.
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
    from .adamw import numba_adamw_update, numba_adamw_update_group
    from .attention import NumbaAttention
    from .cross_entropy import NumbaCrossEntropy
    from .embedding import NumbaEmbedding
    from .gelu import NumbaGELU, NumbaSwiGLU
    from .layer_norm import NumbaLayerNorm, NumbaRMSNorm

    for reference, kernel in [(functional.ScaledDotProductAttention, NumbaAttention),
                              (functional.CrossEntropy, NumbaCrossEntropy),
                              (functional.LayerNorm, NumbaLayerNorm), (functional.RMSNorm, NumbaRMSNorm),
                              (functional.GELU, NumbaGELU),
                              (functional.SwiGLU, NumbaSwiGLU), (functional.Embedding, NumbaEmbedding),
                              (optim.adamw_update, numba_adamw_update),
                              (optim.adamw_update_group, numba_adamw_update_group)]:
        backend.register_kernel(reference, "cpu", kernel)


if numba is not None:
    _register()


# CuPy kernels for device "cuda" (kernels/cuda.py, issue 6): registered only where CuPy imports, so
# CPU-only machines never need it.
try:
    from . import cuda as _cuda_kernels
except ImportError:  # pragma: no cover - depends on the machine
    _cuda_kernels = None
if _cuda_kernels is not None:
    _cuda_kernels.register()
