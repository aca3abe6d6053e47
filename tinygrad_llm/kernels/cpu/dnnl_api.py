"""oneDNN's C API through ctypes, for dnnl.py: the library found and loaded at run time, its enum values, the
engine and stream, and matmul primitives made once and cached.

Where it is found, in this order: the path in TINYGRAD_LLM_ONEDNN (libdnnl's file), the `onednn-cpu-gomp`
distribution's files (importlib.metadata: `pip install tinygrad_llm[onednn]` puts libdnnl.so.3 in the
environment's lib/), sys.prefix/lib, and the system's library path. It counts as loaded only where its bf16
matmul runs on this CPU: oneDNN 3.2 has none without AVX-512 (on an AVX2 CPU it answers dnnl_unimplemented),
and missing_reason says so; f32_reason is None wherever the library loads (its float32 matmul).

Threads: the `onednn-cpu-gomp` build parallelises with GNU OpenMP. Every Python thread that calls oneDNN here
first sets its own OpenMP thread count to one (omp_set_num_threads is per calling thread in libgomp), so oneDNN
never starts an OpenMP team of its own: no second pool spins beside OpenBLAS's and Numba's
(benchmarks/onednn_threads.py). dnnl.gemm splits a large product over threads.THREADS Python threads instead.

Primitives: each is made once per (data type, dims, strides, bias, alpha, beta) and kept (making one costs far
more than running a small one), with one engine and stream. Scratchpads are the caller's (mode "user"), one per
call: the same primitive may run on two threads at once.
"""
import ctypes
import threading

import numpy as np

from . import libraries

ENV_PATH = "TINYGRAD_LLM_ONEDNN"
HINT = "pip install 'tinygrad_llm[onednn]'"

# C API values, read from oneDNN 3.2's headers (dnnl_common_types.h, dnnl_types.h) and checked against a
# compiled program printing them
_SUCCESS = 0                                  # dnnl_status_t, whose names follow:
_STATUS = ("success", "out of memory", "invalid arguments", "unimplemented", "last implementation", "runtime error")
_BF16, _F32 = 2, 3                            # dnnl_data_type_t
_TAG_ANY = 1                                  # dnnl_format_tag_any
_CPU = 1                                      # dnnl_engine_kind_t dnnl_cpu
_STREAM_DEFAULT = 1                           # dnnl_stream_default_flags (in order)
_SCRATCHPAD_USER = 1                          # dnnl_scratchpad_mode_user
_QUERY_IMPL_INFO = 8                          # dnnl_query_impl_info_str
_QUERY_WEIGHTS_MD, _QUERY_SCRATCHPAD_MD = 131, 136
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS, _ARG_BIAS, _ARG_SCRATCHPAD = 1, 17, 33, 41, 80   # DNNL_ARG_*; FROM = 1, TO = 17
_ELTWISE_LINEAR = 38                          # dnnl_eltwise_linear (alpha x + beta)

_Dims = ctypes.c_int64 * 12                   # dnnl_dims_t: DNNL_MAX_NDIMS int64s
_VP = ctypes.c_void_p


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


_state = None                 # (lib, None) once loaded, (None, reason) once failed
_loaded_lib = None            # the library, also where it loaded but its bf16 matmul did not (float32 runs)
_engine = _stream = None
_omp_set_num_threads = None   # libgomp's, found through libdnnl's dependencies; None for other builds
_primitives = {}              # key -> _Primitive
_lock = threading.RLock()   # reentrant: _load (under it) makes its probe primitive, which takes it too
_local = threading.local()    # .omp_set: this thread's OpenMP thread count is set to one


def candidates():
    """The paths tried for libdnnl, in order (TINYGRAD_LLM_ONEDNN alone when it is set)."""
    return libraries.candidates(ENV_PATH, "onednn-cpu-gomp", ("libdnnl.so.3", "libdnnl.so"), "dnnl")


