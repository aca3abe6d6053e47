"""The training loop: resume == uninterrupted (bitwise), k micro-batches == one big batch (with clipping),
a NaN stops the run naming the step and the op with the checkpoint intact, metrics.jsonl, --key=value
parsing, and the example script end to end on a tiny config."""
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinygrad_llm import optim
from tinygrad_llm import train as train_module
from tinygrad_llm.checkpoint import load_checkpoint, load_safetensors
from tinygrad_llm.cli import run_cli
from tinygrad_llm.data import prepare
from tinygrad_llm.train import TrainConfig, TrainingDiverged, parse_overrides, train

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "king", "queen", "shall", "not", "love", "thee", "my", "lord", "hath", "come", "away", "night", "and"]


def write_text(path, n_lines=400, seed=0):
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))).capitalize() + rng.choice([".", ",", "!", "?"])
             for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prepare(write_text(root / "input.txt"), root / "char")
    return str(root / "char")


def tiny(data_dir, out_dir, **overrides):
    base = dict(data_dir=data_dir, out_dir=str(out_dir), n_layer=1, n_head=2, n_embd=16, block_size=16,
                batch_size=4, max_iters=12, lr=1e-2, min_lr=1e-3, warmup_iters=2, eval_interval=4, eval_iters=2,
                log_interval=0, sample_chars=0)
    return TrainConfig(**{**base, **overrides})


def records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_bitwise_equal(a, b):
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ---- resume ---------------------------------------------------------------------------------------

def test_resume_equals_uninterrupted_run_bitwise(data_dir, tmp_path, monkeypatch):
    # dropout on: the restored generator state must also reproduce the dropout masks
    config = tiny(data_dir, tmp_path / "whole", dropout=0.1)
    whole = train(config)

    interrupted = dataclasses.replace(config, out_dir=str(tmp_path / "parts"))
    real_step = train_module.train_step
    def crash_at_10(model, optimizer, cfg, rng, it, *args):
        if it == 10:
            raise KeyboardInterrupt("simulated crash")
        return real_step(model, optimizer, cfg, rng, it, *args)
    monkeypatch.setattr(train_module, "train_step", crash_at_10)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted)
    monkeypatch.undo()
    saved_step = load_checkpoint(Path(interrupted.out_dir) / "ckpt.safetensors")["step"]
    assert saved_step in (4, 8)  # the best checkpoint before the crash; loss falls, so not iteration 0

    resumed = train(dataclasses.replace(interrupted, init_from="resume"))
    assert_bitwise_equal(resumed["model"].state_dict(), whole["model"].state_dict())
    assert resumed["best_val_loss"] == whole["best_val_loss"]
    strip = lambda rs: [{k: r[k] for k in ("iter", "train_loss", "val_loss", "lr")} for r in rs]
    assert strip(records(interrupted.out_dir)) == strip(records(config.out_dir))
    assert_bitwise_equal(load_safetensors(Path(interrupted.out_dir) / "ckpt.safetensors")[0],
                         load_safetensors(Path(config.out_dir) / "ckpt.safetensors")[0])


def test_resume_needs_a_matching_checkpoint(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny(data_dir, tmp_path, init_from="resume"))
    train(tiny(data_dir, tmp_path, max_iters=0))
    with pytest.raises(ValueError, match=r"--n_embd=32 \(the run has 16\)"):
        train(tiny(data_dir, tmp_path, n_embd=32, init_from="resume"))


# ---- gradient accumulation ------------------------------------------------------------------------

def test_micro_batches_equal_one_big_batch_with_clipping(data_dir, tmp_path, monkeypatch):
    norms = {}
    real_clip = optim.clip_grad_norm
    def recording_clip(params, max_norm):
        norm = real_clip(params, max_norm)
        norms.setdefault(current, []).append(norm)
        return norm
    monkeypatch.setattr(train_module, "clip_grad_norm", recording_clip)

    results = {}
    # the batch windows come from one generator stream: 2 draws of 4 starts == 1 draw of 8 starts
    for current, (batch_size, grad_accum) in {"big": (8, 1), "micro": (4, 2), "tiny": (2, 4)}.items():
        config = tiny(data_dir, tmp_path / current, dtype="float64", batch_size=batch_size, grad_accum=grad_accum,
                      max_iters=4, grad_clip=0.05, eval_interval=100)
        results[current] = train(config)["model"].state_dict()
    assert min(norms["big"]) > 0.05  # clipping was active on every step
    for name in ("micro", "tiny"):
        np.testing.assert_allclose(norms[name], norms["big"], rtol=1e-10)
        for key, value in results["big"].items():
            np.testing.assert_allclose(results[name][key], value, rtol=1e-9, atol=1e-12, err_msg=key)


# ---- divergence -----------------------------------------------------------------------------------

