"""Causal self-attention on one GPU, forward + backward: our flash kernels and our stored-probabilities
(cuBLAS) path beside torch.nn.functional.scaled_dot_product_attention, in one process.

    python benchmarks/flash_attention.py                                  # the default shapes, float32 and bf16
    python benchmarks/flash_attention.py --shapes 8,2048,6,64 --dropout 0.2

Each shape is B,T,NH,HS: a packed (B, T, 3C) qkv as a GPT block's c_attn makes it, read as q, k, v views
by all three (torch: split, view, transpose, as nanoGPT). A row gives the median of --repeats CUDA-event
timings after --warmup untimed runs, of the forward alone and of forward + backward (the gradient of qkv
written), and the peak GPU memory of one forward + backward above what the inputs held: the high-water
mark of a CuPy memory pool made for that one run (what it needed at once, in the pool's 512-byte rounding)
against torch.cuda.max_memory_allocated less what was allocated before. Both keep y and the qkv gradient
alive to the end. Our bf16 runs store bfloat16 bits in uint16 arrays (the flash kernels only: the cuBLAS
path here has no bf16); torch's are torch.bfloat16. Our paths: "mma" the tensor-core kernels (flash_mma.py;
bf16 in and out in bf16, 3xTF32 in float32: what SelfAttentionCuda's flash path runs on heads of 32 or 64),
"CUDA cores" flash_attention.py's float32 FMA kernels (on bf16 bits in bf16) with dQ fused or separate, and
"stored" the cuBLAS path (float32). TF32 stays off in both (torch's float32 SDPA picks its own kernel). Check
rows compare our flash outputs with torch's (relative to the largest element).
"""
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli_args import Parser, positive_int  # noqa: E402

DEFAULT_SHAPES = "8,2048,6,64;64,256,6,64;32,512,6,64;16,1024,6,64;4,4096,6,64;8,2048,3,128"


