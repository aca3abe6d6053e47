"""Generate text from a checkpoint written by a training run (the same as `python -m tinygrad_llm.sample`).

    python examples/sample.py --ckpt out/shakespeare_char/ckpt.safetensors --prompt "ROMEO:" --max_new_tokens 300
    python examples/sample.py --ckpt out/shakespeare_char/ckpt.safetensors --device cuda
    python examples/sample.py --help

The checkpoint carries the model's config and its tokenizer, so nothing else is needed.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tinygrad_llm.sample import main  # noqa: E402

if __name__ == "__main__":
    main()
