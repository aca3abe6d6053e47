"""Fine-tuning a pretrained GPT: a classifier, an instruction follower, either fully or with LoRA.

    python -m tinygrad_llm.finetune classify --init=ckpt.safetensors --train=train.tsv --val=val.tsv \\
        --test=test.tsv --out=out/spam [--trainable=head|last:N|all] [--lora_rank=8 --lora_alpha=16]
    python -m tinygrad_llm.finetune instruct --init=ckpt.safetensors --data=train.json --val=val.json \\
        --out=out/instruct [--mask_prompt=true] [--lora_rank=8 --lora_alpha=16]
    python -m tinygrad_llm.finetune export --run=out/instruct --out=merged.safetensors

classify: the LM head is replaced by a (n_embd, n_classes) head `score` reading the final hidden state of
each text's last real token (batches are padded on the right to their longest row, and attention is causal,
so padding never reaches that token). Labels are strings, mapped to ids in sorted order and saved with the
model. By default the head, the last block and the final norm train (`--trainable=last:1`).

instruct: Alpaca-style examples {"instruction", "input", "output"} in the Alpaca prompt template, the
response followed by <|endoftext|>; the loss is the mean over the response tokens (instruction_batch).

Each run writes into --out (only after every input has been read and checked): metrics.jsonl (one line per
evaluation), model.safetensors (the best model by validation accuracy, or validation loss for instruct) and
results.json (the final metrics; for classify the confusion matrices). A LoRA run saves only the adapters
and the head plus the base checkpoint's path and sha256; `export` merges them into a whole model.
`--lora_targets` names the modules that get adapters: linears (c_attn, c_proj, c_fc, the default) and the
embedding tables (wte, wpe).
Texts longer than the context are truncated to their first tokens, with a warning that counts them.
"""
import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from . import functional as F
from .checkpoint import load_model, load_safetensors, save_checkpoint, save_safetensors
from .fileio import atomic_write
from .finetune_data import (ALPACA_HEADER, END_OF_TEXT, InputError, balance, classification_batch,  # noqa: F401
                            encode, encode_texts, eot_id, format_prompt, instruction_batch, instruction_tokens,
                            pad_id, read_instructions, read_labeled)
from .lora import DEFAULT_TARGETS, apply_lora, lora_modules, merge_lora
from .model import GPT, GPTConfig, IGNORE_INDEX
from .nn import LayerNorm, Linear, RMSNorm
from .optim import AdamW, clip_grad_norm, cosine_lr, param_groups
from .tensor import Tensor, no_grad
from .tokenizer import BPETokenizer, tokenizer_from_dict

MODEL_NAME, METRICS_NAME, RESULTS_NAME = "model.safetensors", "metrics.jsonl", "results.json"
FORMAT, VERSION = "tinygrad_llm.finetune", 1


# ---- models -------------------------------------------------------------------------------------

class GPTClassifier(GPT):
    """A GPT whose LM head is replaced by `score`, a Linear (n_embd, n_classes) on the last real token.

    forward(idx int (B, T), last int (B,)) -> logits (B, n_classes), reading position last[b] of row b.
    Parameter names: the GPT's `transformer.*` and `score.weight`, `score.bias`.
    """

    def __init__(self, config, n_classes, rng=None):
        super().__init__(config, rng)
        self._replace_head(n_classes, rng)

    @classmethod
    def from_gpt(cls, gpt, n_classes, rng=None):
        """A classifier sharing `gpt`'s transformer (the same Tensors), with a new random head."""
        model = cls.__new__(cls)
        model.config, model.transformer = gpt.config, gpt.transformer
        model._replace_head(n_classes, rng)
        return model

    def _replace_head(self, n_classes, rng):
        rng = np.random.default_rng(0) if rng is None else rng
        self.lm_head = None
        self.n_classes = int(n_classes)
        self.score = Linear(self.config.n_embd, self.n_classes, rng=rng, dtype=self.config.param_dtype)

    def forward(self, idx, last, rng=None):
        h = self.hidden_states(idx, rng)                              # (B, T, C)
        last = np.asarray(last)
        features = h[np.arange(h.shape[0]), last]                     # (B, C): each row's last real token
        return self.score(features)                                   # (B, n_classes)


