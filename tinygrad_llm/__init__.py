"""tinygrad_llm: a GPT-style language model from scratch in NumPy, every backward pass written by hand."""
import os as _os
import sys as _sys

# OpenBLAS's idle threads spin for 2^28 cycles (~0.1 s) after each call before they sleep; on a 2-core
# machine the spinning holds the core that the attention kernel's second thread needs (kernels/attention.py).
# 2^22 cycles (~1.5 ms) keeps them spinning between the GEMMs of a step but not through an attention call:
# measured (64,6,256,64) forward + backward right after a GEMM, 172-185 ms -> 133 ms; the 4x128 training
# step unchanged within noise (benchmarks/RESULTS.md). OpenBLAS reads the variable once, when NumPy loads
# it, so it is set only when NumPy is not loaded yet (import tinygrad_llm first to get it) and only if unset.
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "22")

from .tensor import Function, Tensor, cat, detect_anomaly, no_grad, where  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Tensor", "Function", "cat", "where", "no_grad", "detect_anomaly"]