def test_nan_loss_stops_naming_the_step_and_op_and_keeps_the_checkpoint(data_dir, tmp_path, monkeypatch):
    config = tiny(data_dir, tmp_path, eval_interval=2, max_iters=10)
    real_step = optim.AdamW.step
    calls = []
    def poisoning_step(self):
        real_step(self)
        calls.append(1)
        if len(calls) == 5:  # after iteration 4's update the embedding table is ruined
            self.param_groups[0]["params"][0].data[...] = np.nan
    monkeypatch.setattr(optim.AdamW, "step", poisoning_step)
    ckpt = tmp_path / "ckpt.safetensors"
    saved_before = {}
    real_save = train_module.save_checkpoint
    def recording_save(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        saved_before["bytes"] = Path(path).read_bytes()
    monkeypatch.setattr(train_module, "save_checkpoint", recording_save)

    with pytest.raises(TrainingDiverged, match=r"loss is nan at iteration 5 .*Embedding forward.*non-finite.*"
                                               r"last good checkpoint .* is untouched"):
        train(config)
    assert ckpt.read_bytes() == saved_before["bytes"]
    meta = load_checkpoint(ckpt)
    assert meta["step"] <= 4
    assert all(np.isfinite(a).all() for a in load_safetensors(ckpt)[0].values())
    assert [r["iter"] for r in records(tmp_path)] == [0, 2, 4]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---- outputs --------------------------------------------------------------------------------------

def test_metrics_jsonl_plot_and_summary(data_dir, tmp_path, capsys):
    summary = train(tiny(data_dir, tmp_path, max_iters=10, eval_interval=4, log_interval=5))
    rs = records(tmp_path)
    assert [r["iter"] for r in rs] == [0, 4, 8, 10]
    for r in rs:
        assert set(r) == {"iter", "train_loss", "val_loss", "lr", "elapsed_s", "tokens_per_s"}
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) and r["lr"] > 0
    assert rs[0]["tokens_per_s"] is None and all(r["tokens_per_s"] > 0 for r in rs[1:])
    assert [r["elapsed_s"] for r in rs] == sorted(r["elapsed_s"] for r in rs)
    assert rs[-1]["val_loss"] < rs[0]["val_loss"]
    assert summary["best_val_loss"] == min(r["val_loss"] for r in rs)
    assert load_checkpoint(tmp_path / "ckpt.safetensors")["step"] == summary["best_iter"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "ms/iter" in out and "tokens/s" in out and "ETA" in out


# ---- --key=value ----------------------------------------------------------------------------------

def test_overrides_are_typed_and_take_both_spellings():
    config = parse_overrides(["--max_iters=500", "--lr", "3e-4", "--bias=false", "--norm", "rmsnorm", "--out_dir=x"])
    assert (config.max_iters, config.lr, config.bias, config.norm, config.out_dir) == (500, 3e-4, False, "rmsnorm", "x")
    assert TrainConfig().max_iters == 2000  # the defaults are left alone
    base = TrainConfig(n_layer=2)
    assert parse_overrides(["--max_iters", "7"], base) == dataclasses.replace(base, max_iters=7)


@pytest.mark.parametrize("args, message", [
    (["--max_itters=5"], r"unknown option '--max_itters=5'; did you mean --max_iters\?"),
    (["--max_iters=1e3"], r"argument --max_iters: expects an integer, got '1e3'"),
    (["--lr=fast"], r"argument --lr: expects a number"),
    (["--bias=maybe"], r"argument --bias: expects true or false"),
    (["max_iters=5"], r"unexpected argument 'max_iters=5'"),
    (["--max_iters"], r"argument --max_iters: expected one argument"),
    (["--init_from=gpt2"], r"argument --init_from: invalid choice: 'gpt2'"),
    (["--n_embd=130"], r"n_embd=130 is not divisible by n_head=4"),
    (["--batch_size=0"], r"batch_size must be a positive integer"),
    (["--grad_clip=nan"], r"grad_clip must be a finite number, got nan"),
    (["--lr=inf"], r"lr must be a finite number, got inf"),
    (["--lr_decay_iters=0"], r"lr_decay_iters must be a positive integer"),
])
def test_override_errors(args, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides(args)


# ---- the examples ---------------------------------------------------------------------------------

def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_rejects_bad_overrides_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(load_example("train_shakespeare").main, ["--data", "missing.txt", "--n_layers=2"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: unknown option '--n_layers=2'; did you mean --n_layer? (--help lists every option)\n"
    assert not list(tmp_path.iterdir())


def test_example_end_to_end_in_seconds_offline_on_the_shipped_text(tmp_path):
    # no --data: the README's command trains on the text shipped in examples/data, with no network at all
    env = {**os.environ, "PYTHONPATH": str(ROOT), "no_proxy": "", "http_proxy": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    args = [sys.executable, str(ROOT / "examples" / "train_shakespeare.py"),
            "--n_layer=1", "--n_head", "2", "--n_embd=16", "--block_size", "16", "--batch_size=4", "--max_iters=20",
            "--eval_interval=10", "--eval_iters=2", "--log_interval=10", "--sample_chars=40"]
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"tokenizing {ROOT / 'examples' / 'data' / 'tinyshakespeare.txt'} (char)" in run.stdout
    assert "vocabulary 65, 1,003,855 train and 111,539 val tokens" in run.stdout  # nanoGPT's figures for this text
    assert "best val loss" in run.stdout and "--- sample" in run.stdout
    out_dir = tmp_path / "out" / "shakespeare_char"
    assert {"ckpt.safetensors", "metrics.jsonl", "loss.png"} <= {p.name for p in out_dir.iterdir()}
    assert (tmp_path / "data" / "shakespeare" / "char" / "meta.json").is_file()

    sample = subprocess.run([sys.executable, str(ROOT / "examples" / "sample.py"), "--ckpt",
                             str(out_dir / "ckpt.safetensors"), "--prompt", "The king", "--max_new_tokens", "30"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("The king") and len(sample.stdout.rstrip("\n")) >= len("The king")


def test_a_metrics_line_cut_off_by_a_crash_is_dropped_and_others_name_the_file(tmp_path):
    from tinygrad_llm.train import _read_records

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iter": 0, "val_loss": 4.1}\n{"iter": 250, "val_loss": 2.4}\n{"iter": 500, "val_l')
    assert [r["iter"] for r in _read_records(path, before_iter=250)] == [0, 250]
    assert path.read_text() == '{"iter": 0, "val_loss": 4.1}\n{"iter": 250, "val_loss": 2.4}\n'
    path.write_text('{"iter": 0}\nnot json\n{"iter": 250}\n')
    with pytest.raises(ValueError, match="metrics.jsonl line 2 is not JSON"):
        _read_records(path, before_iter=250)
