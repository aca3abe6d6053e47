"""The switches of the autograd: whether ops record a graph (no_grad), whether every op's output and
gradients are checked for NaN/Inf (detect_anomaly), and who hears of a leaf's finished gradient
(leaf_grad_hook). Process-wide while their `with` block runs; tensor.py reads them on every op.
"""
import contextlib

_grad_enabled = True
_anomaly_mode = False
_leaf_grad_hook = None


@contextlib.contextmanager
def no_grad():
    """Run ops without recording a graph (evaluation, sampling, optimizer updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled():
    return _grad_enabled


@contextlib.contextmanager
def detect_anomaly():
    """Check every op's forward output and backward gradients; raise naming the first non-finite one."""
    global _anomaly_mode
    previous, _anomaly_mode = _anomaly_mode, True
    try:
        yield
    finally:
        _anomaly_mode = previous


@contextlib.contextmanager
def leaf_grad_hook(fn):
    """While the block runs, backward() calls fn(leaf, dout) as soon as a leaf's gradient from this
    backward is complete (all its uses are done), before the rest of the graph is visited. The leaf's
    .grad is still written only at the end (dout added to it). Data-parallel training starts its
    gradient all-reduce from here, so that communication overlaps the rest of backward."""
    global _leaf_grad_hook
    previous, _leaf_grad_hook = _leaf_grad_hook, fn
    try:
        yield
    finally:
        _leaf_grad_hook = previous


def _check_finite(xp, array, where):
    if array is not None and array.dtype.kind in "fc" and not bool(xp.isfinite(array).all()):
        raise FloatingPointError(f"{where} produced a non-finite value (NaN or Inf)")
