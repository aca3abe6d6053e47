"""Which library runs the CPU's bf16 products: TINYGRAD_LLM_CPU_BF16_GEMM = "mkl" (the default: MKL's
cblas_gemm_bf16bf16f32, mkl.py), "onednn" (oneDNN's matmul, dnnl.py) or "auto" (oneDNN where its bf16 matmul
loads and runs on this CPU, else MKL). Read on every call, so a process (a benchmark) can switch between
products; mixed.py's Linear and mixed_attention.py's products ask `library()` for the module whose gemm /
batched / packed_b they call (both modules have the same interface).

The default stays MKL until oneDNN's bf16 step is measured on a bf16 CPU (benchmarks/cpu_bf16_step.py
--gemm onednn).
"""
import os

from . import dnnl, mkl

ENV = "TINYGRAD_LLM_CPU_BF16_GEMM"
CHOICES = ("mkl", "onednn", "auto")
LABELS = {"mkl": "MKL's bf16 GEMM (pip install 'tinygrad_llm[mkl]')",
          "onednn": f"oneDNN's bf16 matmul ({dnnl.HINT}; or {ENV}=mkl)"}


def choice():
    """The choice named by TINYGRAD_LLM_CPU_BF16_GEMM ("mkl" where unset), or a one-line ValueError."""
    value = os.environ.get(ENV, "").strip().lower() or "mkl"
    if value not in CHOICES:
        raise ValueError(f"{ENV}={os.environ.get(ENV)!r}: expected one of {', '.join(CHOICES)}")
    return value


def _resolved():
    """("mkl" or "onednn", that module) for the choice: "auto" is oneDNN where it loads, else MKL."""
    name = choice()
    if name == "auto":
        name = "onednn" if dnnl.missing_reason() is None else "mkl"
    return name, (dnnl if name == "onednn" else mkl)


def missing_reason():
    """None when the chosen library's bf16 GEMM loads, else one line naming the library and why it does not."""
    try:
        name, module = _resolved()
    except ValueError as e:
        return str(e)
    reason = module.missing_reason()
    return None if reason is None else f"{LABELS[name]}: {reason}"


def name():
    """"mkl" or "onednn": the library the bf16 products run in now (the choice, "auto" resolved)."""
    return _resolved()[0]


def library():
    """The module (mkl or dnnl) whose gemm, batched and packed_b run the bf16 products; a one-line RuntimeError
    where the chosen library is missing (or ValueError for a choice not in CHOICES)."""
    reason = missing_reason()
    if reason is not None:
        raise RuntimeError(f"bf16 products on the CPU need {reason}")
    return _resolved()[1]
