"""Generation speed on the CPU: tokens per second of greedy decoding with the KV cache, ours against
Hugging Face transformers' `generate` on the same weights, in one process.

    python benchmarks/generate.py                       # GPT-2 124M shape, 128 new tokens, 3 rounds
    python benchmarks/generate.py --rounds 5 --prompt_len 32

A GPT-2-124M-shaped model with random weights is made by transformers (seeded), saved as safetensors to a
temporary folder, and loaded here from that folder, so both sides run the same float32 weights. Each round
times ours and then transformers (the order alternates between rounds), after one warm-up run of each;
the figures are medians over the rounds. Both use every core (torch's intra-op threads, OpenBLAS's).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import tinygrad_llm  # noqa: E402,F401  (first: it sets OpenBLAS's thread timeout before NumPy loads)
import numpy as np  # noqa: E402

from tinygrad_llm.generate import load_model  # noqa: E402
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
    t0 = time.perf_counter()
    out = generate(model, prompt, n_new, temperature=0)
    return time.perf_counter() - t0, out[len(prompt):]


def time_hf(model, prompt, n_new):
    import torch
    ids = torch.tensor(prompt[None, :])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, use_cache=True, num_beams=1, pad_token_id=0)
        dt = time.perf_counter() - t0
    return dt, out[0, len(prompt):].numpy()


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
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    print(f"torch {torch.__version__} on {torch.get_num_threads()} threads; numpy {np.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        hf = make_hf_model(folder, args.n_layer, args.n_head, args.n_embd, args.vocab_size, args.block_size, args.seed)
        t0 = time.perf_counter()
        ours = load_model(folder)
        print(f"loaded the saved folder in {time.perf_counter() - t0:.2f} s ({ours.num_params() / 1e6:.1f}M parameters)",
              flush=True)
    prompt = np.random.default_rng(args.seed).integers(0, args.vocab_size, args.prompt_len).astype(np.int64)

    time_ours(ours, prompt, args.new_tokens)                   # warm-up
    time_hf(hf, prompt, args.new_tokens)
    times = {"ours": [], "hf": []}
    outs = {}
    for r in range(args.rounds):
        order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")
        for who in order:
            dt, outs[who] = (time_ours(ours, prompt, args.new_tokens) if who == "ours" else
                             time_hf(hf, prompt, args.new_tokens))
            times[who].append(dt)
            print(f"round {r}: {who:4s} {dt:.3f} s  {args.new_tokens / dt:.1f} tokens/s", flush=True)
    same = int(np.cumprod(outs["ours"] == outs["hf"]).sum())
    print(f"greedy continuations agree on the first {same} of {args.new_tokens} tokens")
    med = {who: statistics.median(t) for who, t in times.items()}
    tps = {who: args.new_tokens / t for who, t in med.items()}
    print(f"median: ours {tps['ours']:.1f} tokens/s ({1000 * med['ours'] / args.new_tokens:.1f} ms/token), "
          f"transformers {tps['hf']:.1f} tokens/s ({1000 * med['hf'] / args.new_tokens:.1f} ms/token); "
          f"ours/transformers speed {tps['ours'] / tps['hf']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