def _declare(lib):
    status = ctypes.c_int
    for name, args in {
            "dnnl_engine_create": [_VP, ctypes.c_int, ctypes.c_size_t],
            "dnnl_stream_create": [_VP, _VP, ctypes.c_uint],
            "dnnl_memory_desc_create_with_strides": [_VP, ctypes.c_int, _VP, ctypes.c_int, _VP],
            "dnnl_memory_desc_create_with_tag": [_VP, ctypes.c_int, _VP, ctypes.c_int, ctypes.c_int],
            "dnnl_memory_desc_destroy": [_VP],
            "dnnl_memory_desc_clone": [_VP, _VP],
            "dnnl_memory_desc_equal": [_VP, _VP],
            "dnnl_primitive_attr_create": [_VP],
            "dnnl_primitive_attr_destroy": [_VP],
            "dnnl_primitive_attr_set_scratchpad_mode": [_VP, ctypes.c_int],
            "dnnl_primitive_attr_set_post_ops": [_VP, _VP],
            "dnnl_post_ops_create": [_VP],
            "dnnl_post_ops_destroy": [_VP],
            "dnnl_post_ops_append_eltwise": [_VP, ctypes.c_int, ctypes.c_float, ctypes.c_float],
            "dnnl_post_ops_append_sum": [_VP, ctypes.c_float, ctypes.c_int32, ctypes.c_int],
            "dnnl_matmul_primitive_desc_create": [_VP, _VP, _VP, _VP, _VP, _VP, _VP],
            "dnnl_reorder_primitive_desc_create": [_VP, _VP, _VP, _VP, _VP, _VP],
            "dnnl_primitive_desc_query": [_VP, ctypes.c_int, ctypes.c_int, _VP],
            "dnnl_primitive_desc_destroy": [_VP],
            "dnnl_primitive_create": [_VP, _VP],
            "dnnl_primitive_destroy": [_VP],
            "dnnl_primitive_execute": [_VP, _VP, ctypes.c_int, _VP],
            "dnnl_memory_create": [_VP, _VP, _VP, _VP],
            "dnnl_memory_destroy": [_VP],
            "dnnl_stream_wait": [_VP]}.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, status
    lib.dnnl_memory_desc_equal.restype = ctypes.c_int
    lib.dnnl_primitive_desc_query_md.argtypes = [_VP, ctypes.c_int, ctypes.c_int]
    lib.dnnl_primitive_desc_query_md.restype = _VP
    lib.dnnl_memory_desc_get_size.argtypes, lib.dnnl_memory_desc_get_size.restype = [_VP], ctypes.c_size_t
    lib.dnnl_version.restype = ctypes.POINTER(ctypes.c_int * 3)


def _check(status, what):
    if status != _SUCCESS:
        raise RuntimeError(f"oneDNN {what}: {_STATUS[status] if 0 < status < len(_STATUS) else status}")


def _load():
    global _state, _engine, _stream, _omp_set_num_threads, _loaded_lib
    lib, path, reason = libraries.open_first(candidates(), _declare, "no libdnnl on the library path")
    if lib is None:
        _state = (None, reason)
        return
    try:
        _omp_set_num_threads = lib.omp_set_num_threads   # libgomp, a dependency of the gomp build
        _omp_set_num_threads.argtypes, _omp_set_num_threads.restype = [ctypes.c_int], None
    except AttributeError:
        _omp_set_num_threads = None
    _one_omp_thread()
    engine, stream = _VP(), _VP()
    _check(lib.dnnl_engine_create(ctypes.byref(engine), _CPU, 0), "CPU engine")
    _check(lib.dnnl_stream_create(ctypes.byref(stream), engine, _STREAM_DEFAULT), "stream")
    _engine, _stream, _loaded_lib = engine, stream, lib
    _state = (lib, None)
    version = ".".join(map(str, lib.dnnl_version().contents))
    try:   # a 2x2x2 bf16 product: oneDNN without a bf16 matmul for this CPU refuses it
        primitive(_BF16, 1, (2, 2), (2, 1), (2, 2), (2, 1), (2, 2), (2, 1), False, 1.0, 0.0)
    except RuntimeError as e:
        _state = (None, f"oneDNN {version} at {path} has no bf16 matmul on this CPU ({e}; it needs AVX-512)")


