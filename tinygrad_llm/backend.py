"""The array seam: which array module (numpy or cupy) holds a tensor, device moves, kernel dispatch.

Nothing here knows about the graph or about derivatives. Ops ask `array_module(x)` for the module of
their inputs and write `xp.exp(x)` instead of `np.exp(x)`, so the same op code runs on NumPy and CuPy.
CuPy is imported only when a CUDA array is asked for: importing tinygrad_llm never needs it.
"""
import os

import numpy as np

_cupy = None


def cupy_module():
    """The cupy module, imported on first use; a clear error when it is not installed."""
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise RuntimeError("device 'cuda' needs CuPy: pip install -e '.[cuda]'") from e
        _cupy = cupy
    return _cupy


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


def add_at(xp, target, index, values):
    """target[index] += values, with repeated indices accumulating (np.add.at / cupyx.scatter_add)."""
    if xp is np:
        np.add.at(target, index, values)
    else:
        import cupyx

        cupyx.scatter_add(target, index, values)


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
