"""Text generation: temperature, top-k, top-p (nucleus) sampling and greedy decoding, with a KV cache.

    rng = np.random.default_rng(0)
    out = generate(model, [[0]], max_new_tokens=100, temperature=0.8, top_k=40, rng=rng)   # (1, 101)
    out = generate(model, prompt_ids, 50, temperature=0)                                    # greedy

The filters apply in this order: divide the logits by the temperature, keep the top_k largest,
keep the smallest set of tokens whose probability adds up to at least top_p, sample from what is left.

From the command line (the checkpoint carries the model's config and its tokenizer):

    python -m tinygrad_llm.sample --ckpt out/shakespeare_char/ckpt.safetensors --prompt "ROMEO:" --top_k 40
"""
import math
from pathlib import Path

import numpy as np

from . import backend
from .cli import bounded, new_parser, parse_config_args, parse_float, parse_int, run_cli
from .tensor import no_grad


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """(B, V) logits -> (B, V) float64 logits with the filtered-out tokens at -inf.

    top_k keeps every token whose logit ties the k-th largest (as nanoGPT does). top_p keeps, in
    order of decreasing probability (ties broken by lower token id first), each token until the kept
    probability reaches top_p: the most likely token is always kept. top_p=1 keeps all.
    """
    logits = np.asarray(logits, dtype=np.float64) / temperature
    if top_k is not None:
        k = min(int(top_k), logits.shape[-1])
        kth = np.sort(logits, axis=-1)[:, -k][:, None]                 # (B, 1)
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p is not None and top_p < 1.0:
        probs = softmax(logits)
        order = np.argsort(-probs, axis=-1, kind="stable")              # most likely first
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep a token when the probability of those before it is still below top_p
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = before < top_p
        keep_sorted[:, 0] = True
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        logits = np.where(keep, logits, -np.inf)
    return logits


