"""The training loop as a library function: `train(TrainConfig(...)) -> summary dict`.

    from tinygrad_llm.train import TrainConfig, parse_overrides, train
    config = parse_overrides(["--max_iters=500", "--lr=3e-4"], TrainConfig(data_dir="data/shakespeare/char"))
    summary = train(config)          # -> {"best_val_loss": ..., "best_iter": ..., "sample": ..., ...}

What one run does, step by step:
- one np.random.Generator seeded with `seed` drives the model's init, dropout and the training batches;
  evaluation batches come from their own generator seeded with (seed, iter), so how often one
  evaluates never changes the training trajectory;
- each iteration sums the gradients of `grad_accum` micro-batches of `batch_size` windows, each
  micro-batch loss scaled by 1/grad_accum, so k micro-batches give the gradient of one batch k times
  larger; clipping then sees that whole-batch gradient (nanoGPT issue #168);
- AdamW with weight decay on the matrices only, lr on a cosine schedule with linear warmup;
- every `eval_interval` iterations (and at the last): the mean loss over `eval_iters` batches of each
  split in eval mode without a graph, one line in out_dir/metrics.jsonl, out_dir/loss.png redrawn,
  and out_dir/ckpt.safetensors rewritten when the val loss is the best so far (atomically);
- a NaN/Inf loss or gradient norm stops the run: the step's forward/backward is re-run under
  detect_anomaly to name the op, and the error names both; the best checkpoint is left as it was.

Resuming (`init_from="resume"`) reads ckpt.safetensors: weights, optimizer, iteration, best val loss and
the generator's state, so the resumed run continues bit for bit as the uninterrupted one would have.
The checkpoint is taken at an evaluation, before that iteration's training step.
"""
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .checkpoint import load_checkpoint, save_checkpoint
from .data import get_batch, load_meta
from .fileio import atomic_write
from .model import GPT, GPTConfig
from .optim import AdamW, clip_grad_norm, cosine_lr, param_groups
from .tensor import detect_anomaly, no_grad
from .tokenizer import tokenizer_from_dict

CHECKPOINT_NAME = "ckpt.safetensors"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
CHOICES = {"init_from": ("scratch", "resume"), "dtype": ("float32", "float64"), "device": ("cpu", "cuda"),
           "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"), "position": ("learned", "rope")}


@dataclass
class TrainConfig:
    """Everything one run needs; defaults are the tiny-Shakespeare character recipe (DESIGN.md section 6)."""
    data_dir: str = "data/shakespeare/char"   # a folder written by data.prepare
    out_dir: str = "out"                      # checkpoint, metrics.jsonl, loss.png
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"
    mlp: str = "gelu"
    position: str = "learned"
    # optimization
    batch_size: int = 12                      # windows per micro-batch
    grad_accum: int = 1                       # micro-batches per optimizer step
    max_iters: int = 2000                     # optimizer steps
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0                    # 0 turns clipping off
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 50                    # a progress line every this many iterations (0: none)
    # run
    seed: int = 1337
    dtype: str = "float32"
    device: str = "cpu"
    init_from: str = "scratch"                # "scratch" | "resume" (from out_dir/ckpt.safetensors)
    sample_chars: int = 300                   # length of the closing text sample (0: none)

    def __post_init__(self):
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_interval", "eval_iters")
        problems = [f"{name} must be a positive integer, got {getattr(self, name)!r}" for name in positive
                    if not _is_int(getattr(self, name)) or getattr(self, name) <= 0]
        problems += [f"{name} must be a non-negative integer, got {getattr(self, name)!r}"
                     for name in ("max_iters", "warmup_iters", "log_interval", "sample_chars")
                     if not _is_int(getattr(self, name)) or getattr(self, name) < 0]
        problems += [f"{name}={getattr(self, name)!r}: expected one of {allowed}"
                     for name, allowed in CHOICES.items() if getattr(self, name) not in allowed]
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            problems.append(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            problems.append(f"betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if self.weight_decay < 0 or self.grad_clip < 0:
            problems.append(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay}, {self.grad_clip}")
        if _is_int(self.n_embd) and _is_int(self.n_head) and self.n_head > 0 and self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    def model_config(self, vocab_size):
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias,
                         dtype=self.dtype, norm=self.norm, mlp=self.mlp, position=self.position)


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def parse_overrides(args, config=None):
    """Apply `--key=value` arguments to a TrainConfig (a new one; `config` is left as it was).

    Values are converted to the field's type: "--max_iters=500", "--lr=3e-4", "--bias=false".
    An unknown key, a malformed argument or a value of the wrong type raises ValueError saying so.
    """
    config = config or TrainConfig()
    types = {f.name: f.type for f in fields(TrainConfig)}
    changes = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"expected --key=value, got {arg!r}")
        key, text = arg[2:].split("=", 1)
        if key not in types:
            raise ValueError(f"unknown key {key!r}; valid keys: {', '.join(types)}")
        changes[key] = _convert(key, text, types[key])
    return dataclasses.replace(config, **changes)


