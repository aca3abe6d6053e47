"""Every Numba kernel equals its NumPy reference, forward and every gradient, and the switch works.

Three layers of checks: each kernel file's edge cases (kernel_checks.py: random and odd shapes, strided
inputs, inputs left to the op; float64 to 1e-10 relative, float32 to 2e-4); hypothesis over shapes for the row
kernels; and the public API run twice, TINYGRAD_LLM_KERNELS=0 and kernels on, through functional,
the optimizer and a whole float64 GPT. The file skips when Numba is not installed.
"""
import numpy as np
import pytest
from hypothesis import example, given, strategies as st

pytest.importorskip("numba")

from kernel_checks import CHECKS, TOLERANCE, compare_with_reference, row_blocks_of, spread_over_threads  # noqa: E402

from tinygrad_llm import backend, cases, functional as F, optim, tensor  # noqa: E402
from tinygrad_llm.kernels.cpu.attention import ScaledDotProductAttentionNumba  # noqa: E402
from tinygrad_llm.kernels.cpu.cross_entropy import CrossEntropyNumba  # noqa: E402
from tinygrad_llm.kernels.cpu.elementwise import GELUNumba  # noqa: E402
from tinygrad_llm.kernels.cpu.layer_norm import LayerNormNumba, RMSNormNumba  # noqa: E402
from tinygrad_llm.model import GPT, GPTConfig  # noqa: E402
from tinygrad_llm.tensor import Context, Tensor  # noqa: E402


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_kernel_file_validates_against_its_reference(name):
    worst = CHECKS[name]()
    assert worst <= TOLERANCE[np.dtype(np.float32)]


def test_kernels_are_registered_and_the_switch_turns_them_off(monkeypatch):
    x = np.zeros((2, 3))
    monkeypatch.setenv("TINYGRAD_LLM_KERNELS", "1")
    assert backend.accelerated(F.LayerNorm, x) is LayerNormNumba
    assert backend.accelerated(F.ScaledDotProductAttention, x) is ScaledDotProductAttentionNumba
    assert backend.accelerated(F.CrossEntropy, x) is CrossEntropyNumba
    assert backend.accelerated(optim.adamw_update, x) is not optim.adamw_update
    assert backend.accelerated(optim.adamw_update_group, x) is not optim.adamw_update_group
    monkeypatch.setenv("TINYGRAD_LLM_KERNELS", "0")
    assert backend.accelerated(F.LayerNorm, x) is F.LayerNorm
    assert backend.accelerated(F.CrossEntropy, x) is F.CrossEntropy
    assert backend.accelerated(optim.adamw_update, x) is optim.adamw_update
    assert backend.accelerated(optim.adamw_update_group, x) is optim.adamw_update_group


def test_dispatch_imports_the_named_kernel_and_falls_back_to_the_op(monkeypatch):
    """A subclass of an op does not inherit its kernels (they would not run its forward); without the
    device's library (Numba here) every op runs as written; a plain function names its kernels too."""
    class MyLayerNorm(F.LayerNorm):
        pass

    monkeypatch.setenv("TINYGRAD_LLM_KERNELS", "1")
    assert backend.implementation(F.LayerNorm, "cpu") is LayerNormNumba
    assert backend.implementation(MyLayerNorm, "cpu") is MyLayerNorm
    assert backend.implementation(F.Linear, "cpu") is F.Linear          # names a CUDA kernel only
    assert optim.adamw_update.kernels == {"cpu": "optim.adamw_update_numba", "cuda": "optim.adamw_update_cuda"}
    monkeypatch.setattr(backend, "_implementations", {})
    monkeypatch.setattr(backend, "_library_found", {"cpu": False})
    assert backend.implementation(F.LayerNorm, "cpu") is F.LayerNorm
    assert backend.accelerated(optim.adamw_update, np.zeros(3)) is optim.adamw_update


