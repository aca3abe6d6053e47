"""Every Numba kernel beside its NumPy reference and PyTorch, one markdown table.

    python benchmarks/kernels.py            # all kernels
    python benchmarks/kernels.py attention  # some of them

Each row is the median of several calls after warm-up, all in this one process (the machine is
shared: compare the ratios, not a lone time). numpy/numba > 1 means the kernel is faster than the
reference; torch/numba > 1 means faster than PyTorch. matmul rows compare a blocked Numba kernel with
BLAS (np.matmul): they show why no matmul kernel is registered.
"""
import os
import platform
import sys

import tinygrad_llm  # noqa: F401  (before NumPy: tinygrad_llm/__init__.py sets OpenBLAS's thread timeout)

try:  # torch next: its OpenMP runtime starts with its own defaults, untouched by the kernels' settings
    import torch
except ImportError:
    torch = None

import numba  # noqa: E402
import numpy as np  # noqa: E402

from tinygrad_llm.kernels import KERNEL_MODULES
from tinygrad_llm.kernels.common import HEADER


def main(names):
    import importlib

    threads = numba.config.NUMBA_NUM_THREADS
    if torch is not None:
        torch.set_num_threads(threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, numba threads {threads} "
          f"({numba.__version__}), numpy {np.__version__}, torch {torch.__version__ if torch else '-'}\n")
    print(HEADER)
    for name in names:
        module = importlib.import_module(f"tinygrad_llm.kernels.{name}")
        for row in module.benchmark():
            print(row, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or KERNEL_MODULES)
