"""Train the 6x384 character GPT on tiny Shakespeare on one GPU: ours (CuPy) beside PyTorch, one process.

    python benchmarks/gpu_train.py --steps 100                # every mode's step time (--modes picks some)
    python benchmarks/gpu_train.py --train ours               # the 5000-iteration run
    python benchmarks/gpu_train.py --train ours --dtype bfloat16
    python benchmarks/gpu_train.py --train torch --tf32

--steps runs every mode of MODES in one process: ours in float32, TF32 and bf16, eager and as a CUDA graph
(tinygrad_llm/cuda_graph.py: the step captured once and replayed), PyTorch eager in float32 and TF32, and
PyTorch's torch.compile (default mode) with bf16 autocast. Each mode's model starts
from the same weights. Each is built and warmed up in turn (torch.compile compiles in its first steps),
which is when its peak memory is read: the growth of its allocator over its build and warm-up (CuPy's pool
for ours, PyTorch's reserved memory for PyTorch), so the modes sharing the process do not count each
other. Then the modes' steps alternate in blocks of 10, each block under its mode's TF32 setting. A step's
times: host issue (the step's Python until it returns, before the sync), wall (to the device sync), GPU
span (CUDA events recorded before and after the step on the stream: the GPU's time from the step's first
queued work to its last, gaps included) and, with --kernel_steps, GPU kernel time (the sum of the step's
kernel durations, torch.profiler over that many steps). Medians after warm-up.

The text is the tiny Shakespeare shipped in examples/data/ unless --data names another. The recipe (nanoGPT's
shakespeare_char configuration): 6 layers, 6 heads, 384 wide, T=256, B=64, dropout 0.2, vocabulary 65
(characters), AdamW betas (0.9, 0.99), weight decay 0.1 on matrices, gradient clipping at 1.0, lr 1e-3
with 100 warm-up steps and a cosine down to 1e-4 at 5000 iterations. The PyTorch model is written below
with the same architecture and loaded with our initial weights; it uses F.scaled_dot_product_attention
(with dropout_p on the attention probabilities in training, as ours and nanoGPT) and torch.optim.AdamW's
default (foreach) implementation, in float32, eager. Both step the same way:
batch to the GPU, forward, backward, clip, AdamW step; a step's time is taken after a device sync.
TF32 matmuls are off unless --tf32 (then on for both).

--profile N: GPU kernel time a step of each framework, by kernel, over N steps (torch.profiler); with
--by_op, ours charged to each Function's forward/backward, the optimizer and the autograd engine.
--steps N: N timed steps each (after warm-up), alternating blocks of 10 so that noise hits both alike;
median ms/step, tokens/s and peak GPU memory. --train ours|torch: the full run, evaluating every
--eval_interval on --eval_iters batches of each split; best val loss, median step time, wall time.
"""
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli_args import DEFAULT_TEXT, Parser, positive_int, require_file  # noqa: E402
from tinygrad_llm import backend, precision  # noqa: E402
from tinygrad_llm.cuda_graph import CudaGraphStep, dropout_scope, step_seed  # noqa: E402
from tinygrad_llm.model import GPT, GPTConfig  # noqa: E402
from tinygrad_llm.optim import AdamW, clip_grad_norm, cosine_lr, param_groups  # noqa: E402
from tinygrad_llm.tensor import no_grad  # noqa: E402

CONFIG = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2)
B, LR, MIN_LR, WARMUP, BETAS, WEIGHT_DECAY, CLIP = 64, 1e-3, 1e-4, 100, (0.9, 0.99), 0.1, 1.0


def load_text(path):
    """Character ids of the text, split 90/10 into train and val (as nanoGPT's shakespeare_char)."""
    text = Path(path).read_text()
    chars = sorted(set(text))
    ids = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lookup = np.zeros(max(map(ord, chars)) + 1, dtype=np.uint16)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    ids = lookup[ids]
    n = int(0.9 * len(ids))
    return {"train": ids[:n], "val": ids[n:]}, len(chars)


