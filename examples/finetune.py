"""Pretrain a small BPE GPT on tiny Shakespeare, then fine-tune it: spam classification and instruction following,
each fully and with LoRA, from the pretrained weights and from random ones (the value of pretraining, measured).

    python examples/finetune.py                         # every step below, in order (CPU; see the README for times)
    python examples/finetune.py --steps=data,pretrain   # only some steps
    python examples/finetune.py --steps=spam --inits=pretrained --modes=lora
    python examples/finetune.py --smoke                 # the same steps, tiny, in under a minute: a check, not a result

Steps (everything under --root, default out/finetune):
  data      the SMS Spam Collection balanced to 747 + 747 and split 70/10/20 into spam/{train,val,test}.tsv;
            the 1,100 instructions split 85/5/10 into instruct/{train,val,test}.json (seeded shuffles)
  pretrain  a 3-layer, 96-wide GPT, context 256, with a byte-level BPE of 512 tokens (256 merges) + <|endoftext|>,
            600 iterations on tiny Shakespeare
  spam      python -m tinygrad_llm.finetune classify ... for each init and mode, then evaluate on the test split
  instruct  python -m tinygrad_llm.finetune instruct ... likewise; test: response loss and greedy exact match
  table     the results of every run found, as a Markdown table

--smoke shrinks everything (the first 20,000 characters of Shakespeare and a 300-token BPE, a 1-layer 32-wide
GPT pretrained for 10 iterations, 100 spam messages and 40 instructions, one epoch each) under out/finetune_smoke.

The data ships in examples/data/ (see its README.md for where each file comes from).
"""
import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "22")  # before NumPy loads: idle BLAS threads sleep after ~1.5 ms (README, Threads)
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import tinygrad_llm  # noqa: E402,F401  (before NumPy's threads start: see the README's Threads section)
from tinygrad_llm import evaluate, finetune  # noqa: E402
from tinygrad_llm.data import prepare  # noqa: E402
from tinygrad_llm.fileio import atomic_write  # noqa: E402
from tinygrad_llm.train import TrainConfig, train  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
SPAM = DATA / "sms_spam" / "SMSSpamCollection"
INSTRUCTIONS = DATA / "instructions" / "instruction-data.json"

PRETRAIN = dict(n_layer=3, n_head=4, n_embd=96, block_size=256, batch_size=4, max_iters=600, warmup_iters=30,
                eval_interval=100, eval_iters=5, lr=1e-3, min_lr=1e-4, sample_chars=200)
# fine-tuning settings per (task, mode): passed to the CLIs as --key=value. Spam texts keep their full length
# (at most 234 tokens here), as the test evaluation sees them. Spam LoRA: chosen without the test split, by
# 5-fold cross-validation on the train and validation messages (README, "The worked example"): adapters of
# rank 16 (alpha 16) on every c_attn, c_proj, c_fc and on the token and position tables, the new head and every
# LayerNorm trained as full parameters, cosine learning rate.
SETTINGS = {
    ("spam", "full"): ["--trainable=all", "--lr=5e-4", "--epochs=3", "--batch_size=8"],
    ("spam", "lora"): ["--lora_rank=16", "--lora_alpha=16", "--lora_targets=c_attn,c_proj,c_fc,wte,wpe",
                       "--lora_norms=true", "--lr=1e-3", "--lr_schedule=cosine", "--epochs=12", "--batch_size=8"],
    ("instruct", "full"): ["--lr=5e-4", "--epochs=2", "--batch_size=8", "--max_new_tokens=64"],
    ("instruct", "lora"): ["--lora_rank=8", "--lora_alpha=16", "--lr=2e-3", "--epochs=2", "--batch_size=8", "--max_new_tokens=64"],
}


# --smoke: the whole pipeline at a size that runs in seconds
SMOKE_PRETRAIN = dict(n_layer=1, n_head=2, n_embd=32, block_size=256, batch_size=2, max_iters=10, warmup_iters=2,
                      eval_interval=5, eval_iters=1, sample_chars=20)
