"""CuPy kernels for CUDA arrays, one module per op family (attention, cross_entropy, elementwise, grads,
layer_norm, linear, optim), plus runtime.py (compiling, launching, the C helpers every kernel shares),
cublas.py and cublaslt.py (the cuBLAS and cuBLASLt calls CuPy does not bind).

Each raw kernel's C++ source sits in the file of its launcher, written once for float and double
(templates), and accumulates in its own dtype. Importing any of these needs CuPy.
"""
