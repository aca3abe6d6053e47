"""Kernels: faster forward/backward pairs for some ops, by device (cpu/: Numba, cuda/: CuPy).

Nothing is imported here. An op names its kernels where it is defined (functional.py's `kernels`
attribute, optim.py's @backend.kernels), and backend.implementation(op, device) imports the named one the
first time the op runs on that device. Every kernel equals its op (tests/test_kernels.py,
tests/test_gpu.py) and runs the op itself for inputs it does not cover. Without Numba or CuPy, or with
TINYGRAD_LLM_KERNELS=0, the ops run as written. How to add one: docs/architecture.md.
"""
