"""Where one training step's time goes, per op, for our GPT and for the PyTorch mirror.

    python benchmarks/profile_step.py --config small --steps 30
    python benchmarks/profile_step.py --config large --steps 2 --warmup 1
    TINYGRAD_LLM_CPU_BF16_EMULATION=1 python benchmarks/profile_step.py --dtype bfloat16 --null-gemm --no-torch

--dtype bfloat16 profiles our bf16 step (precision.py's policy; PyTorch's stays float32), and times every call
of the bf16 GEMM library's gemm and batched (MKL's or oneDNN's, with real data; inside the ops above): the
main thread's sum is wall time, the worker threads' is thread time (a product split over threads, attention's
work items). The step minus the main thread's GEMM time bounds the bf16 step from below for any GEMM speed,
when the GEMMs run on the main thread (the 4x128 step's products, each under mkl.PARALLEL_MIN_FLOPS). --null-gemm makes
every MKL bf16 GEMM call a call of a C function that does no work (libc's labs, through the same ctypes or Numba
call): what is left is the step's time outside the bf16 GEMMs (conversions, Python per product, softmax,
norms...). Their outputs are then garbage, so only the times mean anything. On a CPU without bf16 units,
where MKL emulates the products, it is how the non-GEMM overheads of the bf16 step can still be measured.

Ours is timed with hooks, not cProfile (whose per-call cost would inflate the Python work): every op
that goes through backend.accelerated (Function.apply and the optimizer's update) is wrapped so that its
forward and backward are timed; the phases (forward, backward, optimizer step, zero_grad) are timed
around them. What a phase spends outside its ops is the engine's own Python work: Function.apply and
Tensor construction, the backward loop's gradient sums and leaf copies, the model's module calls and
input checks. An op run inside another (the attention kernel inside SelfAttention, each parameter's
update inside the group update) is listed as "outer > inner" and counted once, in the outer op.
Linear also reports GFLOP/s (forward 2NKM, backward 4NKM flops). Per op the table gives the median
over the timed steps of its per-step total.

PyTorch is profiled with torch.profiler over the same steps (its self CPU time per aten op, grouped
with the same categories by name); the profiler's own overhead is included, so compare shares more
than absolute times. The steps of the two run one after the other (OpenBLAS and torch threads spin).
"""
import collections
import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "22")  # before NumPy loads: idle BLAS threads sleep after ~1.5 ms (README, Threads)
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tinygrad_llm  # noqa: E402,F401
import numpy as np  # noqa: E402

from tinygrad_llm import backend, precision  # noqa: E402
from tinygrad_llm.model import GPT, GPTConfig  # noqa: E402
from tinygrad_llm.optim import AdamW, param_groups  # noqa: E402

from cli_args import Parser, non_negative_int, positive_int  # noqa: E402
from train_step import BETAS, CONFIGS, LR, VOCAB, WEIGHT_DECAY, torch_training_step  # noqa: E402

