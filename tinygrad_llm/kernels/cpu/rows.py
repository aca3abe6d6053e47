"""Row reductions the CPU kernels share, written once as Numba functions that their loops call (Numba
compiles them into the caller)."""
from numba import njit


@njit(fastmath=False, error_model="numpy", cache=True, nogil=True)
def row_max(row, n):
    """max(row[:n]) (n >= 1) in four independent chains, so the max is not one long dependency."""
    m0, m1, m2, m3 = row[0], row[0], row[0], row[0]
    j = 0
    while j + 4 <= n:
        m0, m1, m2, m3 = max(m0, row[j]), max(m1, row[j + 1]), max(m2, row[j + 2]), max(m3, row[j + 3])
        j += 4
    for jj in range(j, n):
        m0 = max(m0, row[jj])
    return max(max(m0, m1), max(m2, m3))
