"""Work spread over Python threads, each calling BLAS on one thread (the attention kernel's large heads).

OpenBLAS's own threads and ours would fight over the cores, so while the work items run, NumPy's
OpenBLAS is set to one thread with threadpoolctl and set back afterwards: the setting is scoped to this
call and to NumPy's BLAS (another BLAS in the process, PyTorch's say, is left alone), and it does not
depend on what was imported first.
"""
import concurrent.futures
import contextlib
import os
import threading

import numpy as np

_UNSET = object()
_numpy_blas = _UNSET


def numpy_blas():
    """threadpoolctl's controller of the BLAS NumPy uses, or None (threadpoolctl or the library not found)."""
    global _numpy_blas
    if _numpy_blas is _UNSET:
        _numpy_blas = None
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            return None
        numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
        # NumPy's own first (SciPy, say, may have loaded another OpenBLAS beside it)
        blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        blas.sort(key=lambda lib: not os.path.realpath(lib.filepath).startswith(os.path.realpath(numpy_dir)))
        _numpy_blas = blas[0] if blas else None
    return _numpy_blas


_blas_lock = threading.Lock()
_blas_users, _blas_before = 0, None


@contextlib.contextmanager
def blas_threads(n):
    """Run the block with NumPy's BLAS on n threads, then back to what it had; a no-op where it is not found.

    Blocks may nest and overlap across Python threads: the first to enter saves, the last to leave restores."""
    blas = numpy_blas()
    if blas is None:
        yield
        return
    global _blas_users, _blas_before
    with _blas_lock:
        if _blas_users == 0:
            _blas_before = blas.get_num_threads()
        _blas_users += 1
        blas.set_num_threads(n)
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                blas.set_num_threads(_blas_before)


def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))   # the cores this process may run on (taskset, containers)
    except AttributeError:                     # not Linux
        return os.cpu_count() or 1


THREADS = max(1, min(_usable_cores(), 8))
_pool, _pool_size = None, 0


def _forget_pool_in_a_forked_child():
    global _pool
    _pool = None   # a fork copies the pool's bookkeeping but not its threads: a new one is made on demand


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_a_forked_child)


def run_items(fn, items, parallel, blas=True):
    """fn(*item) for every item: in this thread, or spread over THREADS threads (BLAS on one each).

    blas=False: the items never call NumPy's BLAS (MKL's sequential calls, Numba passes), so its thread
    count is left alone: setting it through threadpoolctl and back costs more than small items do.

    Every share is finished before this returns or raises (no thread still writes into the outputs or
    calls BLAS after it), and an exception in this thread's share is raised before a worker's."""
    global _pool, _pool_size
    if not parallel or THREADS < 2 or len(items) < 2:
        for item in items:
            fn(*item)
        return
    if _pool is None or _pool_size != THREADS - 1:
        _pool_size = THREADS - 1
        _pool = concurrent.futures.ThreadPoolExecutor(_pool_size, thread_name_prefix="tinygrad_llm-attention")
    shares = [items[i::THREADS] for i in range(THREADS)]
    with blas_threads(1) if blas else contextlib.nullcontext():
        futures = [_pool.submit(lambda share=share: [fn(*item) for item in share]) for share in shares[1:]]
        try:
            for item in shares[0]:
                fn(*item)
        finally:
            concurrent.futures.wait(futures)
    for future in futures:
        future.result()   # a worker's exception, raised here once all have finished