def all_tensors(model):
    """{name: Tensor} for every float Tensor held by the model's modules, frozen or not, each once."""
    out, seen = {}, set()
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, Tensor) and id(value) not in seen:
                seen.add(id(value))
                out[f"{prefix}.{name}" if prefix else name] = value
    return out


def set_trainable(model, spec):
    """requires_grad by `spec`: "all"; "head" (score only); "last:N" (the last N blocks, ln_f and the head)."""
    tensors = all_tensors(model)
    if spec == "all":
        for t in tensors.values():
            t.requires_grad = True
        return
    for t in tensors.values():
        t.requires_grad = False
    names = ["score."]
    if spec.startswith("last:"):
        n = int(spec[5:])
        L = model.config.n_layer
        names += [f"transformer.h.{i}." for i in range(max(0, L - n), L)] + ["transformer.ln_f."]
    for name, t in tensors.items():
        if any(name.startswith(p) for p in names):
            t.requires_grad = True


def _parse_trainable(text):
    if text in ("all", "head"):
        return text
    if text.startswith("last:") and text[5:].isdigit() and int(text[5:]) > 0:
        return text
    raise InputError(f"--trainable expects head, all or last:N with N a positive integer, got {text!r}")


# ---- loading models -----------------------------------------------------------------------------

def _sha256(path):
    """Of a file, or of a folder's files (names and contents, sorted by name)."""
    path = Path(path)
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        if path.is_dir():
            h.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _is_run(file):
    """Whether `file` is a fine-tuning output's model file (a Hugging Face folder's model.safetensors is not)."""
    if not file.is_file():
        return False
    try:
        return load_safetensors(file)[1].get("format") == FORMAT
    except ValueError:
        return False


def load_base(path):
    """(GPT, tokenizer) from a checkpoint of this project, or a folder GPT.from_pretrained reads."""
    path = Path(path)
    if path.is_dir():
        if _is_run(path / MODEL_NAME):
            raise InputError(f"{path} is a fine-tuning output; export it first (python -m tinygrad_llm.finetune export)")
        if not hasattr(GPT, "from_pretrained"):
            raise InputError(f"{path} is a folder, and this version has no GPT.from_pretrained to read it; "
                             "give a .safetensors checkpoint of this project")
        try:
            model = GPT.from_pretrained(str(path))
            if hasattr(BPETokenizer, "from_pretrained"):
                return model, BPETokenizer.from_pretrained(str(path))
            if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                return model, BPETokenizer.from_gpt2_files(path / "vocab.json", path / "merges.txt")
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: {e}") from None
        raise InputError(f"{path}: no vocab.json and merges.txt beside the weights, so no tokenizer")
    if not path.is_file():
        raise InputError(f"--init {path}: no such file or folder")
    try:
        model, meta = load_model(path)
    except (OSError, ValueError) as e:
        raise InputError(str(e)) from None
    if "tokenizer" not in meta:
        raise InputError(f"{path} holds no tokenizer in its metadata")
    return model, tokenizer_from_dict(meta["tokenizer"])


def save_run(out_dir, model, tokenizer, task, labels=None, lora=None, base=None, extra=None):
    """Write out_dir/model.safetensors: the whole model, or (LoRA) only the trainable arrays and the base."""
    arrays = {name: t.numpy() for name, t in all_tensors(model).items()
              if lora is None or t.requires_grad}
    meta = {"format": FORMAT, "version": str(VERSION), "task": json.dumps(task),
            "config": json.dumps(model.config.to_dict()), "tokenizer": json.dumps(tokenizer.to_dict()),
            "labels": json.dumps(labels), "lora": json.dumps(lora), "base": json.dumps(base),
            "extra": json.dumps(extra or {})}
    save_safetensors(Path(out_dir) / MODEL_NAME, arrays, meta)


