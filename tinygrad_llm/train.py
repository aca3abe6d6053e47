"""The training loop as a library function: `train(TrainConfig(...)) -> summary dict`, and its command line.

    from tinygrad_llm.train import TrainConfig, parse_overrides, train
    config = parse_overrides(["--max_iters", "500", "--lr=3e-4"], TrainConfig(data_dir="data/shakespeare/char"))
    summary = train(config)          # -> {"best_val_loss": ..., "best_iter": ..., "sample": ..., ...}

    python -m tinygrad_llm.train --data_dir data/shakespeare/char --max_iters 500    # --help lists every key

What one run does, step by step:
- before anything is allocated or written: out_dir must not hold another run (unless overwrite or resume),
  and the model, its gradients, AdamW's state and one micro-batch's activations must fit in memory;
- one np.random.Generator seeded with `seed` drives the model's init, dropout and the training batches;
  evaluation batches come from their own generator seeded with (seed, iter), so how often one
  evaluates never changes the training trajectory;
- each iteration sums the gradients of `grad_accum` micro-batches of `batch_size` windows, each
  micro-batch loss scaled by 1/grad_accum, so k micro-batches give the gradient of one batch k times
  larger; clipping then sees that whole-batch gradient (nanoGPT issue #168);
- AdamW with weight decay on the matrices only, lr on a cosine schedule with linear warmup that reaches
  min_lr at lr_decay_iters (max_iters unless set) and stays there;
- on the GPU the step is captured once as a CUDA graph and replayed (cuda_graph.py; cuda_graph=False, or
  data-parallel runs: eager), with the same batches, dropout masks and losses as the eager step;
- every `eval_interval` iterations (and at the last): the mean loss over `eval_iters` batches of each
  split in eval mode without a graph, one line in out_dir/metrics.jsonl, out_dir/loss.png redrawn,
  and out_dir/ckpt.safetensors rewritten when the val loss is the best so far (atomically);
- a NaN/Inf loss or gradient norm at a step, or a NaN/Inf evaluation loss, stops the run: the step's
  forward (and backward) is re-run under detect_anomaly to name the op, and the error names both;
  the best checkpoint is left as it was;
- at the end, or at the first SIGINT/SIGTERM (after the step under way), the run's latest state goes to
  out_dir/last.safetensors (atomically); an interruption then raises TrainingInterrupted, whose message
  says how to resume. A second signal stops at once without saving.

Under `mpiexec -n K` (K > 1) the run is data-parallel (distributed.py): batch_size is per rank, every
micro-batch is drawn once with the global batch and rank r keeps its rows, gradients are averaged over the
ranks before clipping, evaluation losses too; rank 0 alone writes and prints; throughput is the whole job's.

Resuming (`init_from="resume"`) reads the newer of ckpt.safetensors and last.safetensors: weights,
optimizer, iteration, best val loss and the generator's state, so the resumed run continues bit for bit
as the uninterrupted one would have. A checkpoint is taken at an iteration, after its evaluation and
before its training step. A resumed run keeps its data, model and optimization settings (the saved
config); only the keys in RESUMABLE may differ, and a new max_iters needs lr_decay_iters set so that the
learning-rate schedule is stated, not implied. `resume_config(out_dir, **changes)` builds that config.
A run saved by K ranks resumes with any other number: what must stay is the global batch (batch_size x
ranks); left unsaid, batch_size is rescaled to keep it.
"""
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import backend, distributed, precision
from .backend import check_device
from .checkpoint import load_checkpoint, save_checkpoint
from .cuda_graph import dropout_scope, step_seed
from .cli import parse_config_args, run_cli
from .data import get_batch, load_meta
from .fileio import atomic_write
from .model import GPT
from .optim import clip_grad_norm, param_groups
from .tensor import detect_anomaly, no_grad
from .tokenizer import tokenizer_from_dict
from .train_config import CHOICES, RESUMABLE, TrainConfig, config_argument_parser, parse_overrides  # noqa: F401

CHECKPOINT_NAME = "ckpt.safetensors"      # the best val loss so far
LAST_NAME = "last.safetensors"            # the latest state: at the end of a run, or where it was interrupted
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


class TrainingDiverged(FloatingPointError):
    """A NaN or Inf loss (or gradient norm) stopped training; the message names the step and the op."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after saving its state; the message says how to resume."""