def test_float32_gelu_tanh_is_within_7_ulp_of_tanh_and_keeps_the_references_edge_values():
    """The float32 tanh form computes tanh(u) by a rational function (kernels/cpu/elementwise.py): check the saved t
    against float64 tanh of the same float32 u, over u in about [-12, 12], and the non-finite inputs."""
    x = np.linspace(-6, 6, 1_000_001, dtype=np.float32)
    ctx = Context((True,))
    GELUNumba.forward(ctx, x, approximate="tanh")
    c, a = np.float32(np.sqrt(2 / np.pi)), np.float32(0.044715)
    u = c * (x + a * x * x * x)   # as the kernel forms it, in float32
    truth = np.tanh(u.astype(np.float64))
    ulp = np.spacing(np.abs(truth).astype(np.float32)).astype(np.float64)
    assert float((np.abs(ctx.tanh - truth) / ulp).max()) <= 7
    assert float(np.abs(ctx.tanh).max()) <= 1
    np.testing.assert_array_equal(ctx.tanh[::-1], -ctx.tanh)   # odd, like tanh
    edges = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 30.0, -30.0], np.float32)
    with np.errstate(invalid="ignore"):   # -inf * 0 = nan, in both
        reference = F.GELU.forward(Context((True,)), edges, approximate="tanh")
        np.testing.assert_array_equal(GELUNumba.forward(Context((True,)), edges, approximate="tanh"), reference)


# ---- hypothesis over shapes ------------------------------------------------------------------------

dtypes = st.sampled_from([np.float64, np.float32])


def _forward_backward_results(impl, arrays, attrs, seed):
    """impl's output and gradients of q, k, v for the dout compare_with_reference draws, and that dout."""
    ctx = Context((True, True, True, False))
    out = impl.forward(ctx, *arrays, None, **attrs)
    dout = np.random.default_rng(seed + 1).standard_normal(out.shape).astype(out.dtype)
    return [out, *impl.backward(ctx, dout)[:3]], dout


def assert_attention_kernel_matches(q, k, v, attrs, seed):
    """float64: kernel == reference to 1e-10 relative, or where a gradient is such a cancellation (below), within
    float64 rounding of the terms that make it up. float32: kernel within float32 rounding of the float64
    answer, measured on the scale of the terms that make it up (max|q,k,v|^2 max|dout|): when a softmax row
    saturates, dS = P (dP - rowsum(dP P)) cancels O(1) terms into a ~1e-7 gradient, and any float32 evaluation
    order is then off by ~1e-8 absolute, which is a large relative error (hypothesis found TQ=1, HS=1 cases)."""
    if q.dtype == np.float64:
        err = compare_with_reference(F.ScaledDotProductAttention, ScaledDotProductAttentionNumba, (q, k, v, None), attrs,
                                     needs=(True, True, True, False), seed=seed)
        if err <= TOLERANCE[np.dtype(np.float64)]:
            return
        # The same cancellation in float64: hypothesis found TQ=HS=1 with 2 keys where a ~5e-7 dq is 8e-9 relative
        # off (4e-15 absolute); so bound the absolute error on the terms' scale at float64 rounding instead.
        bound = 1e-13
    else:
        bound = 1e-5
    truth, dout = _forward_backward_results(F.ScaledDotProductAttention, [a.astype(np.float64) for a in (q, k, v)], attrs, seed)
    kernel, _ = _forward_backward_results(ScaledDotProductAttentionNumba, [q, k, v], attrs, seed)
    terms = max(float(np.abs(a).max()) for a in (q, k, v)) ** 2 * float(np.abs(dout).max())
    for i, (t, g) in enumerate(zip(truth, kernel)):
        assert float(np.abs(g - t).max()) <= bound * terms, f"result {i}"


@given(B=st.integers(1, 3), NH=st.integers(1, 3), T=st.integers(1, 40), HS=st.integers(1, 17),
       causal=st.booleans(), dtype=dtypes, seed=st.integers(0, 2**16))
def test_attention_equals_reference_on_random_shapes(B, NH, T, HS, causal, dtype, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, NH, T, HS)).astype(dtype) * 2 for _ in range(3))
    assert_attention_kernel_matches(q, k, v, dict(causal=causal, scale=HS ** -0.5), seed)


@given(B=st.integers(1, 2), NH=st.integers(1, 2), TQ=st.integers(1, 40), extra_keys=st.integers(0, 5),
       HS=st.integers(1, 9), rows=st.integers(1, 12), dtype=dtypes, seed=st.integers(0, 2**16))
