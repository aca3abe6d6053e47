"""Numba kernels for NumPy arrays, one module per op family (attention, cross_entropy, elementwise,
embedding, layer_norm, optim); each is served because it measured faster than its op
(benchmarks/kernels.py, figures in benchmarks/RESULTS.md).

Shared choices, written here once:
- error_model="numpy": division by zero gives inf/nan as NumPy does, and without Python's
  ZeroDivisionError branch LLVM vectorises the loops.
- Serial (parallel=False): a Numba thread pool beside OpenBLAS's on few cores made each pool's idle
  threads hold the cores the other needed. Attention alone spreads large heads over Python threads
  (threads.py).
- Numba's exp and tanh are scalar libm calls where NumPy's are SIMD loops, so kernels run np.exp/np.tanh
  in place between their Numba passes (or a rational tanh in float32, elementwise.py).
- Compiled code is cached on disk (__pycache__): only the first start pays for compilation. The cache
  does not notice edits to a jitted function in another file, so helpers stay in the file that uses them.
"""
