"""A LoRA fine-tuning step against a full fine-tuning step of the same GPT, one process: time and gradient memory.

    python benchmarks/lora_step.py --steps 10

Both steps are forward, backward and AdamW on the same batch of the 4-layer, 128-wide GPT (context 128,
batch 8, float32). The LoRA model has rank-8 adapters on every c_attn, c_proj and c_fc, all else frozen; the
frozen weights get no gradient (the ops skip what ctx.needs_input_grad does not ask for). The two run in
alternating blocks after untimed warm-up steps; medians of wall time and of the process's CPU time
(all threads) are compared: on a shared machine the CPU time is the steadier of the two. The gradient memory
counts the .grad of every Tensor the model holds, frozen ones included. Prints a markdown table.
"""
import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "22")  # before NumPy loads (README, Threads)
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinygrad_llm  # noqa: E402,F401  (before NumPy: OpenBLAS's thread timeout)
import numpy as np  # noqa: E402

from cli_args import Parser, positive_int  # noqa: E402
from tinygrad_llm.finetune import all_tensors  # noqa: E402
from tinygrad_llm.lora import apply_lora  # noqa: E402
from tinygrad_llm.model import GPT, GPTConfig  # noqa: E402
from tinygrad_llm.optim import AdamW  # noqa: E402


def gradient_bytes(model):
    """Bytes of gradients held by every Tensor of the model, trainable or frozen (each Tensor once)."""
    return sum(t.grad.nbytes for t in all_tensors(model).values() if t.grad is not None)


def step(model, opt, x, y):
    """One training step; returns (gradient bytes, forward seconds, backward seconds)."""
    t = time.perf_counter()
    _, loss = model(x, y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    grad_bytes = gradient_bytes(model)
    opt.step()
    opt.zero_grad()
    return grad_bytes, t1 - t, t2 - t1


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per block (default %(default)s)")
    parser.add_argument("--blocks", type=positive_int, default=3, help="alternating blocks per model (default %(default)s)")
    parser.add_argument("--rank", type=positive_int, default=8, help="LoRA rank, alpha = 2 rank (default %(default)s)")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    config = GPTConfig(vocab_size=513, block_size=128, n_layer=4, n_head=4, n_embd=128)
    full = GPT(config, rng=np.random.default_rng(0))
    lora = GPT(config, rng=np.random.default_rng(0))
    apply_lora(lora, args.rank, 2 * args.rank)
    models = {"full": (full, AdamW(full.parameters(), lr=1e-4)), "lora": (lora, AdamW(lora.parameters(), lr=1e-4))}
    rng = np.random.default_rng(1)
    x = rng.integers(0, 513, (8, 128))
    y = rng.integers(0, 513, (8, 128))
    times, cpu, grad_bytes = {"full": [], "lora": []}, {"full": [], "lora": []}, {}
    fwd, bwd = {"full": [], "lora": []}, {"full": [], "lora": []}
    for _ in range(args.blocks):
        for name, (model, opt) in models.items():
            for _ in range(2):
                step(model, opt, x, y)
            for _ in range(args.steps):
                t, c = time.perf_counter(), time.process_time()
                grad_bytes[name], f, b = step(model, opt, x, y)
                times[name].append(time.perf_counter() - t)
                fwd[name].append(f)
                bwd[name].append(b)
                cpu[name].append(time.process_time() - c)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    med_cpu = {k: statistics.median(v) * 1000 for k, v in cpu.items()}
    med_f = {k: statistics.median(v) * 1000 for k, v in fwd.items()}
    med_b = {k: statistics.median(v) * 1000 for k, v in bwd.items()}
    n = {k: sum(p.size for p in m.parameters()) for k, (m, _) in models.items()}
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; {args.blocks} blocks x {args.steps} steps")
    print("| model (4x128, batch 8x128, float32) | trainable params | gradient memory | median step (wall) | ratio | "
          "median step (CPU time, all threads) | ratio | forward | ratio | backward | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k, label in (("full", "full fine-tuning"), ("lora", f"LoRA rank {args.rank}")):
        print(f"| {label} | {n[k]:,} | {grad_bytes[k] / 2**20:.2f} MiB | {med[k]:.1f} ms | {med[k] / med['full']:.2f} | "
              f"{med_cpu[k]:.1f} ms | {med_cpu[k] / med_cpu['full']:.2f} | {med_f[k]:.1f} ms | {med_f[k] / med_f['full']:.2f} | "
              f"{med_b[k]:.1f} ms | {med_b[k] / med_b['full']:.2f} |")


if __name__ == "__main__":
    main()
