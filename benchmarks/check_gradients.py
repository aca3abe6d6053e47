"""How long `check_gradients` takes: 100 drawn examples of a unary op on shapes up to 8x8x8.

    python benchmarks/check_gradients.py [--op tanh] [--examples 100] [--repeats 5]

Each repeat is one full `check_gradients(op, arrays(shapes(max_dims=3, max_side=8)))` call with a
different seed (so different drawn shapes); the figure is the median after one warm-up call. The
anchor, measured in the same process, is one plain `gradcheck` of the op on a fixed 8x8x8 input
(the largest shape drawn): the ratio says how many worst-case gradchecks a whole property run costs.
The machine is shared: compare the ratio, not a lone time.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import tinygrad_llm  # noqa: F401  (before NumPy: tinygrad_llm/__init__.py sets OpenBLAS's thread timeout)
import numpy as np  # noqa: E402
import hypothesis  # noqa: E402

import tinygrad_llm.functional as F  # noqa: E402
from tinygrad_llm.gradcheck import gradcheck  # noqa: E402
from tinygrad_llm.testing import arrays, check_gradients, shapes  # noqa: E402

OPS = {
    "tanh": lambda x: x.tanh(),
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "exp": lambda x: x.exp(),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time check_gradients on a unary op, shapes up to 8x8x8.")
    parser.add_argument("--op", choices=sorted(OPS), default="tanh", help="the unary op (default: %(default)s)")
    parser.add_argument("--examples", type=int, default=100, help="drawn examples per call (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.examples < 1 or args.repeats < 1:
        parser.error("--examples and --repeats must be at least 1")
    fn = OPS[args.op]
    strategy = arrays(shapes(max_dims=3, max_side=8))

    x = np.random.default_rng(0).standard_normal((8, 8, 8))
    gradcheck(fn, [x])  # warm-up
    anchor = []
    for _ in range(3):
        t = time.perf_counter()
        gradcheck(fn, [x])
        anchor.append(time.perf_counter() - t)
    anchor = statistics.median(anchor)

    check_gradients(fn, strategy, max_examples=args.examples, seed=1000)  # warm-up
    times = []
    for seed in range(args.repeats):
        t = time.perf_counter()
        check_gradients(fn, strategy, max_examples=args.examples, seed=seed)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"load {os.getloadavg()[0]:.2f}, python {sys.version.split()[0]}, numpy {np.__version__}, "
          f"hypothesis {hypothesis.__version__}")
    print(f"check_gradients({args.op}, arrays(shapes(max_dims=3, max_side=8)), max_examples={args.examples}): "
          f"median {median:.2f} s over {args.repeats} seeds (min {min(times):.2f}, max {max(times):.2f})")
    print(f"anchor: one gradcheck of {args.op} on 8x8x8: {anchor * 1000:.0f} ms; "
          f"ratio {median / anchor:.1f} worst-case gradchecks per property run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