def get_batch(data, split, rng):
    d = data[split]
    T = CONFIG["block_size"]
    starts = rng.integers(0, len(d) - T - 1, B)
    x = np.stack([d[s:s + T] for s in starts]).astype(np.int64)
    y = np.stack([d[s + 1:s + 1 + T] for s in starts]).astype(np.int64)
    return x, y


# ---- ours ----------------------------------------------------------------------------------------

class Ours:
    name = "tinygrad_llm (CuPy)"

    def __init__(self, model, max_iters):
        import cupy as cp
        self.cp, self.model, self.max_iters = cp, model.to("cuda"), max_iters
        if model.config.dtype == "bfloat16":
            self.name += ", bf16 mixed precision"
        self.opt = AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS)
        self.params = model.parameters()
        self.rng = np.random.default_rng(1)     # dropout seeds

    def step(self, x, y, it):
        self.opt.lr = cosine_lr(it, LR, MIN_LR, WARMUP, self.max_iters)
        self.model.train()
        with precision.weight_copies():              # bf16: each weight rounded once a step
            with dropout_scope(self.model, CONFIG["dropout"], self.rng):   # one device seed a step, as the graph's
                _, loss = self.model(x, y, rng=self.rng)     # NumPy batches: checked on the host, then copied
            loss.backward()
        clip_grad_norm(self.params, CLIP)
        self.opt.step()
        self.opt.zero_grad()
        return loss

    def eval_loss(self, x, y):
        self.model.eval()
        with no_grad():
            _, loss = self.model(x, y)
        return loss.item()

    def sync(self):
        self.cp.cuda.Device().synchronize()

    def peak_bytes(self):
        return self.cp.get_default_memory_pool().total_bytes()  # the pool keeps what it reached

    def memory_baseline(self):
        """Before this runner's model exists: what the pool holds for others (its cached free blocks let go)."""
        self.cp.get_default_memory_pool().free_all_blocks()
        return self.cp.get_default_memory_pool().total_bytes()

    def event(self):
        event = self.cp.cuda.Event()
        event.record()
        return event

    def elapsed_ms(self, start, end):
        end.synchronize()
        return self.cp.cuda.get_elapsed_time(start, end)


class OursGraph(Ours):
    """The same step captured once as a CUDA graph and replayed (tinygrad_llm/cuda_graph.py): the same batches
    and dropout seeds give the eager step's losses. Captured under the TF32 setting of its mode."""

    def __init__(self, model, max_iters):
        super().__init__(model, max_iters)
        self.name += ", CUDA graph"
        self.graph = CudaGraphStep(self.model, self.opt, B, CONFIG["block_size"], grad_accum=1, grad_clip=CLIP)

    def step(self, x, y, it):
        loss, _ = self.graph([(x, y)], [step_seed(self.rng)], cosine_lr(it, LR, MIN_LR, WARMUP, self.max_iters))
        if self.graph.failure:   # (the step fell back to eager: no graph figures to report)
            raise RuntimeError(f"not captured: {self.graph.failure}")
        return loss

    def peak_bytes(self):   # the default pool (weights, gradients, AdamW state) + the graph's own pool
        return self.cp.get_default_memory_pool().total_bytes() + self.graph.memory_bytes()


# ---- PyTorch -------------------------------------------------------------------------------------