@example(B=1, NH=1, TQ=1, extra_keys=1, HS=1, rows=1, dtype=np.float64, seed=1536)
def test_causal_attention_row_blocks_equal_reference(B, NH, TQ, extra_keys, HS, rows, dtype, seed):
    """Causal row blocks of any size, dividing TQ or not, with TK >= TQ (query block aligned to the keys' end)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, NH, TQ, HS)).astype(dtype) * 2
    k, v = (rng.standard_normal((B, NH, TQ + extra_keys, HS)).astype(dtype) * 2 for _ in range(2))
    with row_blocks_of(rows):
        assert_attention_kernel_matches(q, k, v, dict(causal=True, scale=HS ** -0.5), seed)


@given(B=st.integers(1, 3), NH=st.integers(1, 3), T=st.integers(1, 40), HS=st.integers(1, 9), causal=st.booleans(),
       strided=st.booleans(), threads=st.sampled_from([2, 3]), dtype=dtypes, seed=st.integers(0, 2**16))
def test_attention_spread_over_threads_equals_reference(B, NH, T, HS, causal, strided, threads, dtype, seed):
    """Work items run on 2-3 Python threads (OpenBLAS on one thread each), from contiguous heads (runs over
    all (batch, head) pairs) or from a permuted (B, T, NH, HS) layout (per-head items on strided rows)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T, NH, HS) if strided else (B, NH, T, HS)).astype(dtype) * 2 for _ in range(3))
    if strided:
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    with spread_over_threads(threads):
        assert_attention_kernel_matches(q, k, v, dict(causal=causal, scale=HS ** -0.5), seed)


def test_gelu_erf_form_is_not_served_and_its_kernel_still_validates():
    """The erf form's kernel measured slower than the reference (kernels/cpu/elementwise.py): GELU(approximate="none")
    runs the reference; with the kernel switched on for measuring, it still equals the reference."""
    from tinygrad_llm.kernels.cpu.elementwise import exact_served
    x = np.random.default_rng(3).standard_normal((4, 9)) * 3
    ctx = Context((True,))
    GELUNumba.forward(ctx, x, approximate="none")
    assert ctx.reference
    with exact_served():
        assert compare_with_reference(F.GELU, GELUNumba, (x,), dict(approximate="none")) <= TOLERANCE[np.dtype(np.float64)]
        ctx = Context((True,))
        GELUNumba.forward(ctx, x, approximate="none")
        assert not ctx.reference


def test_blas_threads_sets_and_restores_openblas_threads():
    from tinygrad_llm.kernels.cpu.threads import blas_threads, numpy_blas
    blas = numpy_blas()
    if blas is None:
        pytest.skip("threadpoolctl does not find NumPy's BLAS here")
    before = blas.get_num_threads()
    inside = 2 if before == 1 else 1          # a change whatever OPENBLAS_NUM_THREADS says
    with blas_threads(inside):
        assert blas.get_num_threads() == inside
        with blas_threads(inside):            # nested (another Python thread's block): the outer restores
            assert blas.get_num_threads() == inside
        assert blas.get_num_threads() == inside
    assert blas.get_num_threads() == before


def test_attention_threads_finish_every_share_and_raise_the_first_error():
    """An exception in one share: every share still finishes before the call raises, this thread's error
    comes first, and OpenBLAS gets its thread count back."""
    import threading
    import time

    from tinygrad_llm.kernels.cpu import threads
    blas = threads.numpy_blas()
    before = blas.get_num_threads() if blas else None
    done, lock = [], threading.Lock()

    def fn(i):                                # shares with 2 threads: this one [0, 2, 4], the worker [1, 3, 5]
        if i == 0:
            raise KeyError("this thread's share")
        if i == 1:
            time.sleep(0.2)                   # the worker is still busy when this thread's share fails
        with lock:
            done.append(i)

    with spread_over_threads(2):
        with pytest.raises(KeyError):
            threads.run_items(fn, [(i,) for i in range(6)], parallel=True)
        assert sorted(done) == [1, 3, 5]      # ... and had finished its share when the call raised

        def fails_in_the_worker(i):
            if i == 1:
                raise ValueError("worker share")

        with pytest.raises(ValueError, match="worker share"):
            threads.run_items(fails_in_the_worker, [(i,) for i in range(6)], parallel=True)
    if blas:
        assert blas.get_num_threads() == before


