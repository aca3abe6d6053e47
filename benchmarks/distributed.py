"""Data-parallel training steps: throughput of K ranks (CPU processes or GPUs), the communication left
exposed after backward, optimizer memory per rank with ZeRO-1, and the weights after a few steps.

    python benchmarks/distributed.py --recipe small                                   # 1 rank (2 BLAS threads here)
    mpiexec -n 2 python benchmarks/distributed.py --recipe small                      # 2 ranks x 1 thread
    mpirun -np 2 python benchmarks/distributed.py --recipe large --device cuda [--zero 1] [--no-overlap]
    python benchmarks/distributed.py --recipe large --device cuda --batch 128 --steps 3 --save one.npz   # the check
    mpirun -np 2 python benchmarks/distributed.py --recipe gpt2 --device cuda

Recipes: small = 4x128 (T=64, V=65, batch 12 per rank), large = 6x384 (T=256, V=65, batch 64 per rank),
gpt2 = GPT-2 small's shape (12x768, 12 heads, T=1024, the BPE vocabulary's 50,257 ids, batch 8 per rank);
dropout 0, float32, AdamW (0.9, 0.99), weight decay 0.1, clipping at 1.0, lr 3e-4. Batches are random
token ids drawn as train() draws them (one generator, the global batch, rank r's rows). Each step is timed
to its end (a device sync on a GPU); the figures are medians over --steps after --warmup steps, and the
throughput counts the whole job's tokens. Rank 0 prints one JSON line; --save writes rank 0's weights
after the steps (float32 .npz) to compare runs.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinygrad_llm import backend, distributed  # noqa: E402  (before NumPy: OpenBLAS's thread timeout)
import numpy as np  # noqa: E402
from tinygrad_llm.model import GPT, GPTConfig  # noqa: E402
from tinygrad_llm.optim import param_groups  # noqa: E402

RECIPES = {"small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch=12),
           "large": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=64),
           "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch=8, vocab=50257)}
VOCAB = 65   # the character vocabulary of the Shakespeare recipes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=RECIPES, default="small", help="model and batch (default small)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    parser.add_argument("--batch", type=int, default=None, help="windows per rank (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--zero", type=int, choices=(0, 1), default=0, help="1: ZeRO-1 (default 0)")
    parser.add_argument("--no-overlap", action="store_true", help="all-reduce only after backward")
    parser.add_argument("--bucket_mb", type=float, default=None, help="bucket size in MiB (default: automatic)")
    parser.add_argument("--save", default=None, help="write rank 0's weights after the steps to this .npz")
    args = parser.parse_args()
    recipe = dict(RECIPES[args.recipe])
    batch = args.batch or recipe.pop("batch")
    recipe.pop("batch", None)
    vocab = recipe.pop("vocab", VOCAB)

    world = distributed.world()
    world.begin()
    world.setup(args.device)
    model = GPT(GPTConfig(vocab_size=vocab, dropout=0.0, **recipe), rng=np.random.default_rng(0)).to(args.device)
    dp = distributed.DataParallel(world, model, zero=args.zero, overlap=not args.no_overlap,
                                  bucket_bytes=int(args.bucket_mb * 2**20) if args.bucket_mb else None)
    optimizer = dp.optimizer(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.99))
    data_rng = np.random.default_rng(1)
    T = recipe["block_size"]

    def sync():
        if args.device == "cuda":
            backend.cupy_module().cuda.Device().synchronize()

    times, waits = [], []
    for step in range(args.warmup + args.steps):
        sync()
        start, wait_before = time.perf_counter(), dp.comm_wait_s
        ids = data_rng.integers(0, vocab, size=(batch * world.size, T + 1))
        rows = ids[world.rank * batch:(world.rank + 1) * batch]
        x, y = np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])
        _, loss = model(x, y)
        dp.backward(loss)
        dp.clip_grad_norm(1.0)
        optimizer.step()
        optimizer.zero_grad()
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            waits.append(dp.comm_wait_s - wait_before)
    step_s = statistics.median(times)
    params = sum(p.size for p in model.parameters())
    optimizer_bytes = optimizer.optimizer_bytes() if args.zero else sum(
        a.nbytes for s in optimizer.state.values() for a in s.values() if hasattr(a, "nbytes"))
    result = {"ranks": world.size, "device": args.device, "recipe": args.recipe, "batch_per_rank": batch,
              "zero": args.zero, "overlap": not args.no_overlap, "buckets": len(dp.buckets), "params": params,
              "step_ms": round(1000 * step_s, 2), "step_ms_min": round(1000 * min(times), 2),
              "tokens_per_s": round(world.size * batch * T / step_s),
              "exposed_wait_ms": round(1000 * statistics.median(waits), 3),
              "optimizer_MiB_per_rank": round(optimizer_bytes / 2**20, 2),
              "blas_threads": world.cores if world.size > 1 else None}
    if args.device == "cuda":
        pool = backend.cupy_module().get_default_memory_pool()
        # the pool keeps freed blocks for reuse, so its size after the steps is their high-water mark
        result["gpu_pool_MiB"] = round(pool.total_bytes() / 2**20)
    if world.is_main:
        print(json.dumps(result), flush=True)
        if args.save:
            np.savez(args.save, **{f"p{i}": backend.to_device(p.data, "cpu") for i, p in enumerate(model.parameters())})
    world.end()


if __name__ == "__main__":
    main()
