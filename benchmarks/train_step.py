"""One training step (forward, backward, AdamW step) of our GPT beside PyTorch's, same weights, one process.

    python benchmarks/train_step.py --config small --steps 20
    python benchmarks/train_step.py --config large --steps 5
    python benchmarks/train_step.py --dtype bfloat16 --config large --steps 5

--dtype bfloat16 times four steps in one process: ours and PyTorch's in float32, ours in bfloat16 (bf16
products through MKL, precision.py's policy) and PyTorch's under torch.autocast("cpu", dtype=torch.bfloat16),
with GFLOP/s (6 N + 12 L T C flops a token: N the weights of the matrix products, the LM head's included;
attention counted whole, as if not causal) and the share of the bf16 GEMM peak measured here (MKL,
2048 x 2048 x 2048). On a CPU without bf16 units it says so in one line and exits 1: emulated bf16 is no
measurement of bf16 speed. With TINYGRAD_LLM_CPU_BF16_EMULATION=1 it runs anyway and labels every figure
as emulated.

The PyTorch model is the mirror from tests/test_model.py, loaded with our initial weights, float32,
eager. Both use every core this process may run on: torch.set_num_threads(len(os.sched_getaffinity(0))), so
`taskset -c 0,1` gives both libraries two cores (NumPy's BLAS and our kernel threads follow the same mask).
The two run in alternating blocks (ours, PyTorch, ours, PyTorch), each block starting with untimed
warm-up steps: alternating every step would be unfair, as each library's idle threads spin for a while
after its call and steal the cores from the other's next call. Blocks still spread machine noise over
both. The medians of the timed steps are compared. Prints one markdown row for benchmarks/RESULTS.md.
"""
import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "22")  # before NumPy loads: idle BLAS threads sleep after ~1.5 ms (README, Threads)
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tinygrad_llm  # noqa: E402,F401
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cli_args import Parser, non_negative_int, positive_int  # noqa: E402
from test_model import torch_mirror  # noqa: E402  (the PyTorch mirror of our GPT)

from tinygrad_llm import backend, precision  # noqa: E402
from tinygrad_llm.model import GPT, GPTConfig  # noqa: E402
from tinygrad_llm.optim import AdamW, param_groups  # noqa: E402

CONFIGS = {
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "large": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64),
}
VOCAB = 65
LR, BETAS, WEIGHT_DECAY = 1e-3, (0.9, 0.99), 0.1