class ConfigTooLarge(ValueError):
    """The run would not fit in memory; raised before anything is allocated, with the estimate."""


# ---- before the run: the out_dir, the device, the memory, a resume's settings ----------------------

def check_out_dir(config):
    """Refuse an out_dir under a file, and a new run into an out_dir holding one (unless overwrite)."""
    out_dir = Path(config.out_dir)
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(f"out_dir {out_dir}: {folder} is a file, not a folder")
            break
    if config.init_from == "scratch" and not config.overwrite:
        held = [name for name in (CHECKPOINT_NAME, LAST_NAME) if (out_dir / name).exists()]
        if held:
            raise FileExistsError(f"{out_dir} already holds a run ({', '.join(held)}); continue it with "
                                  f"--init_from=resume, or replace it with --overwrite=true")




def latest_checkpoint(out_dir):
    """(path, meta) of the newer of out_dir's best and last checkpoints (the last one on a tie); None if neither."""
    found = []
    for name in (CHECKPOINT_NAME, LAST_NAME):
        path = Path(out_dir) / name
        if path.is_file():
            meta = load_checkpoint(path)
            lacking = [key for key in ("step", "best_val_loss", "rng_state", "train_config") if key not in meta]
            if lacking:
                raise ValueError(f"{path} lacks the training state {lacking} needed to resume "
                                 "(was it written by another tool?)")
            found.append((meta["step"], name == LAST_NAME, path, meta))
    return max(found, key=lambda f: f[:2])[2:] if found else None


def resume_config(out_dir, **changes):
    """The TrainConfig that continues the run saved in out_dir: its saved settings, with `changes` applied.

    A change to a key outside RESUMABLE that differs from the saved value raises ValueError, as does a
    new max_iters without lr_decay_iters (which would silently reshape the learning-rate schedule).
    """
    found = latest_checkpoint(out_dir)
    if found is None:
        raise FileNotFoundError(f"init_from=resume but {out_dir} holds no checkpoint ({CHECKPOINT_NAME} or {LAST_NAME})")
    path, meta = found
    known = {f.name for f in fields(TrainConfig)}
    saved = {k: v for k, v in meta["train_config"].items() if k in known}
    ranks, saved_ranks = distributed.world().size, meta.get("ranks", 1)
    if "batch_size" not in changes and ranks != saved_ranks and saved["batch_size"] * saved_ranks % ranks == 0:
        saved["batch_size"] = saved["batch_size"] * saved_ranks // ranks     # the same global batch
    config = TrainConfig(**{**saved, **changes, "out_dir": str(out_dir), "init_from": "resume"})
    check_resumable(config, meta["train_config"], path, meta["step"], saved_ranks)
    return config


def check_resumable(config, saved, path, step, saved_ranks=1):
    """ValueError unless `config` may continue the run whose saved config is `saved` (see RESUMABLE).

    The run was saved by saved_ranks ranks; batch_size may differ when batch_size x ranks (the global
    batch) is the run's."""
    ranks = distributed.world().size
    same_global_batch = config.batch_size * ranks == saved.get("batch_size", 0) * saved_ranks
    conflicts = [f"--{k}={getattr(config, k)} (the run has {saved[k]})" for k in saved
                 if k not in RESUMABLE and hasattr(config, k) and getattr(config, k) != saved[k]
                 and not (k == "batch_size" and same_global_batch)]
    if not same_global_batch and ranks != saved_ranks:
        conflicts.append(f"a global batch of {config.batch_size} x {ranks} ranks (the run has "
                         f"{saved.get('batch_size')} x {saved_ranks}; --batch_size sets it per rank)")
    if conflicts:
        raise ValueError(f"{path} continues a run with other settings: {', '.join(conflicts)}; a resumed run keeps "
                         f"its data, model and optimization settings (only {', '.join(RESUMABLE[3:])} may change), "
                         "so drop those flags or start a new run in another --out_dir")
    saved_decay = saved.get("lr_decay_iters") or saved["max_iters"]
    if config.lr_decay_iters is None and config.max_iters != saved_decay:
        raise ValueError(f"--max_iters={config.max_iters} would change the learning-rate schedule, which reaches "
                         f"min_lr at iteration {saved_decay} in this run; state it: --lr_decay_iters={saved_decay} keeps "
                         f"it (lr stays at min_lr after {saved_decay}), --lr_decay_iters={config.max_iters} stretches it")
    if config.max_iters < step:
        raise ValueError(f"--max_iters={config.max_iters} is before iteration {step}, where {path} was saved")


