"""What the CPU's two ctypes libraries (MKL: mkl.py; oneDNN: dnnl_api.py and dnnl.py) share: where each is looked
for, how the first that loads is found, and the checks of a batched bf16 GEMM's operands."""
import ctypes
import ctypes.util
import os
import sys

import numpy as np


def candidates(env, distribution, names, short):
    """The paths tried for a library, in order: the path in the environment variable `env` alone when it is set;
    else the files of the installed `distribution` named like names[-1] (those in `names` first, in its order),
    each of `names` in sys.prefix/lib and sys.base_prefix/lib, and ctypes.util.find_library(short)."""
    given = os.environ.get(env)
    if given:
        return [given]
    paths, stem = [], names[-1]
    try:
        from importlib import metadata
        dist = metadata.distribution(distribution)
        found = [f for f in dist.files or [] if f.name.startswith(stem)]
        found.sort(key=lambda f: names.index(f.name) if f.name in names else len(names))
        paths += [str(dist.locate_file(f)) for f in found]
    except Exception:   # PackageNotFoundError, or a distribution without a file list
        pass
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        paths += [os.path.join(prefix, "lib", name) for name in names]
    found = ctypes.util.find_library(short)
    if found:
        paths.append(found)
    return list(dict.fromkeys(os.path.normpath(p) if os.sep in p else p for p in paths))


def open_first(paths, setup, nothing_tried):
    """The first of `paths` that loads and passes setup(lib) (which raises OSError or AttributeError where the
    library lacks what is needed): (lib, path, None); else (None, None, "not found (...)") naming the last two
    failures, or `nothing_tried` when there was no path."""
    errors = []
    for path in paths:
        if os.sep in path and not os.path.exists(path):
            errors.append(f"{path}: no such file")
            continue
        try:
            lib = ctypes.CDLL(path)
            setup(lib)
        except (OSError, AttributeError) as e:
            errors.append(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        return lib, path, None
    return None, None, f"not found ({'; '.join(errors[-2:]) if errors else nothing_tried})"


def batched_shapes(a, b, out, beta):
    """The checks of a batched bf16 GEMM out[i] = alpha a[i] b[i] + beta out[i] (a (..., M, K), b (..., K, N),
    out (..., M, N) float32, one or two leading axes): a one-line ValueError for shapes that do not fit;
    (leading shape, M, K, N), or None when out already holds the answer (an empty product; K == 0: beta out)."""
    if a.ndim not in (3, 4) or b.ndim != a.ndim or out.ndim != a.ndim:
        raise ValueError(f"bf16 batched GEMM needs 3-D or 4-D operands, not {a.shape} x {b.shape} -> {out.shape}")
    lead = a.shape[:-2]
    M, K = a.shape[-2:]
    N = b.shape[-1]
    if out.strides[-1] != 4 or out.dtype != np.float32 or b.shape[:-1] != lead + (K,) or out.shape != lead + (M, N):
        raise ValueError(f"bf16 batched GEMM shapes {a.shape} x {b.shape} -> {out.shape}")
    if 0 in lead or M == 0 or N == 0:
        return None
    if K == 0:
        out[...] = 0 if beta == 0 else out * np.float32(beta)
        return None
    return lead, M, K, N
