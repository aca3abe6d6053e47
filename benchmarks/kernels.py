"""Every Numba kernel beside its op (the NumPy reference) and PyTorch, one markdown table.

    python benchmarks/kernels.py                        # every kernel family
    python benchmarks/kernels.py attention layer_norm   # some of them
    python benchmarks/kernels.py matmul                 # the blocked Numba matmul against BLAS (not served)

Each row is the median of several calls after warm-up, all in this one process (the machine may be
shared: compare the ratios, not a lone time). numpy/numba > 1 means the kernel is faster than the op;
torch/numba > 1 means faster than PyTorch. PyTorch is optional (its columns read "-" without it).
"""
import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

FAMILIES = ("attention", "cross_entropy", "elementwise", "embedding", "layer_norm", "optim", "matmul")
HEADER = ("| op | shape | dtype | numba ms | numpy ms | torch ms | numpy/numba | torch/numba |\n"
          "|---|---|---|---|---|---|---|---|")


def median_ms(fn, repeat=7, warmup=2):
    """Median wall time of fn() in milliseconds, after `warmup` untimed calls (JIT, caches)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def forward_backward(impl, arrays, attrs=None, needs=None, dout=None):
    """A callable that runs impl's forward then backward once (what a training step asks of an op)."""
    from tinygrad_llm.tensor import Context
    attrs = attrs or {}
    if needs is None:
        needs = tuple(a is not None and hasattr(a, "dtype") and a.dtype.kind == "f" for a in arrays)

    def run():
        ctx = Context(needs)
        out = impl.forward(ctx, *arrays, **attrs)
        impl.backward(ctx, np.ones_like(out) if dout is None else dout)

    return run


def table_row(op, shape, dtype, numba_ms, numpy_ms, torch_ms=None):
    """One markdown row: times and speed-ups (>1 means the Numba kernel is faster)."""
    torch_cell = f"{torch_ms:.3f}" if torch_ms is not None else "-"
    torch_ratio = f"{torch_ms / numba_ms:.2f}" if torch_ms is not None else "-"
    return (f"| {op} | {shape} | {np.dtype(dtype).name} | {numba_ms:.3f} | {numpy_ms:.3f} | {torch_cell} | "
            f"{numpy_ms / numba_ms:.2f} | {torch_ratio} |")