def count_params(config):
    """Parameter elements of GPT(config) (a GPTConfig), tied weights once, computed without building it."""
    C, H, V, T, L = config.n_embd, config.mlp_hidden, config.vocab_size, config.block_size, config.n_layer
    b = 1 if config.bias else 0
    norm = C * (1 + b) if config.norm == "layernorm" else C
    attention = C * 3 * C + b * 3 * C + C * C + b * C
    mlp = (2 if config.mlp == "swiglu" else 1) * (C * H + b * H) + H * C + b * C
    embeddings = V * C + (T * C if config.position == "learned" else 0) + (0 if config.tie_embeddings else V * C)
    return embeddings + L * (2 * norm + attention + mlp) + norm


def estimate_memory(config, vocab_size):
    """Bytes one training step needs, about: {"parameters", "gradients", "optimizer", "activations", "total"}.

    Activations: what one micro-batch's graph keeps for the backward pass and the backward's temporaries,
    per block about 14 (B, T, C) arrays, 4 (B, T, H) ones and 2 (B, NH, T, T) attention arrays (3 with
    dropout); then 3 (B, T, V) arrays for the logits and the loss, and 2 (B, T, C) for the embeddings.
    Python's and the libraries' own memory is not counted. tests/test_cli.py checks the total against the
    peak that tracemalloc measures over two steps (1.07-1.53x of it for the configurations there).
    """
    model_config = config.model_config(vocab_size)
    itemsize = np.dtype(precision.param_dtype(config.dtype)).itemsize   # bf16: float32 weights and activations
    B, T, C, H, NH = config.batch_size, config.block_size, config.n_embd, model_config.mlp_hidden, config.n_head
    params = count_params(model_config) * itemsize
    per_block = B * T * (14 * C + 4 * H) + (3 if config.dropout else 2) * B * NH * T * T
    activations = (config.n_layer * per_block + 3 * B * T * vocab_size + 2 * B * T * C) * itemsize
    # AdamW keeps two moments per parameter; its step and the gradient norm need about one more of temporaries
    sizes = {"parameters": params, "gradients": params, "optimizer": 3 * params, "activations": activations}
    return {**sizes, "total": sum(sizes.values())}


def available_memory(device):
    """Bytes free for this process on the device, or None when unknown: for the CPU, MemAvailable of
    /proc/meminfo, lowered to the cgroup's limit when one is set; for cuda, the GPU's free memory."""
    if device == "cuda":
        return int(backend.cupy_module().cuda.Device().mem_info[0])
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


def check_memory(config, vocab_size):
    need, free = estimate_memory(config, vocab_size), available_memory(config.device)
    if free is not None and need["total"] > free:
        parts = ", ".join(f"{name} {_gib(need[name])}" for name in ("parameters", "gradients", "optimizer", "activations"))
        raise ConfigTooLarge(f"this config needs about {_gib(need['total'])} ({parts}) but {_gib(free)} of "
                             f"{'GPU ' if config.device == 'cuda' else ''}memory is available; make n_embd, n_layer, "
                             "block_size or batch_size smaller (grad_accum keeps the batch with smaller micro-batches)")


def _gib(n):
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


# ---- the run ------------------------------------------------------------------------------------------