def load_run(out_dir):
    """(model, tokenizer, info) from a fine-tuning output folder (or its model.safetensors). A LoRA run's
    base is read from its saved path and checked against its saved sha256; the adapters stay unmerged."""
    path = Path(out_dir)
    path = path / MODEL_NAME if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"{out_dir}: no {MODEL_NAME}")
    arrays, meta = load_safetensors(path)
    if meta.get("format") != FORMAT:
        raise InputError(f"{path} is not a fine-tuning output (format {meta.get('format')!r})")
    info = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "version")}
    config = GPTConfig.from_dict(info["config"])
    tokenizer = tokenizer_from_dict(info["tokenizer"])
    lora = info["lora"]
    base = info["base"] or {}
    if lora is not None and base.get("reinit_seed") is not None:
        gpt = GPT(config, rng=np.random.default_rng(base["reinit_seed"]))
    elif lora is not None:
        if not Path(base["path"]).exists():
            raise InputError(f"{path} is a LoRA run on {base['path']}, which is not there any more")
        if _sha256(base["path"]) != base["sha256"]:
            raise InputError(f"{base['path']} has changed since the LoRA run in {out_dir} was trained on it")
        gpt, _ = load_base(base["path"])
    else:
        gpt = GPT(config)
    model = GPTClassifier.from_gpt(gpt, len(info["labels"])) if info["task"] == "classify" else gpt
    if lora is not None:
        apply_lora(model, lora["rank"], lora["alpha"], tuple(lora["targets"]))
        set_trainable_names = set(arrays)
        for name, t in all_tensors(model).items():
            t.requires_grad = name in set_trainable_names
    tensors = all_tensors(model)
    if info["task"] != "classify" and "lm_head.weight" in arrays and config.tie_embeddings:
        arrays.pop("lm_head.weight")
    unknown = sorted(set(arrays) - set(tensors))
    if unknown:
        raise InputError(f"{path}: arrays {unknown[:5]} do not belong to the model")
    if lora is None:
        missing = sorted(n for n in tensors if n not in arrays and n != "lm_head.weight")
        if missing:
            raise InputError(f"{path}: missing arrays {missing[:5]}")
    for name, array in arrays.items():
        t = tensors[name]
        if t.shape != array.shape:
            raise InputError(f"{path}: {name} has shape {array.shape}, the model {t.shape}")
        t.data[...] = array
    model.eval()
    return model, tokenizer, info


# ---- training -----------------------------------------------------------------------------------

def _batches(n, batch_size, rng):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


@no_grad()
def classify_eval(model, token_lists, labels, pad, batch_size=32):
    """(mean loss, accuracy, predictions) over a split, in eval mode."""
    was = model.training
    model.eval()
    total, preds = 0.0, []
    for b in _batches(len(token_lists), batch_size, None):
        idx, last = classification_batch([token_lists[i] for i in b], pad)
        logits = model(idx, last)
        total += F.cross_entropy(logits, labels[b], reduction="sum").item()
        preds.append(logits.numpy().argmax(-1))
    model.train(was)
    preds = np.concatenate(preds)
    return total / len(labels), float((preds == labels).mean()), preds


@no_grad()
def instruct_eval(model, examples, tokenizer, mask_prompt=True, max_length=None, batch_size=8):
    """Mean loss over the trained targets (the response and its <|endoftext|> with mask_prompt) of a split."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y = instruction_batch(examples[i:i + batch_size], tokenizer, mask_prompt, max_length)
        n = int((y != IGNORE_INDEX).sum())
        if n:
            logits, _ = model(x)
            total += F.cross_entropy(logits, y, reduction="sum").item()
            count += n
    model.train(was)
    return total / max(count, 1)


def greedy_answer(model, tokenizer, example, max_new_tokens=None):
    """The model's greedy response to one example, cut at <|endoftext|>, stripped."""
    from .sample import generate
    prompt = encode(tokenizer, format_prompt(example))[-(model.config.block_size - 1):]
    room = model.config.block_size - len(prompt)
    n = room if max_new_tokens is None else min(max_new_tokens, room)
    eot = eot_id(tokenizer)
    ids = generate(model, np.asarray(prompt, dtype=np.int64), n, temperature=0, stop_tokens=[eot])
    new = [int(t) for t in ids[len(prompt):] if int(t) != eot]
    return tokenizer.decode(new).strip()


def confusion_matrix(labels, preds, n):
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (labels, preds), 1)
    return m


def class_report(matrix, names):
    """{label: {precision, recall, support}} from a confusion matrix (rows: true, columns: predicted)."""
    out = {}
    for i, name in enumerate(names):
        tp, predicted, actual = matrix[i, i], matrix[:, i].sum(), matrix[i].sum()
        out[name] = {"precision": float(tp / predicted) if predicted else 0.0,
                     "recall": float(tp / actual) if actual else 0.0, "support": int(actual)}
    return out