def torch_or_none():
    """torch when installed (an oracle for timing), else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def bench_attention(shapes=((12, 4, 64, 32), (64, 6, 256, 64))):
    """Forward + backward of causal attention, float32, (B,NH,T,HS) of the two model configs."""
    rows, torch = [], torch_or_none()
    for shape in shapes:
        q, k, v = attention_inputs(shape, np.float32, strided=True)
        arrays, attrs = (q, k, v, None), dict(causal=True, scale=1 / math.sqrt(shape[-1]))
        needs = (True, True, True, False)
        t_numba = median_ms(forward_backward(ScaledDotProductAttentionNumba, arrays, attrs, needs), repeat=5)
        t_numpy = median_ms(forward_backward(F.ScaledDotProductAttention, arrays, attrs, needs), repeat=5)
        t_torch = None
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(a)).requires_grad_() for a in (q, k, v))

            def torch_step():
                torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True).sum().backward()

            t_torch = median_ms(torch_step, repeat=5)
        rows.append(table_row("attention fwd+bwd", shape, np.float32, t_numba, t_numpy, t_torch))
    return rows


def bench_cross_entropy(shapes=((12 * 64, 65), (64 * 256, 65), (8 * 256, 50257))):
    """Forward + backward, float32, (N, V): the two char-level configs and a GPT-2-vocabulary row block."""
    rows, torch = [], torch_or_none()
    for shape in shapes:
        logits, targets = cross_entropy_inputs(shape, np.float32, ignore_fraction=0.0)
        arrays, attrs = (logits, targets), dict(ignore_index=-100, reduction="mean")
        t_numba = median_ms(forward_backward(CrossEntropyNumba, arrays, attrs), repeat=5)
        t_numpy = median_ms(forward_backward(F.CrossEntropy, arrays, attrs), repeat=5)
        t_torch = None
        if torch is not None:
            tl, tt = torch.from_numpy(logits).requires_grad_(), torch.from_numpy(targets)
            t_torch = median_ms(lambda: torch.nn.functional.cross_entropy(tl, tt).backward(), repeat=5)
        rows.append(table_row("cross_entropy fwd+bwd", shape, np.float32, t_numba, t_numpy, t_torch))
    return rows


def bench_elementwise(shapes=((12, 64, 512), (64, 256, 1536))):
    with exact_served():   # the erf form's kernel is measured though not served
        return _bench_elementwise(shapes)


def _bench_elementwise(shapes):
    """Forward + backward, float32, the MLP hidden activations (B,T,4C) of the two model configs."""
    rows, torch = [], torch_or_none()
    for shape in shapes:
        x, y = elementwise_inputs(shape, np.float32)
        cases = [("gelu tanh", F.GELU, GELUNumba, (x,), dict(approximate="tanh")),
                 ("gelu exact", F.GELU, GELUNumba, (x,), dict(approximate="none")),
                 ("swiglu", F.SwiGLU, SwiGLUNumba, (x, y), {}), ("add", Add, AddThreads, (x, y), {})]
        for name, reference, kernel, arrays, attrs in cases:
            t_numba = median_ms(forward_backward(kernel, arrays, attrs), repeat=5)
            t_numpy = median_ms(forward_backward(reference, arrays, attrs), repeat=5)
            t_torch = None
            if torch is not None:
                tx, ty = torch.from_numpy(x).requires_grad_(), torch.from_numpy(y).requires_grad_()
                tf = torch.nn.functional
                fn = {"gelu tanh": lambda: tf.gelu(tx, approximate="tanh"), "gelu exact": lambda: tf.gelu(tx),
                      "swiglu": lambda: tf.silu(tx) * ty, "add": lambda: tx + ty}[name]
                t_torch = median_ms(lambda: fn().backward(torch.ones(shape)), repeat=5)
            rows.append(table_row(f"{name} fwd+bwd", shape, np.float32, t_numba, t_numpy, t_torch))
    return rows


def bench_embedding(cases=(((12, 64), 65, 128), ((64, 256), 65, 384), ((64, 256), 256, 384))):
    """Forward + backward, float32: token table (V,C) and the position table (block_size, C)."""
    rows, torch = [], torch_or_none()
    for idx_shape, V, C in cases:
        idx, w = embedding_inputs(idx_shape, V, C, np.float32)
        dout = np.random.default_rng(1).standard_normal(idx_shape + (C,)).astype(np.float32)
        t_numba = median_ms(forward_backward(EmbeddingNumba, (idx, w), needs=(False, True), dout=dout))
        t_numpy = median_ms(forward_backward(F.Embedding, (idx, w), needs=(False, True), dout=dout))
        t_torch = None
        if torch is not None:
            tw, ti, td = torch.from_numpy(w).requires_grad_(), torch.from_numpy(idx), torch.from_numpy(dout)
            t_torch = median_ms(lambda: torch.nn.functional.embedding(ti, tw).backward(td))
        rows.append(table_row("embedding fwd+bwd", f"{idx_shape} V={V} C={C}", np.float32, t_numba, t_numpy, t_torch))
    return rows


def bench_layer_norm(shapes=((12, 64, 128), (64, 256, 384))):
    """Forward + backward, float32, (B,T,C) of the two model configs."""
    rows, torch = [], torch_or_none()
    for shape in shapes:
        x, w, b = norm_inputs(shape, np.float32)
        for name, reference, kernel, arrays, attrs in [("layer_norm", F.LayerNorm, LayerNormNumba, (x, w, b), dict(eps=1e-5)),
                                                       ("rms_norm", F.RMSNorm, RMSNormNumba, (x, w), dict(eps=1e-6))]:
            t_numba = median_ms(forward_backward(kernel, arrays, attrs))
            t_numpy = median_ms(forward_backward(reference, arrays, attrs))
            t_torch = None
            if torch is not None:
                tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
                if name == "layer_norm":
                    step = lambda: torch.nn.functional.layer_norm(tx, (shape[-1],), tw, tb, 1e-5).sum().backward()
                else:
                    step = lambda: torch.nn.functional.rms_norm(tx, (shape[-1],), tw, 1e-6).sum().backward()
                t_torch = median_ms(step)
            rows.append(table_row(f"{name} fwd+bwd", shape, np.float32, t_numba, t_numpy, t_torch))
    return rows


def bench_optim(shapes=((384, 1536), (65, 128))):
    """Markdown rows: one update of a parameter of each shape, float32."""
    rows, torch = [], torch_or_none()
    for shape in shapes:
        p, m, v = adamw_state(shape, np.float32, 0)
        g = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        args = (3e-4, 0.9, 0.95, 1e-8, 0.1, 10)
        t_numba = median_ms(lambda: adamw_update_numba(p, g, m, v, *args), repeat=21)
        t_numpy = median_ms(lambda: adamw_update(p, g, m, v, *args), repeat=21)
        t_torch = None
        if torch is not None:
            tp = torch.zeros(shape, requires_grad=True)
            tp.grad = torch.from_numpy(g)
            opt = torch.optim.AdamW([tp], lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
            t_torch = median_ms(opt.step, repeat=21)
        rows.append(table_row("adamw_update", shape, np.float32, t_numba, t_numpy, t_torch))
    return rows


def bench_matmul():
    import numba_matmul
    return numba_matmul.benchmark(median_ms, table_row, torch_or_none())


def _import_kernels():
    """The kernels and the tests' input makers, as globals of this module (after the Numba check)."""
    global F, ScaledDotProductAttentionNumba, CrossEntropyNumba, GELUNumba, SwiGLUNumba, exact_served, Add, AddThreads
    global EmbeddingNumba, LayerNormNumba, RMSNormNumba, adamw_update_numba, adamw_update
    global attention_inputs, cross_entropy_inputs, elementwise_inputs, embedding_inputs, norm_inputs, adamw_state
    from kernel_checks import (adamw_state, attention_inputs, cross_entropy_inputs, elementwise_inputs,
                               embedding_inputs, norm_inputs)
    from tinygrad_llm import functional as F
    from tinygrad_llm.kernels.cpu.attention import ScaledDotProductAttentionNumba
    from tinygrad_llm.kernels.cpu.cross_entropy import CrossEntropyNumba
    from tinygrad_llm.kernels.cpu.elementwise import AddThreads, GELUNumba, SwiGLUNumba, exact_served
    from tinygrad_llm.tensor import Add
    from tinygrad_llm.kernels.cpu.embedding import EmbeddingNumba
    from tinygrad_llm.kernels.cpu.layer_norm import LayerNormNumba, RMSNormNumba
    from tinygrad_llm.kernels.cpu.optim import adamw_update_numba
    from tinygrad_llm.optim import adamw_update


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time every Numba kernel beside its op and PyTorch (markdown rows).")
    parser.add_argument("families", nargs="*", metavar="family", default=list(FAMILIES[:-1]),
                        help=f"kernel families to time, of {', '.join(FAMILIES)} (default: all but matmul)")
    args = parser.parse_args(argv)
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown kernel family {unknown[0]!r}: expected one of {', '.join(FAMILIES)}")
    try:
        import numba
    except ImportError:
        print("benchmarks/kernels.py needs Numba: pip install -e '.[kernels]'", file=sys.stderr)
        return 1
    _import_kernels()
    torch = torch_or_none()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible "
          f"(numba {numba.__version__}), numpy {np.__version__}, torch {torch.__version__ if torch else '-'}\n")
    print(HEADER)
    for family in args.families:
        for row in globals()[f"bench_{family}"]():
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