def train(config):
    """Run the loop described in the module docstring; returns a summary dict.

    Summary keys: best_val_loss, best_iter, iters (optimizer steps taken, all runs together),
    final_train_loss, final_val_loss (the last evaluation), elapsed_s (this run), tokens_per_s,
    checkpoint (its path), sample (the decoded closing text, or None) and model (the trained GPT).
    """
    world = distributed.world()   # several ranks under mpiexec: data-parallel (distributed.py)
    world.begin()
    world.check_same_config(dataclasses.asdict(config))
    meta, resume_from = check_run(config)      # everything is checked before anything is allocated or written
    world.setup(config.device)
    run = Run(config, meta)
    if resume_from is not None:
        run.restore(*resume_from)
    run.open_outputs()
    print(f"model: {run.model.num_params():,} parameters; {run.tokens_per_iter:,} tokens per iteration; "
          f"{config.max_iters} iterations; vocabulary {meta['vocab_size']}")
    with stop_requests() as stop, run.progress:
        for it in range(run.start_iter, config.max_iters + 1):
            lr = config.lr_at(it)
            # a resumed run starts where its checkpoint was taken: right after that iteration's evaluation
            if (it % config.eval_interval == 0 or it == config.max_iters) and not (run.resumed and it == run.start_iter):
                run.evaluate(it, lr)
            if it == config.max_iters:
                break
            stop_signal = world.max(stop.signal or 0)    # the ranks stop together, at the same iteration
            if stop_signal:
                run.interrupt(it, stop_signal)
            run.progress.start_step()
            loss = train_step(run.model, run.optimizer, config, run.rng, it, lr, run.ckpt_path, run.dp, run.graph_step())
            run.progress.end_step(it, world.mean(loss), lr)
    elapsed = time.perf_counter() - run.start_time
    run.save(run.last_path, config.max_iters)
    sample = None
    world.end()
    if config.sample_chars and world.is_main:
        sample = sample_text(run.model, run.tokenizer, config.sample_chars, run.rng)
        print(f"--- sample ({config.sample_chars} characters) ---\n{sample}\n---")
    return {"best_val_loss": run.best_val_loss, "best_iter": run.best_iter, "iters": config.max_iters,
            "final_train_loss": run.last_losses["train"], "final_val_loss": run.last_losses["val"],
            "elapsed_s": elapsed, "tokens_per_s": run.progress.mean_rate(), "checkpoint": str(run.ckpt_path),
            "sample": sample, "model": run.model}


def check_run(config):
    """(data meta, (checkpoint path, its meta) to resume from or None), after every check that needs no
    allocation: out_dir, device, data, a resume's checkpoint and settings, memory."""
    out_dir = Path(config.out_dir)
    check_out_dir(config)
    check_device(config.device)
    meta = load_meta(config.data_dir)
    resume_from = None
    if config.init_from == "resume":
        resume_from = latest_checkpoint(out_dir)
        if resume_from is None:
            raise FileNotFoundError(f"init_from=resume but {out_dir} holds no checkpoint ({CHECKPOINT_NAME} or {LAST_NAME})")
        path, saved = resume_from
        check_resumable(config, saved["train_config"], path, saved["step"], saved.get("ranks", 1))
        if saved.get("tokenizer", meta["tokenizer"]) != meta["tokenizer"]:
            raise ValueError(f"{path} was trained with another tokenizer than the one in "
                             f"{config.data_dir}/meta.json; resume with the data_dir the run was started with")
    check_memory(config, meta["vocab_size"])
    return meta, resume_from