def _convert(key, text, kind):
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(kind, kind)  # annotations may be strings
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--{key} expects true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{key} expects {'an integer' if kind is int else 'a number'}, got {text!r}") from None


class TrainingDiverged(FloatingPointError):
    """A NaN or Inf loss (or gradient norm) stopped training; the message names the step and the op."""


def train(config):
    """Run the loop described in the module docstring; returns a summary dict.

    Summary keys: best_val_loss, best_iter, iters (optimizer steps taken, all runs together),
    final_train_loss, final_val_loss (the last evaluation), elapsed_s (this run), tokens_per_s,
    checkpoint (its path), sample (the decoded closing text, or None) and model (the trained GPT).
    """
    out_dir = Path(config.out_dir)
    meta = load_meta(config.data_dir)
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    ckpt_path = out_dir / CHECKPOINT_NAME
    if config.init_from == "resume" and not ckpt_path.is_file():
        raise FileNotFoundError(f"init_from=resume but there is no checkpoint at {ckpt_path}")

    rng = np.random.default_rng(config.seed)
    model = GPT(config.model_config(meta["vocab_size"]), rng=rng)
    model.to(config.device)  # before a resume, so that the optimizer state is loaded onto the same device
    optimizer = AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                      betas=(config.beta1, config.beta2))
    start_iter, best_val_loss, best_iter, previous_elapsed = 0, math.inf, None, 0.0
    if config.init_from == "resume":
        saved = load_checkpoint(ckpt_path, model, optimizer)
        lacking = [key for key in ("step", "best_val_loss", "rng_state") if key not in saved]
        if lacking:
            raise ValueError(f"{ckpt_path} lacks the training state {lacking} needed to resume "
                             "(was it written by another tool?)")
        if saved.get("tokenizer", meta["tokenizer"]) != meta["tokenizer"]:
            raise ValueError(f"{ckpt_path} was trained with another tokenizer than the one in {config.data_dir}/meta.json; "
                             "resume with the data_dir the run was started with")
        rng.bit_generator.state = saved["rng_state"]
        start_iter, best_val_loss, best_iter = saved["step"], saved["best_val_loss"], saved["step"]
        previous_elapsed = saved.get("elapsed_s", 0.0)
        print(f"resuming from {ckpt_path} at iteration {start_iter} (best val loss {best_val_loss:.4f})")

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / METRICS_NAME
    if config.init_from == "scratch":
        metrics_path.write_text("")
    records = _read_records(metrics_path, before_iter=start_iter)

    tokens_per_iter = config.batch_size * config.grad_accum * config.block_size
    print(f"model: {model.num_params():,} parameters; {tokens_per_iter:,} tokens per iteration; "
          f"{config.max_iters} iterations; vocabulary {meta['vocab_size']}")

    run_start = time.perf_counter()
    train_time, interval_tokens, interval_time = 0.0, 0, 0.0
    last = {"train": None, "val": None}
    for it in range(start_iter, config.max_iters + 1):
        lr = cosine_lr(it, config.lr, config.min_lr, config.warmup_iters, config.max_iters)
        evaluate_now = it % config.eval_interval == 0 or it == config.max_iters
        # a resumed run starts where its checkpoint was taken: right after that iteration's evaluation
        if evaluate_now and not (config.init_from == "resume" and it == start_iter):
            losses = estimate_loss(model, config, it)
            last = losses
            record = {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr,
                      "elapsed_s": round(previous_elapsed + time.perf_counter() - run_start, 3),
                      "tokens_per_s": round(interval_tokens / interval_time, 1) if interval_time else None}
            records.append(record)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            improved = losses["val"] < best_val_loss
            if improved:
                best_val_loss, best_iter = losses["val"], it
                save_checkpoint(ckpt_path, model, optimizer, meta={
                    "step": it, "best_val_loss": best_val_loss, "rng_state": rng.bit_generator.state,
                    "tokenizer": meta["tokenizer"], "train_config": dataclasses.asdict(config),
                    "elapsed_s": record["elapsed_s"]})
            print(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                  + (f" (best so far, saved {ckpt_path})" if improved else ""), flush=True)
            plot_losses(records, out_dir / PLOT_NAME)
            interval_tokens, interval_time = 0, 0.0
        if it == config.max_iters:
            break

        step_start = time.perf_counter()
        loss_value = train_step(model, optimizer, config, rng, it, lr, ckpt_path)
        step_time = time.perf_counter() - step_start
        train_time += step_time
        interval_time += step_time
        interval_tokens += tokens_per_iter
        done = it + 1 - start_iter
        if config.log_interval and (it % config.log_interval == 0 or it == config.max_iters - 1):
            ms = 1000 * train_time / done
            eta = (config.max_iters - it - 1) * train_time / done
            print(f"iter {it:5d} | loss {loss_value:.4f} | lr {lr:.2e} | {ms:7.1f} ms/iter | "
                  f"{tokens_per_iter * done / train_time:8,.0f} tokens/s | ETA {_duration(eta)}", flush=True)

    elapsed = time.perf_counter() - run_start
    sample = None
    if config.sample_chars:
        sample = sample_text(model, tokenizer, config.sample_chars, rng)
        print(f"--- sample ({config.sample_chars} characters) ---\n{sample}\n---")
    return {"best_val_loss": best_val_loss, "best_iter": best_iter, "iters": config.max_iters,
            "final_train_loss": last["train"], "final_val_loss": last["val"], "elapsed_s": elapsed,
            "tokens_per_s": tokens_per_iter * (config.max_iters - start_iter) / train_time if train_time else None,
            "checkpoint": str(ckpt_path), "sample": sample, "model": model}


