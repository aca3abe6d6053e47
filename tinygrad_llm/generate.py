"""Generate text from a model on the command line; the loading and streaming that the server shares.

    python -m tinygrad_llm.generate --model out/shakespeare_char/ckpt.safetensors --prompt "ROMEO:"
    python -m tinygrad_llm.generate --model gpt2-folder --prompt "The meaning of" --temperature 0 --max_new_tokens 40

--model is a Hugging Face folder (config.json, model.safetensors and the tokenizer's vocab.json +
merges.txt) or a training checkpoint (the tokenizer is in it). stdout gets the prompt and then the
continuation, each token's text written as soon as it is made; everything else goes to stderr.
Generation ends after --max_new_tokens tokens or at the model's end-of-text token (not printed).
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .backend import check_device
from .cli import new_parser, parse_config_args, parse_float, parse_int, run_cli
from .model import GPT
from .sample import generate_stream
from .tokenizer import BPETokenizer

END_OF_TEXT = "<|endoftext|>"


class TextModel:
    """A model with its tokenizer and end-of-text ids, loaded from a Hugging Face folder or a checkpoint.

        tm = TextModel.load("gpt2-folder")
        ids = tm.encode("Hello")
        for text, token in tm.stream(ids, 20, temperature=0):   # text: what this token adds
            print(text, end="", flush=True)
    """

    def __init__(self, model, tokenizer, end_ids=(), name="model"):
        self.model, self.tokenizer, self.end_ids, self.name = model, tokenizer, tuple(end_ids), name

    @property
    def block_size(self):
        return self.model.config.block_size

    @classmethod
    def load(cls, path, device="cpu"):
        """From a Hugging Face folder or a training checkpoint (GPT.from_pretrained, BPETokenizer.from_pretrained);
        raises OSError / ValueError naming what is missing or wrong."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"--model {path}: no such folder or checkpoint file")
        model = GPT.from_pretrained(path, device=device)
        tokenizer = BPETokenizer.from_pretrained(path)      # a checkpoint's own tokenizer, whichever kind
        if (path / "config.json").is_file():
            end_ids = _folder_end_ids(path)
        else:
            special = getattr(tokenizer, "special_tokens", {})
            end_ids = [special[END_OF_TEXT]] if END_OF_TEXT in special else []
        return cls(model, tokenizer, end_ids, path.name if path.is_dir() else path.stem)

    def encode(self, text):
        """Token ids of `text` (special tokens such as <|endoftext|> in it become their ids, as in Hugging
        Face's tokenizers). Raises ValueError for an empty prompt or one longer than the context."""
        if isinstance(self.tokenizer, BPETokenizer):
            ids = self.tokenizer.encode(text, allowed_special="all")
        else:
            ids = self.tokenizer.encode(text)
        if not ids:
            raise ValueError("the prompt is empty: there is nothing to continue")
        if len(ids) > self.block_size:
            raise ValueError(f"the prompt is {len(ids)} tokens, longer than the model's context of {self.block_size}")
        return ids

    def stream(self, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None):
        """Yields (text, token id) for each new token: text is what the token adds to the continuation,
        possibly "" while a character split across tokens is incomplete. The end-of-text token ends the
        stream and adds no text. Same ids and seed give the same tokens."""
        rng = np.random.default_rng(seed)
        decoder = _incremental_decoder(self.tokenizer)
        steps = generate_stream(self.model, np.asarray(ids, dtype=np.int64), max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, stop_tokens=self.end_ids, rng=rng)
        try:
            for nxt in steps:
                token = int(nxt[0])
                if token in self.end_ids:
                    yield decoder.flush(), token
                    return
                yield decoder.feed(token), token
            tail = decoder.flush()
            if tail:
                yield tail, None
        finally:
            steps.close()


def _folder_end_ids(path):
    """eos_token_id of a Hugging Face folder: generation_config.json's, else config.json's (int or list)."""
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.is_file():
            eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
            if eos is not None:
                return [int(i) for i in (eos if isinstance(eos, list) else [eos])]
    return []


class _PlainDecoder:
    """For tokenizers whose tokens are whole characters: each id decodes on its own."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def feed(self, token):
        return self.tokenizer.decode([token])

    def flush(self):
        return ""


def _incremental_decoder(tokenizer):
    return tokenizer.incremental_decoder() if hasattr(tokenizer, "incremental_decoder") else _PlainDecoder(tokenizer)


class SettingError(ValueError):
    """An out-of-range generation setting; `name` is the setting's."""

    def __init__(self, name, message):
        super().__init__(f"{name} {message}")
        self.name = name


def check_sampling(max_new_tokens, temperature, top_k, top_p, length_name="max_new_tokens"):
    """Raise SettingError naming the first out-of-range setting (length_name: what the caller calls the first)."""
    if max_new_tokens < 1:
        raise SettingError(length_name, f"must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not np.isfinite(temperature):
        raise SettingError("temperature", f"must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise SettingError("top_k", f"must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise SettingError("top_p", f"must be in (0, 1], got {top_p}")


def argument_parser():
    p = new_parser(__doc__.splitlines()[0], prog="python -m tinygrad_llm.generate")
    p.add_argument("--model", required=True, help="a Hugging Face folder, a training checkpoint (.safetensors) or its "
                   "out_dir (required)")
    p.add_argument("--prompt", required=True, help="the text to continue, not empty (required)")
    p.add_argument("--max_new_tokens", type=parse_int, default=100, help="tokens to generate at most (default: 100)")
    p.add_argument("--temperature", type=parse_float, default=1.0, help="divides the logits; 0 is greedy (default: 1.0)")
    p.add_argument("--top_k", type=parse_int, default=None, help="keep only the k most likely tokens (default: all)")
    p.add_argument("--top_p", type=parse_float, default=None,
                   help="keep the most likely tokens up to this total probability (default: 1, all)")
    p.add_argument("--seed", type=parse_int, default=None, help="seed of the sampling (default: a fresh one each run)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the model runs; cuda needs CuPy (default: cpu)")
    return p


def main(argv=None):
    """`python -m tinygrad_llm.generate --model PATH --prompt TEXT ...`; --help lists the options."""
    run_cli(_main, argv)


def _main(argv):
    args = parse_config_args(argument_parser(), argv)
    check_sampling(args["max_new_tokens"], args["temperature"], args["top_k"], args["top_p"])
    check_device(args["device"])
    t0 = time.perf_counter()
    text_model = TextModel.load(args["model"], device=args["device"])
    ids = text_model.encode(args["prompt"])
    print(f"loaded {args['model']} in {time.perf_counter() - t0:.1f} s; prompt {len(ids)} tokens", file=sys.stderr)
    out = sys.stdout.buffer
    n, t0 = 0, time.perf_counter()
    try:
        out.write(args["prompt"].encode("utf-8"))
        out.flush()
        for text, token in text_model.stream(ids, args["max_new_tokens"], args["temperature"], args["top_k"],
                                             args["top_p"], args["seed"]):
            n += token is not None
            if text:
                out.write(text.encode("utf-8"))
                out.flush()
    except BrokenPipeError:                # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # so the flush at exit cannot fail
        return
    seconds = time.perf_counter() - t0
    print(f"{chr(10) if sys.stdout.isatty() else ''}{n} tokens in {seconds:.2f} s ({n / seconds:.1f} tokens/s)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
