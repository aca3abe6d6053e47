"""Export a training checkpoint as a Hugging Face folder: `python -m tinygrad_llm.export CKPT OUT_DIR`.

OUT_DIR then holds config.json and model.safetensors (GPT-2 layout for LayerNorm/GELU/learned-position
models, Llama layout for RMSNorm/SwiGLU/RoPE ones), plus the tokenizer's files when the checkpoint was
trained with a BPE tokenizer; transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR) opens it. A
character tokenizer has no Hugging Face file format: the weights are exported without it, and a note
says so on stderr.
"""
import argparse
import sys

from .hub import load_pretrained, load_tokenizer, save_pretrained
from .tokenizer import CharTokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tinygrad_llm.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a training checkpoint (ckpt.safetensors) or the out_dir holding it")
    parser.add_argument("out_dir", help="the folder to write (created; files in an existing folder are replaced)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="dtype of the exported weights")
    parser.add_argument("--no_tokenizer", action="store_true", default=False,
                        help="export the weights only, even if the checkpoint holds a tokenizer")
    args = parser.parse_args(argv)
    try:
        model = load_pretrained(args.checkpoint, dtype=args.dtype)
        tokenizer = None
        if not args.no_tokenizer:
            try:
                tokenizer = load_tokenizer(args.checkpoint)
            except ValueError as e:   # e.g. a checkpoint saved without a tokenizer: weights only
                print(f"note: {e}; exporting the weights only", file=sys.stderr)
        if isinstance(tokenizer, CharTokenizer):
            print("note: the checkpoint's character tokenizer cannot be written as Hugging Face tokenizer files "
                  "(they describe byte-level BPE); exporting the weights only", file=sys.stderr)
            tokenizer = None
        save_pretrained(model, args.out_dir, tokenizer=tokenizer)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out_dir} ({model.num_params():,} parameters"
          f"{', with its tokenizer' if tokenizer is not None else ''})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
