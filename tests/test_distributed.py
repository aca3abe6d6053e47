"""Data-parallel training under `mpiexec -n 2` (CPU ranks): the same weights as one process with the doubled
batch (also with gradient accumulation and with ZeRO-1), resuming across rank counts, a raising or killed
rank ending the whole job, mismatched configs refused; and in-process checks of the single-rank paths."""
import dataclasses
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tinygrad_llm import distributed
from tinygrad_llm.checkpoint import load_checkpoint, load_safetensors
from tinygrad_llm.data import prepare
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.optim import AdamW, param_groups
from tinygrad_llm.tensor import Tensor
from tinygrad_llm.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec")
HAVE_MPI = MPIEXEC is not None and importlib.util.find_spec("mpi4py") is not None   # (without importing it)
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec: pip install -e '.[dist]'")
WORDS = ["the", "king", "queen", "shall", "not", "love", "thee", "my", "lord", "hath", "come", "away", "night", "and"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))).capitalize() + "." for _ in range(300)]
    (root / "input.txt").write_text("\n".join(lines) + "\n")
    prepare(root / "input.txt", root / "char")
    return str(root / "char")


def tiny(data_dir, out_dir, **overrides):
    """float64, clipping active (grad_clip far under the norm), evaluations at 0, 4 and 8."""
    base = dict(data_dir=data_dir, out_dir=str(out_dir), n_layer=1, n_head=2, n_embd=16, block_size=16,
                batch_size=4, max_iters=8, lr=1e-2, min_lr=1e-3, warmup_iters=2, eval_interval=4, eval_iters=2,
                log_interval=0, sample_chars=0, dtype="float64", grad_clip=0.05)
    return TrainConfig(**{**base, **overrides})