SMOKE_TEXT_CHARS, SMOKE_TOKENIZER, SMOKE_SPAM, SMOKE_INSTRUCTIONS = 20_000, "bpe:300", 100, 40
SMOKE_FINETUNE = {"spam": ["--epochs=1"], "instruct": ["--epochs=1", "--max_new_tokens=4"]}


def make_data(root, seed=123, smoke=False):
    rng = np.random.default_rng(seed)
    rows = [line.split("\t", 1) for line in SPAM.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = finetune.balance([(label, text) for label, text in rows], rng)
    rows = [rows[i] for i in rng.permutation(len(rows))][:SMOKE_SPAM if smoke else None]
    n_train, n_val = int(0.7 * len(rows)), int(0.1 * len(rows))
    splits = {"train": rows[:n_train], "val": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}
    for name, part in splits.items():
        atomic_write(root / "spam" / f"{name}.tsv", "".join(f"{label}\t{text}\n" for label, text in part))
    examples = json.loads(INSTRUCTIONS.read_text(encoding="utf-8"))
    examples = [examples[i] for i in rng.permutation(len(examples))][:SMOKE_INSTRUCTIONS if smoke else None]
    n_train, n_val = int(0.85 * len(examples)), int(0.05 * len(examples))
    parts = {"train": examples[:n_train], "val": examples[n_train:n_train + n_val], "test": examples[n_train + n_val:]}
    for name, part in parts.items():
        atomic_write(root / "instruct" / f"{name}.json", json.dumps(part, indent=1))
    print("spam: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) +
          "; instruct: " + ", ".join(f"{k} {len(v)}" for k, v in parts.items()))


def pretrain(root, smoke=False):
    if (root / "pretrain" / "ckpt.safetensors").is_file():
        print(f"using the pretrained model in {root / 'pretrain'} (delete that folder to pretrain again)")
        return
    data_dir = root / "shakespeare_bpe"
    if not (data_dir / "meta.json").is_file():
        text = SHAKESPEARE
        if smoke:
            text = root / "shakespeare_head.txt"
            atomic_write(text, SHAKESPEARE.read_text(encoding="utf-8")[:SMOKE_TEXT_CHARS])
        prepare(text, data_dir, tokenizer=SMOKE_TOKENIZER if smoke else "bpe:512")
    config = TrainConfig(data_dir=str(data_dir), out_dir=str(root / "pretrain"), **(SMOKE_PRETRAIN if smoke else PRETRAIN))
    summary = train(config)
    print(f"pretrained: best val loss {summary['best_val_loss']:.4f}, {summary['elapsed_s']:.0f} s")


def finetune_run(root, task, init, mode, smoke=False):
    base = root / "pretrain" / "ckpt.safetensors"
    out = root / "runs" / f"{task}_{init}_{mode}"
    args = ["classify" if task == "spam" else "instruct", f"--init={base}", f"--out={out}",
            f"--reinit={'true' if init == 'random' else 'false'}"] + SETTINGS[(task, mode)]
    args += SMOKE_FINETUNE[task] if smoke else []
    if task == "spam":
        args += [f"--train={root / 'spam/train.tsv'}", f"--val={root / 'spam/val.tsv'}", f"--test={root / 'spam/test.tsv'}"]
    else:
        args += [f"--data={root / 'instruct/train.json'}", f"--val={root / 'instruct/val.json'}"]
    print(f"\n=== {task}, {init} initial weights, {mode} ===\n$ python -m tinygrad_llm.finetune " + " ".join(args), flush=True)
    if finetune.main(args):
        sys.exit(f"error: the {task} {init} {mode} run failed")
    test = root / ("spam/test.tsv" if task == "spam" else "instruct/test.json")
    args = [f"--model={out}", f"--data={test}", "--json"]
    args += ["--task=classify"] if task == "spam" else ["--task=instruct", f"--max_new_tokens={4 if smoke else 64}"]
    parser = evaluate.build_parser()
    start = time.perf_counter()
    result = evaluate.run(parser.parse_args(args))
    trained = json.loads((out / finetune.RESULTS_NAME).read_text())
    result.update(elapsed_s=trained["elapsed_s"], trainable=trained["trainable_params"],
                  test_s=round(time.perf_counter() - start, 1))
    atomic_write(out / "test.json", json.dumps(result, indent=1))


def _cell(text):
    return " ".join(text.split()).replace("|", "\\|")


def table(root):
    """The test results of every run under root/runs as a Markdown table, then the instruction runs' first
    three greedy answers side by side."""
    lines = ["| task | initial weights | fine-tuning | trainable parameters | test accuracy | test response loss | "
             "greedy exact match | fine-tuning time | test time |", "|---|---|---|---|---|---|---|---|---|"]
    answers = {}
    for path in sorted((root / "runs").glob("*/test.json"), key=lambda p: (not p.parent.name.startswith("spam"), p.parent.name)):
        task, init, mode = path.parent.name.split("_")
        r = json.loads(path.read_text())
        acc = f"{100 * r['accuracy']:.2f}% ({r['examples']})" if "accuracy" in r else ""
        loss = f"{r['loss']:.3f}" if task == "instruct" else ""
        em = f"{100 * r['exact_match']:.1f}% ({r['examples']})" if "exact_match" in r else ""
        lines.append(f"| {task} | {init} | {mode} | {r['trainable']:,} | {acc} | {loss} | {em} | "
                     f"{r['elapsed_s']:.0f} s | {r.get('test_s', 0):.0f} s |")
        if task == "instruct":
            answers[f"{init}, {mode}"] = r["samples"]
    if answers:
        names = sorted(answers)
        first = answers[names[0]]
        lines += ["", "| instruction | expected | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]
        for i, sample in enumerate(first):
            prompt = sample["instruction"] + (f" ({sample['input']})" if sample["input"] else "")
            lines.append(f"| {_cell(prompt)} | {_cell(sample['expected'])} | " +
                         " | ".join(_cell(answers[n][i]["answer"]) if i < len(answers[n]) else "" for n in names) + " |")
    print("\n".join(lines))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="output folder (default out/finetune, with --smoke out/finetune_smoke)")
    parser.add_argument("--steps", default="data,pretrain,spam,instruct,table")
    parser.add_argument("--inits", default="pretrained,random")
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--smoke", action="store_true", help="a tiny version of every step, to check the pipeline")
    args = parser.parse_args(argv)
    if args.root is None:
        args.root = Path("out/finetune_smoke" if args.smoke else "out/finetune")
    steps, inits, modes = (args.steps.split(","), args.inits.split(","), args.modes.split(","))
    bad = ([s for s in steps if s not in ("data", "pretrain", "spam", "instruct", "table")] +
           [i for i in inits if i not in ("pretrained", "random")] + [m for m in modes if m not in ("full", "lora")])
    if bad:
        parser.error(f"unknown step, init or mode {bad}")
    for path in (SHAKESPEARE, SPAM, INSTRUCTIONS):
        if not path.is_file():
            sys.exit(f"error: {path} is missing (it ships with the repository)")
    start = time.perf_counter()
    if "data" in steps:
        make_data(args.root, smoke=args.smoke)
    if "pretrain" in steps:
        pretrain(args.root, smoke=args.smoke)
    for task in ("spam", "instruct"):
        if task in steps:
            for init in inits:
                for mode in modes:
                    finetune_run(args.root, task, init, mode, smoke=args.smoke)
    if "table" in steps:
        table(args.root)
    print(f"\nsteps {','.join(steps)}: {(time.perf_counter() - start) / 60:.1f} min wall time")


if __name__ == "__main__":
    main(sys.argv[1:])