def torch_training_step(mirror):
    """step(x, y) -> loss: forward, backward and a torch.optim.AdamW step of the mirror (the same two
    parameter groups as param_groups: decay on matrices only)."""
    params = list(mirror.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=LR, betas=BETAS)

    def step(x, y):
        _, loss = mirror(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small", help="(default %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed steps each (default 20 small, 5 large)")
    parser.add_argument("--warmup", type=non_negative_int, default=2,
                        help="untimed steps at the start of each block (default %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=2, help="blocks of steps for each library (default %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: our bf16 and PyTorch's autocast steps beside both float32 ones (default %(default)s)")
    parser.add_argument("--no-torch-autocast", action="store_true",
                        help="bfloat16: leave PyTorch's autocast step out (emulated, it ran at ~1 GFLOP/s here: "
                             "hours for the 6x384 step)")
    return parser.parse_args(argv)


def torch_autocast_step(mirror):
    """As torch_training_step, with the forward and loss under torch.autocast("cpu", dtype=torch.bfloat16)."""
    step32 = torch_training_step(mirror)

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return step32(x, y)

    return step


def ours_training_step(model):
    opt = AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS)

    def step(x, y):
        with precision.weight_copies():   # bf16: each weight rounded once a step, as train.py does
            _, loss = model(x, y)
            loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    return step


def step_flops(cfg, B, T):
    """6 N + 12 L T C flops a token (forward and backward): N the matrix products' weights, the LM head's too."""
    C, L = cfg.n_embd, cfg.n_layer
    return B * T * (6 * (12 * L * C * C + VOCAB * C) + 12 * L * T * C)


def bf16_peak():
    """GFLOP/s of MKL's bf16 GEMM on 2048^3 (median of 5 after one warm-up), every thread."""
    from tinygrad_llm.kernels.cpu import mkl
    rng, n = np.random.default_rng(0), 2048
    a, b = (rng.integers(0x3F00, 0x3F80, (n, n)).astype(np.uint16) for _ in range(2))   # bf16 in [0.5, 1)
    out, times = np.empty((n, n), np.float32), []
    for i in range(6):
        t0 = time.perf_counter()
        mkl.gemm(a, b, out)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times[1:]) / 1e9


def conversion_ms(step, batch):
    """One more step, its float32 -> bf16 conversion passes timed (ms, summed over threads): what fusing them
    into the kernels that write their inputs could save at most. Attention's head split (qkv and dO to bf16
    head-major arrays) counts; its P and dS conversions happen inside its row passes and do not."""
    from tinygrad_llm.kernels.cpu import mixed, mixed_attention
    spent, originals = [], (mixed._to_bf16_flat, mixed_attention.split_heads)

    def timed(fn):
        def run(*args):
            t0 = time.perf_counter()
            fn(*args)
            spent.append(time.perf_counter() - t0)
        return run

    mixed._to_bf16_flat, mixed_attention.split_heads = (timed(fn) for fn in originals)
    try:
        step(*batch)
    finally:
        mixed._to_bf16_flat, mixed_attention.split_heads = originals
    return sum(spent) * 1e3


def refuse_without_bf16_units():
    """None, or the label of emulated figures; exits 1 (one line) where bf16 cannot be measured."""
    reason = precision.unsupported_reason("bfloat16", "cpu")
    if reason is not None:
        sys.exit(f"train_step.py: {reason}")
    flags = precision.cpu_flags() or ()
    if not any(f in flags for f in precision.CPU_BF16_FLAGS):
        return "EMULATED (no bf16 units; TINYGRAD_LLM_CPU_BF16_EMULATION=1): not a measurement of bf16 speed"
    return None


def main():
    args = parse_args()
    emulated = refuse_without_bf16_units() if args.dtype == "bfloat16" else None
    spec = dict(CONFIGS[args.config])
    B = spec.pop("batch_size")
    steps = args.steps or (20 if args.config == "small" else 5)
    torch.set_num_threads(len(os.sched_getaffinity(0)))   # the cores this process may use (taskset)

    cfg = GPTConfig(vocab_size=VOCAB, **spec)
    T = cfg.block_size
    model = GPT(cfg, rng=np.random.default_rng(0))
    steps_by_name = {"ours": ours_training_step(model), "torch": torch_training_step(torch_mirror(model))}
    if args.dtype == "bfloat16":
        model16 = GPT(GPTConfig(vocab_size=VOCAB, dtype="bfloat16", **spec), rng=np.random.default_rng(0))
        steps_by_name = {"ours float32": steps_by_name["ours"], "PyTorch float32": steps_by_name["torch"],
                         "ours bfloat16": ours_training_step(model16)}
        if not args.no_torch_autocast:
            steps_by_name["PyTorch autocast bf16"] = torch_autocast_step(torch_mirror(model))

    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, VOCAB, (B, T)), rng.integers(0, VOCAB, (B, T))) for _ in range(args.warmup + steps)]
    times = {name: [] for name in steps_by_name}
    first_losses = {name: step(*batches[0]) for name, step in steps_by_name.items()}   # same weights, same batch
    per_block = -(-steps // args.rounds)
    for r in range(args.rounds):
        for name, step in steps_by_name.items():
            for i in range(args.warmup + per_block):
                t0 = time.perf_counter()
                step(*batches[i % len(batches)])
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)

    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    losses = ", ".join(f"{name} {loss:.6f}" for name, loss in first_losses.items())
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
          f"torch {torch.__version__}, kernels {'on' if backend.kernels_enabled() else 'off'}; "
          f"first-step loss {losses}; "
          f"{len(times[next(iter(times))])} timed steps each in {args.rounds} blocks after {args.warmup} warm-up steps")
    name = f"{cfg.n_layer}x{cfg.n_embd} T={T} B={B} V={VOCAB}"
    if args.dtype == "float32":
        print("| config | ours ms/step | PyTorch ms/step | ratio ours/PyTorch | ours tokens/s |")
        print("|---|---|---|---|---|")
        print(f"| {name} | {ms['ours']:.1f} | {ms['torch']:.1f} | {ms['ours'] / ms['torch']:.2f}x | "
              f"{B * T / ms['ours'] * 1e3:,.0f} |")
        return
    peak, flops = bf16_peak(), step_flops(cfg, B, T)
    convert = conversion_ms(steps_by_name["ours bfloat16"], batches[0])
    if emulated:
        print(f"# {emulated}")
    print(f"# bf16 GEMM peak here (MKL, 2048^3): {peak:.0f} GFLOP/s; {flops / 1e9:.1f} GFLOP a step; our bf16 "
          f"step's float32 -> bf16 conversions: {convert:.1f} ms (summed over threads, one step)")
    print("| config | step | ms/step | GFLOP/s | share of bf16 peak | ratio to PyTorch's same-dtype step |")
    print("|---|---|---|---|---|---|")
    for step_name, other in (("ours float32", "PyTorch float32"), ("PyTorch float32", None),
                             ("ours bfloat16", "PyTorch autocast bf16"), ("PyTorch autocast bf16", None)):
        if step_name not in ms:
            continue
        ratio = f"{ms[step_name] / ms[other]:.2f}x" if other in ms else ""
        print(f"| {name} | {step_name}{' (emulated)' if emulated and 'bf' in step_name else ''} | "
              f"{ms[step_name]:.1f} | {flops / ms[step_name] / 1e6:.1f} | {flops / ms[step_name] / 1e6 / peak:.0%} | "
              f"{ratio} |")


if __name__ == "__main__":
    main()