def as_args(config):
    return [f"--{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config) if getattr(config, f.name) is not None]


DRIVER = """
import os, signal, sys
from tinygrad_llm import train as t
crash_at, crash_rank, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
real_step = t.train_step
def step(model, optimizer, config, rng, it, *rest):
    rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))
    if it == crash_at and crash_rank in (rank, -1):
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"simulated failure on rank {rank}")
    return real_step(model, optimizer, config, rng, it, *rest)
t.train_step = step
t.main(sys.argv[4:])
"""


def mpirun(k, args, driver=None, timeout=120):
    """`mpiexec -n k python -m tinygrad_llm.train args` (or the failure-injecting driver); CompletedProcess + seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Open MPI's mpiexec (the GPU machines') refuses root unless told; MPICH's ignores these
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    program = ["-c", DRIVER, *driver] if driver else ["-m", "tinygrad_llm.train"]
    start = time.monotonic()
    done = subprocess.run([MPIEXEC, "-n", str(k), sys.executable, *program, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - start


def final_state(out_dir, step):
    """The weights and optimizer state saved in out_dir at iteration `step` (the last or the best checkpoint)."""
    for name in ("last.safetensors", "ckpt.safetensors"):
        path = Path(out_dir) / name
        if path.is_file() and load_checkpoint(path)["step"] == step:
            return load_safetensors(path)[0]
    raise AssertionError(f"no checkpoint of iteration {step} in {out_dir}")


def assert_close(a, b, rtol=1e-10):
    assert set(a) == set(b)
    for name in a:
        scale = max(float(np.abs(b[name]).max()), 1e-300)
        assert float(np.abs(a[name] - b[name]).max()) / scale < rtol, name


def metrics(out_dir):
    import json
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


# ---- 2 ranks == 1 process with the doubled batch ---------------------------------------------------

@needs_mpi
@pytest.mark.slow
def test_two_ranks_with_grad_accum_equal_one_process_with_the_doubled_batch(data_dir, tmp_path):
    one = train(tiny(data_dir, tmp_path / "one", batch_size=4, grad_accum=2))
    two = tiny(data_dir, tmp_path / "two", batch_size=2, grad_accum=2)
    done, _ = mpirun(2, as_args(two))
    assert done.returncode == 0, done.stderr
    # weights and AdamW state after 8 clipped steps; the losses of every evaluation
    assert_close(final_state(two.out_dir, 8), final_state(tmp_path / "one", 8))
    for a, b in zip(metrics(two.out_dir), metrics(tmp_path / "one"), strict=True):
        assert a["iter"] == b["iter"]
        np.testing.assert_allclose([a["train_loss"], a["val_loss"]], [b["train_loss"], b["val_loss"]], rtol=1e-12)
    assert one["best_val_loss"] == pytest.approx(metrics(two.out_dir)[-1]["val_loss"], rel=1e-12)
    # rank 0 alone prints and writes; throughput is the whole job's (2 ranks x 2 x 2 x 16 tokens)
    assert done.stdout.count("iter 8: train loss") == 1 and "128 tokens per iteration" in done.stdout
    assert not [p for p in Path(two.out_dir).iterdir() if p.name.endswith(".tmp")]


@needs_mpi
@pytest.mark.slow
def test_zero_and_resume_across_rank_counts_equal_the_uninterrupted_run(data_dir, tmp_path):
    whole = tiny(data_dir, tmp_path / "whole", batch_size=4, grad_accum=2)
    train(whole)
    cut = tmp_path / "cut"
    _one_process_cut_at_6(dataclasses.replace(whole, out_dir=str(cut)))     # its checkpoint: iteration 4
    # 2 ranks under ZeRO-1, dying at iteration 6: their checkpoint of iteration 4 (the full AdamW state,
    # gathered from the shards) equals one process's ...
    parts = tiny(data_dir, tmp_path / "parts", batch_size=2, grad_accum=2, zero=1)
    done, _ = mpirun(2, as_args(parts), driver=["6", "-1", "raise"])
    assert done.returncode != 0 and "simulated failure" in done.stderr
    assert_close(final_state(parts.out_dir, 4), final_state(cut, 4))
    # ... and one process resumes it to the uninterrupted run's end
    train(dataclasses.replace(parts, batch_size=4, zero=0, init_from="resume"))
    assert_close(final_state(parts.out_dir, 8), final_state(whole.out_dir, 8))
    # the other way round: one process's checkpoint resumed by 2 ranks under ZeRO-1
    # (left unsaid, batch_size is rescaled to keep the run's global batch: 4 x 1 rank -> 2 x 2 ranks)
    done, _ = mpirun(2, ["--init_from=resume", f"--out_dir={cut}", "--zero=1"])
    assert done.returncode == 0, done.stderr
    assert_close(final_state(cut, 8), final_state(whole.out_dir, 8))


def _one_process_cut_at_6(config):
    """Train config in this process, stopped by a crash at iteration 6 (after the checkpoint of 4)."""
    from tinygrad_llm import train as train_module
    real_step = train_module.train_step

    def stop_at_6(model, optimizer, cfg, rng, it, *rest):
        if it == 6:
            raise KeyboardInterrupt("simulated crash")
        return real_step(model, optimizer, cfg, rng, it, *rest)
    train_module.train_step = stop_at_6
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config)
    finally:
        train_module.train_step = real_step
    assert load_checkpoint(Path(config.out_dir) / "ckpt.safetensors")["step"] == 4


# ---- failures end the whole job --------------------------------------------------------------------

@needs_mpi
@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_ends_the_job_within_a_minute(data_dir, tmp_path, how):
    config = tiny(data_dir, tmp_path, batch_size=2, max_iters=1000, eval_interval=1000)
    done, seconds = mpirun(2, as_args(config), driver=["3", "1", how], timeout=90)
    assert done.returncode != 0
    assert seconds < 60
    if how == "raise":
        assert "simulated failure on rank 1" in done.stderr


@needs_mpi
@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_one_iteration_and_saves_the_full_state(data_dir, tmp_path):
    config = tiny(data_dir, tmp_path, batch_size=2, max_iters=100000, eval_interval=100000, zero=1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "tinygrad_llm.train", *as_args(config)],
                           env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "loss.png").exists() and time.monotonic() < deadline:   # the evaluation of 0 is done
        time.sleep(0.2)
    time.sleep(3.0)                                                                  # some steps later
    job.send_signal(signal.SIGINT)                     # what Ctrl-C does: mpiexec passes it to every rank
    out, err = job.communicate(timeout=60)
    stops = [line for line in err.splitlines() if line.startswith("interrupted by SIGINT at iteration")]
    assert len(stops) == 2 and stops[0] == stops[1], err           # both ranks, the same iteration
    saved = load_checkpoint(tmp_path / "last.safetensors")
    assert f"iteration {saved['step']};" in stops[0] and saved["step"] > 0 and saved["ranks"] == 2
    arrays = load_safetensors(tmp_path / "last.safetensors")[0]
    assert arrays["optimizer.state.0.exp_avg"].shape == arrays["transformer.wte.weight"].shape   # gathered whole


@needs_mpi
def test_mismatched_configs_across_ranks_are_refused(data_dir, tmp_path):
    config = tiny(data_dir, tmp_path, batch_size=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rank = [sys.executable, "-m", "tinygrad_llm.train", *as_args(config)]
    done = subprocess.run([MPIEXEC, "-n", "1", *rank, "--lr=0.01", ":", "-n", "1", *rank, "--lr=0.02"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "different configs" in done.stderr and "lr=0.02" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "ckpt.safetensors").exists()


# ---- one process: no MPI; ZeRO's sharded optimizer on one rank ----------------------------------------

def test_one_process_needs_no_mpi(data_dir, tmp_path, monkeypatch):
    for name in distributed.SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_world", None)
    train(tiny(data_dir, tmp_path, max_iters=2, zero=1))
    assert "mpi4py" not in sys.modules
    assert distributed.world().size == 1


def test_zero_on_one_rank_equals_adamw_and_its_state_dict_is_adamw_s(data_dir):
    rng = np.random.default_rng(0)
    config = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8, dtype="float64")
    models = [GPT(config, rng=np.random.default_rng(3)) for _ in range(2)]
    world = distributed.World(1)
    dp = distributed.DataParallel(world, models[1], zero=1, bucket_bytes=1024)   # several buckets
    assert len(dp.buckets) > 2
    plain = AdamW(param_groups(models[0], 0.1), lr=1e-2, betas=(0.9, 0.99))
    sharded = dp.optimizer(param_groups(models[1], 0.1), lr=1e-2, betas=(0.9, 0.99))
    for _ in range(3):
        x = rng.integers(0, 20, size=(3, 8))
        y = rng.integers(0, 20, size=(3, 8))
        for model, opt in ((models[0], plain), (models[1], sharded)):
            _, loss = model(x, y)
            if opt is plain:
                loss.backward()
                from tinygrad_llm.optim import clip_grad_norm
                norm0 = clip_grad_norm(model.parameters(), 0.1)
            else:
                dp.backward(loss)
                norm1 = dp.clip_grad_norm(0.1)
            opt.step()
            opt.zero_grad()
        assert norm1 == pytest.approx(norm0, rel=1e-12)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        np.testing.assert_allclose(b.data, a.data, rtol=1e-12, atol=1e-15)
    state, reference = sharded.state_dict(), plain.state_dict()
    assert state["param_groups"] == reference["param_groups"] and set(state["state"]) == set(reference["state"])
    for i, s in reference["state"].items():
        assert state["state"][i]["step"] == s["step"] == 3
        np.testing.assert_allclose(state["state"][i]["exp_avg"], s["exp_avg"], rtol=1e-12, atol=1e-18)
    # and back: a fresh ZeroAdamW that loads AdamW's state takes the next step as AdamW does
    fresh = distributed.DataParallel(world, models[1], zero=1, bucket_bytes=1024).optimizer(
        param_groups(models[1], 0.1), lr=1e-2, betas=(0.9, 0.99))
    fresh.load_state_dict(reference)
    again = fresh.state_dict()
    for i, s in reference["state"].items():
        np.testing.assert_array_equal(again["state"][i]["exp_avg_sq"], s["exp_avg_sq"])


def test_overlapped_hook_sees_every_gradient_once_complete():
    # the gradient handed to leaf_grad_hook is the whole of that backward's gradient for the leaf
    from tinygrad_llm.tensor import leaf_grad_hook
    w = Tensor(np.arange(3.0), requires_grad=True)
    seen = {}
    with leaf_grad_hook(lambda leaf, dout: seen.setdefault(id(leaf), []).append(dout.copy())):
        ((w * w).sum() + (w * 3.0).sum()).backward()
    assert list(seen) == [id(w)] and len(seen[id(w)]) == 1
    np.testing.assert_array_equal(seen[id(w)][0], 2 * np.arange(3.0) + 3)
    np.testing.assert_array_equal(w.grad, 2 * np.arange(3.0) + 3)


def test_batch_rows_partition_the_global_batch(data_dir):
    world = distributed.World(1)
    x, y = world.batch(data_dir, "train", 6, 8, np.random.default_rng(5))
    parts = []
    for rank in range(3):
        world.rank, world.size = rank, 3
        parts.append(world.batch(data_dir, "train", 2, 8, np.random.default_rng(5)))
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)


def test_bad_zero_is_refused():
    with pytest.raises(ValueError, match="zero must be 0 or 1"):
        TrainConfig(zero=2)


# ---- GPUs: NCCL ----------------------------------------------------------------------------------------

def _gpu_count():
    from tinygrad_llm import backend
    return backend.cupy_module().cuda.runtime.getDeviceCount() if backend.cuda_available() else 0


def relative_norm(a, b):
    """||a - b|| / ||b|| over every array together (float32 Adam steps amplify rounding in a few elements)."""
    diff = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in b)
    return (diff / sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b)) ** 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec")
@pytest.mark.skipif(_gpu_count() < 2, reason="needs CuPy and two CUDA GPUs")
@pytest.mark.parametrize("zero", [0, 1])
def test_two_gpus_equal_one_gpu_with_the_doubled_batch(data_dir, tmp_path, zero):
    common = dict(device="cuda", dtype="float32", n_layer=2, n_embd=32, grad_accum=2)
    train(tiny(data_dir, tmp_path / "one", batch_size=8, **common))
    two = tiny(data_dir, tmp_path / "two", batch_size=4, zero=zero, **common)
    done, _ = mpirun(2, as_args(two))
    assert done.returncode == 0, done.stderr
    a, b = final_state(two.out_dir, 8), final_state(tmp_path / "one", 8)
    weights = [k for k in b if not k.startswith("optimizer.")]
    assert relative_norm({k: a[k] for k in weights}, {k: b[k] for k in weights}) < 1e-5
    assert relative_norm(a, b) < 1e-4
    np.testing.assert_allclose(metrics(two.out_dir)[-1]["val_loss"], metrics(tmp_path / "one")[-1]["val_loss"], rtol=1e-5)
