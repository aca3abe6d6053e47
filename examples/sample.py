"""Generate text from a checkpoint written by a training run.

    python examples/sample.py --ckpt out/shakespeare_char/ckpt.safetensors --prompt "ROMEO:" --max_new_tokens 300
    python examples/sample.py --ckpt out/shakespeare_char/ckpt.safetensors --device cuda

The checkpoint carries the model's config and its tokenizer, so nothing else is needed.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tinygrad_llm.checkpoint import load_model  # noqa: E402
from tinygrad_llm.sample import generate  # noqa: E402
from tinygrad_llm.tokenizer import tokenizer_from_dict  # noqa: E402


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--ckpt", type=Path, required=True, help="a .safetensors checkpoint from train.py")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--max_new_tokens", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (cuda needs CuPy)")
    args = parser.parse_args(argv)

    try:
        model, meta = load_model(args.ckpt)        # built from the checkpoint's own config
        model.to(args.device)
        if "tokenizer" not in meta:
            raise ValueError(f"{args.ckpt} holds no tokenizer in its metadata")
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
        prompt_ids = tokenizer.encode(args.prompt)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    ids = generate(model, np.asarray(prompt_ids, dtype=np.int64), args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, rng=np.random.default_rng(args.seed))
    print(tokenizer.decode(ids.tolist()))


if __name__ == "__main__":
    main(sys.argv[1:])
