"""A NumPy stand-in for CuPy, for running the CUDA kernel files' Python side where no GPU is: arrays are host
arrays (256-byte aligned, with .data.ptr and .get()), and a compiled kernel records its launch instead of running,
after checking that the launch passes exactly the parameters its C++ signature declares (macros expanded) and
only pointers, NumPy scalars or arrays. Results are garbage (no kernel runs); what it checks is the launchers'
control flow: which kernels a call launches, with how many arguments, what it offers, what it refuses. Whatever
CuPy function it does not define is NumPy's (arange, exp, take, ufuncs), on host arrays; cupy.cuda answers with an
H200's properties and no device to count, and anything else there with a mock.

install() puts it in sys.modules as `cupy`: only in a process of its own (test_cuda_launchers.py runs one).
"""
import re
import sys
import types
from unittest import mock

import numpy as np

launches = []   # (kernel name, grid, block, number of arguments)


class _Pointer:
    def __init__(self, array):
        self.ptr = array.__array_interface__["data"][0]


class ndarray(np.ndarray):
    @property
    def data(self):
        return _Pointer(self)

    def get(self):
        return np.asarray(self).copy()

    @property
    def device(self):
        return types.SimpleNamespace(id=0)


def empty(shape, dtype=np.float32):
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    buffer = np.empty(size + 256, np.uint8)
    start = -buffer.__array_interface__["data"][0] % 256
    return buffer[start:start + size].view(dtype).reshape(shape).view(ndarray)


def zeros(shape, dtype=np.float32):
    out = empty(shape, dtype)
    out[...] = 0
    return out


def full(shape, value, dtype=np.float32):
    out = empty(shape, dtype)
    out[...] = value
    return out


def empty_like(a, dtype=None):
    return empty(a.shape, dtype or a.dtype)


def asarray(a, dtype=None):
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    out = empty(np.shape(a), dtype or np.asarray(a).dtype)
    out[...] = a
    return out


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray) and a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return asarray(np.ascontiguousarray(a), dtype)


def asfortranarray(a):
    return np.asfortranarray(a).view(ndarray)


def _ours(value):
    """NumPy results as this module's arrays (copied onto an aligned buffer), everything else as it is."""
    if isinstance(value, np.ndarray) and not isinstance(value, ndarray):
        return asarray(value)
    if isinstance(value, tuple):
        return tuple(_ours(v) for v in value)
    return value


def get_default_memory_pool():
    return mock.MagicMock()


def __getattr__(name):
    """What this module does not define is NumPy's (arange, exp, take, ...), returning this module's arrays."""
    found = getattr(np, name)
    if isinstance(found, (type, np.ufunc)) or not callable(found):   # a ufunc keeps its .at; keeps our arrays
        return found
    return lambda *args, **kwargs: _ours(found(*args, **kwargs))


def _macros(code):
    """{name: body} of the source's object-like #defines (continuation lines joined)."""
    joined = code.replace("\\\n", " ")
    return dict(re.findall(r"^\s*#define\s+(\w+)\s+(.*)$", joined, flags=re.M))


def _parameters(code, name):
    """The number of parameters of kernel `name` (its template arguments dropped) in `code`."""
    base = name.split("<")[0].strip()
    pattern = r"__global__\s+void\s+(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s*)?" + re.escape(base) + r"\s*\("
    found = re.search(pattern, code)
    assert found, f"no __global__ {base} in the source"
    depth, i = 1, found.end()
    while depth:
        depth += {"(": 1, ")": -1}.get(code[i], 0)
        i += 1
    params = code[found.end():i - 1]
    for macro, body in _macros(code).items():
        params = re.sub(rf"\b{macro}\b", lambda _, body=body: body, params)
    params = re.sub(r"//[^\n]*", "", params)
    return 0 if not params.strip() else params.count(",") + 1


class _Kernel:
    def __init__(self, code, name):
        self.code, self.name, self.max_dynamic_shared_size_bytes = code, name, 0

    def __call__(self, grid, block, args, shared_mem=0, **kwargs):
        for a in args:
            assert isinstance(a, (np.generic, int, ndarray)), f"{self.name}: argument of type {type(a).__name__}"
        expected = _parameters(self.code, self.name)
        assert len(args) == expected, f"{self.name}: {len(args)} arguments for {expected} parameters"
        launches.append((self.name, grid, block, len(args)))


class RawModule:
    def __init__(self, code="", options=(), name_expressions=(), **kwargs):
        self.code = code

    def get_function(self, name):
        return _Kernel(self.code, name)


class RawKernel(_Kernel):
    def __init__(self, code, name, *args, **kwargs):
        super().__init__(code, name)


class ElementwiseKernel:
    """Records the call; returns its outputs: those passed, else new arrays of the first array input's shape."""

    def __init__(self, in_params, out_params, operation, name="elementwise", **kwargs):
        self.name = name
        self.n_in, self.n_out = len(in_params.split(",")), len(out_params.split(","))

    def __call__(self, *args):
        assert len(args) in (self.n_in, self.n_in + self.n_out), f"{self.name}: {len(args)} arguments"
        launches.append((self.name, None, None, len(args)))
        outs = args[self.n_in:] or [empty_like(next(a for a in args if isinstance(a, np.ndarray)))
                                    for _ in range(self.n_out)]
        return outs[0] if self.n_out == 1 else tuple(outs)


class _Anything(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return mock.MagicMock()


def install():
    """Register this module as `cupy` (and its submodules as stand-ins that answer anything)."""
    module = sys.modules[__name__]
    module.__path__ = []
    module.cuda = _Anything("cupy.cuda")
    module.cuda.__path__ = []
    sys.modules["cupy"] = module
    runtime = module.cuda.runtime = _Anything("cupy.cuda.runtime")   # an H200's properties, no device to count
    runtime.getDeviceProperties = lambda device=0: {"totalGlobalMem": 141 * 2 ** 30, "major": 9, "minor": 0,
                                                    "multiProcessorCount": 132, "name": b"stand-in"}
    runtime.deviceGetAttribute = lambda attribute, device=0: 232448 if attribute == 97 else 132
    runtime.getDeviceCount = lambda: 0
    module.cuda.Device = lambda *args: types.SimpleNamespace(id=0, compute_capability="90", synchronize=lambda: None,
                                                             attributes={"MultiProcessorCount": 132})
    for name in ("cupy.cuda", "cupy.cuda.cublas", "cupy.cuda.runtime", "cupy._core", "cupy._core._routines_linalg"):
        stand_in = {"cupy.cuda": module.cuda, "cupy.cuda.runtime": runtime}.get(name) or _Anything(name)
        stand_in.__path__ = []
        sys.modules[name] = stand_in
    return module