def torch_gpt(cfg, state):
    """Our architecture in PyTorch (GPT-2 names, Conv1D (in, out) weights), loaded with `state`."""
    import torch
    nn, F = torch.nn, torch.nn.functional

    class Conv1D(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.zeros(n_in, n_out)), nn.Parameter(torch.zeros(n_out))

        def forward(self, x):
            return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            C = cfg.n_embd
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.attn = nn.Module()
            self.attn.c_attn, self.attn.c_proj = Conv1D(C, 3 * C), Conv1D(C, C)
            self.mlp = nn.Module()
            self.mlp.c_fc, self.mlp.c_proj = Conv1D(C, 4 * C), Conv1D(4 * C, C)
            self.drop = nn.Dropout(cfg.dropout)

        def forward(self, x):
            Bx, T, C = x.shape
            q, k, v = [t.view(Bx, T, cfg.n_head, C // cfg.n_head).transpose(1, 2)
                       for t in self.attn.c_attn(self.ln_1(x)).split(C, dim=2)]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=cfg.dropout if self.training else 0.0)
            y = y.transpose(1, 2).reshape(Bx, T, C)
            x = x + self.drop(self.attn.c_proj(y))
            return x + self.drop(self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh")))

    class GPTTorch(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd), wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                h=nn.ModuleList([Block() for _ in range(cfg.n_layer)]), ln_f=nn.LayerNorm(cfg.n_embd)))
            self.drop = nn.Dropout(cfg.dropout)

        def forward(self, idx, targets):
            tr = self.transformer
            x = self.drop(tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1], device=idx.device)))
            for block in tr.h:
                x = block(x)
            logits = tr.ln_f(x) @ tr.wte.weight.T
            return logits, F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    model = GPTTorch()
    state = {k: torch.from_numpy(v) for k, v in state.items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=True)
    return model.cuda()


class Torch:
    name = "PyTorch eager"

    def __init__(self, model_state, cfg, max_iters, compiled_bf16=False):
        """compiled_bf16: the model under torch.compile (default mode), its forward and loss under
        torch.autocast("cuda", torch.bfloat16) (the optimizer as in eager: AdamW's default foreach)."""
        import contextlib

        import torch
        self.torch, self.max_iters = torch, max_iters
        torch.manual_seed(1)
        self.model = torch_gpt(cfg, model_state)
        self.forward, self.autocast = self.model, contextlib.nullcontext
        if compiled_bf16:
            self.name = "PyTorch torch.compile + bf16 autocast"
            self.forward = torch.compile(self.model)
            self.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        params = list(self.model.parameters())
        self.opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                                      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                     lr=LR, betas=BETAS)

    def step(self, x, y, it):
        torch = self.torch
        for group in self.opt.param_groups:
            group["lr"] = cosine_lr(it, LR, MIN_LR, WARMUP, self.max_iters)
        self.model.train()
        with self.autocast():
            _, loss = self.forward(torch.from_numpy(x).cuda(non_blocking=True), torch.from_numpy(y).cuda(non_blocking=True))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def eval_loss(self, x, y):
        torch = self.torch
        self.model.eval()
        with torch.no_grad(), self.autocast():
            _, loss = self.forward(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda())
        return loss.item()

    def sync(self):
        self.torch.cuda.synchronize()

    def peak_bytes(self):
        return self.torch.cuda.max_memory_reserved()

    def memory_baseline(self):
        self.torch.cuda.empty_cache()
        self.torch.cuda.reset_peak_memory_stats()
        return self.torch.cuda.memory_reserved()

    def event(self):
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start, end):
        end.synchronize()
        return start.elapsed_time(end)


# ---- runs ----------------------------------------------------------------------------------------

# mode -> (framework, dtype, TF32 matmuls): what --steps compares, in one process
MODES = {
    "ours fp32": ("ours", "float32", False),
    "ours tf32": ("ours", "float32", True),
    "ours bf16": ("ours", "bfloat16", False),
    "ours fp32 graph": ("ours_graph", "float32", False),
    "ours tf32 graph": ("ours_graph", "float32", True),
    "ours bf16 graph": ("ours_graph", "bfloat16", False),
    "torch eager fp32": ("torch", "float32", False),
    "torch eager tf32": ("torch", "float32", True),
    "torch compile bf16": ("torch", "bfloat16", False),
}


def make_runner(kind, vocab, max_iters, dtype="float32"):
    """ours or torch, from the same initial weights; dtype bfloat16: ours in bf16 mixed precision, PyTorch
    compiled under bf16 autocast."""
    cfg = GPTConfig(vocab_size=vocab, **CONFIG)
    model = GPT(cfg, rng=np.random.default_rng(1337))
    if kind in ("ours", "ours_graph"):
        runner = Ours if kind == "ours" else OursGraph
        if dtype == "bfloat16":
            bf16 = GPT(GPTConfig(vocab_size=vocab, dtype="bfloat16", **CONFIG), rng=np.random.default_rng(1337))
            return runner(bf16, max_iters)
        return runner(model, max_iters)
    return Torch(model.state_dict(), cfg, max_iters, compiled_bf16=dtype == "bfloat16")


