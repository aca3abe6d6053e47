"""oneDNN's matmul with bf16 operands and float32 sums and results, through ctypes on its C API: the other
library the CPU's bf16 products can run in (mkl.py is the first; TINYGRAD_LLM_CPU_BF16_GEMM picks, see
bf16_gemm.py). Same interface as mkl.py: gemm (2-D operands, transposed views read in place, a float32 bias
added by oneDNN), batched (attention's 3-D / 4-D products) and PackedB / packed_b (a weight kept in the
layout oneDNN prefers).

Why oneDNN as well: it is what PyTorch's bf16 matmul runs on, and on an Intel Xeon with AMX PyTorch ran the
step's short-K products (K = 128..384) 1.5-3x faster than MKL's cblas_gemm_bf16bf16f32 on one thread. Its
speed inside this project is not yet measured on a bf16 CPU (benchmarks/cpu_bf16_gemm.py and
cpu_bf16_step.py --gemm time it).

Where it is found, in this order: the path in TINYGRAD_LLM_ONEDNN (libdnnl's file), the `onednn-cpu-gomp`
distribution's files (importlib.metadata: `pip install tinygrad_llm[onednn]` puts libdnnl.so.3 in the
environment's lib/), sys.prefix/lib, and the system's library path. It loads only where its bf16 matmul
runs on this CPU: oneDNN 3.2 has none without AVX-512 (on an AVX2 CPU it answers dnnl_unimplemented), and
missing_reason says so.

Threads: the `onednn-cpu-gomp` build parallelises with GNU OpenMP. Every Python thread that calls oneDNN
here first sets its own OpenMP thread count to one (omp_set_num_threads is per calling thread in libgomp),
so oneDNN never starts an OpenMP team of its own: no second pool spins beside OpenBLAS's and Numba's. As in
mkl.py, a large product is split by rows of its output over threads.THREADS Python threads (ctypes lets go
of the GIL during the call), each running oneDNN on one thread.

Primitives: creating one costs far more than running a small one, so each is made once per (data type,
shapes, strides, bias, alpha, beta) and kept for the process's life, with the engine and stream made once.
Scratchpads are the caller's (scratchpad mode "user"), one per call: the same primitive may run on two
threads at once.

Data types: uint16 operands are bf16 bits (as mixed.py makes them; ml_dtypes.bfloat16 arrays are taken as
well); float32 operands run oneDNN's float32 matmul, through the same code: the tests check the plumbing
with it on CPUs whose oneDNN has no bf16 matmul.
"""
import ctypes
import ctypes.util
import os
import sys
import threading

import numpy as np

from . import threads

NAME = "onednn"
ENV_PATH = "TINYGRAD_LLM_ONEDNN"
HINT = "pip install 'tinygrad_llm[onednn]'"
PARALLEL_MIN_FLOPS = 1 << 28   # as mkl.PARALLEL_MIN_FLOPS: below this a product runs on one thread

# C API values, read from oneDNN 3.2's headers (dnnl_common_types.h, dnnl_types.h) and checked against a
# compiled program printing them
_SUCCESS, _UNIMPLEMENTED = 0, 3               # dnnl_status_t
_BF16, _F32 = 2, 3                            # dnnl_data_type_t
_TAG_ANY = 1                                  # dnnl_format_tag_any
_CPU = 1                                      # dnnl_engine_kind_t dnnl_cpu
_STREAM_DEFAULT = 1                           # dnnl_stream_default_flags (in order)
_SCRATCHPAD_USER = 1                          # dnnl_scratchpad_mode_user
_QUERY_IMPL_INFO = 8                          # dnnl_query_impl_info_str
_QUERY_WEIGHTS_MD, _QUERY_SCRATCHPAD_MD = 131, 136
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS, _ARG_BIAS, _ARG_SCRATCHPAD = 1, 17, 33, 41, 80   # DNNL_ARG_*; FROM = 1, TO = 17
_ELTWISE_LINEAR = 38                          # dnnl_eltwise_linear (alpha x + beta)
_MAX_NDIMS = 12

_Dims = ctypes.c_int64 * _MAX_NDIMS
_VP = ctypes.c_void_p


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


_state = None                 # (lib, None) once loaded, (None, reason) once failed
_engine = _stream = None
_omp_set_num_threads = None   # libgomp's, found through libdnnl's dependencies; None for other builds
_primitives = {}              # key -> _Primitive
_lock = threading.Lock()
_local = threading.local()    # .omp_set: this thread's OpenMP thread count is set to one