def format_confusion(matrix, names):
    width = max(8, *(len(n) for n in names)) + 1
    lines = ["true \\ predicted".ljust(width + 8) + "".join(n.rjust(width) for n in names)]
    lines += [name.ljust(width + 8) + "".join(str(v).rjust(width) for v in row) for name, row in zip(names, matrix)]
    return "\n".join(lines)


def _make_optimizer(model, args):
    groups = [g for g in param_groups(model, args.weight_decay) if g["params"]]
    return AdamW(groups, lr=args.lr, betas=(0.9, 0.999))


def _schedule(args, n_examples):
    """step -> learning rate: constant, or (cosine) a linear warm-up over the first 5% of the steps, then a
    cosine decay to lr/10 at the last step."""
    total = args.epochs * math.ceil(n_examples / args.batch_size)
    if args.lr_schedule == "constant":
        return lambda step: args.lr
    warmup = max(1, total // 20)
    return lambda step: cosine_lr(step, args.lr, args.lr / 10, warmup, total)


def _step(model, optimizer, loss, grad_clip, lr):
    optimizer.lr = lr
    loss.backward()
    params = model.parameters()
    if grad_clip:
        clip_grad_norm(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad()


def _prepare_model(model, args, task):
    """Apply LoRA or --trainable (already checked by _parse_trainable); returns (lora info or None)."""
    if args.lora_rank:
        try:
            apply_lora(model, args.lora_rank, args.lora_rank if args.lora_alpha is None else args.lora_alpha,
                       tuple(args.lora_targets.split(",")), rng=np.random.default_rng(args.seed + 1))
        except ValueError as e:
            raise InputError(str(e)) from None
        if task == "classify":
            for t in (model.score.weight, model.score.bias):
                t.requires_grad = True
        if args.lora_norms:
            for _, m in model.named_modules():
                if isinstance(m, (LayerNorm, RMSNorm)):
                    for t in vars(m).values():
                        if isinstance(t, Tensor):
                            t.requires_grad = True
        return {"rank": args.lora_rank, "alpha": float(args.lora_rank if args.lora_alpha is None else args.lora_alpha),
                "targets": args.lora_targets.split(","), "norms": bool(args.lora_norms)}
    set_trainable(model, args.trainable)
    return None


def _start_output(model, args, task):
    """Once every input is read and checked: the model made trainable for `task` (LoRA or not), the base's
    record, and --out begun (the folder and an empty metrics file). Returns (lora, base, out, metrics)."""
    lora = _prepare_model(model, args, task)
    base = _base_record(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / METRICS_NAME
    metrics.write_text("")
    return lora, base, out, metrics


def _base_record(args):
    """Where the run started from; for LoRA what load_run needs to rebuild the frozen weights."""
    if args.reinit:  # the frozen weights are GPT(config, rng=default_rng(seed)): rebuilt from the seed
        return {"path": str(Path(args.init).resolve()), "reinit_seed": args.seed}
    if not args.lora_rank:
        return {"path": str(Path(args.init).resolve())}
    return {"path": str(Path(args.init).resolve()), "sha256": _sha256(args.init)}


def _load_init(args):
    gpt, tokenizer = load_base(args.init)
    if args.reinit:  # the same architecture and tokenizer, fresh GPT-2 initial weights
        gpt = GPT(gpt.config, rng=np.random.default_rng(args.seed))
    return gpt, tokenizer


def _log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _check_options(args):
    if args.lora_rank is None and (args.lora_norms or args.lora_alpha is not None):
        raise InputError("--lora_alpha and --lora_norms need --lora_rank (LoRA is off without it)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is a file; it must be a folder (new or a previous run's)")


def run_classify(args):
    _check_options(args)
    rng = np.random.default_rng(args.seed)
    trainable = _parse_trainable(args.trainable)
    train_rows = read_labeled(args.train)
    if args.balance:
        train_rows = balance(train_rows, rng)
    val_rows = read_labeled(args.val)
    test_rows = read_labeled(args.test) if args.test else None
    names = sorted({label for label, _ in train_rows})
    if len(names) < 2:
        raise InputError(f"{args.train}: every example has the label {names[0]!r}; a classifier needs at least two classes")
    for split, rows, path in (("val", val_rows, args.val), ("test", test_rows, args.test)):
        unseen = sorted({label for label, _ in rows or []} - set(names))
        if unseen:
            raise InputError(f"{path}: label(s) {unseen} do not occur in the training data {args.train} (labels {names})")
    gpt, tokenizer = _load_init(args)
    max_length = _max_length(args, gpt)
    ids = {label: i for i, label in enumerate(names)}
    splits = {}
    for split, rows, path in (("train", train_rows, args.train), ("val", val_rows, args.val), ("test", test_rows, args.test)):
        if rows is not None:
            splits[split] = (encode_texts(tokenizer, [t for _, t in rows], max_length, path),
                             np.array([ids[label] for label, _ in rows], dtype=np.int64))
    model = GPTClassifier.from_gpt(gpt, len(names), rng=np.random.default_rng(args.seed + 2))
    args.trainable = trainable
    # every input is read and checked: from here on --out is written
    lora, base, out, metrics = _start_output(model, args, "classify")
    pad = pad_id(tokenizer)
    optimizer, lr_at = _make_optimizer(model, args), _schedule(args, len(train_rows))
    n_train = sum(p.size for p in model.parameters())
    print(f"classify: {len(names)} classes {names}; train {len(train_rows)}, val {len(val_rows)}"
          + (f", test {len(test_rows)}" if test_rows else "") + f"; {n_train:,} trainable parameters of "
          f"{sum(t.size for t in all_tensors(model).values()):,}" + (f" (LoRA rank {lora['rank']})" if lora else ""))
    tokens, labels = splits["train"]
    best, step, start = (-1.0, math.inf), 0, time.perf_counter()
    model.train()
    for epoch in range(1, args.epochs + 1):
        total, correct = 0.0, 0
        for b in _batches(len(tokens), args.batch_size, rng):
            idx, last = classification_batch([tokens[i] for i in b], pad)
            logits = model(idx, last, rng=rng)
            loss = F.cross_entropy(logits, labels[b])
            total += loss.item() * len(b)
            correct += int((logits.numpy().argmax(-1) == labels[b]).sum())
            _step(model, optimizer, loss, args.grad_clip, lr_at(step))
            step += 1
        val_loss, val_acc, _ = classify_eval(model, *splits["val"], pad)
        record = {"epoch": epoch, "step": step, "train_loss": total / len(tokens), "train_accuracy": correct / len(tokens),
                  "val_loss": val_loss, "val_accuracy": val_acc, "elapsed_s": round(time.perf_counter() - start, 1)}
        improved = (val_acc, -val_loss) > (best[0], -best[1])
        if improved:
            best = (val_acc, val_loss)
            save_run(out, model, tokenizer, "classify", names, lora, base, {"epoch": epoch})
        _log(metrics, record)
        print(f"epoch {epoch}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | "
              f"val loss {val_loss:.4f} acc {val_acc:.4f}" + (" (best, saved)" if improved else ""), flush=True)
    model, _, _ = load_run(out)
    results = {"task": "classify", "labels": names, "trainable_params": n_train, "lora": lora,
               "elapsed_s": round(time.perf_counter() - start, 1)}
    results["best_epoch"] = json.loads(load_safetensors(out / MODEL_NAME)[1]["extra"])["epoch"]
    for split, (toks, labs) in splits.items():
        loss, acc, preds = classify_eval(model, toks, labs, pad)
        matrix = confusion_matrix(labs, preds, len(names))
        results[split] = {"loss": loss, "accuracy": acc, "confusion": matrix.tolist(),
                          "per_class": class_report(matrix, names)}
        _log(metrics, {"final": split, "loss": loss, "accuracy": acc, "confusion": matrix.tolist()})
        print(f"{split}: loss {loss:.4f}, accuracy {acc:.4f}")
    last_split = "test" if "test" in splits else "val"
    print(f"confusion matrix ({last_split}):\n" + format_confusion(np.array(results[last_split]["confusion"]), names))
    atomic_write(out / RESULTS_NAME, json.dumps(results, indent=1))
    return results


def _max_length(args, gpt):
    if args.max_length is None:
        return gpt.config.block_size
    if not 0 < args.max_length <= gpt.config.block_size:
        raise InputError(f"--max_length must be in [1, {gpt.config.block_size}] (the model's context), got {args.max_length}")
    return args.max_length


def run_instruct(args):
    _check_options(args)
    args.trainable = _parse_trainable(args.trainable)
    if args.trainable == "head":
        raise InputError("--trainable=head is for classify; instruct trains all or last:N")
    rng = np.random.default_rng(args.seed)
    train = read_instructions(args.data)
    val = read_instructions(args.val) if args.val else None
    gpt, tokenizer = _load_init(args)
    eot_id(tokenizer)
    max_length = _max_length(args, gpt)
    long = sum(len(p) + len(r) - 1 > max_length for e in train for p, r in [instruction_tokens(e, tokenizer)])
    if long:
        print(f"warning: {long} of {len(train)} examples in {args.data} are longer than {max_length} tokens; "
              f"each was truncated to its first {max_length}", file=sys.stderr)
    lora, base, out, metrics = _start_output(gpt, args, "instruct")
    optimizer, lr_at = _make_optimizer(gpt, args), _schedule(args, len(train))
    n_train = sum(p.size for p in gpt.parameters())
    print(f"instruct: train {len(train)}" + (f", val {len(val)}" if val else "") +
          f"; {n_train:,} trainable parameters of "
          f"{sum(t.size for t in all_tensors(gpt).values()):,}" + (f" (LoRA rank {lora['rank']})" if lora else ""))
    best, step, start = math.inf, 0, time.perf_counter()
    gpt.train()
    for epoch in range(1, args.epochs + 1):
        total, count = 0.0, 0
        for b in _batches(len(train), args.batch_size, rng):
            x, y = instruction_batch([train[i] for i in b], tokenizer, args.mask_prompt, max_length)
            if not (y != IGNORE_INDEX).any():
                continue
            _, loss = gpt(x, y, rng=rng)
            n = int((y != IGNORE_INDEX).sum())
            total, count = total + loss.item() * n, count + n
            _step(gpt, optimizer, loss, args.grad_clip, lr_at(step))
            step += 1
        record = {"epoch": epoch, "step": step, "train_loss": total / max(count, 1),
                  "elapsed_s": round(time.perf_counter() - start, 1)}
        if val:
            record["val_loss"] = instruct_eval(gpt, val, tokenizer, args.mask_prompt, max_length)
        score = record.get("val_loss", record["train_loss"])
        improved = score < best
        if improved:
            best = score
            save_run(out, gpt, tokenizer, "instruct", None, lora, base, {"epoch": epoch})
        _log(metrics, record)
        print(f"epoch {epoch}: train loss {record['train_loss']:.4f}" +
              (f" | val loss {record['val_loss']:.4f}" if val else "") + (" (best, saved)" if improved else ""), flush=True)
    model, _, _ = load_run(out)
    results = {"task": "instruct", "trainable_params": n_train, "lora": lora, "elapsed_s": round(time.perf_counter() - start, 1),
               "best_epoch": json.loads(load_safetensors(out / MODEL_NAME)[1]["extra"])["epoch"]}
    if val:
        results["val_loss"] = instruct_eval(model, val, tokenizer, args.mask_prompt, max_length)
        results["samples"] = [{"instruction": e["instruction"], "input": e.get("input", ""), "output": e["output"],
                               "model": greedy_answer(model, tokenizer, e, args.max_new_tokens)} for e in val[:3]]
        for s in results["samples"]:
            print(f"### {s['instruction']} {s['input']}\n  expected: {s['output']}\n  model:    {s['model']}")
    atomic_write(out / RESULTS_NAME, json.dumps(results, indent=1))
    return results


def run_export(args):
    """Merge a run's adapters (if any) and write one file: a checkpoint of this project for instruct (sample.py
    and evaluate read it), a whole fine-tuning model file for classify."""
    model, tokenizer, info = load_run(args.run)
    if lora_modules(model):
        merge_lora(model)
    for t in all_tensors(model).values():
        t.requires_grad = True
    if info["task"] == "instruct":
        save_checkpoint(args.out, model, meta={"tokenizer": tokenizer.to_dict(), "finetune": {"task": "instruct"}})
    else:
        arrays = {name: t.numpy() for name, t in all_tensors(model).items()}
        meta = {"format": FORMAT, "version": str(VERSION), "task": json.dumps("classify"),
                "config": json.dumps(model.config.to_dict()), "tokenizer": json.dumps(tokenizer.to_dict()),
                "labels": json.dumps(info["labels"]), "lora": "null", "base": json.dumps(info["base"]),
                "extra": json.dumps(info.get("extra", {}))}
        save_safetensors(args.out, arrays, meta)
    print(f"wrote {args.out}")


# ---- command line -------------------------------------------------------------------------------

def _bool(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _positive_float(text):
    value = _nonneg_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (argparse's own prints the usage too)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _common(p, lr):
    p.add_argument("--init", required=True, help="a checkpoint of this project (or a folder GPT.from_pretrained reads)")
    p.add_argument("--out", required=True, help="output folder: model.safetensors, metrics.jsonl, results.json")
    p.add_argument("--lora_rank", type=_positive_int, default=None, help="train LoRA adapters of this rank (None: no LoRA)")
    p.add_argument("--lora_alpha", type=_positive_float, default=None, help="LoRA alpha (None: the rank)")
    p.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS), help="modules that get adapters: linears (c_attn, c_proj, c_fc) and embedding tables (wte, wpe)")
    p.add_argument("--lora_norms", type=_bool, default=False,
                   help="with LoRA: every LayerNorm's (or RMSNorm's) weight and bias trains too (a classifier's head always does)")
    p.add_argument("--reinit", type=_bool, default=False, help="true: the base's architecture and tokenizer with fresh random weights")
    p.add_argument("--epochs", type=_positive_int, default=5, help="passes over the training data")
    p.add_argument("--batch_size", type=_positive_int, default=8, help="examples per step")
    p.add_argument("--lr", type=_nonneg_float, default=lr, help="AdamW (peak) learning rate")
    p.add_argument("--lr_schedule", choices=("constant", "cosine"), default="constant",
                   help="cosine: linear warm-up over the first 5%% of the steps, then down to lr/10 at the last")
    p.add_argument("--weight_decay", type=_nonneg_float, default=0.1, help="AdamW weight decay on matrices")
    p.add_argument("--grad_clip", type=_nonneg_float, default=1.0, help="0: no clipping")
    p.add_argument("--max_length", type=_positive_int, default=None, help="tokens per text (None: the model's context)")
    p.add_argument("--seed", type=int, default=123, help="seeds the head, adapters, shuffling and --reinit")


def build_parser():
    parser = _Parser(prog="python -m tinygrad_llm.finetune", description=__doc__.splitlines()[0], allow_abbrev=False,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("classify", help="a classifier on labelled texts", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(c, 5e-4)
    c.add_argument("--train", required=True, help=".csv/.tsv with label and text columns, or label<TAB>text lines")
    c.add_argument("--val", required=True, help="validation texts (same formats); picks the best epoch")
    c.add_argument("--test", default=None, help="test texts, evaluated once at the end")
    c.add_argument("--trainable", default="last:1", help="head, last:N (N last blocks, final norm, head) or all")
    c.add_argument("--balance", type=_bool, default=False, help="true: downsample the training classes to the rarest")
    i = sub.add_parser("instruct", help="instruction tuning on Alpaca-style JSON", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(i, 5e-4)
    i.add_argument("--data", required=True, help="JSON list of {instruction, input, output}")
    i.add_argument("--val", default=None, help="validation examples; picks the best epoch")
    i.add_argument("--mask_prompt", type=_bool, default=True, help="true: the loss covers the response only")
    i.add_argument("--trainable", default="all", help="all or last:N")
    i.add_argument("--max_new_tokens", type=_positive_int, default=64, help="for the greedy sample answers")
    e = sub.add_parser("export", help="merge a run's adapters and write one model file", allow_abbrev=False)
    e.add_argument("--run", required=True, help="a fine-tuning output folder")
    e.add_argument("--out", required=True, help="the file to write (.safetensors)")
    return parser


def exit_code(parser, run, argv=None):
    """Parse argv, then run(args): 0 when it returns; argparse's code on a usage error or --help; 1 with one
    stderr line on a user's mistake (InputError, OSError). The finetune and evaluate CLIs' main."""
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse's error (one line, printed) or --help: its exit code
        return e.code
    try:
        run(args)
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    commands = {"classify": run_classify, "instruct": run_instruct, "export": run_export}
    return exit_code(build_parser(), lambda args: commands[args.command](args), argv)


if __name__ == "__main__":
    sys.exit(main())