def set_tf32(enabled):
    """TF32 matmuls on or off in both frameworks (CuPy's compute type, PyTorch's backend flags)."""
    import torch
    backend.set_tf32(enabled)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def memory_baseline(kind):
    """What the framework's allocator holds before a new runner exists (its free cached blocks let go)."""
    if kind in ("ours", "ours_graph"):
        import cupy as cp
        pool = cp.get_default_memory_pool()
        pool.free_all_blocks()
        return pool.total_bytes()
    import torch
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_reserved()


def time_steps(data, vocab, steps, modes=tuple(MODES), warmup=10, block=10, kernel_steps=0):
    """Each mode's median times per step (module docstring), alternating blocks of `block` steps."""
    rng = np.random.default_rng(0)
    runners, peak, warm_s = {}, {}, {}
    for mode in modes:   # built and warmed up one at a time: each one's memory is its allocator's growth
        kind, dtype, tf32 = MODES[mode]
        set_tf32(tf32)
        base = memory_baseline(kind)
        t0 = time.perf_counter()
        try:
            runner = make_runner(kind, vocab, 5000, dtype)
            for it in range(warmup):
                runner.step(*get_batch(data, "train", rng), it)
            runner.sync()
        except Exception as e:   # one mode failing (a compiler missing, say) leaves the others measured
            print(f"{mode}: failed, left out: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        runners[mode] = runner
        warm_s[mode] = time.perf_counter() - t0
        peak[mode] = runner.peak_bytes() - base
        print(f"{mode}: built and warmed up in {warm_s[mode]:.1f} s, peak {peak[mode] / 2 ** 20:.0f} MiB", flush=True)
    times = {mode: {"wall": [], "issue": [], "gpu_span": []} for mode in runners}
    losses = {mode: [] for mode in runners}
    it = warmup
    while min(len(t["wall"]) for t in times.values()) < steps:
        for mode, runner in runners.items():
            set_tf32(MODES[mode][2])
            for _ in range(block):
                x, y = get_batch(data, "train", rng)
                runner.sync()
                start = runner.event()
                t0 = time.perf_counter()
                loss = runner.step(x, y, it)
                issued = time.perf_counter()
                end = runner.event()
                runner.sync()
                t1 = time.perf_counter()
                times[mode]["wall"].append(t1 - t0)
                times[mode]["issue"].append(issued - t0)
                times[mode]["gpu_span"].append(runner.elapsed_ms(start, end) / 1e3)
                losses[mode].append(float(loss.item()))
        it += block
    kernel_ms = kernel_times(data, runners, kernel_steps) if kernel_steps else {}
    result = {}
    for mode, runner in runners.items():
        ms = {k: statistics.median(v[:steps]) * 1e3 for k, v in times[mode].items()}
        result[mode] = {"framework": runner.name, "ms_per_step": round(ms["wall"], 2),
                        "host_issue_ms": round(ms["issue"], 2), "gpu_span_ms": round(ms["gpu_span"], 2),
                        "gpu_kernel_ms": kernel_ms.get(mode), "tokens_per_s": round(B * CONFIG["block_size"] / ms["wall"] * 1e3),
                        "peak_gpu_mib": round(peak[mode] / 2 ** 20), "warmup_s": round(warm_s[mode], 1),
                        "loss_first": round(losses[mode][0], 4), "loss_last": round(losses[mode][-1], 4)}
    return result


def kernel_times(data, runners, steps):
    """ms of GPU kernels a step for each runner: the sum of its kernels' durations over `steps` steps
    (torch.profiler, which sees CuPy's launches too through CUPTI), divided by steps."""
    from torch.profiler import ProfilerActivity, profile
    rng, out = np.random.default_rng(1), {}
    for mode, runner in runners.items():
        set_tf32(MODES[mode][2])
        runner.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for it in range(steps):
                runner.step(*get_batch(data, "train", rng), it)
            runner.sync()
        total = sum(e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0)
        out[mode] = round(total / steps / 1e3, 2)
    return out


def table(result, reference="torch eager fp32"):
    """A Markdown table of time_steps' result, with each mode's time over PyTorch's eager (same precision
    family: fp32 -> eager fp32, tf32 -> eager tf32, bf16 -> compiled bf16)."""
    anchors = {"fp32": "torch eager fp32", "tf32": "torch eager tf32", "bf16": "torch compile bf16"}
    lines = ["| mode | ms/step | host issue ms | GPU span ms | GPU kernels ms | tokens/s | peak MiB | vs PyTorch |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for mode, r in result.items():
        anchor = next((anchors[t] for t in mode.split() if t in anchors), reference)
        ratio = (f"{r['ms_per_step'] / result[anchor]['ms_per_step']:.2f}x {anchor}"
                 if anchor in result and anchor != mode else "")
        kernels = "" if r["gpu_kernel_ms"] is None else f"{r['gpu_kernel_ms']:.2f}"
        lines.append(f"| {mode} | {r['ms_per_step']:.2f} | {r['host_issue_ms']:.2f} | {r['gpu_span_ms']:.2f} | "
                     f"{kernels} | {r['tokens_per_s']:,} | {r['peak_gpu_mib']:,} | {ratio} |")
    return "\n".join(lines)


def profile_steps(data, vocab, steps, out, rows=30, dtype="float32"):
    """GPU kernel time per step of each framework, by kernel (torch.profiler sees CuPy's launches through CUPTI)."""
    from torch.profiler import ProfilerActivity, profile
    rng = np.random.default_rng(0)
    for kind in ("ours", "torch"):
        runner = make_runner(kind, vocab, 5000, dtype)
        for it in range(5):
            runner.step(*get_batch(data, "train", rng), it)
        runner.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for it in range(steps):
                runner.step(*get_batch(data, "train", rng), it)
            runner.sync()
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        total = sum(e.self_device_time_total for e in events) / steps / 1e3
        print(f"\n## {runner.name}: {total:.2f} ms of GPU kernels a step ({steps} steps), "
              f"{sum(e.count for e in events) / steps:.0f} launches a step", file=out)
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
            print(f"{e.self_device_time_total / steps / 1e3:8.3f} ms {e.count // steps:5d}x  {e.key[:110]}", file=out)
        out.flush()
        del runner


def profile_by_op(data, vocab, steps, out, dtype="float32"):
    """Our GPU kernel time a step by Function (forward / backward), optimizer and autograd engine.

    Every Function's forward and backward, clip_grad_norm and AdamW.step run inside a torch.profiler
    record_function range; each kernel is charged to the innermost range open when it was launched
    (matched through the launch's correlation id in the exported trace). "engine" is what Tensor.backward
    itself launches: the sums of gradients that meet at a tensor used twice, and the leaves' .grad copies.
    """
    import collections
    import tempfile

    from torch.profiler import ProfilerActivity, profile, record_function

    import tinygrad_llm.optim as optim_module
    import tinygrad_llm.tensor as tensor_module

    accelerated = backend.accelerated

    class Ranged:
        def __init__(self, impl, name):
            self.impl, self.name = impl, name
            self.sums_pending = getattr(impl, "sums_pending", ())   # what the engine offers the kernel (tensor.py)

        def forward(self, ctx, *args, **attrs):
            with record_function(f"{self.name}.forward"):
                return self.impl.forward(ctx, *args, **attrs)

        def backward(self, ctx, dout):
            with record_function(f"{self.name}.backward"):
                return self.impl.backward(ctx, dout)

    def ranged_accelerated(reference, *arrays):   # Functions get ranges; plain functions (optimizer) run as they are
        impl = accelerated(reference, *arrays)
        return Ranged(impl, reference.__name__) if isinstance(reference, type) else impl

    tensor_module.backend.accelerated = ranged_accelerated
    rng = np.random.default_rng(0)
    runner = make_runner("ours", vocab, 5000, dtype)
    for name in ("step", "zero_grad"):
        method = getattr(runner.opt, name)
        setattr(runner.opt, name, lambda method=method, name=name: _ranged(record_function, f"AdamW.{name}", method))
    clip = optim_module.clip_grad_norm
    globals()["clip_grad_norm"] = lambda *a, **k: _ranged(record_function, "clip_grad_norm", clip, *a, **k)
    backward = tensor_module.Tensor.backward
    tensor_module.Tensor.backward = lambda self, *a, **k: _ranged(record_function, "engine", backward, self, *a, **k)
    try:
        for it in range(3):
            runner.step(*get_batch(data, "train", rng), it)
        runner.sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for it in range(steps):
                runner.step(*get_batch(data, "train", rng), it)
            runner.sync()
    finally:
        tensor_module.backend.accelerated = accelerated
        tensor_module.Tensor.backward = backward
        globals()["clip_grad_norm"] = clip
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))["traceEvents"]
    ranges = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in trace if e.get("cat") == "user_annotation")
    launch_range = {}
    for e in trace:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            inside = [r for r in ranges if r[0] <= e["ts"] <= r[1]]
            launch_range[e["args"]["correlation"]] = min(inside, key=lambda r: r[1] - r[0])[2] if inside else "other"
    time_by, count_by = collections.Counter(), collections.Counter()
    for e in trace:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            where = launch_range.get(e.get("args", {}).get("correlation"), "other")
            kernel = e["name"].split("(")[0].split("<")[0].replace("void ", "")[:48]
            time_by[where, kernel] += e["dur"] / steps / 1e3
            count_by[where, kernel] += 1 / steps
    # GPU idle: the gaps between consecutive kernels, charged to the range that launched the kernel after
    kernels = sorted((e["ts"], e["ts"] + e["dur"], launch_range.get(e.get("args", {}).get("correlation"), "other"))
                     for e in trace if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    idle, end = collections.Counter(), None
    for start, stop, where in kernels:
        if end is not None and start > end:
            idle[where] += (start - end) / steps / 1e3
        end = stop if end is None else max(end, stop)
    print(f"\nGPU idle between kernels: {sum(idle.values()):.2f} ms a step (the last step's end to the next's "
          "start included); before the kernels of: " + ", ".join(f"{w} {ms:.2f}" for w, ms in idle.most_common(8)),
          file=out)
    total = collections.Counter()
    for (where, _), ms in time_by.items():
        total[where] += ms
    print(f"\n## {runner.name}, by op: {sum(total.values()):.2f} ms of GPU kernels a step", file=out)
    for where, ms in total.most_common():
        kernels = ", ".join(f"{k} {count_by[w, k]:.0f}x {t:.2f}" for (w, k), t in time_by.most_common() if w == where)
        print(f"{ms:8.3f} ms  {where:32s} {kernels[:220]}", file=out)
    out.flush()


def _ranged(record_function, name, fn, *args, **kwargs):
    with record_function(name):
        return fn(*args, **kwargs)


def train_run(kind, data, vocab, max_iters, eval_interval, eval_iters, log, dtype="float32"):
    runner = make_runner(kind, vocab, max_iters, dtype)
    rng = np.random.default_rng(0)
    step_times, best_val, best_iter, history = [], math.inf, None, []
    start = time.perf_counter()
    for it in range(max_iters + 1):
        if it % eval_interval == 0 or it == max_iters:
            eval_rng = np.random.default_rng((7, it))
            losses = {split: statistics.fmean(runner.eval_loss(*get_batch(data, split, eval_rng)) for _ in range(eval_iters))
                      for split in ("train", "val")}
            if losses["val"] < best_val:
                best_val, best_iter = losses["val"], it
            history.append({"iter": it, **{k: round(v, 4) for k, v in losses.items()},
                            "elapsed_s": round(time.perf_counter() - start, 1)})
            print(f"[{kind}] iter {it}: train {losses['train']:.4f} val {losses['val']:.4f} "
                  f"({time.perf_counter() - start:.0f} s, median step "
                  f"{statistics.median(step_times) * 1e3 if step_times else 0:.2f} ms)", file=log, flush=True)
        if it == max_iters:
            break
        x, y = get_batch(data, "train", rng)
        t0 = time.perf_counter()
        runner.step(x, y, it)
        runner.sync()
        step_times.append(time.perf_counter() - t0)
    ms = statistics.median(step_times[10:]) * 1e3
    return {"framework": runner.name, "iters": max_iters, "best_val_loss": round(best_val, 4), "best_iter": best_iter,
            "ms_per_step": round(ms, 2), "tokens_per_s": round(B * CONFIG["block_size"] / ms * 1e3),
            "peak_gpu_mib": round(runner.peak_bytes() / 2 ** 20), "wall_s": round(time.perf_counter() - start, 1),
            "history": history}


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_TEXT, help="the text (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="time this many steps of each mode (default: no timing)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="with --steps: the modes to time, comma-separated (default: all, %(default)s)")
    parser.add_argument("--kernel_steps", type=positive_int, default=None,
                        help="with --steps: also each mode's GPU kernel time a step, over this many profiled steps "
                             "(default: not measured)")
    parser.add_argument("--train", choices=("ours", "ours_graph", "torch"),
                        help="run the whole training of one framework (ours_graph: ours as a CUDA graph)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="with --train and --profile: bfloat16 is ours in bf16 mixed precision, PyTorch "
                             "compiled under bf16 autocast (default %(default)s)")
    parser.add_argument("--iters", type=positive_int, default=5000, help="with --train (default %(default)s)")
    parser.add_argument("--eval_interval", type=positive_int, default=250, help="with --train (default %(default)s)")
    parser.add_argument("--eval_iters", type=positive_int, default=50, help="with --train (default %(default)s)")
    parser.add_argument("--profile", type=positive_int, default=None,
                        help="print the GPU kernels of this many steps of each (default: no profile)")
    parser.add_argument("--by_op", action="store_true", help="with --profile: our kernels charged to each op")
    parser.add_argument("--tf32", action="store_true",
                        help="TF32 matmuls in both frameworks for --train and --profile (--steps: each mode's own)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    require_file(parser, "--data", args.data)
    args.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes: unknown mode(s) {unknown}; expected some of {list(MODES)}")
    return args


def main():
    args = parse_args()
    try:
        import cupy as cp
    except ImportError:
        sys.exit("error: this benchmark needs CuPy and a CUDA GPU: pip install -e '.[cuda]'")
    import torch
    backend.set_tf32(args.tf32)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    data, vocab = load_text(args.data)
    from tinygrad_llm.kernels.cuda import attention
    results = {"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "tf32": args.tf32,
               "cupy": cp.__version__, "torch": torch.__version__, "numpy": np.__version__,
               "attention_save": attention.save_mode()}   # TINYGRAD_LLM_ATTENTION_SAVE
    print(json.dumps(results), flush=True)
    if args.steps:
        results["timing"] = time_steps(data, vocab, args.steps, args.modes, kernel_steps=args.kernel_steps or 0)
        set_tf32(args.tf32)
        print(json.dumps(results["timing"], indent=1), flush=True)
        print(table(results["timing"]), flush=True)
    if args.profile and args.by_op:
        profile_by_op(data, vocab, args.profile, sys.stdout, dtype=args.dtype)
    elif args.profile:
        profile_steps(data, vocab, args.profile, sys.stdout, dtype=args.dtype)
    if args.train:
        results["train"] = train_run(args.train, data, vocab, args.iters, args.eval_interval, args.eval_iters, sys.stdout,
                                     args.dtype)
        print(json.dumps({k: v for k, v in results["train"].items() if k != "history"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
