"""What a training run is told: TrainConfig (every key, its default, its help and its checks) and the
command-line parsing that builds one. train.py runs it; RESUMABLE names the keys a resumed run may change.
"""
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from . import precision
from .cli import config_parser, option, parse_config_args
from .model import GPTConfig
from .optim import cosine_lr

CHOICES = {"init_from": ("scratch", "resume"), "dtype": precision.DTYPES, "device": ("cpu", "cuda"),
           "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"), "position": ("learned", "rope")}
# what a resumed run may set differently from the run it continues (everything else comes from the checkpoint)
RESUMABLE = ("out_dir", "init_from", "overwrite", "max_iters", "lr_decay_iters", "eval_interval", "eval_iters",
             "log_interval", "sample_chars", "device", "zero", "cuda_graph")   # (batch_size: see check_resumable)


@dataclass
class TrainConfig:
    """Everything one run needs; defaults are the tiny-Shakespeare character recipe."""
    data_dir: str = option("data/shakespeare/char", "folder written by tinygrad_llm.data.prepare (meta.json, train.bin, val.bin)")
    out_dir: str = option("out", "folder for ckpt.safetensors (best), last.safetensors, metrics.jsonl, loss.png")
    # model
    n_layer: int = option(4, "transformer blocks")
    n_head: int = option(4, "attention heads per block (must divide n_embd)")
    n_embd: int = option(128, "width of the residual stream")
    block_size: int = option(64, "context length in tokens")
    dropout: float = option(0.0, "dropout probability in [0, 1)")
    bias: bool = option(True, "biases in the Linear and LayerNorm layers")
    norm: str = option("layernorm", "normalization layer")
    mlp: str = option("gelu", "MLP kind (swiglu: Llama's gated MLP)")
    position: str = option("learned", "position encoding (rope: rotary)")
    # optimization
    batch_size: int = option(12, "windows per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_iters: int = option(2000, "optimizer steps")
    lr: float = option(1e-3, "peak learning rate")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = option(100, "linear warm-up steps")
    lr_decay_iters: int = option(None, "step at which the cosine decay reaches min_lr (None: max_iters)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.99, "AdamW beta2")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = option(1.0, "clip the gradient's global norm to this (0: no clipping)")
    # evaluation and logging
    eval_interval: int = option(250, "evaluate (and maybe save the best checkpoint) every this many steps")
    eval_iters: int = option(20, "batches per split in each evaluation")
    log_interval: int = option(50, "a progress line every this many steps (0: none)")
    # run
    seed: int = option(1337, "seed of the init, dropout and batches")
    dtype: str = option("float32", "parameter and activation dtype (bfloat16: float32 weights and optimizer "
                        "state, bf16 matrix products with float32 sums; on the CPU it needs bf16 units and MKL)")
    device: str = option("cpu", "where to train (cuda needs CuPy and an NVIDIA GPU)")
    init_from: str = option("scratch", "scratch: a new run; resume: continue the run saved in out_dir")
    overwrite: bool = option(False, "let a new run replace the run saved in out_dir")
    sample_chars: int = option(300, "length of the closing text sample (0: none)")
    zero: int = option(0, "1: ZeRO-1 under mpiexec, AdamW's state and update sharded over the ranks")
    cuda_graph: bool = option(True, "on the GPU, capture the training step once as a CUDA graph and replay it "
                                    "(false: issue every kernel from Python each step)")

    def __post_init__(self):
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_interval", "eval_iters")
        problems = [f"{name} must be a positive integer, got {getattr(self, name)!r}" for name in positive
                    if not _is_int(getattr(self, name)) or getattr(self, name) <= 0]
        problems += [f"{name} must be a non-negative integer, got {getattr(self, name)!r}"
                     for name in ("max_iters", "warmup_iters", "log_interval", "sample_chars")
                     if not _is_int(getattr(self, name)) or getattr(self, name) < 0]
        if self.zero not in (0, 1) or isinstance(self.zero, bool):
            problems.append(f"zero must be 0 or 1, got {self.zero!r}")
        if self.lr_decay_iters is not None and not (_is_int(self.lr_decay_iters) and self.lr_decay_iters > 0):
            problems.append(f"lr_decay_iters must be a positive integer (or None), got {self.lr_decay_iters!r}")
        problems += [f"{name}={getattr(self, name)!r}: expected one of {allowed}"
                     for name, allowed in CHOICES.items() if getattr(self, name) not in allowed]
        numbers = ("dropout", "lr", "min_lr", "beta1", "beta2", "weight_decay", "grad_clip")
        not_finite = [name for name in numbers if not _is_finite(getattr(self, name))]
        problems += [f"{name} must be a finite number, got {getattr(self, name)!r}" for name in not_finite]
        if not not_finite:
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
        reason = precision.unsupported_reason(self.dtype, self.device)
        if reason is not None:   # a CPU without bf16 units (or bf16 CPU kernels) is refused, never run slowly
            raise ValueError(f"TrainConfig: {reason}")

    def model_config(self, vocab_size):
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias,
                         dtype=self.dtype, norm=self.norm, mlp=self.mlp, position=self.position)

    def lr_at(self, it):
        return cosine_lr(it, self.lr, self.min_lr, self.warmup_iters, self.lr_decay_iters or self.max_iters)


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_finite(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def config_argument_parser(description=None, defaults=None, epilog=None, prog=None):
    """The argparse parser of every TrainConfig key (--key value or --key=value; --help lists them all)."""
    return config_parser(TrainConfig, description=description, defaults=defaults, choices=CHOICES, epilog=epilog,
                         prog=prog)


def parse_overrides(args, config=None):
    """Apply `--key value` / `--key=value` arguments to a TrainConfig (a new one; `config` is left as it was).

    Values are converted to the field's type: "--max_iters=500", "--lr", "3e-4", "--bias=false".
    An unknown key, a malformed argument or a value of the wrong type raises ValueError (UsageError) saying so.
    """
    given = parse_config_args(config_argument_parser(), args)
    return dataclasses.replace(config or TrainConfig(), **given)