def shape_list(text):
    """An argparse type: 'B,T,NH,HS;...' -> [(B, T, NH, HS), ...], every number positive."""
    import argparse
    try:
        shapes = [tuple(int(n) for n in part.split(",")) for part in text.split(";") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be B,T,NH,HS;... of integers, got {text!r}") from None
    if not shapes or any(len(s) != 4 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"must be B,T,NH,HS;... of positive integers, got {text!r}")
    return shapes


def dropout_value(text):
    import argparse
    try:
        p = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0 <= p < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {p}")
    return p


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--shapes", type=shape_list, default=shape_list(DEFAULT_SHAPES),
                        help=f"B,T,NH,HS;... (default {DEFAULT_SHAPES})")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="float32 and/or bfloat16 (default %(default)s)")
    parser.add_argument("--dropout", type=dropout_value, default=0.0, help="attention dropout (default %(default)s)")
    parser.add_argument("--warmup", type=positive_int, default=3, help="untimed runs first (default %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed runs, median (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not args.dtypes or any(d not in ("float32", "bfloat16") for d in args.dtypes):
        parser.error(f"argument --dtypes: must be float32 and/or bfloat16, got {','.join(args.dtypes)!r}")
    return args


def timed(fn, sync_events, warmup, repeats):
    """Median milliseconds of fn() over `repeats` runs (after `warmup`), with (make_event, elapsed) events."""
    make, elapsed = sync_events
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = make(), make()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(elapsed(start, end))
    return statistics.median(times)


def ours(cp, shape, dtype, path, dropout, args):
    """Our forward and forward + backward (ms), peak MiB, and y as float32, for path 'mma' (flash_mma.py),
    'CUDA cores' (flash_attention.py, dQ fused into the dK/dV kernel), 'CUDA cores, dQ separate' (its own
    kernel) or 'stored' (the cuBLAS path)."""
    import numpy as np

    from tinygrad_llm.kernels.cuda import attention, flash_attention as flash, flash_mma
    from tinygrad_llm.tensor import Context
    B, T, NH, HS = shape
    rng = np.random.default_rng(0)
    qkv = cp.asarray(rng.standard_normal((B, T, 3 * NH * HS), dtype=np.float32))
    dout = cp.asarray(rng.standard_normal((B, T, NH * HS), dtype=np.float32))
    if dtype == "bfloat16":
        qkv, dout = flash.to_bfloat16_bits(qkv), flash.to_bfloat16_bits(dout)
    scale, gen = HS ** -0.5, np.random.default_rng(1)
    attention.FLASH = "0" if path == "stored" else "1"
    flash.FUSED_DQ = path != "CUDA cores, dQ separate"
    flash_mma.MMA = "1" if path == "mma" else "0"

    def forward():
        if path == "mma" and dtype == "bfloat16":
            return None, flash_mma.self_attention_forward(qkv, NH, True, scale, 12345, dropout, output="bfloat16")
        if dtype == "bfloat16":
            return None, flash.self_attention_forward(qkv, NH, True, scale, 12345, dropout, storage="bfloat16")
        ctx = Context((True,))
        return ctx, attention.SelfAttentionCuda.forward(ctx, qkv, NH, causal=True, scale=scale, dropout_p=dropout, rng=gen)

    def step():
        ctx, out = forward()
        if path == "mma" and dtype == "bfloat16":
            return out[0], flash_mma.self_attention_backward(qkv, *out, dout, NH, True, scale, 12345, dropout,
                                                             output="bfloat16")
        if dtype == "bfloat16":
            return out[0], flash.self_attention_backward(qkv, *out, dout, NH, True, scale, 12345, dropout,
                                                         storage="bfloat16")
        return out, attention.SelfAttentionCuda.backward(ctx, dout)

    events = (cp.cuda.Event, cp.cuda.get_elapsed_time)
    fwd = timed(forward, events, args.warmup, args.repeats)
    both = timed(step, events, args.warmup, args.repeats)
    cp.cuda.Device().synchronize()
    pool = cp.cuda.MemoryPool()              # a pool of its own: it holds only what this run allocates
    with cp.cuda.using_allocator(pool.malloc):
        y, dqkv = step()
        cp.cuda.Device().synchronize()
        peak = pool.total_bytes() / 2 ** 20
    y = flash.from_bfloat16_bits(y) if dtype == "bfloat16" else y
    del dqkv
    return fwd, both, peak, cp.asnumpy(y)


def sdpa(torch, shape, dtype, dropout, args):
    """torch's forward and forward + backward (ms), peak MiB, and y as float32."""
    B, T, NH, HS = shape
    import numpy as np
    rng = np.random.default_rng(0)
    qkv = torch.tensor(rng.standard_normal((B, T, 3 * NH * HS), dtype=np.float32), device="cuda")
    dout = torch.tensor(rng.standard_normal((B, T, NH * HS), dtype=np.float32), device="cuda")
    tdtype = getattr(torch, dtype)
    qkv, dout = qkv.to(tdtype).requires_grad_(), dout.to(tdtype)

    def forward():
        q, k, v = [t.view(B, T, NH, HS).transpose(1, 2) for t in qkv.split(NH * HS, dim=2)]
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        return y.transpose(1, 2).reshape(B, T, NH * HS)

    def step():
        qkv.grad = None
        y = forward()
        y.backward(dout)
        return y

    events = (lambda: torch.cuda.Event(enable_timing=True), lambda a, b: a.elapsed_time(b))
    fwd = timed(forward, events, args.warmup, args.repeats)
    both = timed(step, events, args.warmup, args.repeats)
    qkv.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return fwd, both, peak, y.detach().float().cpu().numpy()


def main():
    args = parse_args()
    try:
        import cupy as cp
        import torch
    except ImportError:
        sys.exit("error: this benchmark needs CuPy, PyTorch and a CUDA GPU")
    import numpy as np
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "dropout": args.dropout, "rows": []}
    print(f"# {results['gpu']}, dropout {args.dropout}, median of {args.repeats} after {args.warmup} warm-up")
    print("| B,T,NH,HS | dtype | path | fwd ms | fwd+bwd ms | peak MiB | time / SDPA | memory / SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        for dtype in args.dtypes:
            t_fwd, t_both, t_peak, t_y = sdpa(torch, shape, dtype, args.dropout, args)
            rows = [("torch SDPA", t_fwd, t_both, t_peak)]
            for path in ("mma", "CUDA cores", "CUDA cores, dQ separate") + (("stored",) if dtype == "float32" else ()):
                fwd, both, peak, y = ours(cp, shape, dtype, path, args.dropout, args)
                rows.append((f"ours {path}", fwd, both, peak))
                if path in ("mma", "CUDA cores") and args.dropout == 0:
                    err = float(np.abs(y - t_y).max() / np.abs(t_y).max())
                    results["rows"].append({"shape": shape, "dtype": dtype, f"check_{path}_vs_torch": err})
                    print(f"| {','.join(map(str, shape))} | {dtype} | check: {path} vs torch rel err {err:.1e} "
                          "| | | | | |")
            for name, fwd, both, peak in rows:
                print(f"| {','.join(map(str, shape))} | {dtype} | {name} | {fwd:.3f} | {both:.3f} | {peak:.0f} | "
                      f"{both / t_both:.2f} | {peak / t_peak:.2f} |")
                results["rows"].append({"shape": shape, "dtype": dtype, "path": name, "fwd_ms": fwd,
                                        "fwd_bwd_ms": both, "peak_mib": peak})
            sys.stdout.flush()
            cp.get_default_memory_pool().free_all_blocks()
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
