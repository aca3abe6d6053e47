"""Export a training checkpoint as a Hugging Face folder: `python -m tinygrad_llm.export CKPT OUT_DIR`.

OUT_DIR then holds config.json and model.safetensors (GPT-2 layout for LayerNorm/GELU/learned-position
models, Llama layout for RMSNorm/SwiGLU/RoPE ones), plus the tokenizer's files when the checkpoint was
trained with a BPE tokenizer; transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR) opens it. A
character tokenizer has no Hugging Face file format: the weights are exported without it, and a note
says so on stderr.
"""
import sys

from .cli import new_parser, run_cli
from .hub import load_pretrained, load_tokenizer, save_pretrained
from .tokenizer import CharTokenizer


def main(argv=None):
    """Export as the command line says; a user's mistake raises (run_cli turns it into one line on stderr)."""
    parser = new_parser(description=__doc__.split("\n\n")[0], prog="python -m tinygrad_llm.export")
    parser.add_argument("checkpoint", help="a training checkpoint (a .safetensors file) or the out_dir holding one "
                        "(its ckpt.safetensors, else last.safetensors)")
    parser.add_argument("out_dir", help="the folder to write (created; files in an existing folder are replaced)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="dtype of the exported weights (default: float32)")
    parser.add_argument("--no_tokenizer", action="store_true", default=False,
                        help="export the weights only, even if the checkpoint holds a tokenizer (default: false)")
    args = parser.parse_args(argv)
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
    print(f"wrote {args.out_dir} ({model.num_params():,} parameters"
          f"{', with its tokenizer' if tokenizer is not None else ''})", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