class Run:
    """One training run's state: model, optimizer, generator, best so far, outputs; train() drives it."""

    def __init__(self, config, meta):
        self.config, self.meta = config, meta
        self.tokenizer = tokenizer_from_dict(meta["tokenizer"])
        out_dir = Path(config.out_dir)
        self.ckpt_path, self.last_path = out_dir / CHECKPOINT_NAME, out_dir / LAST_NAME
        self.metrics_path, self.plot_path = out_dir / METRICS_NAME, out_dir / PLOT_NAME
        self.rng = np.random.default_rng(config.seed)
        self.model = GPT(config.model_config(meta["vocab_size"]), rng=self.rng)
        self.model.to(config.device)  # before a resume, so that the optimizer state is loaded onto the same device
        self.world = distributed.world()
        self.dp = distributed.DataParallel(self.world, self.model, zero=config.zero)
        self.optimizer = self.dp.optimizer(param_groups(self.model, config.weight_decay), lr=config.lr,
                                           betas=(config.beta1, config.beta2))
        self.resumed, self.start_iter, self.previous_elapsed = False, 0, 0.0
        self.best_val_loss, self.best_iter = math.inf, None
        self.last_losses = {"train": None, "val": None}
        self.tokens_per_iter = config.batch_size * config.grad_accum * config.block_size * self.world.size  # all ranks
        self.progress = Progress(config, self.tokens_per_iter)
        self.plot_skipped = False
        self.start_time = time.perf_counter()
        self.graph = None

    def graph_step(self):
        """The CUDA graph of the training step (cuda_graph.py), made at the first step; None on the CPU, with
        --cuda_graph=false, and under mpiexec or with zero=1 (those steps are not captured: they run eagerly)."""
        config = self.config
        if self.graph is None and config.device == "cuda" and config.cuda_graph:
            if self.world.size > 1 or config.zero:
                if self.world.is_main:
                    print("cuda_graph: data-parallel (and ZeRO) steps are not captured; the steps run eagerly")
                self.graph = False
            else:
                from .cuda_graph import CudaGraphStep
                self.graph = CudaGraphStep(self.model, self.optimizer, config.batch_size, config.block_size,
                                           config.grad_accum, config.grad_clip)
        return self.graph or None

    def restore(self, path, meta):
        """Load the checkpoint at path (its meta already read) into the model, optimizer and generator."""
        saved = load_checkpoint(path, self.model, self.optimizer)
        self.rng.bit_generator.state = saved["rng_state"]
        self.resumed, self.start_iter = True, saved["step"]
        self.best_val_loss, self.best_iter = saved["best_val_loss"], saved.get("best_iter", saved["step"])
        self.previous_elapsed = saved.get("elapsed_s", 0.0)
        print(f"resuming from {path} at iteration {self.start_iter} (best val loss {self.best_val_loss:.4f})")

    def open_outputs(self):
        """A new run clears what an overwritten run left (check_out_dir allowed it); a resumed one keeps the
        metrics of the evaluations up to its start."""
        self.records = []
        if self.world.is_main:      # (several ranks: rank 0 alone writes)
            if not self.resumed:
                for stale in (self.ckpt_path, self.last_path, self.plot_path):
                    stale.unlink(missing_ok=True)
            self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            if not self.resumed:
                self.metrics_path.write_text("")
            self.records = _read_records(self.metrics_path, before_iter=self.start_iter)
        self.start_time = time.perf_counter()

    def elapsed(self):
        return round(self.previous_elapsed + time.perf_counter() - self.start_time, 3)

    def save(self, path, it):
        optimizer = self.dp.full_optimizer(self.optimizer)   # ZeRO: gathered from every rank (all call save)
        if not self.world.is_main:
            return
        save_checkpoint(path, self.model, optimizer, meta={
            "step": it, "best_val_loss": self.best_val_loss, "best_iter": self.best_iter,
            "rng_state": self.rng.bit_generator.state, "tokenizer": self.meta["tokenizer"],
            "train_config": dataclasses.asdict(self.config), "elapsed_s": self.elapsed(), "ranks": self.world.size})

    def evaluate(self, it, lr):
        """Both splits' loss (a NaN or Inf stops the run); a metrics line, the plot, the best checkpoint."""
        losses = estimate_loss(self.model, self.config, it)
        check_finite_losses(self.model, self.config, it, losses, self.ckpt_path)
        self.last_losses = losses
        record = {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr,
                  "elapsed_s": self.elapsed(), "tokens_per_s": self.progress.interval_rate()}
        self.records.append(record)
        if self.world.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        improved = losses["val"] < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_iter = losses["val"], it
            self.save(self.ckpt_path, it)
        self.progress.write(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                            + (f" (best so far, saved {self.ckpt_path})" if improved else ""))
        if self.world.is_main and not plot_losses(self.records, self.plot_path) and not self.plot_skipped:
            self.plot_skipped = True
            self.progress.write(f"{PLOT_NAME} skipped: matplotlib is not installed (pip install -e '.[plot]')")

    def interrupt(self, it, signum):
        """Save the state at iteration it (before its step) and raise TrainingInterrupted."""
        self.save(self.last_path, it)
        self.world.end()      # every rank stops here together: the job may end without an MPI abort
        raise TrainingInterrupted(f"interrupted by {signal.Signals(signum).name} at iteration {it}; the run's state "
                                  f"is saved in {self.last_path}; continue it with --init_from=resume "
                                  f"--out_dir={self.config.out_dir}")


