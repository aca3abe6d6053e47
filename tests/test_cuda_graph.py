"""The training step as one CUDA graph (tinygrad_llm/cuda_graph.py) and what it rests on: the project's own
cuBLAS GEMMs, dropout seeds read from device memory, and an autograd graph that holds no unsaved activation.

The GPU tests skip (cleanly, at collection) where CuPy or a GPU is missing; the first test runs everywhere.
"""
import gc
import importlib
import weakref

import numpy as np
import pytest

from tinygrad_llm import backend
from tinygrad_llm.tensor import Tensor

def test_the_graph_frees_an_activation_no_backward_saved():
    """Add saves no array: once the forward lets go of its output, the graph must not keep it alive."""
    w = Tensor(np.arange(1000, dtype=np.float32), requires_grad=True)
    a = w + w
    freed = weakref.ref(a.data)
    b = a + w
    del a
    gc.collect()
    assert freed() is None
    b.sum().backward()
    np.testing.assert_array_equal(w.grad, np.full(1000, 3, np.float32))


def _cuda(name):
    return importlib.import_module(f"tinygrad_llm.kernels.cuda.{name}")


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA GPU")
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_ctypes_matmul_and_column_sums_equal_numpy(trans_a, trans_b, dtype):
    import cupy as cp
    cublas = _cuda("cublas")
    rng = np.random.default_rng(3)
    M, N, K = 37, 19, 45
    a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(dtype)
    b = rng.standard_normal((N, K) if trans_b else (K, N)).astype(dtype)
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    got = cublas.matmul(cp.asarray(a), cp.asarray(b), trans_a=trans_a, trans_b=trans_b).get()
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert got.shape == (M, N) and np.abs(got - want).max() / np.abs(want).max() < tol
    out = cp.asarray(np.ones((M, N), dtype))
    cublas.matmul(cp.asarray(a), cp.asarray(b), trans_a=trans_a, trans_b=trans_b, out=out, beta=1)
    assert np.abs(out.get() - (want + 1)).max() / np.abs(want + 1).max() < tol
    rows = rng.standard_normal((300, 7)).astype(dtype)
    sums = cublas.sum_rows_cuda(cp.asarray(rows)).get()
    assert np.abs(sums - rows.astype(np.float64).sum(axis=0)).max() < (1e-10 if dtype == np.float64 else 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA GPU")
def test_dropout_seeded_from_device_memory_follows_the_base_and_the_call():
    import cupy as cp
    from tinygrad_llm.tensor import Context
    runtime, elementwise = _cuda("runtime"), _cuda("elementwise")
    x = cp.ones((64, 1000), np.float32)
    seeds = runtime.DeviceSeeds(2)

    def masks(base, slot=0):
        seeds.words[slot:slot + 1].set(np.array([base], np.uint64))
        with runtime.device_seeds(seeds, slot):
            first = elementwise.DropoutCuda.forward(Context((True,)), x, p=0.25, rng=np.random.default_rng(0))
            second = elementwise.DropoutCuda.forward(Context((True,)), x, p=0.25, rng=np.random.default_rng(0))
        return first.get(), second.get()

    a1, a2 = masks(12345)
    b1, b2 = masks(12345, slot=1)
    c1, _ = masks(999)
    assert abs((a1 == 0).mean() - 0.25) < 0.01 and abs((a2 == 0).mean() - 0.25) < 0.01
    assert not np.array_equal(a1, a2)                                # the call's index changes the mask
    np.testing.assert_array_equal(a1, b1)                            # the base decides, not the slot
    np.testing.assert_array_equal(a2, b2)
    assert not np.array_equal(a1, c1)
    # the kernel reads the base when it runs: rewriting the word changes what the same launch draws
    ctx = Context((True,))
    seeds.words[:1].set(np.array([7], np.uint64))
    with runtime.device_seeds(seeds, 0):
        y = elementwise.DropoutCuda.forward(ctx, x, p=0.25, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(elementwise.DropoutCuda.backward(ctx, x).get(), y.get())   # backward: same mask


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA GPU")
def test_dropout_add_is_one_dropout_call_of_the_step():
    """Inside device_seeds, DropoutAddCuda takes the call's index as DropoutCuda does (one index a call), so the
    fused block's k-th residual dropout hashes with the same seed as the unfused block's k-th dropout."""
    import cupy as cp
    from tinygrad_llm.tensor import Context
    runtime, elementwise = _cuda("runtime"), _cuda("elementwise")
    gen = np.random.default_rng(1)
    x, y = (cp.asarray(gen.standard_normal((64, 1000)).astype(np.float32)) for _ in range(2))
    seeds = runtime.DeviceSeeds(1)
    seeds.words[:1].set(np.array([4242], np.uint64))
    with runtime.device_seeds(seeds, 0):
        fused = [elementwise.DropoutAddCuda.forward(Context((True, True)), x, y, p=0.25, rng=np.random.default_rng(0))
                 for _ in range(2)]
        assert seeds.calls == 2
    with runtime.device_seeds(seeds, 0):
        unfused = [x + elementwise.DropoutCuda.forward(Context((True,)), y, p=0.25, rng=np.random.default_rng(0))
                   for _ in range(2)]
    for a, b in zip(fused, unfused):
        assert bool((a == b).all())
    assert not bool((fused[0] == fused[1]).all())


def _prepare(tmp_path):
    from tinygrad_llm.data import prepare
    text = tmp_path / "text.txt"
    text.write_text("".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(300)))
    prepare(text, tmp_path / "data")
    return str(tmp_path / "data")


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA GPU")
def test_graph_step_gives_the_eager_steps_losses_over_20_steps(tmp_path):
    """Same init, batches and dropout seeds: the replayed graph and the eager step agree to float32 rounding,
    with 2 micro-batches, clipping, dropout and a learning rate that moves every step (warm-up, then decay)."""
    from pathlib import Path

    from tinygrad_llm.cuda_graph import CudaGraphStep
    from tinygrad_llm.model import GPT
    from tinygrad_llm.optim import AdamW, param_groups
    from tinygrad_llm.train import TrainConfig, train_step
    from tinygrad_llm.data import load_meta
    config = TrainConfig(data_dir=_prepare(tmp_path), n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8,
                         grad_accum=2, dropout=0.1, warmup_iters=5, lr_decay_iters=20, max_iters=20, device="cuda",
                         grad_clip=0.5)
    vocab = load_meta(config.data_dir)["vocab_size"]
    runs = []
    for graphed in (False, True):
        rng = np.random.default_rng(config.seed)
        model = GPT(config.model_config(vocab), rng=rng).to("cuda")
        optimizer = AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2))
        graph = CudaGraphStep(model, optimizer, config.batch_size, config.block_size, config.grad_accum,
                              config.grad_clip) if graphed else None
        losses = [train_step(model, optimizer, config, rng, it, config.lr_at(it), Path(tmp_path / "none"), graph=graph)
                  for it in range(20)]
        runs.append((losses, model, optimizer, graph))
    (eager, model_e, opt_e, _), (graphed, model_g, opt_g, graph) = runs
    assert graph.graph is not None and graph.calls == 20        # captured at step 3, then replayed
    assert len(set(graphed)) == 20 and graphed[-1] < graphed[0]  # new batches every replay, and it learns
    np.testing.assert_allclose(graphed, eager, rtol=2e-4)
    for p, q in zip(model_e.parameters(), model_g.parameters()):
        np.testing.assert_allclose(q.numpy(), p.numpy(), rtol=2e-3, atol=2e-5)
    assert {s["step"] for s in opt_g.state.values()} == {20} == {s["step"] for s in opt_e.state.values()}
    # what the kernel caches keep outlives the graph: nothing of theirs may live in the graph's own pool
    del runs, graph, model_g, opt_g
    gc.collect()
    for array in _cuda("runtime").cached_arrays():
        pool = getattr(getattr(getattr(array, "data", None), "mem", None), "pool", None)
        assert pool is None or pool() is not None


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA GPU")
def test_train_with_and_without_the_graph_reaches_the_same_losses(tmp_path):
    """The whole run (evaluations between the replays, on the default stream) either way."""
    from tinygrad_llm.train import TrainConfig, train
    data = _prepare(tmp_path)
    common = dict(data_dir=data, n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_interval=4,
                  eval_iters=2, log_interval=0, sample_chars=0, device="cuda", dropout=0.1, max_iters=12)
    summaries = [train(TrainConfig(out_dir=str(tmp_path / f"out{flag}"), cuda_graph=flag, **common))
                 for flag in (False, True)]
    for key in ("best_val_loss", "final_train_loss", "final_val_loss"):
        assert abs(summaries[1][key] - summaries[0][key]) <= 2e-4 * abs(summaries[0][key]), key


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA GPU")
def test_a_replay_with_a_non_finite_gradient_norm_leaves_the_weights_as_they_were(tmp_path):
    """The eager step stops before AdamW when the norm is NaN; the graph cannot stop, so its AdamW must skip
    (else clipping's NaN coefficient reaches every weight and the re-run that names the op sees only NaNs)."""
    from tinygrad_llm.cuda_graph import CudaGraphStep
    from tinygrad_llm.data import get_batch, load_meta
    from tinygrad_llm.model import GPT
    from tinygrad_llm.optim import AdamW, param_groups
    from tinygrad_llm.train import TrainConfig
    config = TrainConfig(data_dir=_prepare(tmp_path), n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4,
                         device="cuda", dropout=0.0)
    rng = np.random.default_rng(0)
    model = GPT(config.model_config(load_meta(config.data_dir)["vocab_size"]), rng=rng).to("cuda")
    optimizer = AdamW(param_groups(model, config.weight_decay), lr=1e-3)
    graph = CudaGraphStep(model, optimizer, config.batch_size, config.block_size, 1, 1.0)

    def batch():
        return [get_batch(config.data_dir, "train", config.batch_size, config.block_size, rng)]
    for _ in range(4):   # two eager warm-up steps, the capture, a replay: all finite
        loss, norm = graph(batch(), [0], 1e-3)
        assert np.isfinite(float(loss)) and np.isfinite(float(norm))
    assert graph.graph is not None
    params = model.parameters()
    params[1].data[0] = np.nan                    # one poisoned weight: NaN loss and gradient norm
    before = [p.numpy().copy() for p in params]
    moments = [optimizer.state[id(p)]["exp_avg"].get() for p in params]
    loss, norm = graph(batch(), [0], 1e-3)
    assert np.isnan(float(loss)) and not np.isfinite(float(norm))
    for p, b, m in zip(params, before, moments):
        np.testing.assert_array_equal(p.numpy(), b)
        np.testing.assert_array_equal(optimizer.state[id(p)]["exp_avg"].get(), m)
