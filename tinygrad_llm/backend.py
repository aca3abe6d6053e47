"""The array seam: which array module (numpy or cupy) holds a tensor, device moves, kernel dispatch.

Nothing here knows about the graph or about derivatives. Ops ask `array_module(x)` for the module of
their inputs and write `xp.exp(x)` instead of `np.exp(x)`, so the same op code runs on NumPy and CuPy.
CuPy is imported only when a CUDA array is asked for: importing tinygrad_llm never needs it.
"""
import importlib
import os

import numpy as np

from . import precision

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


def check_device(device):
    """ValueError (a user's mistake, worded for the command line) when `device` is "cuda" and none is usable."""
    if device == "cuda" and not cuda_available():
        raise ValueError("--device cuda needs CuPy and an NVIDIA GPU, and none was found "
                         "(pip install -e '.[cuda]' on a machine with one); use --device cpu")


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

    A product with a kept vector of ones: a BLAS gemv (CPU) or cuBLAS product (GPU) measured several times
    faster than the axis-0 reduction on both (benchmarks/RESULTS.md). With TF32 switched on (set_tf32)
    the GPU product rounds like every other float32 matmul in that mode.
    """
    if a.ndim == 2 and a.dtype.kind == "f":
        if is_cupy_array(a) and kernels_enabled() and _library_installed("cuda"):
            # the project's cuBLAS handle (kernels/cuda/cublas.py): CuPy's cannot be captured in a CUDA graph
            return importlib.import_module("tinygrad_llm.kernels.cuda.cublas").sum_rows_cuda(a)
        return _ones(a.shape[0], a.dtype, a.device.id if is_cupy_array(a) else None) @ a
    return a.sum(axis=0)


_ones_cache = {}


def _ones(n, dtype, device_id):
    """A kept vector of n ones (None: NumPy; else on that GPU): no fill per call; a few sizes at most."""
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
# Kernel dispatch. An op names its kernels where it is defined: a Function class has
#     kernels = {"cpu": "layer_norm.LayerNormNumba", "cuda": "layer_norm.LayerNormCuda"}
# and a plain array function (the optimizer's updates) gets the same through @kernels(cpu=..., cuda=...).
# A name is "<module>.<attribute>" under tinygrad_llm/kernels/<device>/. The kernel is imported the first
# time an op runs on that device, so nothing here imports kernels/ (which imports the ops above it).
# A kernel for a Function is a class with the same forward(ctx, ...)/backward(ctx, dout) signature that
# runs the op itself for inputs it does not cover; a kernel for a function has the function's signature.

_LIBRARY = {"cpu": "numba", "cuda": "cupy"}   # what a device's kernels are written with
_library_found = {}
_implementations = {}   # (op, device) -> what runs


def kernels_enabled():
    """TINYGRAD_LLM_KERNELS=0 selects the pure NumPy/CuPy ops everywhere."""
    return os.environ.get("TINYGRAD_LLM_KERNELS", "1") != "0"


def kernels(**names):
    """Name the kernels of a plain array function, as a Function does with its `kernels` attribute:
    @kernels(cpu="optim.adamw_update_numba", cuda="optim.adamw_update_cuda")."""
    def name(fn):
        fn.kernels = dict(names)
        return fn
    return name


def _library_installed(device):
    if device not in _library_found:
        try:
            importlib.import_module(_LIBRARY[device])
            _library_found[device] = True
        except ImportError:
            _library_found[device] = False
    return _library_found[device]


def implementation(op, device):
    """What runs `op` on `device` ("cpu" or "cuda"): the kernel the op names for it, imported on first use,
    or the op itself when it names none, when Numba/CuPy is missing, or when kernels are switched off."""
    if not kernels_enabled():
        return op
    impl = _implementations.get((op, device))
    if impl is None:
        # the op's own attribute, not one inherited by a subclass (whose forward the kernel would not run)
        name = getattr(op, "__dict__", {}).get("kernels", {}).get(device)
        impl = op
        if name is not None and _library_installed(device):
            module, attribute = name.rsplit(".", 1)
            impl = getattr(importlib.import_module(f"tinygrad_llm.kernels.{device}.{module}"), attribute)
        _implementations[(op, device)] = impl
    return impl


def mixed_implementation(op, device, mode):
    """The kernel `op` names for `device` in its `bf16_kernels` (precision.py's policy), or None. Taken
    under autocast even with TINYGRAD_LLM_KERNELS=0: it is the only implementation of the bf16 products."""
    key = (op, device, mode)
    if key not in _implementations:
        name = getattr(op, "__dict__", {}).get("bf16_kernels", {}).get(device)
        impl = None
        if name is not None:
            module, attribute = name.rsplit(".", 1)
            impl = getattr(importlib.import_module(f"tinygrad_llm.kernels.{device}.{module}"), attribute)
        _implementations[key] = impl
    return _implementations[key]


def accelerated(op, *arrays):
    """implementation(op, device of the first array among `arrays`): what Function.apply and the
    optimizer call. Under precision.autocast, an op of the bf16 policy runs its bf16 kernel."""
    mode = precision.current()
    if mode is not None:
        device = next((device_of(a) for a in arrays if hasattr(a, "dtype")), "cpu")
        impl = mixed_implementation(op, device, mode)
        if impl is not None:
            return impl
    if not kernels_enabled():
        return op
    device = next((device_of(a) for a in arrays if hasattr(a, "dtype")), "cpu")
    impl = _implementations.get((op, device))
    return impl if impl is not None else implementation(op, device)