@given(rows=st.integers(1, 50), C=st.integers(2, 70), dtype=dtypes, seed=st.integers(0, 2**16))
def test_norms_equal_reference_on_random_shapes(rows, C, dtype, seed):
    if dtype == np.float32:
        # with a few elements per row, dx is a cancellation (xhat^2 ~ 1 when C = 2) that float32 evaluates
        # to a few digits in any order, the reference's included; float64 covers the small rows
        C = max(C, 8)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, C)) * 5 + 2).astype(dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    assert compare_with_reference(F.LayerNorm, LayerNormNumba, (x, w, b), dict(eps=1e-5), seed=seed) <= TOLERANCE[np.dtype(dtype)]
    assert compare_with_reference(F.RMSNorm, RMSNormNumba, (x, w), dict(eps=1e-6), seed=seed) <= TOLERANCE[np.dtype(dtype)]


@given(N=st.integers(1, 40), V=st.integers(1, 300), dtype=dtypes, reduction=st.sampled_from(["mean", "sum", "none"]),
       seed=st.integers(0, 2**16))
@example(N=1, V=5, dtype=np.float32, reduction="mean", seed=65536)
def test_cross_entropy_equals_reference_on_random_shapes(N, V, dtype, reduction, seed):
    """float64: kernel == reference to 1e-10 relative. float32: the same, or, where a confident row's loss
    (log-sum-exp minus the target's logit) cancels terms of size max|logit| into a ~1e-4 loss, within float32
    rounding of those terms (hypothesis found N=1, V=5: the kernel's 2.08297e-4 was nearer float64's 2.08296e-4
    than the reference's 2.08356e-4, a 2.8e-4 relative difference)."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((N, V)) * 10).astype(dtype)
    targets = np.where(rng.random(N) < 0.3, -100, rng.integers(0, V, N))
    attrs = dict(ignore_index=-100, reduction=reduction)
    err = compare_with_reference(F.CrossEntropy, CrossEntropyNumba, (logits, targets), attrs, seed=seed)
    if err <= TOLERANCE[np.dtype(dtype)] or dtype == np.float64:
        assert err <= TOLERANCE[np.dtype(dtype)]
        return
    results = []
    for impl in (F.CrossEntropy, CrossEntropyNumba):
        ctx = Context((True, False))
        out = impl.forward(ctx, logits, targets, **attrs)
        dout = np.random.default_rng(seed + 1).standard_normal(np.shape(out)).astype(dtype)
        results.append((out, impl.backward(ctx, dout)[0]))
    terms = float(np.abs(logits).max()) * N * float(np.abs(dout).max())
    for (a, b) in zip(*results):
        assert float(np.abs(np.asarray(a, np.float64) - b).max()) <= 1e-6 * terms


# ---- the public API with kernels off and on ---------------------------------------------------------

def _run_both(monkeypatch, fn, arrays, grad_inputs):
    """fn(*tensors) with TINYGRAD_LLM_KERNELS=0 and =1: outputs and gradients of (out * dout).sum()."""
    results = []
    for switch in ("0", "1"):
        monkeypatch.setenv("TINYGRAD_LLM_KERNELS", switch)
        tensors = [Tensor(a, requires_grad=i in grad_inputs) if a.dtype.kind == "f" else a for i, a in enumerate(arrays)]
        out = fn(*tensors)
        dout = np.random.default_rng(7).standard_normal(out.shape).astype(out.dtype)
        (out * Tensor(dout)).sum().backward()
        results.append([out.numpy()] + [tensors[i].grad for i in sorted(grad_inputs)])
    return results


def _names_a_cpu_kernel(case):
    op = getattr(F, case.op, None) or getattr(tensor, case.op, None) if case.op else None
    return op is not None and "cpu" in vars(op).get("kernels", {})


KERNEL_CASES = [case.name for case in cases.CASES if _names_a_cpu_kernel(case)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", KERNEL_CASES)
def test_public_api_gives_the_same_results_with_kernels_off_and_on(monkeypatch, name, dtype):
    case = cases.BY_NAME[name]
    arrays = case.arrays(dtype)
    grad_inputs = {i for i, a in enumerate(arrays) if a.dtype.kind == "f"}
    reference, kernels = _run_both(monkeypatch, lambda *xs: case.fn(F, *xs), arrays, grad_inputs)
    for i, (a, b) in enumerate(zip(kernels, reference)):
        np.testing.assert_allclose(a, b, rtol=TOLERANCE[np.dtype(dtype)], atol=TOLERANCE[np.dtype(dtype)] * np.abs(b).max(),
                                   err_msg=f"{name}: {'output' if i == 0 else f'gradient {i}'}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_public_attention_on_threaded_heads_gives_the_same_results_with_kernels_off_and_on(monkeypatch, dtype):
    """T = 128: heads of 128 x 128 scores, which the kernel spreads over threads (the catalogue's are smaller)."""
    q, k, v = (np.random.default_rng(i).standard_normal((1, 2, 128, 8)).astype(dtype) for i in range(3))
    reference, kernels = _run_both(monkeypatch, lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (q, k, v),
                                   {0, 1, 2})
    for i, (a, b) in enumerate(zip(kernels, reference)):
        np.testing.assert_allclose(a, b, rtol=TOLERANCE[np.dtype(dtype)], atol=TOLERANCE[np.dtype(dtype)] * np.abs(b).max(),
                                   err_msg=f"attention: {'output' if i == 0 else f'gradient {i}'}")


def test_every_cpu_kernel_is_reached_by_a_case():
    reached = {cases.BY_NAME[name].op for name in KERNEL_CASES}
    assert {"LayerNorm", "RMSNorm", "GELU", "SwiGLU", "ScaledDotProductAttention", "CrossEntropy", "Embedding"} <= reached


def test_whole_model_and_adamw_give_the_same_results_with_kernels_off_and_on(monkeypatch):
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=12, dtype="float64")
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 11, (3, 8)), rng.integers(0, 11, (3, 8))
    runs = []
    for switch in ("0", "1"):
        monkeypatch.setenv("TINYGRAD_LLM_KERNELS", switch)
        model = GPT(config, rng=np.random.default_rng(1))
        opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            _, loss = model(idx, targets)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs.append((losses, {name: p.data.copy() for name, p in model.named_parameters()}))
    (losses_ref, params_ref), (losses_ker, params_ker) = runs
    np.testing.assert_allclose(losses_ker, losses_ref, rtol=1e-10)
    for name in params_ref:
        np.testing.assert_allclose(params_ker[name], params_ref[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_kernel_benchmark_cli_help_and_a_bad_family():
    """benchmarks/kernels.py on a fresh clone: --help lists the options, an unknown family is one line and exit 2."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
    ok = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd="/")
    assert ok.returncode == 0 and "attention" in ok.stdout and ok.stderr == ""
    bad = subprocess.run([sys.executable, str(script), "no_such_family"], capture_output=True, text=True, cwd="/")
    assert bad.returncode == 2 and "unknown kernel family 'no_such_family'" in bad.stderr and "Traceback" not in bad.stderr


def test_thread_settings_do_not_depend_on_import_order_or_leak_to_the_process():
    """import tinygrad_llm sets no environment variable (children and libraries loaded later see none), whether
    NumPy was imported before it or not; and the threaded attention limits only NumPy's BLAS, only while it runs."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS", "OMP_", "MKL_"))}
    code = "import {}; import os; print(sorted(k for k in os.environ if k.startswith(('OPENBLAS', 'OMP_', 'MKL_'))))"
    for first in ("numpy, tinygrad_llm", "tinygrad_llm, numpy"):
        out = subprocess.run([sys.executable, "-c", code.format(first)], capture_output=True, text=True, env=env)
        assert out.returncode == 0 and out.stdout.strip() == "[]", (first, out.stdout, out.stderr)

    torch = pytest.importorskip("torch")
    from tinygrad_llm.kernels.cpu.threads import blas_threads, numpy_blas
    torch_threads = torch.get_num_threads()
    with blas_threads(1):
        assert torch.get_num_threads() == torch_threads     # another library's pool is left alone
        if numpy_blas() is not None:
            assert numpy_blas().get_num_threads() == 1


def test_our_own_programs_ask_for_the_short_blas_spin_and_nothing_else_does():
    """`python -m tinygrad_llm.<cli>` sets OPENBLAS_THREAD_TIMEOUT=22 before NumPy loads (the 6x384 step:
    0.93x PyTorch's with it, 1.26x without); a user's program, pytest, a NumPy already loaded or the user's
    own value are left alone."""
    from tinygrad_llm import _short_blas_spin_in_our_own_programs as spin

    def env_after(argv, modules=(), environ=None):
        environ = {} if environ is None else environ
        spin(argv=argv, modules=set(modules), environ=environ)
        return environ

    assert env_after(["python", "-m", "tinygrad_llm.train", "--max_iters", "5"]) == {"OPENBLAS_THREAD_TIMEOUT": "22"}
    assert env_after(["python3", "-X", "dev", "-m", "tinygrad_llm.serve"]) == {"OPENBLAS_THREAD_TIMEOUT": "22"}
    assert env_after(["python", "-m", "pytest", "-q"]) == {}
    assert env_after(["python", "my_script.py", "-m", "x"]) == {}
    assert env_after(["python", "-m", "tinygrad_llm.train"], modules=["numpy"]) == {}
    assert env_after(["python", "-m", "tinygrad_llm.train"], environ={"OPENBLAS_THREAD_TIMEOUT": "0"}) == {
        "OPENBLAS_THREAD_TIMEOUT": "0"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size,threshold", [((1 << 20) + 3, None), (1001, 1), (1, 1)])
def test_threaded_add_equals_numpys_add_bitwise(monkeypatch, dtype, size, threshold):
    """Add's CPU kernel (the residual adds and the autograd's gradient sums) splits x + y over threads: the same
    additions, so the same bits; broadcasting, strided or mixed-dtype operands take the op."""
    from tinygrad_llm.kernels.cpu import elementwise, threads
    if threshold is not None:
        monkeypatch.setattr(elementwise, "ADD_PARALLEL_MIN_VALUES", threshold)
    monkeypatch.setattr(threads, "THREADS", 2)
    rng = np.random.default_rng(size)
    x, y = (rng.standard_normal(size) * 1e3).astype(dtype), rng.standard_normal(size).astype(dtype)
    x[0] = np.nan
    ctx = Context((True, True))
    out = elementwise.AddThreads.forward(ctx, x.reshape(1, -1), y.reshape(1, -1))
    np.testing.assert_array_equal(out, (x + y).reshape(1, -1))
    dx, dy = elementwise.AddThreads.backward(ctx, out)
    assert dx is out and dy is out
    for a, b in ((x, y[:1]), (x[::2], y[::2]), (x, y.astype(np.float16))):
        ctx = Context((True, True))
        np.testing.assert_array_equal(elementwise.AddThreads.forward(ctx, a, b), a + b)
        assert [g.shape for g in elementwise.AddThreads.backward(ctx, np.ones_like(a + b))] == [a.shape, b.shape]


def test_model_with_threaded_adds_equals_model_without(monkeypatch):
    """The whole float32 model and its gradients with every add threaded (threshold 1) and with none."""
    from tinygrad_llm.kernels.cpu import elementwise, threads
    monkeypatch.setattr(threads, "THREADS", 2)
    results = []
    for threshold in (1, 1 << 62):
        monkeypatch.setattr(elementwise, "ADD_PARALLEL_MIN_VALUES", threshold)
        model = GPT(GPTConfig(vocab_size=31, block_size=8, n_layer=2, n_head=2, n_embd=16), rng=np.random.default_rng(0))
        idx = np.random.default_rng(1).integers(0, 31, (2, 8))
        _, loss = model(idx, idx)
        loss.backward()
        results.append([loss.data] + [p.grad for _, p in model.named_parameters()])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
