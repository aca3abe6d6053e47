"""The array seam: which array module (numpy or cupy) holds a tensor, device moves, kernel dispatch.

Nothing here knows about the graph or about derivatives. Ops ask `array_module(x)` for the module of
their inputs and write `xp.exp(x)` instead of `np.exp(x)`, so the same op code runs on NumPy and CuPy.
CuPy is imported only when a CUDA array is asked for: importing tinygrad_llm never needs it.
"""
import ctypes
import os
import sys

import numpy as np

_cupy = None


def _keep_freed_memory_in_the_heap():
    """Ask glibc to reuse freed memory instead of handing large blocks back to the kernel.

    By default every array over 32 MiB is a fresh mmap that the kernel must fault in and zero page by
    page, and the 6x384 training step allocates dozens of 100 MB activations: measured on the 2-core
    machine, serving them from the heap takes the step from 10.9 s to 9.0 s (benchmarks/RESULTS.md).
    The cost: memory freed by a run is kept by the process for reuse rather than returned.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): leave the allocator alone
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(1 << 30))
    libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int((1 << 31) - 1))


_keep_freed_memory_in_the_heap()


def cupy_module():
    """The cupy module, imported on first use; a clear error when it is not installed."""
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise RuntimeError("device 'cuda' needs CuPy: pip install -e '.[cuda]'") from e
        _cupy = cupy
        if os.environ.get("TINYGRAD_LLM_TF32", "0") == "1":
            set_tf32(True)
    return _cupy


def set_tf32(enabled):
    """Let cuBLAS run float32 matmuls on TF32 tensor cores: inputs rounded to 10 mantissa bits, sums in
    float32; several times faster on Ampere and later, and no longer equal to NumPy's float32 results
    (about 1e-3 relative). Off by default (as torch.backends.cuda.matmul.allow_tf32);
    TINYGRAD_LLM_TF32=1 turns it on when CuPy is first used. float64 is never affected."""
    from cupy._core import _routines_linalg as linalg

    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT)


def cuda_available():
    """True when CuPy imports and sees at least one GPU."""
    try:
        return cupy_module().cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def is_cupy_array(x):
    # Compare by the defining module so that numpy-only machines never import cupy here.
    return type(x).__module__.startswith("cupy")


def array_module(*arrays):
    """numpy or cupy: the module that owns the arrays (numpy for scalars and lists)."""
    for a in arrays:
        if is_cupy_array(a):
            return cupy_module()
    return np


def device_of(x):
    return "cuda" if is_cupy_array(x) else "cpu"


def to_device(x, device):
    """Move an array to "cpu" (numpy) or "cuda" (cupy); returns x itself when it is already there."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")
    if device == device_of(x):
        return x
    if device == "cpu":
        return x.get()
    return cupy_module().asarray(x)


def _is_basic_index(index):
    """Slices, integers, None and Ellipsis only: no element can be picked twice."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, (slice, int, np.integer)) for p in parts)


def sum_rows(a):
    """(N, C) -> (C,): the column sums, as bias and norm-weight gradients need.

    A product with a kept vector of ones: on CuPy its axis-0 reduction took 393 us for (16384, 1152)
    float32 on an H200, the cuBLAS product 28 us; on NumPy, see _ones. With TF32 switched on (set_tf32)
    the GPU product rounds like every other float32 matmul in that mode.
    """
    if a.ndim == 2 and a.dtype.kind == "f":
        return _ones(a.shape[0], a.dtype, a.device.id if is_cupy_array(a) else None) @ a
    return a.sum(axis=0)


_ones_cache = {}


def _ones(n, dtype, device_id):
    """A kept vector of n ones (None: NumPy; else on that GPU): no fill per call; a few sizes at most.

    On the CPU the product is a BLAS gemv: (768, 384) float32 column sums took 32 us as a.sum(axis=0),
    14 us as ones @ a (2 cores)."""
    key = (n, np.dtype(dtype), device_id)
    ones = _ones_cache.get(key)
    if ones is None:
        if len(_ones_cache) >= 16:
            _ones_cache.clear()
        if device_id is None:
            ones = np.ones(n, dtype=dtype)
            ones.flags.writeable = False
        else:
            cp = cupy_module()
            with cp.cuda.Device(device_id):
                ones = cp.ones(n, dtype=dtype)
        _ones_cache[key] = ones
    return ones


def add_at(xp, target, index, values):
    """target[index] += values, with repeated indices accumulating (np.add.at / cupy.add.at)."""
    if _is_basic_index(index):
        target[index] += values  # a view: one elementwise pass instead of a scatter
    else:
        xp.add.at(target, index, values)


# ----------------------------------------------------------------------------------------------
# Kernel dispatch. An op is a reference: a Function class (functional.py) or a plain array function
# (the AdamW update). `accelerated(reference, *arrays)` gives back what to run: a kernel registered
# for that reference and the arrays' device when kernels are enabled, else the reference itself.
# A kernel for a Function is a class with the same forward(ctx, ...)/backward(ctx, dout) signature;
# it keeps its own saved context. A kernel is registered only beside a test that it equals the reference.

_kernels = {}  # (reference, device) -> kernel
_kernels_loaded = False


def kernels_enabled():
    """TINYGRAD_LLM_KERNELS=0 selects the pure NumPy reference path everywhere."""
    return os.environ.get("TINYGRAD_LLM_KERNELS", "1") != "0"


def register_kernel(reference, device, kernel):
    """Serve `kernel` in place of `reference` for arrays on `device` ("cpu" or "cuda")."""
    _kernels[(reference, device)] = kernel


def _load_kernels():
    global _kernels_loaded
    _kernels_loaded = True
    try:
        from . import kernels  # noqa: F401  (registers what it can: Numba and CuPy are optional)
    except ImportError:
        pass


def accelerated(reference, *arrays):
    """What to run for `reference` on these arrays: a kernel if one serves them, else `reference`."""
    if not kernels_enabled():
        return reference
    if not _kernels_loaded:
        _load_kernels()
    if not _kernels:
        return reference
    device = next((device_of(a) for a in arrays if hasattr(a, "dtype")), "cpu")
    return _kernels.get((reference, device), reference)