def train_step(model, optimizer, config, rng, it, lr, ckpt_path):
    """One optimizer step over grad_accum micro-batches; returns the (unscaled) mean loss."""
    model.train()
    optimizer.lr = lr
    total = 0.0
    for micro in range(config.grad_accum):
        x, y = get_batch(config.data_dir, "train", config.batch_size, config.block_size, rng)
        _, loss = model(x, y, rng=rng)          # NumPy ids: the model checks them on the host, then copies them
        value = loss.item()
        if not math.isfinite(value):
            _diverged(model, x, y, f"loss is {value} at iteration {it} (micro-batch {micro})", ckpt_path)
        # scaled by 1/k, the k backward passes sum to the gradient of the mean over all k micro-batches
        (loss * (1.0 / config.grad_accum)).backward()
        total += value
    norm = clip_grad_norm(model.parameters(), config.grad_clip) if config.grad_clip else _grad_norm(model)
    if not math.isfinite(norm):
        _diverged(model, x, y, f"gradient norm is {norm} at iteration {it} (loss was finite)", ckpt_path)
    optimizer.step()
    optimizer.zero_grad()
    return total / config.grad_accum


def _grad_norm(model):
    return math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in model.parameters() if p.grad is not None))


def _diverged(model, x, y, what, ckpt_path):
    """Re-run the step's forward and backward under detect_anomaly to find the op; raise TrainingDiverged."""
    model.zero_grad()
    op = "no op produced a non-finite value when the step was re-run"
    try:
        with detect_anomaly():
            _, loss = model(x, y, rng=np.random.default_rng(0))  # (any dropout mask will do here)
            loss.backward()
    except FloatingPointError as e:
        op = str(e)
    model.zero_grad()
    kept = f"the last good checkpoint {ckpt_path} is untouched" if ckpt_path.is_file() else "no checkpoint was written yet"
    raise TrainingDiverged(f"training stopped: {what}; {op}; {kept}")


def estimate_loss(model, config, it):
    """Mean loss over eval_iters batches of each split, in eval mode and without a graph.

    The batches come from a generator seeded with (seed, it): reproducible, and apart from the
    training generator, so evaluating does not change what training sees.
    """
    eval_rng = np.random.default_rng((config.seed, it))
    model.eval()
    losses = {}
    with no_grad():
        for split in ("train", "val"):
            total = 0.0
            for _ in range(config.eval_iters):
                x, y = get_batch(config.data_dir, split, config.batch_size, config.block_size, eval_rng)
                _, loss = model(x, y)
                total += loss.item()
            losses[split] = total / config.eval_iters
    model.train()
    return losses


def sample_text(model, tokenizer, n_chars, rng, prompt="\n", temperature=0.8, top_k=None):
    """About n_chars characters generated after `prompt` (a newline, as nanoGPT starts its samples)."""
    from .sample import generate
    prompt_ids = tokenizer.encode(prompt)
    ids = generate(model, np.asarray(prompt_ids, dtype=np.int64), max_new_tokens=n_chars,
                   temperature=temperature, top_k=top_k, rng=rng)
    return tokenizer.decode(ids[len(prompt_ids):].tolist())[:n_chars]


def _read_records(path, before_iter):
    """The metrics.jsonl records of earlier evaluations (for the plot); on resume, later ones are dropped."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # an append cut off by a crash: that evaluation is redone
                break
            raise ValueError(f"{path} line {number} is not JSON: {line[:80]!r}") from None
    kept = [r for r in records if r["iter"] <= before_iter]
    if len(kept) != len(lines):
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def plot_losses(records, path):
    """Train and val loss against iteration, as a PNG; silently skipped when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    iters = [r["iter"] for r in records]
    ax.plot(iters, [r["train_loss"] for r in records], marker="o", label="train")
    ax.plot(iters, [r["val_loss"] for r in records], marker="o", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png"))


def _duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def main(argv=None):
    """`python -m tinygrad_llm.train --data_dir=... [--key=value ...]`."""
    try:
        config = parse_overrides(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    summary = train(config)
    print(f"best val loss {summary['best_val_loss']:.4f} at iteration {summary['best_iter']}; "
          f"{summary['elapsed_s']:.1f} s")


if __name__ == "__main__":
    main()
