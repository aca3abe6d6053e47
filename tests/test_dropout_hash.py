"""The GPU's dropout mask: the rule written out again here in NumPy (from its description in
kernels/cuda/runtime.py, not by calling it), its statistics checked on the CPU, and the CUDA function checked
bit for bit against this NumPy rule on the GPU.

The rule: for element i (64 bits) and seed s (64 bits), in 32-bit arithmetic,
    x = ((lo(i) xor lo(s)) + hi(s) * 0x9E3779B9);  x ^= x >> 16;  x *= 0x7feb352d
    x += hi(i) * 0x9E3779B9;  x ^= x >> 15;  x *= 0x846ca68b;  x ^= x >> 16
and the element is kept when (x >> 8) >= ceil(p * 2^24).
"""
import numpy as np
import pytest

from tinygrad_llm import backend

U32 = np.uint32


def keep_reference(seed, index, p):
    """The rule above on NumPy uint32 arrays (wrapping arithmetic): a bool array of index's (and seed's) shape."""
    index, seed = np.asarray(index, np.uint64), np.asarray(seed, np.uint64)
    low, high = np.uint64(0xFFFFFFFF), np.uint64(32)
    lo, hi = (index & low).astype(U32), (index >> high).astype(U32)
    with np.errstate(over="ignore"):
        x = (lo ^ (seed & low).astype(U32)) + (seed >> high).astype(U32) * U32(0x9E3779B9)
        x ^= x >> U32(16)
        x *= U32(0x7FEB352D)
        x += hi * U32(0x9E3779B9)
        x ^= x >> U32(15)
        x *= U32(0x846CA68B)
        x ^= x >> U32(16)
    threshold = int(np.ceil(np.float32(p) * np.float32(2 ** 24)))
    return (x >> U32(8)) >= U32(threshold)


def test_keep_fraction_is_one_minus_p_for_every_p():
    n = 1 << 20
    for p in (0.05, 0.1, 0.2, 0.5, 0.9):
        kept = keep_reference(0x1234_5678_9ABC_DEF0, np.arange(n), p).mean()
        assert abs(kept - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)   # five standard deviations


def test_p_zero_keeps_all_and_p_one_keeps_none():
    i = np.arange(1 << 16)
    assert keep_reference(7, i, 0.0).all() and not keep_reference(7, i, 1.0).any()


def test_neighbours_rows_and_seeds_are_uncorrelated():
    """Correlation of the keep bits of elements 1 and T apart (a score and the next key, the next query of a
    (T, T) block), and of the same elements under two seeds (consecutive steps), each within 5 standard
    deviations of zero (1/sqrt(n) for n pairs)."""
    n, T = 1 << 20, 256
    a = keep_reference(0xDEADBEEF_0BADF00D, np.arange(n + T), 0.2).astype(np.float64)
    b = keep_reference(0xDEADBEEF_0BADF00E, np.arange(n), 0.2).astype(np.float64)
    bound = 5 / np.sqrt(n)
    for x, y in ((a[:n], a[1:n + 1]), (a[:n], a[T:n + T]), (a[:n], b)):
        assert abs(np.corrcoef(x, y)[0, 1]) < bound


def test_each_run_of_two_to_the_32_elements_gets_its_own_mask():
    """Element i and element i + 2^32 (the high word is mixed in): the masks agree only as two independent ones
    would, (1 - p)^2 + p^2 of the time."""
    n, p = 1 << 20, 0.2
    i = np.arange(n, dtype=np.uint64)
    same = (keep_reference(99, i, p) == keep_reference(99, i + np.uint64(1 << 32), p)).mean()
    assert abs(same - ((1 - p) ** 2 + p ** 2)) < 5 * np.sqrt(0.68 * 0.32 / n)


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA GPU")
@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 1.0])
def test_the_cuda_function_is_the_rule(p):
    """runtime.HEADER's dropout_keep on (seed, i) pairs, i below and above 2^32 and near 2^63, bit for bit the rule."""
    import cupy as cp
    from tinygrad_llm.kernels.cuda import runtime
    kernel = cp.RawKernel(runtime.HEADER + r"""
extern "C" __global__ void keep_bits(const unsigned long long* seeds, const long long* index, float p, bool* out, int n) {
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e < n) out[e] = dropout_keep(seeds[e], index[e], p);
}""", "keep_bits", options=("-std=c++17",))
    rng = np.random.default_rng(5)
    n = 1 << 16
    seeds = rng.integers(0, 2 ** 63, n, dtype=np.uint64)
    index = np.concatenate([np.arange(n // 4), rng.integers(0, 2 ** 32, n // 4), (1 << 32) + np.arange(n // 4),
                            rng.integers(2 ** 62, 2 ** 63 - 1, n // 4)]).astype(np.int64)
    out = cp.empty(n, cp.bool_)
    kernel(((n + 255) // 256,), (256,), (cp.asarray(seeds), cp.asarray(index), np.float32(p), out, np.int32(n)))
    expected = keep_reference(seeds, index.astype(np.uint64), p)
    np.testing.assert_array_equal(cp.asnumpy(out), expected)