class Progress:
    """Progress lines and a tqdm bar for the training steps, with the first step timed apart.

    The first step of a process compiles the Numba kernels (seconds, once): it is reported on its
    own line and left out of the rate and the ETA. The bar shows on a terminal only (stderr a TTY);
    the log lines (every log_interval steps) go to stdout either way, through the bar so as not to break it.
    """

    def __init__(self, config, tokens_per_iter):
        self.config, self.tokens_per_iter = config, tokens_per_iter
        self.bar = None
        self.first_step_s = None
        self.steady_time, self.steady_steps = 0.0, 0       # every step but the first
        self.interval_time, self.interval_steps = 0.0, 0   # since the last evaluation

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def write(self, line):
        (self.bar.write if self.bar is not None else print)(line)
        sys.stdout.flush()

    def start_step(self):
        self.step_start = time.perf_counter()

    def end_step(self, it, loss, lr):
        seconds = time.perf_counter() - self.step_start
        self.interval_time += seconds
        self.interval_steps += 1
        if self.first_step_s is None:
            self.first_step_s = seconds
            if self.config.log_interval:
                self.write(f"first step {seconds:.2f} s (includes compiling the kernels once; "
                           "left out of the rate and ETA)")
            self.bar = tqdm(total=self.config.max_iters, initial=it + 1, unit="it", desc="training",
                            disable=None, dynamic_ncols=True, leave=False)
        else:
            self.steady_time += seconds
            self.steady_steps += 1
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        log = self.config.log_interval
        if log and (it % log == 0 or it == self.config.max_iters - 1):
            rate = self.mean_rate()
            per_step = self.steady_time / self.steady_steps if self.steady_steps else None
            eta = _duration((self.config.max_iters - it - 1) * per_step) if per_step is not None else "-"
            ms = f"{1000 * per_step:7.1f}" if per_step is not None else "      -"
            speed = f"{rate:8,.0f}" if rate is not None else "       -"
            self.write(f"iter {it:5d} | loss {loss:.4f} | lr {lr:.2e} | {ms} ms/iter | {speed} tokens/s | ETA {eta}")

    def mean_rate(self):
        """Tokens per second over the steps after the first (None until there is one)."""
        return self.tokens_per_iter * self.steady_steps / self.steady_time if self.steady_time else None

    def interval_rate(self):
        """Tokens per second since the previous evaluation (None if no step ran), then starts a new interval."""
        rate = round(self.tokens_per_iter * self.interval_steps / self.interval_time, 1) if self.interval_time else None
        self.interval_time, self.interval_steps = 0.0, 0
        return rate


@contextmanager
def stop_requests():
    """While inside, the first SIGINT or SIGTERM sets `.signal` (the loop stops after its step and saves);
    a second one raises KeyboardInterrupt at once. Outside the main thread signals are left alone."""
    state = type("StopRequest", (), {"signal": None})()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state.signal is not None:
            raise KeyboardInterrupt(f"interrupted again by {signal.Signals(signum).name}: stopped at once, "
                                    "without saving the latest state")
        state.signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train_step(model, optimizer, config, rng, it, lr, ckpt_path, dp=None, graph=None):
    """One optimizer step over grad_accum micro-batches; returns the (unscaled) mean loss (this rank's).

    With `graph` (a cuda_graph.CudaGraphStep) the step is its replay: the same batches and dropout seeds are
    drawn from rng in the same order as the eager step, so both give the same losses to rounding."""
    world = distributed.world()
    dp = dp or distributed.DataParallel(world, model)
    model.train()
    optimizer.lr = lr
    if graph is not None:
        batches, bases = [], []
        for micro in range(config.grad_accum):
            batches.append(world.batch(config.data_dir, "train", config.batch_size, config.block_size, rng))
            bases.append(step_seed(world.dropout_rng(rng, config, it, micro)) if config.dropout else 0)
        loss, norm = graph(batches, bases, lr)
        value, norm = (float(v) for v in backend.to_device(backend.cupy_module().stack([loss, norm]), "cpu"))
        x, y = batches[-1]
        if not math.isfinite(value):
            _diverged(model, x, y, f"loss is {value} at iteration {it}", ckpt_path)
        if not math.isfinite(norm):
            _diverged(model, x, y, f"gradient norm is {norm} at iteration {it} (loss was finite)", ckpt_path)
        return value
    total = 0.0
    with precision.weight_copies():   # bf16: each weight rounded once for all the step's micro-batches
        for micro in range(config.grad_accum):
            x, y = world.batch(config.data_dir, "train", config.batch_size, config.block_size, rng)
            drop = world.dropout_rng(rng, config, it, micro)
            with dropout_scope(model, config.dropout, drop, micro, config.grad_accum):   # on the GPU: as the graph's
                _, loss = model(x, y, rng=drop)  # NumPy ids: checked on the host
            value = loss.item()
            if not math.isfinite(value):
                _diverged(model, x, y, f"loss is {value} at iteration {it} (micro-batch {micro})", ckpt_path)
            # scaled by 1/k, the k backward passes sum to the gradient of the mean over all k micro-batches
            dp.backward(loss * (1.0 / config.grad_accum), last=micro == config.grad_accum - 1)
            total += value
    dp.average_gradients()   # over the ranks (with ZeRO, into this rank's shard)
    if config.zero:
        norm = dp.clip_grad_norm(config.grad_clip)
    else:
        norm = clip_grad_norm(model.parameters(), config.grad_clip) if config.grad_clip else _grad_norm(model)
    if not math.isfinite(norm):
        _diverged(model, x, y, f"gradient norm is {norm} at iteration {it} (loss was finite)", ckpt_path)
    optimizer.step()
    optimizer.zero_grad()
    return total / config.grad_accum