# op name (ours: the reference's name; torch: substrings of aten op names) -> category
CATEGORIES = [
    ("matmul", ("Linear", "MatMul", "addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention", ("ScaledDotProductAttention", "SelfAttention", "attention", "aten::_softmax", "softmax_backward")),
    ("norms", ("LayerNorm", "RMSNorm", "layer_norm", "rms_norm")),
    ("activation", ("GELU", "SwiGLU", "gelu", "silu")),
    ("loss", ("CrossEntropy", "log_softmax", "nll_loss", "cross_entropy")),
    ("embedding", ("Embedding", "embedding")),
    ("optimizer", ("adamw", "_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt", "Optimizer")),
    ("elementwise", ("Add", "Sub", "Mul", "Div", "aten::add", "aten::mul", "aten::sub", "aten::div")),
    ("shape ops", ("Reshape", "Permute", "GetItem", "Cat", "aten::view", "aten::reshape", "aten::permute",
                   "aten::transpose", "aten::split", "aten::slice", "aten::contiguous", "aten::clone", "aten::copy_")),
]


def category(name):
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other"


class Recorder:
    """Per-step sums of op times (seconds) and flops, keyed by (op, phase)."""

    def __init__(self):
        self.step = collections.defaultdict(float)
        self.calls = collections.Counter()
        self.flops = collections.defaultdict(float)
        self.running = []   # names of the timed ops now running: an op inside another is reported as "outer > inner"

    def enter(self, name):
        key = " > ".join(self.running + [name])
        self.running.append(name)
        return key

    def add(self, key, seconds, flops=0.0):
        self.running.pop()
        self.step[key] += seconds
        self.calls[key] += 1
        self.flops[key] += flops


def linear_flops(x, w):
    rows = x.size // x.shape[-1]
    return 2.0 * rows * w.shape[0] * w.shape[1]


def timed(reference, impl, rec):
    """impl (a kernel class, a Function class, or an array function) with its calls timed into rec."""
    name = getattr(reference, "__name__", str(reference))
    if not hasattr(impl, "forward"):   # a plain array function (the optimizer's update)
        def run(*args, **kwargs):
            key = (rec.enter(name), "step")
            t0 = time.perf_counter()
            out = impl(*args, **kwargs)
            rec.add(key, time.perf_counter() - t0)
            return out
        return run

    class Timed:
        @staticmethod
        def forward(ctx, *arrays, **attrs):
            flops = linear_flops(arrays[0], arrays[1]) if name in ("Linear", "MatMul") and arrays[1].ndim == 2 else 0.0
            ctx.profile_flops = flops
            key = (rec.enter(name), "fwd")
            t0 = time.perf_counter()
            out = impl.forward(ctx, *arrays, **attrs)
            rec.add(key, time.perf_counter() - t0, flops)
            return out

        @staticmethod
        def backward(ctx, dout):
            flops = 2 * ctx.profile_flops
            key = (rec.enter(name), "bwd")
            t0 = time.perf_counter()
            grads = impl.backward(ctx, dout)
            rec.add(key, time.perf_counter() - t0, flops)
            return grads

    return Timed


def null_gemm():
    """Make MKL's bf16 GEMM calls (plain and packed) calls of labs (same arguments, no work): see --null-gemm."""
    import ctypes
    from tinygrad_llm.kernels.cpu import mkl
    if mkl.missing_reason() is not None:
        sys.exit(f"profile_step.py: --null-gemm needs MKL: {mkl.missing_reason()}")
    address = ctypes.cast(ctypes.CDLL(None).labs, ctypes.c_void_p).value

    def fake(real):
        return ctypes.CFUNCTYPE(real.restype, *real.argtypes)(address)

    mkl._state = (fake(mkl._state[0]), None)
    if mkl._packing is not None:   # the packed weights' products (PackedB) too; their packing is real
        size, pack, compute = mkl._packing
        mkl._packing = (size, pack, fake(compute))


GEMM_TIME = {"main": 0.0, "workers": 0.0, "calls": 0}


def time_gemms():
    """Wrap the bf16 libraries' gemm and batched (both modules: bf16_gemm.library() picks one per call) so
    that their calls add their time to GEMM_TIME, split by the calling thread."""
    import threading
    from tinygrad_llm.kernels.cpu import dnnl, mkl

    def timer(fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                where = "main" if threading.current_thread() is threading.main_thread() else "workers"
                GEMM_TIME[where] += time.perf_counter() - t0
                GEMM_TIME["calls"] += 1
        return call

    for module in (mkl, dnnl):
        module.gemm, module.batched = timer(module.gemm), timer(module.batched)


def profile_ours(spec, batches, warmup, steps, dtype="float32"):
    B = spec.pop("batch_size")
    cfg = GPTConfig(vocab_size=VOCAB, dtype=dtype, **spec)
    model = GPT(cfg, rng=np.random.default_rng(0))
    opt = AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS)
    rec = Recorder()
    original, wrappers = backend.accelerated, {}

    def accelerated(reference, *arrays):
        impl = original(reference, *arrays)
        if (reference, impl) not in wrappers:   # one wrapper each: making it per call would be timed as engine work
            wrappers[reference, impl] = timed(reference, impl, rec)
        return wrappers[reference, impl]

    backend.accelerated = accelerated
    per_step = []   # one dict per timed step: key -> seconds
    flops = {}
    try:
        for i in range(warmup + steps):
            x, y = batches[i % len(batches)]
            rec.step.clear()
            rec.flops.clear()
            GEMM_TIME.update(main=0.0, workers=0.0, calls=0)
            with precision.weight_copies():   # bf16: each weight rounded once a step, as train.py does
                t0 = time.perf_counter()
                _, loss = model(x, y)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            opt.zero_grad()
            t4 = time.perf_counter()
            loss.item()
            if i < warmup:
                continue
            ops = dict(rec.step)
            outer = {(n, p): s for (n, p), s in ops.items() if " > " not in n}
            fwd_ops = sum(s for (n, p), s in outer.items() if p == "fwd")
            bwd_ops = sum(s for (n, p), s in outer.items() if p == "bwd")
            opt_ops = sum(s for (n, p), s in outer.items() if p == "step")
            ops[("engine: forward (apply, Tensor, module calls, checks)", "")] = (t1 - t0) - fwd_ops
            ops[("engine: backward (graph walk, grad sums, leaf copies)", "")] = (t2 - t1) - bwd_ops
            ops[("engine: optimizer (Python around the update)", "")] = (t3 - t2) - opt_ops
            ops[("engine: zero_grad", "")] = t4 - t3
            ops[("step", "")] = t4 - t0
            if GEMM_TIME["calls"]:
                ops[("(bf16 GEMM calls, main thread: wall time inside the ops above)", "")] = GEMM_TIME["main"]
                ops[("(bf16 GEMM calls, worker threads: thread time inside the ops above)", "")] = GEMM_TIME["workers"]
            per_step.append(ops)
            flops = dict(rec.flops)
    finally:
        backend.accelerated = original
    calls = {k: v / (warmup + steps) for k, v in rec.calls.items()}
    return per_step, flops, calls, f"{cfg.n_layer}x{cfg.n_embd} T={cfg.block_size} B={B} V={VOCAB} {dtype}"


def print_ours(per_step, flops, calls, name):
    keys = sorted({k for s in per_step for k in s}, key=str)
    med = {k: 1e3 * statistics.median(s.get(k, 0.0) for s in per_step) for k in keys}
    total = med[("step", "")]
    print(f"\n## ours, {name}: {total:.1f} ms/step (median of {len(per_step)} steps)\n")
    print("| op | phase | calls/step | ms/step | share | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for k in sorted(keys, key=lambda k: -med[k]):
        if k == ("step", ""):
            continue
        rate = f"{flops[k] / med[k] * 1e-6:.0f}" if flops.get(k) else ""
        n = f"{calls[k]:.0f}" if k in calls else ""
        print(f"| {k[0]} | {k[1]} | {n} | {med[k]:.2f} | {med[k] / total:.1%} | {rate} |")
    by_cat = collections.defaultdict(float)
    for k in keys:
        if k != ("step", "") and " > " not in k[0] and not k[0].startswith("("):   # an inner op's time is inside its outer op's
            by_cat["Python overhead (engine)" if k[0].startswith("engine") else category(k[0])] += med[k]
    print_categories(by_cat, total)


def print_categories(by_cat, total):
    print("\n| category | ms/step | share |")
    print("|---|---|---|")
    for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"| {cat} | {ms:.2f} | {ms / total:.1%} |")


def profile_torch(spec, batches, warmup, steps, model_seed=0):
    import torch
    from test_model import torch_mirror

    spec = dict(spec)
    spec.pop("batch_size")
    torch.set_num_threads(len(os.sched_getaffinity(0)))   # the cores this process may use (taskset)
    model = GPT(GPTConfig(vocab_size=VOCAB, **spec), rng=np.random.default_rng(model_seed))
    step = torch_training_step(torch_mirror(model))

    for i in range(warmup):
        step(*batches[i % len(batches)])
    wall = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            t0 = time.perf_counter()
            step(*batches[(warmup + i) % len(batches)])
            wall.append(time.perf_counter() - t0)
    total = 1e3 * statistics.median(wall)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    print(f"\n## PyTorch (torch.profiler, self CPU time per op): {total:.1f} ms/step under the profiler\n")
    print("| op | calls/step | ms/step | share |")
    print("|---|---|---|---|")
    by_cat = collections.defaultdict(float)
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total):
        ms = e.self_cpu_time_total / 1e3 / steps
        by_cat[category(e.key)] += ms
        if ms / total >= 0.005:
            print(f"| {e.key} | {e.count / steps:.0f} | {ms:.2f} | {ms / total:.1%} |")
    by_cat["Python and dispatch (step minus op self times)"] = total - sum(by_cat.values())
    print_categories(by_cat, total)


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small", help="(default %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed steps (default 30 small, 2 large)")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first (default %(default)s)")
    parser.add_argument("--no-torch", action="store_true", help="profile ours only")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="our step's dtype (PyTorch's stays float32) (default %(default)s)")
    parser.add_argument("--null-gemm", action="store_true",
                        help="bf16: MKL's GEMM calls do nothing, to time the rest of the step (default off)")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    spec = dict(CONFIGS[args.config])
    steps = args.steps or (30 if args.config == "small" else 2)
    B, T = spec["batch_size"], spec["block_size"]
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, VOCAB, (B, T)), rng.integers(0, VOCAB, (B, T))) for _ in range(args.warmup + steps)]
    print(f"# {os.cpu_count()} cores, numpy {np.__version__}, kernels {'on' if backend.kernels_enabled() else 'off'}, "
          f"load average {os.getloadavg()[0]:.2f}")
    if args.dtype == "bfloat16":
        reason = precision.unsupported_reason("bfloat16", "cpu")
        if reason is not None:
            sys.exit(f"profile_step.py: {reason}")
        time_gemms()
        if args.null_gemm:
            null_gemm()
            print("# --null-gemm: MKL's bf16 GEMM calls do nothing; times are the step outside them")
    elif args.null_gemm:
        sys.exit("profile_step.py: --null-gemm needs --dtype bfloat16")
    print_ours(*profile_ours(dict(spec), batches, args.warmup, steps, args.dtype))
    if not args.no_torch:
        profile_torch(spec, batches, args.warmup, steps)


if __name__ == "__main__":
    main()
