"""The default tiny-Shakespeare run, ours beside a PyTorch loop of the same recipe, one after the other in one process.

    python benchmarks/shakespeare_vs_torch.py                                  # the full comparison (2000 iterations each)
    python benchmarks/shakespeare_vs_torch.py --order torch-first --json out.json
    python benchmarks/shakespeare_vs_torch.py --max_iters 20 --eval_interval 10 --eval_iters 2 --dtype float64

The recipe is TrainConfig's defaults (the tiny-Shakespeare character recipe): 4 layers, 4 heads, 128 wide, block 64, batch 12,
lr 1e-3 cosine to 1e-4 after 100 warmup iterations, AdamW betas (0.9, 0.99), weight decay 0.1 on 2-D weights
only, clip 1.0, no dropout, evaluation every 250 iterations on 20 batches of each split, char-level.

(a) ours: `tinygrad_llm.train.train(TrainConfig(...))`, as examples/train_shakespeare.py runs it (evaluations,
    metrics.jsonl, loss.png, best checkpoint; only the closing text sample is off: sample_chars=0). To time
    each step, the module's `train_step` and `estimate_loss` are wrapped in a timer (one perf_counter pair).
(b) PyTorch, eager, written here: the mirror from tests/test_model.py loaded with the initial weights of our
    GPT built from the same seed; the training batches drawn with tinygrad_llm.data.get_batch from the same
    np.random.Generator(seed) right after that init, as train() draws them; evaluations from
    np.random.default_rng((seed, iter)) as train.estimate_loss draws them; torch.optim.AdamW with the same
    two parameter groups, torch.nn.utils.clip_grad_norm_, lr from tinygrad_llm.optim.cosine_lr; the best
    checkpoint saved with torch.save when the val loss improves (as ours keeps one).

Both trajectories start from the same weights and see the same batches, so the val losses side by side say
whether a gap is the library (float32 rounding only, they stay close) or the recipe. With --dtype float64
the two loops agree to ~1e-8 (the max abs difference is printed): the recipe is the same.

Wall time = the training loop as train() measures it: from the first iteration to the last evaluation,
evaluations and checkpoint writes included, data preparation and model construction excluded.
Threads: --threads sets torch.set_num_threads (default: all cores). NumPy's OpenBLAS thread count is
fixed when NumPy is imported, by OPENBLAS_NUM_THREADS (unset: all cores); it cannot be changed here.
"""
import contextlib
import dataclasses
import json
import math
import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "22")  # before NumPy loads: idle BLAS threads sleep after ~1.5 ms (README, Threads)
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tinygrad_llm  # noqa: E402,F401
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cli_args import DEFAULT_TEXT, Parser, non_negative_int, positive_int, require_file  # noqa: E402
from test_model import torch_mirror  # noqa: E402  (the PyTorch mirror of our GPT)

import tinygrad_llm.train as train_module  # noqa: E402
from tinygrad_llm import backend  # noqa: E402
from tinygrad_llm.data import get_batch, prepare  # noqa: E402
from tinygrad_llm.model import GPT  # noqa: E402
from tinygrad_llm.optim import cosine_lr  # noqa: E402
from tinygrad_llm.train import TrainConfig, train  # noqa: E402



# ---- (a) ours, through train() ------------------------------------------------------------------

@contextlib.contextmanager
def _timed_train_module(log):
    """Wrap train_module.train_step / estimate_loss (looked up by train() at call time) with timers."""
    step, estimate = train_module.train_step, train_module.estimate_loss

    def timed_step(*args, **kwargs):
        t0 = time.perf_counter()
        loss = step(*args, **kwargs)
        log["step_s"].append(time.perf_counter() - t0)
        log["train_losses"].append(loss)
        return loss

    def timed_estimate(model, config, it):
        t0 = time.perf_counter()
        losses = estimate(model, config, it)
        log["eval_s"] += time.perf_counter() - t0
        log["evals"].append({"iter": it, "train": losses["train"], "val": losses["val"]})
        return losses

    train_module.train_step, train_module.estimate_loss = timed_step, timed_estimate
    try:
        yield
    finally:
        train_module.train_step, train_module.estimate_loss = step, estimate


def run_ours(config):
    log = {"step_s": [], "train_losses": [], "eval_s": 0.0, "evals": []}
    with _timed_train_module(log):
        summary = train(config)
    return dict(log, wall_s=summary["elapsed_s"], best_val_loss=summary["best_val_loss"],
                best_iter=summary["best_iter"], final_train_loss=summary["final_train_loss"],
                final_val_loss=summary["final_val_loss"])


# ---- (b) the PyTorch loop of the same recipe -----------------------------------------------------

def torch_estimate_loss(mirror, config, it):
    """train.estimate_loss, in PyTorch: the same batches (generator seeded with (seed, it)), the same means."""
    eval_rng = np.random.default_rng((config.seed, it))
    mirror.eval()
    losses = {}
    with torch.no_grad():
        for split in ("train", "val"):
            total = 0.0
            for _ in range(config.eval_iters):
                x, y = get_batch(config.data_dir, split, config.batch_size, config.block_size, eval_rng)
                _, loss = mirror(torch.from_numpy(x), torch.from_numpy(y))
                total += loss.item()
            losses[split] = total / config.eval_iters
    mirror.train()
    return losses