def _grad_norm(model):
    return math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in model.parameters() if p.grad is not None))


def _diverged(model, x, y, what, ckpt_path, backward=True):
    """Re-run the step's forward (and backward) under detect_anomaly to find the op; raise TrainingDiverged."""
    model.zero_grad()
    op = "no op produced a non-finite value when the step was re-run"
    try:
        with detect_anomaly():
            if backward:
                _, loss = model(x, y, rng=np.random.default_rng(0))  # (any dropout mask will do here)
                loss.backward()
            else:
                with no_grad():
                    model(x, y)
    except FloatingPointError as e:
        op = str(e)
    model.zero_grad()
    kept = f"the last good checkpoint {ckpt_path} is untouched" if ckpt_path.is_file() else "no checkpoint was written yet"
    raise TrainingDiverged(f"training stopped: {what}; {op}; {kept}")


def check_finite_losses(model, config, it, losses, ckpt_path):
    """TrainingDiverged, naming the op, when an evaluation loss is NaN or Inf."""
    for split, value in losses.items():
        if not math.isfinite(value):
            x, y = get_batch(config.data_dir, split, config.batch_size, config.block_size,
                             np.random.default_rng((config.seed, it)))
            model.eval()
            try:
                _diverged(model, x, y, f"{split} loss is {value} at the evaluation of iteration {it}", ckpt_path,
                          backward=False)
            finally:
                model.train()


def estimate_loss(model, config, it):
    """Mean loss over eval_iters batches of each split, in eval mode and without a graph.

    The batches come from a generator seeded with (seed, it): reproducible, and apart from the
    training generator, so evaluating does not change what training sees.
    """
    eval_rng = np.random.default_rng((config.seed, it))
    world = distributed.world()
    model.eval()
    losses = {}
    with no_grad():
        for split in ("train", "val"):
            total = 0.0
            for _ in range(config.eval_iters):
                x, y = world.batch(config.data_dir, split, config.batch_size, config.block_size, eval_rng)
                _, loss = model(x, y)
                total += loss.item()
            losses[split] = world.mean(total / config.eval_iters)   # over ranks: the global batch's mean
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
    """Train and val loss against iteration, as a PNG; returns False (and draws nothing) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
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
    return True


def _duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def main(argv=None):
    """`python -m tinygrad_llm.train --data_dir DIR [--key value ...]`; --help lists every key."""
    parser = config_argument_parser(prog="python -m tinygrad_llm.train", description="Train a GPT on a folder written by tinygrad_llm.data.prepare "
                                    "(examples/train_shakespeare.py prepares tiny Shakespeare and calls this).")
    run_cli(lambda args: _main(parser, args), argv)


def _main(parser, argv):
    given = parse_config_args(parser, argv)
    if given.get("init_from") == "resume":
        config = resume_config(given.pop("out_dir", TrainConfig.out_dir), **given)
    else:
        config = TrainConfig(**given)
    summary = train(config)
    print(f"best val loss {summary['best_val_loss']:.4f} at iteration {summary['best_iter']}; "
          f"{summary['elapsed_s']:.1f} s; checkpoint {summary['checkpoint']}")


if __name__ == "__main__":
    main()
