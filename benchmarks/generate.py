"""Generation speed on the CPU: tokens per second of greedy decoding with the KV cache, ours against
Hugging Face transformers' `generate` on the same weights, in one process.

    python benchmarks/generate.py                       # GPT-2 124M shape, 128 new tokens, 3 rounds
    python benchmarks/generate.py --rounds 5 --prompt_len 32

A GPT-2-124M-shaped model with random weights is made by transformers (seeded), saved as safetensors to a
temporary folder, and loaded here from that folder (GPT.from_pretrained), so both sides run the same float32
weights. Each round times ours and transformers (the order alternates between rounds), after one warm-up
run of each; the figures are medians over the rounds, of wall time and of this process's CPU time (which the other
jobs on a shared machine disturb less). Both sides get the same number of threads (--threads:
OpenBLAS's for NumPy, torch's intra-op threads), 1 by default: decoding is one matrix-vector product after
another, and on a machine shared with other jobs two-thread products wait for a descheduled thread (both
libraries measured 5-8x slower per token with 2 threads than with 1 on the project's busy 2-core VM).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402

from tinygrad_llm.model import GPT  # noqa: E402
from tinygrad_llm.sample import generate  # noqa: E402


def make_hf_model(folder, n_layer, n_head, n_embd, vocab_size, block_size, seed):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                        n_positions=block_size, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def time_ours(model, prompt, n_new):
    t0, c0 = time.perf_counter(), time.process_time()
    out = generate(model, prompt, n_new, temperature=0)
    return time.perf_counter() - t0, time.process_time() - c0, out[len(prompt):]


def time_hf(model, prompt, n_new):
    import torch
    ids = torch.tensor(prompt[None, :])
    with torch.inference_mode():
        t0, c0 = time.perf_counter(), time.process_time()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, use_cache=True, num_beams=1, pad_token_id=0)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dt, cpu, out[0, len(prompt):].numpy()


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--vocab_size", type=int, default=50257)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--prompt_len", type=int, default=16, help="random prompt ids (default: 16)")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens generated per run (default: 128)")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each after the warm-up (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt (default: 0)")
    p.add_argument("--threads", type=int, default=1, help="BLAS / torch threads of both sides (default: 1)")
    args = p.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits
    threadpool_limits(args.threads)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} and numpy {np.__version__}, {args.threads} thread(s) each", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        hf = make_hf_model(folder, args.n_layer, args.n_head, args.n_embd, args.vocab_size, args.block_size, args.seed)
        t0 = time.perf_counter()
        ours = GPT.from_pretrained(folder)
        print(f"loaded the saved folder in {time.perf_counter() - t0:.2f} s ({ours.num_params() / 1e6:.1f}M parameters)",
              flush=True)
    prompt = np.random.default_rng(args.seed).integers(0, args.vocab_size, args.prompt_len).astype(np.int64)

    time_ours(ours, prompt, args.new_tokens)                   # warm-up
    time_hf(hf, prompt, args.new_tokens)
    wall, cpu, outs = {"ours": [], "hf": []}, {"ours": [], "hf": []}, {}
    for r in range(args.rounds):
        for who in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
            dt, dc, outs[who] = (time_ours if who == "ours" else time_hf)(ours if who == "ours" else hf, prompt,
                                                                          args.new_tokens)
            wall[who].append(dt)
            cpu[who].append(dc)
            print(f"round {r}: {who:4s} {dt:.3f} s ({args.new_tokens / dt:.1f} tokens/s), CPU time {dc:.3f} s",
                  flush=True)
    same = int(np.cumprod(outs["ours"] == outs["hf"]).sum())
    print(f"greedy continuations agree on the first {same} of {args.new_tokens} tokens")
    for label, times in (("wall time", wall), ("CPU time", cpu)):
        tps = {who: args.new_tokens / statistics.median(t) for who, t in times.items()}
        print(f"median {label}: ours {tps['ours']:.1f} tokens/s ({1000 / tps['ours']:.1f} ms/token), transformers "
              f"{tps['hf']:.1f} tokens/s ({1000 / tps['hf']:.1f} ms/token); ours/transformers {tps['ours'] / tps['hf']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
