"""What every kernel file shares: checking a kernel against its reference, and timing both.

A kernel class stands in for a reference Function: same forward(ctx, *arrays, **attrs) and
backward(ctx, dout). `compare_with_reference` runs both on the same inputs and the same random dout
and returns the largest relative difference over the output and every gradient; `median_ms` times a
call after warm-up (the machine is shared: medians and ratios in one process, never a lone time).
"""
import contextlib
import ctypes
import os
import threading
import time

import numpy as np

from ...tensor import Context

_BLAS_SENTINEL = object()
_blas = _BLAS_SENTINEL


def openblas_threads_api():
    """(set_num_threads, get_num_threads) of the OpenBLAS NumPy has loaded, or None (another BLAS, no /proc).

    Found by its path in /proc/self/maps and its exported names (NumPy's wheels ship OpenBLAS as
    libscipy_openblas with prefixed, 64-bit-index symbols)."""
    global _blas
    if _blas is not _BLAS_SENTINEL:
        return _blas
    _blas = None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
    except OSError:
        return None
    # NumPy's own first (SciPy, say, may have loaded another OpenBLAS beside it)
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    paths = sorted(paths, key=lambda path: (not path.startswith(os.path.join(numpy_dir, "numpy")), path))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                setter, getter = f"{prefix}_set_num_threads{suffix}", f"{prefix}_get_num_threads{suffix}"
                if hasattr(lib, setter) and hasattr(lib, getter):
                    set_threads, get_threads = getattr(lib, setter), getattr(lib, getter)
                    set_threads.argtypes, set_threads.restype, get_threads.restype = [ctypes.c_int], None, ctypes.c_int
                    _blas = (set_threads, get_threads)
                    return _blas
    return None


@contextlib.contextmanager
def blas_threads(n):
    """Run the block with OpenBLAS using n threads (then back to what it had); a no-op without OpenBLAS.

    For splitting work over Python threads that each call BLAS: with OpenBLAS's own threads as well,
    the two kinds would fight over the cores. The setting is process-wide while the block runs.
    (OpenBLAS's idle workers still spin for a while after their last call: see tinygrad_llm/__init__.py.
    Shutting them down here instead, blas_thread_shutdown_, measured slower: 207-220 vs 172-185 ms.)"""
    api = openblas_threads_api()
    if api is None:
        yield
        return
    set_threads, get_threads = api
    global _blas_users, _blas_before
    with _blas_lock:   # blocks of several Python threads at once: the first saves, the last restores
        if _blas_users == 0:
            _blas_before = get_threads()
        _blas_users += 1
        set_threads(n)
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                set_threads(_blas_before)


_blas_lock = threading.Lock()
_blas_users, _blas_before = 0, None


# float64 must agree to rounding; float32 kernels may order their sums differently from NumPy's pairwise ones.
TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 2e-4}


def relative_error(a, b):
    """max |a - b| / max(|b|, tiny): one number per array pair, robust to zeros in b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    scale = max(float(np.abs(b).max()) if b.size else 0.0, 1e-30)
    return float(np.abs(a - b).max()) / scale if a.size else 0.0


def compare_with_reference(reference, kernel, arrays, attrs=None, needs=None, seed=0):
    """Run reference and kernel forward and backward on `arrays`; the largest relative difference.

    needs: needs_input_grad per array (default: the floating ones). Both backwards see one random dout.
    """
    attrs = attrs or {}
    if needs is None:
        needs = tuple(a is not None and hasattr(a, "dtype") and a.dtype.kind == "f" for a in arrays)
    ctx_ref, ctx_ker = Context(needs), Context(needs)
    out_ref = reference.forward(ctx_ref, *arrays, **attrs)
    out_ker = kernel.forward(ctx_ker, *arrays, **attrs)
    if out_ker.dtype != out_ref.dtype:
        raise AssertionError(f"{kernel.__name__}: output dtype {out_ker.dtype}, reference {out_ref.dtype}")
    errors = [relative_error(out_ker, out_ref)]
    dout = np.random.default_rng(seed + 1).standard_normal(out_ref.shape).astype(out_ref.dtype)
    grads_ref, grads_ker = reference.backward(ctx_ref, dout), kernel.backward(ctx_ker, dout)
    # a one-input op may return its gradient bare, as Function.backward allows
    grads_ref = grads_ref if isinstance(grads_ref, tuple) else (grads_ref,)
    grads_ker = grads_ker if isinstance(grads_ker, tuple) else (grads_ker,)
    if len(grads_ref) != len(grads_ker):
        raise AssertionError(f"{kernel.__name__}: {len(grads_ker)} gradients, reference {len(grads_ref)}")
    for i, (g_ref, g_ker) in enumerate(zip(grads_ref, grads_ker)):
        if (g_ref is None) != (g_ker is None):
            raise AssertionError(f"{kernel.__name__}: gradient {i} is {g_ker is None and 'missing' or 'extra'}")
        if g_ref is not None:
            if g_ker.dtype != g_ref.dtype:
                raise AssertionError(f"{kernel.__name__}: gradient {i} dtype {g_ker.dtype}, reference {g_ref.dtype}")
            errors.append(relative_error(g_ker, g_ref))
    return max(errors)


def median_ms(fn, repeat=7, warmup=2):
    """Median wall time of fn() in milliseconds, after `warmup` untimed calls (JIT, caches)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def forward_backward(impl, arrays, attrs=None, needs=None, dout=None):
    """A callable that runs impl's forward then backward once (what a training step asks of an op)."""
    attrs = attrs or {}
    if needs is None:
        needs = tuple(a is not None and hasattr(a, "dtype") and a.dtype.kind == "f" for a in arrays)

    def run():
        ctx = Context(needs)
        out = impl.forward(ctx, *arrays, **attrs)
        impl.backward(ctx, np.ones_like(out) if dout is None else dout)

    return run


HEADER = "| op | shape | dtype | numba ms | numpy ms | torch ms | numpy/numba | torch/numba |\n|---|---|---|---|---|---|---|---|"


def table_row(op, shape, dtype, numba_ms, numpy_ms, torch_ms=None):
    """One markdown row: times and speed-ups (>1 means the Numba kernel is faster)."""
    torch_cell = f"{torch_ms:.3f}" if torch_ms is not None else "-"
    torch_ratio = f"{torch_ms / numba_ms:.2f}" if torch_ms is not None else "-"
    return (f"| {op} | {shape} | {np.dtype(dtype).name} | {numba_ms:.3f} | {numpy_ms:.3f} | {torch_cell} | "
            f"{numpy_ms / numba_ms:.2f} | {torch_ratio} |")


def torch_or_none():
    """torch when installed (the benchmarks' oracle), else None: it is never a runtime dependency."""
    try:
        import torch
    except ImportError:
        return None
    return torch
