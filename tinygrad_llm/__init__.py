"""tinygrad_llm: a GPT-style language model from scratch in NumPy, every backward pass written by hand.

Process-wide tuning lives here and only here (everything else the library changes, it changes for the
duration of its own call and puts back):
- glibc keeps freed memory in its heap for reuse (_keep_freed_memory_in_the_heap below).
- Threads: imported into someone else's program, the library sets no thread count and no environment
  variable for the process, whatever was imported first; the Numba kernels are serial, and the attention
  kernel sets NumPy's OpenBLAS to one thread with threadpoolctl only while its own Python threads run
  (kernels/cpu/threads.py). OpenBLAS's idle threads spin for a while after each call
  (OPENBLAS_THREAD_TIMEOUT, read once when NumPy loads it) and hold the cores the next call needs: our own
  programs (`python -m tinygrad_llm.<cli>` below; examples/ and benchmarks/ at their top) ask for the
  short spin, unless the user set the variable (README, "Threads").
"""
import ctypes as _ctypes
import os as _os
import sys as _sys


def _keep_freed_memory_in_the_heap():
    """Ask glibc to reuse freed memory instead of handing large blocks back to the kernel.

    By default every array over 32 MiB is a fresh mmap that the kernel must fault in and zero page by
    page, and a training step allocates dozens of such activations: serving them from the heap made the
    6x384 step faster (benchmarks/RESULTS.md). The cost: memory freed by a run is kept by the process
    for reuse rather than returned. Independent of import order: it applies to later allocations.
    """
    if not _sys.platform.startswith("linux"):
        return
    try:
        libc = _ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): leave the allocator alone
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, _ctypes.c_int(1 << 30))
    libc.mallopt(M_TRIM_THRESHOLD, _ctypes.c_int((1 << 31) - 1))


def _short_blas_spin_in_our_own_programs(argv=None, modules=None, environ=None):
    """`python -m tinygrad_llm.train` (or any CLI of the package): OpenBLAS's idle threads sleep after ~1.5 ms
    instead of ~0.1 s (the 6x384 CPU step measured 0.93x PyTorch's with it, 1.26x without). The package is
    imported before the module runs, so NumPy is not loaded yet; a user's own program is left alone."""
    argv = getattr(_sys, "orig_argv", []) if argv is None else argv
    modules = _sys.modules if modules is None else modules
    environ = _os.environ if environ is None else environ
    ours = any(a == "-m" and b.split(".")[0] == "tinygrad_llm" for a, b in zip(argv, argv[1:]))
    if ours and "numpy" not in modules:
        environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "22")


_keep_freed_memory_in_the_heap()
_short_blas_spin_in_our_own_programs()

from .tensor import Function, Tensor, cat, detect_anomaly, no_grad, where  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Tensor", "Function", "cat", "where", "no_grad", "detect_anomaly"]