def run_torch(config, vocab_size):
    rng = np.random.default_rng(config.seed)            # as train(): init first, then the training batches
    mirror = torch_mirror(GPT(config.model_config(vocab_size), rng=rng))
    params = list(mirror.parameters())                  # the tied embedding appears once
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2))
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "ckpt.pt"
    tokens_per_iter = config.batch_size * config.grad_accum * config.block_size
    log = {"step_s": [], "train_losses": [], "eval_s": 0.0, "evals": []}
    best_val_loss, best_iter, last = math.inf, None, {"train": None, "val": None}

    run_start = time.perf_counter()
    for it in range(config.max_iters + 1):
        lr = cosine_lr(it, config.lr, config.min_lr, config.warmup_iters, config.max_iters)
        if it % config.eval_interval == 0 or it == config.max_iters:
            t0 = time.perf_counter()
            last = torch_estimate_loss(mirror, config, it)
            log["eval_s"] += time.perf_counter() - t0
            log["evals"].append({"iter": it, "train": last["train"], "val": last["val"]})
            improved = last["val"] < best_val_loss
            if improved:
                best_val_loss, best_iter = last["val"], it
                tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
                torch.save({"model": mirror.state_dict(), "optimizer": optimizer.state_dict(), "iter": it,
                            "best_val_loss": best_val_loss}, tmp)
                os.replace(tmp, ckpt_path)
            print(f"iter {it}: train loss {last['train']:.4f}, val loss {last['val']:.4f}"
                  + (" (best so far, saved)" if improved else ""), flush=True)
        if it == config.max_iters:
            break

        t0 = time.perf_counter()
        mirror.train()
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(config.grad_accum):
            x, y = get_batch(config.data_dir, "train", config.batch_size, config.block_size, rng)
            _, loss = mirror(torch.from_numpy(x), torch.from_numpy(y))
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"PyTorch loop: loss is {value} at iteration {it}")
            (loss * (1.0 / config.grad_accum)).backward()
            total += value
        norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip) if config.grad_clip else None
        if norm is not None and not math.isfinite(float(norm)):
            raise FloatingPointError(f"PyTorch loop: gradient norm is {float(norm)} at iteration {it}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0
        log["step_s"].append(step_s)
        log["train_losses"].append(total / config.grad_accum)
        done = it + 1
        if config.log_interval and (it % config.log_interval == 0 or it == config.max_iters - 1):
            train_s = sum(log["step_s"])
            print(f"iter {it:5d} | loss {total / config.grad_accum:.4f} | lr {lr:.2e} | "
                  f"{1000 * train_s / done:7.1f} ms/iter | {tokens_per_iter * done / train_s:8,.0f} tokens/s", flush=True)
    wall_s = time.perf_counter() - run_start
    return dict(log, wall_s=wall_s, best_val_loss=best_val_loss, best_iter=best_iter,
                final_train_loss=last["train"], final_val_loss=last["val"])


# ---- report --------------------------------------------------------------------------------------

def figures(result, tokens_per_iter):
    steps = result["step_s"]
    train_s = sum(steps)
    return {"best_val_loss": result["best_val_loss"], "best_iter": result["best_iter"],
            "final_train_loss": result["final_train_loss"], "final_val_loss": result["final_val_loss"],
            "wall_s": result["wall_s"], "step_total_s": train_s, "eval_total_s": result["eval_s"],
            "other_s": result["wall_s"] - train_s - result["eval_s"],
            "median_ms_per_iter": 1000 * statistics.median(steps) if steps else None,
            "first_step_ms": 1000 * steps[0] if steps else None,
            "tokens_per_s": tokens_per_iter * len(steps) / train_s if train_s else None,
            "evals": result["evals"], "train_losses": result["train_losses"]}


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_TEXT, help="tiny Shakespeare text (default %(default)s)")
    parser.add_argument("--max_iters", type=positive_int, default=TrainConfig.max_iters, help="(default %(default)s)")
    parser.add_argument("--eval_interval", type=positive_int, default=TrainConfig.eval_interval, help="(default %(default)s)")
    parser.add_argument("--eval_iters", type=positive_int, default=TrainConfig.eval_iters, help="(default %(default)s)")
    parser.add_argument("--log_interval", type=positive_int, default=TrainConfig.log_interval, help="(default %(default)s)")
    parser.add_argument("--seed", type=non_negative_int, default=TrainConfig.seed, help="(default %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="float64 checks that the two loops follow the same recipe (losses agree to ~1e-8)")
    parser.add_argument("--order", choices=("ours-first", "torch-first"), default="ours-first", help="(default %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    require_file(parser, "--data", args.data)
    return args


def main(argv=None):
    args = parse_args(argv)
    text_path = args.data.resolve()
    torch.set_num_threads(args.threads)
    openblas = os.environ.get("OPENBLAS_NUM_THREADS")
    thread_note = (f"torch threads {torch.get_num_threads()}; NumPy's OpenBLAS threads are fixed at import by "
                   f"OPENBLAS_NUM_THREADS={openblas if openblas is not None else 'unset (all cores)'}")

    with tempfile.TemporaryDirectory(prefix="shakespeare_vs_torch_") as tmp:
        tmp = Path(tmp)
        meta = prepare(text_path, tmp / "data")             # not timed
        base = TrainConfig(data_dir=str(tmp / "data"), max_iters=args.max_iters, eval_interval=args.eval_interval,
                           eval_iters=args.eval_iters, log_interval=args.log_interval, seed=args.seed,
                           dtype=args.dtype, sample_chars=0)
        tokens_per_iter = base.batch_size * base.grad_accum * base.block_size
        machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
                   f"kernels {'on' if backend.kernels_enabled() else 'off'}")
        print(f"# {machine}; {thread_note}")
        print(f"# {text_path}: vocabulary {meta['vocab_size']}, {meta['train_tokens']:,} train / "
              f"{meta['val_tokens']:,} val tokens; {args.max_iters} iterations, {args.dtype}, order {args.order}")
        load_before = os.getloadavg()
        if load_before[0] > 0.5:
            print(f"# warning: load average {load_before[0]:.2f} before the runs: other jobs share the cores, and "
                  "both libraries' spinning BLAS/OpenMP threads slow down many-fold when oversubscribed")
        runners = {"ours": lambda: run_ours(dataclasses.replace(base, out_dir=str(tmp / "ours"))),
                   "torch": lambda: run_torch(dataclasses.replace(base, out_dir=str(tmp / "torch")), meta["vocab_size"])}
        names = ("ours", "torch") if args.order == "ours-first" else ("torch", "ours")
        results = {}
        for name in names:
            print(f"\n=== {'ours (tinygrad_llm.train.train)' if name == 'ours' else 'PyTorch eager loop'} ===", flush=True)
            results[name] = figures(runners[name](), tokens_per_iter)
        load_after = os.getloadavg()

    ours, ref = results["ours"], results["torch"]
    print(f"\n## val loss at each evaluation (same initial weights, same batches; {args.dtype})")
    print("| iter | ours train | PyTorch train | ours val | PyTorch val | val ours - PyTorch |")
    print("|---|---|---|---|---|---|")
    for a, b in zip(ours["evals"], ref["evals"]):
        print(f"| {a['iter']} | {a['train']:.4f} | {b['train']:.4f} | {a['val']:.4f} | {b['val']:.4f} | {a['val'] - b['val']:+.2e} |")
    step_diff = max((abs(a - b) for a, b in zip(ours["train_losses"], ref["train_losses"])), default=0.0)
    eval_diff = max((abs(a[s] - b[s]) for a, b in zip(ours["evals"], ref["evals"]) for s in ("train", "val")), default=0.0)
    print(f"max abs difference ours - PyTorch: training-step losses {step_diff:.3e} over {len(ours['train_losses'])} steps, "
          f"evaluation losses {eval_diff:.3e}")

    def ratio(key):
        return ours[key] / ref[key] if ours[key] and ref[key] else None

    ratios = {key: ratio(key) for key in ("wall_s", "median_ms_per_iter", "tokens_per_s", "best_val_loss")}
    print(f"\n## tiny Shakespeare, char, {args.max_iters} iterations, {args.dtype}, order {args.order} "
          f"(load average {load_before[0]:.2f} before, {load_after[0]:.2f} after)")
    print(f"# {machine}; {thread_note}")
    print("| | best val loss (iter) | final train / val loss | wall s (steps + eval + other) | median ms/iter | tokens/s |")
    print("|---|---|---|---|---|---|")
    for label, r in (("ours", ours), ("PyTorch eager", ref)):
        print(f"| {label} | {r['best_val_loss']:.4f} ({r['best_iter']}) | {r['final_train_loss']:.4f} / {r['final_val_loss']:.4f} "
              f"| {r['wall_s']:.1f} ({r['step_total_s']:.1f} + {r['eval_total_s']:.1f} + {r['other_s']:.1f}) "
              f"| {r['median_ms_per_iter']:.1f} | {r['tokens_per_s']:,.0f} |")
    fmt = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
    print(f"| ratio ours/PyTorch | {fmt(ratios['best_val_loss'])} | | {fmt(ratios['wall_s'])} "
          f"| {fmt(ratios['median_ms_per_iter'])} | {fmt(ratios['tokens_per_s'])} |")
    print("(wall and ms/iter ratios above 1x, and a tokens/s ratio below 1x, mean ours is slower; "
          "'other' = checkpoint writes, metrics.jsonl, loss.png, progress lines)")

    if args.json:
        report = {"machine": machine, "threads": {"torch": torch.get_num_threads(), "OPENBLAS_NUM_THREADS": openblas},
                  "data": str(text_path), "config": dataclasses.asdict(base), "order": args.order,
                  "load_average": {"before": load_before, "after": load_after},
                  "ours": ours, "torch": ref, "ratio_ours_over_torch": ratios,
                  "max_abs_diff": {"train_step_losses": step_diff, "eval_losses": eval_diff}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