def missing_reason():
    """None when oneDNN's bf16 matmul loads and runs on this CPU (loading it on the first call), else one line
    saying why not."""
    if _state is None:
        with _lock:
            if _state is None:
                _load()
    return _state[1]


def f32_reason():
    """None when oneDNN's library loads (its float32 matmul: the tests of this module's plumbing), else why not."""
    missing_reason()
    return None if _engine is not None else _state[1]


def _lib(dt=_BF16):
    """The loaded library, or a one-line RuntimeError saying what is missing for products of data type dt."""
    if dt == _BF16 and missing_reason() is not None:
        raise RuntimeError(f"bf16 products in oneDNN need its bf16 matmul, {missing_reason()}: {HINT}")
    if f32_reason() is not None:
        raise RuntimeError(f"oneDNN's matmul {f32_reason()}: {HINT}")
    return _loaded_lib


def _one_omp_thread():
    """This Python thread's OpenMP thread count set to one, once (libgomp keeps it per calling thread)."""
    if _omp_set_num_threads is not None and not getattr(_local, "omp_set", False):
        _omp_set_num_threads(1)
        _local.omp_set = True


def _desc(lib, dt, dims, strides):
    md = _VP()
    _check(lib.dnnl_memory_desc_create_with_strides(ctypes.byref(md), len(dims), _Dims(*dims), dt,
                                                    _Dims(*strides)), "memory descriptor")
    return md


