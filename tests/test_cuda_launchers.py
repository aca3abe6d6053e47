"""The CUDA kernel files' Python side, run where there is no GPU (CI): in a process of its own, with CuPy replaced
by tests/cupy_stand_in.py (host arrays; each launch checked against its kernel's C++ signature and recorded, not
run). This checks what the GPU tests cannot check without a GPU: that each launcher passes its kernel the
parameters it declares, launches the kernels it should for the case at hand, and offers and refuses what it should;
and a whole training step of a small GPT in float32 and in bf16 (forward, backward, clipping, AdamW), every launch
checked. The values are the GPU tests' business (tests/test_gpu*.py, test_flash_mma.py)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def test_cuda_launchers_on_the_stand_in():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), TINYGRAD_LLM_KERNELS="1")
    run = subprocess.run([sys.executable, str(Path(__file__))], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.strip().endswith("all scenarios ran"), run.stdout[-2000:]


def _scenarios():
    import contextlib

    import cupy_stand_in
    cp = cupy_stand_in.install()
    from tinygrad_llm.kernels.cuda import runtime

    def no_library(name):   # on a GPU machine cuBLAS would load and be handed host pointers
        raise OSError(f"lib{name} is not loaded beside the stand-in")

    runtime.load_library = no_library   # before cublas.py and cublaslt.py import it
    from tinygrad_llm import backend, precision
    from tinygrad_llm.kernels.cuda import columns, cublas, cublaslt, flash_mma, layer_norm, mixed
    from tinygrad_llm.kernels.cuda import mixed_elementwise as me
    assert cublas.load_library is no_library and cublaslt.load_library is no_library
    from tinygrad_llm.tensor import Context
    launched = cupy_stand_in.launches
    rng = np.random.default_rng(0)

    def arr(*shape):
        return cp.asarray(rng.standard_normal(shape).astype(np.float32))

    def names():
        out = [name.split("<")[0] for name, *_ in launched]
        launched.clear()
        return out

    x, y, dout = arr(4, 64, 96), arr(4, 64, 96), arr(4, 64, 96)
    for inside in (True, False):   # the bf16 backward passes: fused and offered only inside a region
        region = precision.weight_copies() if inside else contextlib.nullcontext()
        ctx = Context((True,))
        with region:
            me.GELUBF16Cuda.forward(ctx, x, approximate="tanh")
            names()
            copy, sums = precision.take_copy(me.GELUBF16Cuda.backward(ctx, dout), sums=True)
        assert names() == (["gelu_tanh_backward_columns", "column_partials"] if inside else ["gelu_tanh_backward_v"])
        assert (copy is not None and sums is not None) == inside
        ctx = Context((True, True))
        with (precision.weight_copies() if inside else contextlib.nullcontext()):
            me.DropoutAddBF16Cuda.forward(ctx, x, y, p=0.2, rng=np.random.default_rng(1))
            names()
            dx, dy = me.DropoutAddBF16Cuda.backward(ctx, dout)
            copy, sums = precision.take_copy(dy, sums=True)
        assert dx is dout and names() == (["dropout_columns", "column_partials"] if inside else ["dropout_v"])
        assert (copy is not None and sums is not None) == inside
    os.environ["TINYGRAD_LLM_KERNELS"] = "0"   # the op's own masks
    ctx = Context((True, True))
    me.DropoutAddBF16Cuda.forward(ctx, x, y, p=0.2, rng=np.random.default_rng(1))
    assert ctx.reference and names() == []
    os.environ["TINYGRAD_LLM_KERNELS"] = "1"
    ctx = Context((True,))
    me.GELUBF16Cuda.forward(ctx, arr(5, 13), approximate="tanh")
    with precision.weight_copies():   # 13 columns: no 16-byte lanes, the float32 kernel, no offer
        assert precision.take_copy(me.GELUBF16Cuda.backward(ctx, arr(5, 13))) is None
    assert names() == ["gelu_tanh_forward_bf16_v", "gelu_tanh_backward_v"]

    # column sums: 16-byte lanes where rows allow, one more launch for the chunks' partials
    for shape, kernels in (((7, 33), 1), ((64, 384), 1), ((16384, 1152), 2), ((0, 5), 0)):
        sums = columns.column_sums(arr(*shape) if shape[0] else cp.empty(shape))
        got = names()
        assert sums.shape == (shape[1],) and len(got) == kernels, (shape, got)
    try:
        columns.column_sums(arr(64, 384), bf16_out=cp.empty(64 * 384 + 1, dtype=np.uint16)[1:].reshape(64, 384))
        raise AssertionError("a bf16_out off an 8-byte boundary was taken on the 16-byte path")
    except TypeError as e:
        assert "8-byte boundary" in str(e)
    columns.column_sums(arr(5, 3), bf16_out=cp.empty(16, dtype=np.uint16)[1:].reshape(5, 3))   # a lane a column

    # LayerNorm: the pending gradient taken, 16-byte lanes where C allows, w made contiguous
    for C, instance in ((384, "layer_norm_backward<float, 3, true>"), (10, "layer_norm_backward<float, 1, false>"),
                        (1024, "layer_norm_backward<float, 8, true>")):
        ctx = Context((True, True, True))
        layer_norm.LayerNormCuda.forward(ctx, arr(37, C), arr(2 * C)[::2], arr(C))
        assert ctx.w.flags.c_contiguous
        ctx.pending = {0: arr(37, C)}
        launched.clear()
        layer_norm.LayerNormCuda.backward(ctx, arr(37, C))
        assert ctx.pending == {} and launched[0][0] == instance, (C, launched[0][0])

    # bf16 Linear: the bias gradient is the offered sums, dout not read again for them
    mixed.bf16_matmul = lambda *args, **kwargs: True   # no cuBLASLt here
    with precision.weight_copies():
        ctx = Context((True, True, True))
        out = mixed.LinearBF16Cuda.forward(ctx, arr(4, 64, 96), arr(96, 384), arr(384))
        d, offered = cp.asarray(out.copy()), cp.zeros(384)
        precision.offer_copy(d, cp.empty(d.shape, dtype=np.uint16), sums=offered)
        names()
        assert mixed.LinearBF16Cuda.backward(ctx, d)[2] is offered and names() == []

    # flash attention: y's bf16 copy, its refusals, the backward's launches
    qb, yb = cp.empty((2, 64, 3 * 128), dtype=np.uint16), cp.empty((2, 64, 128), dtype=np.uint16)
    yy, lse = flash_mma.self_attention_forward(qb, 2, True, 0.125, 3, 0.2, y_bf16=yb)
    for bad in (yb[:, :, :-1], cp.empty(2 * 64 * 128 + 1, dtype=np.uint16)[1:].reshape(2, 64, 128)):
        try:
            flash_mma.self_attention_forward(qb, 2, True, 0.125, 3, 0.2, y_bf16=bad)
            raise AssertionError("a bad y_bf16 was taken")
        except ValueError as e:
            assert "y_bf16" in str(e)
    flash_mma.self_attention_backward(qb, yy, lse, arr(2, 64, 128), 2, True, 0.125, 3, 0.2)
    assert names() == ["mma_flash_forward", "mma_rowdot_zero", "mma_flash_backward"]
    q32 = arr(2, 64, 384)
    for kind in ("tf32", "float32"):
        yy, lse = flash_mma.self_attention_forward(q32, 2, True, 0.125, 3, 0.2, kind=kind)
        flash_mma.self_attention_backward(q32, yy, lse, arr(2, 64, 128), 2, True, 0.125, 3, 0.2, kind=kind)
        assert names() == ["tf32_flash_forward", "mma_rowdot_zero", "tf32_flash_backward"]
    for inside in (True, False):   # bf16 attention offers y's copy only inside a region
        with (precision.weight_copies() if inside else contextlib.nullcontext()):
            ctx = Context((True,))
            out = mixed.SelfAttentionBF16Cuda.forward(ctx, arr(2, 64, 384), 2, causal=True, scale=0.125,
                                                      dropout_p=0.2, rng=np.random.default_rng(0))
            assert ctx.mma and (precision.take_copy(out) is not None) == inside
            launched.clear()
            mixed.SelfAttentionBF16Cuda.backward(ctx, arr(2, 64, 128))
            assert ctx.keep_bits is not None and launched[-1][0] == "mma_flash_backward<float, 64, true>"
    yy, lse = flash_mma.self_attention_forward(qb, 2, True, 0.125, 3, 0.0)
    flash_mma.self_attention_backward(qb, yy, lse, arr(2, 64, 128), 2, True, 0.125, 3, 0.0)   # no dropout: no mask
    assert launched[-1][0] == "mma_flash_backward<float, 64, false>"
    names()

    # strict float32 products on the tensor cores (3xTF32), one k slice and several (the partials' sum)
    from tinygrad_llm.kernels.cuda import gemm_3xtf32
    names()
    for M, N, K in ((512, 384, 384), (384, 384, 16384)):
        a, b, c = arr(M, K), arr(K, N), cp.empty((M, N))
        assert gemm_3xtf32.supported(M, N, K, a.data.ptr, K, b.data.ptr, N, c.data.ptr, N)
        gemm_3xtf32.gemm(M, N, K, a.data.ptr, K, b.data.ptr, N, c.data.ptr, N)
        assert names() == (["gemm3x"] if K < 4096 else ["gemm3x", "gemm3x_sum"]), (M, N, K)

    # a whole training step of a small GPT on the GPU path, float32 and bf16: every launch checked
    from tinygrad_llm.model import GPT, GPTConfig
    from tinygrad_llm.optim import AdamW, clip_grad_norm, param_groups
    ids = np.random.default_rng(1).integers(0, 65, (2, 64))
    for dtype, expected in (("float32", {"layer_norm_backward", "multi_adamw", "dropout_add_v"}),
                            ("bfloat16", {"mma_flash_backward", "gelu_tanh_backward_columns", "dropout_columns"})):
        model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.2,
                              dtype=dtype), rng=np.random.default_rng(0)).to("cuda")
        opt = AdamW(param_groups(model, 0.1), lr=1e-3)
        with np.errstate(all="ignore"), precision.weight_copies():   # garbage values: no kernel runs
            _, loss = model(ids, ids, rng=np.random.default_rng(2))
            loss.backward()
            clip_grad_norm(model.parameters(), 1.0)
            opt.step()
        assert expected <= set(names()), dtype
    assert backend.device_of is not None
    print("all scenarios ran")


if __name__ == "__main__":
    _scenarios()
