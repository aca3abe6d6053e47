"""k-fold cross-validation of a spam fine-tuning setting on the training and validation messages: how the
worked example's LoRA setting was compared with the others without looking at the test split.

    python examples/finetune.py --steps=data,pretrain          # first: the splits and the pretrained model
    OPENBLAS_NUM_THREADS=1 python examples/finetune_cv.py --tag=lora_tables -- \\
        --lora_rank=16 --lora_alpha=16 --lora_targets=c_attn,c_proj,c_fc,wte,wpe --lora_norms=true \\
        --lr=1e-3 --lr_schedule=cosine --epochs=12
    OPENBLAS_NUM_THREADS=1 python examples/finetune_cv.py --tag=full -- --trainable=all --lr=5e-4 --epochs=3

Everything after `--` goes to `python -m tinygrad_llm.finetune classify` (with --init, --train, --val, --out,
--batch_size=8 and --seed given here). The train and validation messages of --root are pooled (1,194 in the
example) and dealt into --folds folds by a seeded shuffle (the same folds for every setting); each fold is
held out once while the setting trains on the rest. Printed: each fold's held-out accuracy by epoch, then the
accuracy at each epoch over all held-out messages; the figure compared is the last epoch's (picking the best
epoch on the held-out fold would flatter every setting). The test split is never read.

--probe_full_tables=wte[,wpe] also trains those embedding tables in full after LoRA froze them: not a LoRA
setting, a probe of what LoRA's frozen tables cost. Folds and runs go under --root/cv/<tag>/.
The README's figures were taken with OPENBLAS_NUM_THREADS=1; other thread counts can round differently.
"""
import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "22")  # before NumPy loads: idle BLAS threads sleep after ~1.5 ms (README, Threads)
import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tinygrad_llm import finetune  # noqa: E402
from tinygrad_llm.fileio import atomic_write  # noqa: E402


def fold_files(root, out, folds, fold_seed):
    """Write out/train{k}.tsv and out/held{k}.tsv for each fold; returns the held-out sizes."""
    rows = []
    for split in ("train", "val"):
        path = root / "spam" / f"{split}.tsv"
        if not path.is_file():
            sys.exit(f"error: {path} is missing (run `python examples/finetune.py --steps=data,pretrain` first)")
        rows += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if folds < 2 or folds > len(rows):
        sys.exit(f"error: --folds must be between 2 and {len(rows)}, got {folds}")
    order = np.random.default_rng(fold_seed).permutation(len(rows))
    sizes = []
    for k in range(folds):
        held = set(order[k::folds].tolist())
        atomic_write(out / f"train{k}.tsv", "".join(rows[i] + "\n" for i in range(len(rows)) if i not in held))
        atomic_write(out / f"held{k}.tsv", "".join(rows[i] + "\n" for i in sorted(held)))
        sizes.append(len(held))
    return sizes


@contextlib.contextmanager
def unfreeze_tables(names):
    """Inside: finetune's model preparation, then the named embedding tables trained in full (the probe)."""
    prepare = finetune._prepare_model

    def prepare_and_unfreeze(model, args, task):
        info = prepare(model, args, task)
        for name in names:
            getattr(model.transformer, name).weight.requires_grad = True
        return info

    finetune._prepare_model = prepare_and_unfreeze
    try:
        yield
    finally:
        finetune._prepare_model = prepare


def main(argv):
    if "--" in argv:
        cut = argv.index("--")
        argv, setting = argv[:cut], argv[cut + 1:]
    else:
        setting = []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("out/finetune"), help="examples/finetune.py's output folder")
    parser.add_argument("--tag", required=True, help="a name for this setting: runs go under ROOT/cv/TAG")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold_seed", type=int, default=7, help="the shuffle that deals the messages into folds")
    parser.add_argument("--seed", type=int, default=123, help="finetune's --seed for every fold")
    parser.add_argument("--init", default=None, help="the model to fine-tune (default ROOT/pretrain/ckpt.safetensors)")
    parser.add_argument("--probe_full_tables", default="", help="embedding tables (wte, wpe) to train in full: a probe")
    args = parser.parse_args(argv)
    tables = [t for t in args.probe_full_tables.split(",") if t]
    bad = [t for t in tables if t not in ("wte", "wpe")]
    if bad:
        parser.error(f"--probe_full_tables takes wte and wpe, got {bad}")
    init = args.init or str(args.root / "pretrain" / "ckpt.safetensors")
    if not Path(init).exists():
        sys.exit(f"error: {init} is missing (run `python examples/finetune.py --steps=data,pretrain` first)")
    out = args.root / "cv" / args.tag
    sizes = fold_files(args.root, out, args.folds, args.fold_seed)
    by_fold = []
    for k in range(args.folds):
        run = out / f"fold{k}"
        with unfreeze_tables(tables):
            code = finetune.main(["classify", f"--init={init}", f"--train={out / f'train{k}.tsv'}",
                                  f"--val={out / f'held{k}.tsv'}", f"--out={run}", "--batch_size=8",
                                  f"--seed={args.seed}", *setting])
        if code:
            sys.exit(f"error: fold {k} failed (finetune exit code {code})")
        records = [json.loads(line) for line in (run / finetune.METRICS_NAME).read_text().splitlines()]
        by_fold.append([r["val_accuracy"] for r in records if "val_accuracy" in r])
        print(f"fold {k}: held-out accuracy by epoch " + " ".join(f"{a:.4f}" for a in by_fold[-1]), flush=True)
    epochs = min(len(a) for a in by_fold)
    weights = np.array(sizes, dtype=float)
    pooled = [float(np.dot([a[e] for a in by_fold], weights) / weights.sum()) for e in range(epochs)]
    print("all held-out messages, accuracy by epoch: " + " ".join(f"e{e + 1} {100 * p:.2f}%" for e, p in enumerate(pooled)))
    print(f"{args.tag}: cross-validated accuracy at the last epoch {100 * pooled[-1]:.2f}% over {int(weights.sum())} messages")


if __name__ == "__main__":
    main(sys.argv[1:])
