"""One training step (forward, backward, AdamW step) of our GPT beside PyTorch's, same weights, one process.

    python benchmarks/train_step.py --config small --steps 20
    python benchmarks/train_step.py --config large --steps 5

The PyTorch model is the mirror from tests/test_model.py, loaded with our initial weights, float32,
eager. Both use every core (torch.set_num_threads(os.cpu_count()); NumPy's BLAS uses all by default).
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

from tinygrad_llm import backend  # noqa: E402
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
    return parser.parse_args(argv)


def main():
    args = parse_args()
    spec = dict(CONFIGS[args.config])
    B = spec.pop("batch_size")
    steps = args.steps or (20 if args.config == "small" else 5)
    torch.set_num_threads(os.cpu_count())

    cfg = GPTConfig(vocab_size=VOCAB, **spec)
    T = cfg.block_size
    model = GPT(cfg, rng=np.random.default_rng(0))
    mirror = torch_mirror(model)
    opt = AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS)
    torch_step = torch_training_step(mirror)

    def ours_step(x, y):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, VOCAB, (B, T)), rng.integers(0, VOCAB, (B, T))) for _ in range(args.warmup + steps)]
    times = {"ours": [], "torch": []}
    first_losses = (ours_step(*batches[0]), torch_step(*batches[0]))   # same weights, same batch: same loss
    per_block = -(-steps // args.rounds)
    for r in range(args.rounds):
        for name, step in (("ours", ours_step), ("torch", torch_step)):
            for i in range(args.warmup + per_block):
                t0 = time.perf_counter()
                step(*batches[i % len(batches)])
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)

    ours_ms = statistics.median(times["ours"]) * 1e3
    torch_ms = statistics.median(times["torch"]) * 1e3
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
          f"torch {torch.__version__}, kernels {'on' if backend.kernels_enabled() else 'off'}; "
          f"first-step loss ours {first_losses[0]:.6f} torch {first_losses[1]:.6f}; "
          f"{len(times['ours'])} timed steps each in {args.rounds} blocks after {args.warmup} warm-up steps")
    print("| config | ours ms/step | PyTorch ms/step | ratio ours/PyTorch | ours tokens/s |")
    print("|---|---|---|---|---|")
    name = f"{cfg.n_layer}x{cfg.n_embd} T={T} B={B} V={VOCAB}"
    print(f"| {name} | {ours_ms:.1f} | {torch_ms:.1f} | {ours_ms / torch_ms:.2f}x | {B * T / ours_ms * 1e3:,.0f} |")


if __name__ == "__main__":
    main()
