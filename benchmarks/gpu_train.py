"""Train the 6x384 character GPT on tiny Shakespeare on one GPU: ours (CuPy) beside PyTorch eager, one process.

    python benchmarks/gpu_train.py --steps 200                # step times only
    python benchmarks/gpu_train.py --train ours               # the 5000-iteration run
    python benchmarks/gpu_train.py --train torch --tf32

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
from tinygrad_llm import backend  # noqa: E402
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
        self.opt = AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS)
        self.params = model.parameters()
        self.rng = np.random.default_rng(1)     # dropout seeds

    def step(self, x, y, it):
        self.opt.lr = cosine_lr(it, LR, MIN_LR, WARMUP, self.max_iters)
        self.model.train()
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

    def __init__(self, model_state, cfg, max_iters):
        import torch
        self.torch, self.max_iters = torch, max_iters
        torch.manual_seed(1)
        self.model = torch_gpt(cfg, model_state)
        params = list(self.model.parameters())
        self.opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                                      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                     lr=LR, betas=BETAS)

    def step(self, x, y, it):
        torch = self.torch
        for group in self.opt.param_groups:
            group["lr"] = cosine_lr(it, LR, MIN_LR, WARMUP, self.max_iters)
        self.model.train()
        _, loss = self.model(torch.from_numpy(x).cuda(non_blocking=True), torch.from_numpy(y).cuda(non_blocking=True))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def eval_loss(self, x, y):
        torch = self.torch
        self.model.eval()
        with torch.no_grad():
            _, loss = self.model(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda())
        return loss.item()

    def sync(self):
        self.torch.cuda.synchronize()

    def peak_bytes(self):
        return self.torch.cuda.max_memory_reserved()


# ---- runs ----------------------------------------------------------------------------------------

def make_runner(kind, vocab, max_iters):
    cfg = GPTConfig(vocab_size=vocab, **CONFIG)
    model = GPT(cfg, rng=np.random.default_rng(1337))
    if kind == "ours":
        return Ours(model, max_iters)
    return Torch(model.state_dict(), cfg, max_iters)


def time_steps(data, vocab, steps, warmup=10, block=10):
    """Median ms per step of each framework, alternating blocks of `block` steps."""
    runners = {kind: make_runner(kind, vocab, 5000) for kind in ("ours", "torch")}
    rng = np.random.default_rng(0)
    times = {kind: [] for kind in runners}
    issue = {kind: [] for kind in runners}   # host time to issue a step (before the sync): the Python overhead
    losses = {kind: [] for kind in runners}
    it = 0
    while min(len(t) for t in times.values()) < warmup + steps:
        for kind, runner in runners.items():
            for _ in range(block):
                x, y = get_batch(data, "train", rng)
                runner.sync()
                t0 = time.perf_counter()
                loss = runner.step(x, y, it)
                issue[kind].append(time.perf_counter() - t0)
                runner.sync()
                times[kind].append(time.perf_counter() - t0)
                losses[kind].append(float(loss.item()))
        it += block
    result = {}
    for kind, runner in runners.items():
        ms = statistics.median(times[kind][warmup:warmup + steps]) * 1e3
        result[kind] = {"framework": runner.name, "ms_per_step": round(ms, 2),
                        "tokens_per_s": round(B * CONFIG["block_size"] / ms * 1e3),
                        "host_issue_ms": round(statistics.median(issue[kind][warmup:warmup + steps]) * 1e3, 2),
                        "peak_gpu_mib": round(runner.peak_bytes() / 2 ** 20),
                        "loss_first": round(losses[kind][0], 4), "loss_last": round(losses[kind][-1], 4)}
    result["ratio_ours_over_torch"] = round(result["ours"]["ms_per_step"] / result["torch"]["ms_per_step"], 3)
    return result


def profile_steps(data, vocab, steps, out, rows=30):
    """GPU kernel time per step of each framework, by kernel (torch.profiler sees CuPy's launches through CUPTI)."""
    from torch.profiler import ProfilerActivity, profile
    rng = np.random.default_rng(0)
    for kind in ("ours", "torch"):
        runner = make_runner(kind, vocab, 5000)
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


def profile_by_op(data, vocab, steps, out):
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
    runner = make_runner("ours", vocab, 5000)
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


def train_run(kind, data, vocab, max_iters, eval_interval, eval_iters, log):
    runner = make_runner(kind, vocab, max_iters)
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
                        help="time this many steps of each framework (default: no timing)")
    parser.add_argument("--train", choices=("ours", "torch"), help="run the whole training of one framework")
    parser.add_argument("--iters", type=positive_int, default=5000, help="with --train (default %(default)s)")
    parser.add_argument("--eval_interval", type=positive_int, default=250, help="with --train (default %(default)s)")
    parser.add_argument("--eval_iters", type=positive_int, default=50, help="with --train (default %(default)s)")
    parser.add_argument("--profile", type=positive_int, default=None,
                        help="print the GPU kernels of this many steps of each (default: no profile)")
    parser.add_argument("--by_op", action="store_true", help="with --profile: our kernels charged to each op")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls in both frameworks")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    require_file(parser, "--data", args.data)
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
    results = {"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "tf32": args.tf32,
               "cupy": cp.__version__, "torch": torch.__version__, "numpy": np.__version__}
    print(json.dumps(results), flush=True)
    if args.steps:
        results["timing"] = time_steps(data, vocab, args.steps)
        print(json.dumps(results["timing"], indent=1), flush=True)
    if args.profile and args.by_op:
        profile_by_op(data, vocab, args.profile, sys.stdout)
    elif args.profile:
        profile_steps(data, vocab, args.profile, sys.stdout)
    if args.train:
        results["train"] = train_run(args.train, data, vocab, args.iters, args.eval_interval, args.eval_iters, sys.stdout)
        print(json.dumps({k: v for k, v in results["train"].items() if k != "history"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