class _Primitive:
    """A matmul primitive and what running it needs: its descriptors, its scratchpad size, and (format_any) the
    layout it wants its weights in."""

    def __init__(self, lib, dt, batch, a_dims, a_strides, b_dims, b_strides, c_dims, c_strides, bias, alpha,
                 beta, format_any=False):
        self.lib = lib
        wmd = _VP()
        if format_any:   # the weights' layout left to the primitive
            _check(lib.dnnl_memory_desc_create_with_tag(ctypes.byref(wmd), len(b_dims), _Dims(*b_dims), dt, _TAG_ANY),
                   "memory descriptor")
        self.mds = [_desc(lib, dt, a_dims, a_strides), wmd if format_any else _desc(lib, dt, b_dims, b_strides),
                    _desc(lib, _F32, c_dims, c_strides)]
        nd = len(c_dims)
        bias_dims = (1,) * (nd - 1) + c_dims[-1:]
        self.bias_md = _desc(lib, _F32, bias_dims, (c_dims[-1],) * (nd - 1) + (1,)) if bias else None
        attr, post = _VP(), _VP()
        _check(lib.dnnl_primitive_attr_create(ctypes.byref(attr)), "attributes")
        try:
            _check(lib.dnnl_primitive_attr_set_scratchpad_mode(attr, _SCRATCHPAD_USER), "scratchpad mode")
            if alpha != 1.0 or beta != 0.0:
                _check(lib.dnnl_post_ops_create(ctypes.byref(post)), "post-ops")
                if alpha != 1.0:
                    _check(lib.dnnl_post_ops_append_eltwise(post, _ELTWISE_LINEAR, alpha, 0.0), "scale post-op")
                if beta != 0.0:
                    _check(lib.dnnl_post_ops_append_sum(post, beta, 0, _F32), "sum post-op")
                _check(lib.dnnl_primitive_attr_set_post_ops(attr, post), "post-ops")
            pd = _VP()
            _check(lib.dnnl_matmul_primitive_desc_create(ctypes.byref(pd), _engine, self.mds[0], self.mds[1],
                                                         self.bias_md, self.mds[2], attr), "bf16 matmul" if dt == _BF16
                   else "float32 matmul")
        finally:
            if post:
                lib.dnnl_post_ops_destroy(post)
            lib.dnnl_primitive_attr_destroy(attr)
        self.pd = pd
        info = ctypes.c_char_p()
        lib.dnnl_primitive_desc_query(pd, _QUERY_IMPL_INFO, 0, ctypes.byref(info))
        self.impl = (info.value or b"").decode()
        self.scratch_md = lib.dnnl_primitive_desc_query_md(pd, _QUERY_SCRATCHPAD_MD, 0)
        self.scratch_bytes = lib.dnnl_memory_desc_get_size(self.scratch_md) if self.scratch_md else 0
        if format_any:   # the weights' layout the primitive chose (owned by pd, which lives as long as this)
            self.mds[1] = lib.dnnl_primitive_desc_query_md(pd, _QUERY_WEIGHTS_MD, 0)
        prim = _VP()
        _check(lib.dnnl_primitive_create(ctypes.byref(prim), pd), "primitive")
        self.prim = prim

    def run(self, a_ptr, b_ptr, c_ptr, bias_ptr=None):
        scratch = np.empty(self.scratch_bytes + 64, np.uint8)   # kept alive through the call
        handles = [(_ARG_SRC, self.mds[0], a_ptr), (_ARG_WEIGHTS, self.mds[1], b_ptr), (_ARG_DST, self.mds[2], c_ptr)]
        if self.bias_md is not None:
            handles.append((_ARG_BIAS, self.bias_md, bias_ptr))
        if self.scratch_bytes:
            handles.append((_ARG_SCRATCHPAD, self.scratch_md, -(-scratch.ctypes.data // 64) * 64))
        _execute(self.prim, handles)


def _execute(prim, handles):
    """prim run on (argument, memory descriptor, address) triples, each a memory object for the call."""
    lib, made = _loaded_lib, []
    try:
        for arg, md, ptr in handles:
            mem = _VP()
            _check(lib.dnnl_memory_create(ctypes.byref(mem), md, _engine, _VP(ptr)), "memory")
            made.append((arg, mem))
        _one_omp_thread()
        _check(lib.dnnl_primitive_execute(prim, _stream, len(made), (_ExecArg * len(made))(*made)), "execute")
        _check(lib.dnnl_stream_wait(_stream), "stream wait")
    finally:
        for _, mem in made:
            lib.dnnl_memory_destroy(mem)


def primitive(dt, *key, format_any=False):
    """The cached _Primitive for (dt, batch, dims and strides of a, b, c, bias, alpha, beta)."""
    full = (dt, format_any) + key
    prim = _primitives.get(full)
    if prim is None:
        lib = _loaded_lib if _state is not None and _state[0] is not None else _lib(dt)
        _one_omp_thread()   # the primitive is made for this thread count
        prim = _Primitive(lib, dt, *key, format_any=format_any)
        with _lock:
            prim = _primitives.setdefault(full, prim)
    return prim


def reorder(dt, ptr, dims, strides, md):
    """A new buffer holding the (dims, strides) array at ptr in layout md: (the uint8 buffer, its 64-byte aligned
    address, md's clone)."""
    lib = _loaded_lib
    src, dst, pd, prim = _desc(lib, dt, dims, strides), _VP(), _VP(), _VP()
    _check(lib.dnnl_memory_desc_clone(ctypes.byref(dst), md), "memory descriptor")
    buf = np.empty(lib.dnnl_memory_desc_get_size(dst) + 64, np.uint8)
    addr = -(-buf.ctypes.data // 64) * 64
    _check(lib.dnnl_reorder_primitive_desc_create(ctypes.byref(pd), src, _engine, dst, _engine, None), "reorder")
    try:
        _check(lib.dnnl_primitive_create(ctypes.byref(prim), pd), "reorder")
        _execute(prim, [(_ARG_SRC, src, ptr), (_ARG_DST, dst, addr)])
    finally:
        if prim:
            lib.dnnl_primitive_destroy(prim)
        lib.dnnl_primitive_desc_destroy(pd)
        lib.dnnl_memory_desc_destroy(src)
    return buf, addr, dst