def candidates():
    """The paths tried for libdnnl, in order (TINYGRAD_LLM_ONEDNN alone when it is set)."""
    given = os.environ.get(ENV_PATH)
    if given:
        return [given]
    paths = []
    try:
        from importlib import metadata
        dist = metadata.distribution("onednn-cpu-gomp")
        paths += [str(dist.locate_file(f)) for f in dist.files or [] if f.name.startswith("libdnnl.so")]
        paths.sort(key=lambda p: not p.endswith(".so.3"))
    except Exception:   # PackageNotFoundError, or a distribution without a file list
        pass
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        paths += [os.path.join(prefix, "lib", name) for name in ("libdnnl.so.3", "libdnnl.so")]
    found = ctypes.util.find_library("dnnl")
    if found:
        paths.append(found)
    return list(dict.fromkeys(os.path.normpath(p) if os.sep in p else p for p in paths))


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
        names = {1: "out of memory", 2: "invalid arguments", 3: "unimplemented", 4: "last implementation",
                 5: "runtime error", 6: "not required"}
        raise RuntimeError(f"oneDNN {what}: {names.get(status, f'status {status}')}")


def _load():
    global _state, _engine, _stream, _omp_set_num_threads, _loaded_lib
    errors = []
    for path in candidates():
        if os.sep in path and not os.path.exists(path):
            errors.append(f"{path}: no such file")
            continue
        try:
            lib = ctypes.CDLL(path)
            _declare(lib)
        except (OSError, AttributeError) as e:
            errors.append(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
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
            _primitive(_BF16, 1, (2, 2), (2, 1), (2, 2), (2, 1), (2, 2), (2, 1), False, 1.0, 0.0)
        except RuntimeError as e:
            _state = (None, f"oneDNN {version} at {path} has no bf16 matmul on this CPU ({e}; it needs AVX-512)")
        return
    tried = "; ".join(errors[-2:]) if errors else "no libdnnl on the library path"
    _state = (None, f"not found ({tried})")


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


_loaded_lib = None   # the library, where it loaded but its bf16 matmul did not (float32 still runs)


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
        self.mds = [_desc(lib, dt, a_dims, a_strides), None, _desc(lib, _F32, c_dims, c_strides)]
        if format_any:
            wmd = _VP()
            _check(lib.dnnl_memory_desc_create_with_tag(ctypes.byref(wmd), len(b_dims), _Dims(*b_dims), dt, _TAG_ANY),
                   "memory descriptor")
            self.mds[1] = wmd
        else:
            self.mds[1] = _desc(lib, dt, b_dims, b_strides)
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
        lib = self.lib
        _one_omp_thread()
        scratch = np.empty(self.scratch_bytes + 64, np.uint8) if self.scratch_bytes else None
        handles = [(_ARG_SRC, self.mds[0], a_ptr), (_ARG_WEIGHTS, self.mds[1], b_ptr), (_ARG_DST, self.mds[2], c_ptr)]
        if self.bias_md is not None:
            handles.append((_ARG_BIAS, self.bias_md, bias_ptr))
        if scratch is not None:
            handles.append((_ARG_SCRATCHPAD, self.scratch_md, -(-scratch.ctypes.data // 64) * 64))
        args = (_ExecArg * len(handles))()
        made = []
        try:
            for i, (arg, md, ptr) in enumerate(handles):
                mem = _VP()
                _check(lib.dnnl_memory_create(ctypes.byref(mem), md, _engine, _VP(ptr)), "memory")
                made.append(mem)
                args[i].arg, args[i].memory = arg, mem
            _check(lib.dnnl_primitive_execute(self.prim, _stream, len(handles), args), "execute")
            _check(lib.dnnl_stream_wait(_stream), "stream wait")
        finally:
            for mem in made:
                lib.dnnl_memory_destroy(mem)


def _primitive(dt, *key, format_any=False):
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


def _dtype_of(*arrays):
    """oneDNN's data type for these operands: bf16 for uint16 bits or ml_dtypes' bfloat16, f32 for float32."""
    names = {x.dtype.name for x in arrays}
    if names <= {"uint16", "bfloat16"}:
        return _BF16
    if names == {"float32"}:
        return _F32
    raise ValueError(f"oneDNN matmul operands must be bf16 (uint16 bits) or float32, not {sorted(names)}")


def _matrix(x, item):
    """(dims, strides in elements) of a 2-D operand with a unit stride on one axis (a transposed view is read in
    place); an axis of length one gets a stride that makes the layout plain."""
    (rows, cols), (sr, sc) = x.shape, x.strides
    if sr % item or sc % item or sr < 0 or sc < 0:
        raise ValueError(f"oneDNN matmul operand strides {x.strides} are not whole elements")
    sr, sc = sr // item, sc // item
    if rows == 1:
        sr, sc = (cols, 1) if sc == 1 or cols == 1 else (1, sc)
    elif cols == 1:
        sr, sc = (1, rows) if sr == 1 else (sr, 1)
    if (sc == 1 and sr >= cols) or (sr == 1 and sc >= rows):
        return (rows, cols), (sr, sc)
    raise ValueError(f"oneDNN matmul operand of shape {x.shape} and strides {x.strides}: no unit stride")


def _batch(x, item):
    """(dims, strides in elements) of a 3-D / 4-D operand: its last two axes as _matrix reads them, each leading
    axis with its own stride (an axis of length one: the extent of what follows it)."""
    dims, strides = _matrix(x[(0,) * (x.ndim - 2)], item)
    lead_dims, lead_strides = list(x.shape[:-2]), []
    extent = max(s * (d - 1) for d, s in zip(dims, strides)) + 1
    for d, s in zip(reversed(x.shape[:-2]), reversed(x.strides[:-2])):
        if s % item:
            raise ValueError(f"oneDNN matmul operand strides {x.strides} are not whole elements")
        lead_strides.insert(0, s // item if d > 1 else extent)
        extent += (d - 1) * (s // item)
    return tuple(lead_dims) + dims, tuple(lead_strides) + strides


class PackedB:
    """A GEMM's right operand b (K, N) (bf16 bits, or float32) kept in the layout oneDNN's matmul prefers for it
    (a reorder of b into the weights layout a format_tag_any primitive picks), for products that use it again
    and again: a weight's copy, made once per precision.weight_copies region, serves every micro-batch's
    product. The layout may depend on the product's rows (M), so the reorder is made on the first product of
    each layout and kept: one per weight copy in a step whose micro-batches have one shape. Same shape
    contract as b; only dnnl.gemm reads it."""

    def __init__(self, b):
        self.dt = _dtype_of(b)
        _lib(self.dt)
        _matrix(b, b.itemsize)   # a layout gemm can read
        self.b, self.shape = b, b.shape
        self.layouts = []        # (memory descriptor, buffer)
        self._lock = threading.Lock()

    def buffer(self, md):
        """b's bytes in the weights layout md (reordered on first use)."""
        lib = _loaded_lib
        for known, buf in self.layouts:
            if lib.dnnl_memory_desc_equal(known, md):
                return buf
        with self._lock:
            for known, buf in self.layouts:
                if lib.dnnl_memory_desc_equal(known, md):
                    return buf
            dims, strides = _matrix(self.b, self.b.itemsize)
            src = _desc(lib, self.dt, dims, strides)
            dst = _VP()
            _check(lib.dnnl_memory_desc_clone(ctypes.byref(dst), md), "memory descriptor")
            buf = np.empty(lib.dnnl_memory_desc_get_size(dst) + 64, np.uint8)
            addr = -(-buf.ctypes.data // 64) * 64
            pd, prim = _VP(), _VP()
            _check(lib.dnnl_reorder_primitive_desc_create(ctypes.byref(pd), src, _engine, dst, _engine, None),
                   "weights reorder")
            try:
                _check(lib.dnnl_primitive_create(ctypes.byref(prim), pd), "weights reorder")
                args = (_ExecArg * 2)()
                mems = [_VP(), _VP()]
                _check(lib.dnnl_memory_create(ctypes.byref(mems[0]), src, _engine, _VP(self.b.ctypes.data)), "memory")
                _check(lib.dnnl_memory_create(ctypes.byref(mems[1]), dst, _engine, _VP(addr)), "memory")
                args[0].arg, args[0].memory, args[1].arg, args[1].memory = _ARG_SRC, mems[0], _ARG_DST, mems[1]
                _one_omp_thread()
                _check(lib.dnnl_primitive_execute(prim, _stream, 2, args), "weights reorder")
                _check(lib.dnnl_stream_wait(_stream), "stream wait")
                for mem in mems:
                    lib.dnnl_memory_destroy(mem)
            finally:
                if prim:
                    lib.dnnl_primitive_destroy(prim)
                lib.dnnl_primitive_desc_destroy(pd)
                lib.dnnl_memory_desc_destroy(src)
            self.layouts.append((dst, (buf, addr)))
            return buf, addr


def packed_b(b):
    """PackedB(b) where oneDNN's bf16 matmul loads, else b itself (dnnl.gemm takes either)."""
    return PackedB(b) if missing_reason() is None else b


def _one(a, b, out, alpha, beta, bias):
    """One oneDNN call: out (M, N) float32 = alpha a b + beta out (+ bias)."""
    packed = type(b) is PackedB
    dt = _dtype_of(a, b.b if packed else b)
    item = a.itemsize
    a_dims, a_strides = _matrix(a, item)
    c_dims, c_strides = _matrix(out, 4)
    if packed:
        prim = _primitive(dt, 1, a_dims, a_strides, b.shape, None, c_dims, c_strides, bias is not None, alpha, beta,
                          format_any=True)
        b_ptr = b.buffer(prim.mds[1])[1]
    else:
        b_dims, b_strides = _matrix(b, item)
        prim = _primitive(dt, 1, a_dims, a_strides, b_dims, b_strides, c_dims, c_strides, bias is not None, alpha,
                          beta)
        b_ptr = b.ctypes.data
    prim.run(a.ctypes.data, b_ptr, out.ctypes.data, None if bias is None else bias.ctypes.data)


def gemm(a, b, out, alpha=1.0, beta=0.0, parallel=True, bias=None):
    """out (M, N) float32 = alpha a b + beta out (+ bias): mkl.gemm's contract, in oneDNN. a (M, K) and b (K, N)
    bf16 bits (uint16; or both float32: oneDNN's float32 matmul), C- or F-ordered 2-D arrays or views (a
    transposed operand is read in place), or b a PackedB; out with unit column stride. Float32 sums.
    bias (N,) float32, added by oneDNN to each output row; alpha must then be 1 (oneDNN would scale the bias
    too). parallel: a product of at least PARALLEL_MIN_FLOPS is split by output rows (by columns when it has
    few rows) over threads.THREADS threads; False inside work that is already spread over threads."""
    M, K = a.shape
    N = b.shape[1]
    if b.shape[0] != K or out.shape != (M, N) or out.dtype != np.float32 or out.strides[1] != 4:
        raise ValueError(f"bf16 GEMM shapes {a.shape} x {b.shape} -> {out.shape} ({out.dtype}, strides {out.strides})")
    if bias is not None:
        bias = np.ascontiguousarray(bias, dtype=np.float32)
        if bias.shape != (N,) or alpha != 1.0:
            raise ValueError(f"oneDNN GEMM bias of shape {bias.shape} for {N} columns (alpha {alpha}: must be 1)")
    if M == 0 or N == 0:
        return out
    if K == 0:
        out[...] = 0 if beta == 0 else out * np.float32(beta)
        if bias is not None:
            out += bias
        return out
    alpha, beta = float(alpha), float(beta)
    n = threads.THREADS
    if not parallel or n < 2 or 2 * M * N * K < PARALLEL_MIN_FLOPS:
        _one(a, b, out, alpha, beta, bias)
        return out
    if M >= N or M >= 64 * n or type(b) is PackedB:   # a packed b is whole: its products split by rows
        cuts = [M * i // n for i in range(n + 1)]
        items = [(a[r0:r1], b, out[r0:r1], alpha, beta, bias) for r0, r1 in zip(cuts, cuts[1:]) if r1 > r0]
    else:
        cuts = [N * i // n for i in range(n + 1)]
        items = [(a, b[:, c0:c1], out[:, c0:c1], alpha, beta, None if bias is None else bias[c0:c1])
                 for c0, c1 in zip(cuts, cuts[1:]) if c1 > c0]
    threads.run_items(_one, items, True, blas=False)
    return out


def batched(a, b, out, alpha=1.0, beta=0.0):
    """mkl.batched's contract in one oneDNN call: out[i] = alpha a[i] b[i] + beta out[i] for every leading index
    of a (..., M, K), b (..., K, N), out (..., M, N), one or two leading axes each with strides of its own (views
    into attention's heads), on this thread."""
    if a.ndim not in (3, 4) or b.ndim != a.ndim or out.ndim != a.ndim:
        raise ValueError(f"bf16 batched GEMM needs 3-D or 4-D operands, not {a.shape} x {b.shape} -> {out.shape}")
    lead = a.shape[:-2]
    M, K = a.shape[-2:]
    N = b.shape[-1]
    if out.strides[-1] != 4 or out.dtype != np.float32 or b.shape[:-1] != lead + (K,) or out.shape != lead + (M, N):
        raise ValueError(f"bf16 batched GEMM shapes {a.shape} x {b.shape} -> {out.shape}")
    if 0 in lead or M == 0 or N == 0:
        return out
    if K == 0:
        out[...] = 0 if beta == 0 else out * np.float32(beta)
        return out
    dt, item = _dtype_of(a, b), a.itemsize
    (ad, ast), (bd, bst), (cd, cst) = _batch(a, item), _batch(b, item), _batch(out, 4)
    prim = _primitive(dt, len(lead), ad, ast, bd, bst, cd, cst, False, float(alpha), float(beta))
    prim.run(a.ctypes.data, b.ctypes.data, out.ctypes.data)
    return out