def softmax(logits):
    """(B, V) -> (B, V), stable; -inf logits get probability 0."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, rng=None):
    """(B, V) logits of the last position -> (B,) int64 next tokens.

    temperature 0 or top_k 1 is greedy (argmax, lowest id on ties) and needs no rng; otherwise rng
    (an np.random.Generator) draws one uniform number per row.
    """
    logits = np.asarray(backend.to_device(logits, "cpu"))
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if temperature == 0 or top_k == 1:
        return logits.argmax(axis=-1).astype(np.int64)
    if not isinstance(rng, np.random.Generator):
        raise ValueError("sampling needs rng, an np.random.Generator (or temperature=0 / top_k=1 for greedy)")
    probs = softmax(filter_logits(logits, temperature, top_k, top_p))
    cdf = np.cumsum(probs, axis=-1)                                     # (B, V)
    # u in (0, 1]: the first token whose cdf reaches u * total has nonzero probability
    u = (1.0 - rng.random(len(cdf)))[:, None] * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=-1), cdf.shape[-1] - 1).astype(np.int64)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=None, rng=None):
    """Continue idx (int (T,) or (B, T)) by up to max_new_tokens tokens; returns the ids, prompt included.

    The prompt runs once through the model filling a KV cache; each new token then costs one
    position. When the context would exceed block_size, the cache cannot help (learned positions
    would have to shift), so from then on every step recomputes the last block_size tokens in full.

    stop_tokens: ids that end generation; the stop token is kept in the output. With B > 1 rows, a
    row that has stopped repeats its stop token while the others go on, and generation ends when
    every row has stopped (so each row's text ends at its first stop token). The model runs in eval
    mode (no dropout) and is put back in its previous mode afterwards.
    """
    out = _as_batch(idx)
    steps = [nxt[:, None] for nxt in generate_stream(model, out, max_new_tokens, temperature, top_k, top_p,
                                                     stop_tokens, rng)]
    out = np.concatenate([out, *steps], axis=1)
    return out[0] if np.ndim(idx.data if hasattr(idx, "data") else idx) == 1 else out


def _as_batch(idx):
    """int (T,) or (B, T), on any device -> int64 (B, T) NumPy array."""
    idx = np.asarray(backend.to_device(idx.data if hasattr(idx, "data") else idx, "cpu"))
    out = idx[None, :] if idx.ndim == 1 else idx
    if out.ndim != 2 or out.shape[1] == 0:
        raise ValueError(f"idx must be a non-empty int array of shape (T,) or (B, T), got shape {idx.shape}")
    return out.astype(np.int64)


def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=None,
                    rng=None):
    """As generate(), one step at a time: yields each new (B,) int64 array of tokens as soon as it is chosen
    (for streaming). The model is back in its previous mode when the generator ends or is closed."""
    out = _as_batch(idx)
    block_size = model.config.block_size
    stops = np.array(sorted(set(stop_tokens or ())), dtype=np.int64)
    B = out.shape[0]
    stopped = np.zeros(B, dtype=bool)
    last_stop = np.zeros(B, dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            cache = None
            if out.shape[1] < block_size:
                cache = model.new_kv_cache(B)
                logits, _ = model(out, kv_cache=cache)
            else:
                logits, _ = model(out[:, -block_size:])
            for step in range(max_new_tokens):
                nxt = sample_next(logits.data[:, -1, :], temperature, top_k, top_p, rng)   # (B,)
                nxt = np.where(stopped, last_stop, nxt)
                out = np.concatenate([out, nxt[:, None]], axis=1)
                hit = np.isin(nxt, stops) & ~stopped
                last_stop[hit], stopped[hit] = nxt[hit], True
                yield nxt
                if stopped.all() or step == max_new_tokens - 1:
                    break
                if cache is not None and cache.length < block_size:
                    logits, _ = model(nxt[:, None], kv_cache=cache)
                else:
                    cache = None                      # context is full: recompute the last block_size tokens
                    logits, _ = model(out[:, -block_size:])
    finally:
        model.train(was_training)


def argument_parser():
    p = new_parser("Generate text from a checkpoint written by a training run.", prog="python -m tinygrad_llm.sample")
    p.add_argument("--ckpt", type=Path, default=Path("out/shakespeare_char/ckpt.safetensors"),
                   help="a .safetensors checkpoint from training (default: out/shakespeare_char/ckpt.safetensors, "
                        "where examples/train_shakespeare.py saves its best)")
    p.add_argument("--prompt", default="\n", help="text to continue, not empty (default: a newline)")
    p.add_argument("--max_new_tokens", type=bounded(parse_int, lambda n: n > 0, "a positive integer"), default=300,
                   help="tokens to generate (default: 300)")
    p.add_argument("--temperature", type=bounded(parse_float, lambda t: 0 <= t < math.inf, "a finite number >= 0"),
                   default=0.8, help="divides the logits; 0 is greedy decoding (default: 0.8)")
    p.add_argument("--top_k", type=bounded(parse_int, lambda k: k >= 1, "an integer >= 1"), default=None,
                   help="keep only the k most likely tokens (default: all)")
    p.add_argument("--top_p", type=bounded(parse_float, lambda q: 0 < q <= 1, "in (0, 1]"), default=None,
                   help="keep the most likely tokens up to this total probability (default: 1, all)")
    p.add_argument("--seed", type=parse_int, default=1337, help="seed of the sampling (default: 1337)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the model runs; cuda needs CuPy (default: cpu)")
    return p


def main(argv=None):
    """`python -m tinygrad_llm.sample --ckpt PATH [--prompt TEXT] ...`; --help lists the options."""
    run_cli(_main, argv)


def _main(argv):
    from .checkpoint import load_model
    from .tokenizer import tokenizer_from_dict
    from .backend import check_device

    args = parse_config_args(argument_parser(), argv)
    if not args["prompt"]:
        raise ValueError("--prompt is empty: give some text to continue (the default is a newline)")
    check_device(args["device"])
    model, meta = load_model(args["ckpt"])        # built from the checkpoint's own config
    if "tokenizer" not in meta:
        raise ValueError(f"{args['ckpt']} holds no tokenizer in its metadata")
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    prompt_ids = tokenizer.encode(args["prompt"])
    model.to(args["device"])
    ids = generate(model, np.asarray(prompt_ids, dtype=np.int64), args["max_new_tokens"], temperature=args["temperature"],
                   top_k=args["top_k"], top_p=args["top_p"], rng=np.random.default_rng(args["seed"]))
    print(tokenizer.decode(ids.tolist()))


if __name__ == "__main__":
    main()
