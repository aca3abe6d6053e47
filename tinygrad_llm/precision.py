"""Mixed precision: the one bf16 policy every backend follows, the autocast switch, the per-step weight
copies, and the check that a device can run it.

Under `dtype="bfloat16"` (GPTConfig, TrainConfig, the CLIs) the model keeps float32 parameters (the master
weights), float32 gradients and float32 AdamW moments; only the matrix products take bf16 operands, and
they accumulate in float32 and write float32 results:

    bf16 operands, float32 sums    every linear layer (x w + b: forward, dx = dout w^T, dw = x^T dout), the
                                   LM head, and attention's four products (q k^T, P v; dP = dO v^T,
                                   dq = dS k, dk = dS^T q, dv = P^T dO)
    float32                        LayerNorm / RMSNorm (statistics and output), softmax (attention's and
                                   the loss's), cross-entropy, GELU, dropout, residual adds, embeddings,
                                   master weights, gradients, clipping and AdamW

bf16 keeps float32's 8-bit exponent, so gradients do not underflow as float16's would: no loss scaling.

The policy is data (BF16_OPS below): an op in it names its bf16 kernels in its `bf16_kernels` attribute
(as `kernels` names the float ones), and `backend.accelerated` picks them while `autocast("bfloat16")` is
on. GPT.forward turns it on for a bfloat16 model. A weight is rounded to bf16 once per autocast region
(one forward and the backward that follows it reuse the copy), or once per `weight_copies()` region,
which a training step opens around its micro-batches: once per optimizer step, not once per use.

Nothing here imports a kernel or an array library beyond NumPy: the CPU and GPU backends share it. Only
unsupported_reason asks the CPU's bf16 GEMM choice (kernels/cpu/bf16_gemm.py: MKL or oneDNN), by name,
whether the chosen library loads.
"""
import contextlib
import functools
import importlib
import os

import numpy as np

BFLOAT16 = "bfloat16"
DTYPES = ("float32", "float64", BFLOAT16)   # what GPTConfig.dtype / --dtype accept

# The Functions (by class name, functional.py) whose products take bf16 operands under autocast. Everything
# else keeps its input dtype (float32): the norms, softmax, the loss, the elementwise ops, the optimizer.
# Not yet here: ScaledDotProductAttention (the RoPE, grouped-query and KV-cache paths) and LoRALinear, which
# run in float32 under bfloat16 until they get bf16 kernels.
BF16_OPS = ("Linear", "SelfAttention")

# Ops that compute in float32 under autocast (outputs and gradients stay float32, as above) but whose kernels
# write, in the same pass, the bf16 copy of what they produce for the bf16 product that consumes it: GELU's
# output is the MLP's c_proj operand and its input gradient c_fc's dout; LayerNorm's output is c_attn's, c_fc's
# or the LM head's operand (its input gradient joins the residual stream: no copy); DropoutAdd's branch
# gradient is c_proj's dout (on the GPU; with a gradient, its column sums: the product's bias gradient)
# (offer_copy / take_copy below).
BF16_COPY_PRODUCERS = ("DropoutAdd", "GELU", "LayerNorm")

# The CPU features that make bf16 products fast (/proc/cpuinfo flags): AVX-512 BF16 dot products, AMX tiles.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def param_dtype(dtype):
    """The dtype parameters, gradients and optimizer state are held in under `dtype`: float32 for bfloat16."""
    return "float32" if dtype == BFLOAT16 else dtype


def is_mixed(dtype):
    return dtype == BFLOAT16


# ---- the autocast switch ---------------------------------------------------------------------------

_mode = None            # None (every op in its input dtype) or "bfloat16"
_copies = None          # the current region's bf16 weight copies: key -> copy
_copies_depth = 0
_operands = None        # the region's offered bf16 copies (activations, gradients): id(array) -> (array, copy, sums)
_UNSET = object()


def current():
    """The compute dtype autocast has switched on ("bfloat16"), or None."""
    return _mode


@contextlib.contextmanager
def weight_copies():
    """One set of bf16 weight copies for everything inside (a training step's micro-batches): the weights
    must not change inside. Regions nest; the copies are dropped when the outermost one ends."""
    global _copies, _copies_depth, _operands
    if _copies_depth == 0:
        _copies, _operands = {}, {}
    _copies_depth += 1
    try:
        yield
    finally:
        _copies_depth -= 1
        if _copies_depth == 0:
            _copies = _operands = None


@contextlib.contextmanager
def autocast(dtype=BFLOAT16):
    """Run the BF16_OPS with bf16 operands (float32 accumulation) inside; dtype None or a float dtype: off.
    Opens a weight_copies region of its own unless one is open already."""
    global _mode
    previous, _mode = _mode, (BFLOAT16 if is_mixed(dtype) else None)
    try:
        with weight_copies():
            yield
    finally:
        _mode = previous


def weight_copy(w, convert, kind="bf16"):
    """convert(w) (w's bf16 copy), made once per weight_copies region: the same weight, asked for again
    inside the region (its next use, or the next micro-batch), gets the copy made the first time.
    Outside a region every call converts. The key is the array's memory and layout, so a transposed view
    (the tied LM head's wte^T) has a copy of its own; and `kind`, so that one weight can have copies of
    several forms (the CPU's bf16 bits, and the same bits packed for MKL as a product's right operand)."""
    if _copies is None:
        return convert(w)
    ptr = w.data.ptr if hasattr(w.data, "ptr") else w.__array_interface__["data"][0]
    key = (ptr, w.shape, w.strides, str(w.dtype), kind)
    entry = _copies.get(key)
    if entry is None:   # w is kept with its copy: its memory cannot be handed to another array in the region
        entry = _copies[key] = (w, convert(w))
    return entry[1]


def offer_copy(x, copy, sums=None):
    """A BF16_COPY_PRODUCERS kernel hands over `copy`, the bf16 bits of x (an array it has just made and
    returns, which nothing changes in place afterwards), for the product that takes x next (take_copy);
    `sums`, where the kernel summed them in the same pass, x's column sums (x.reshape(-1, M).sum(axis=0) in
    float32): a gradient's, which is that product's bias gradient. Kept only inside a weight_copies region,
    and dropped with it."""
    if _operands is not None:
        _operands[id(x)] = (x, copy, sums)


def collecting():
    """True inside a weight_copies region, where an offered copy can be taken: outside one, a producer that would
    write a copy only for the offer (a backward outside the step's region) runs its float32 kernel instead."""
    return _operands is not None


def take_copy(x, sums=False):
    """The bf16 copy offered for this very array x, removed from the region (a copy is taken once), or None:
    then the product converts x itself. With sums=True, (copy, column sums or None), or (None, None). The
    entry holds x, so its id cannot name another array meanwhile."""
    entry = None if _operands is None else _operands.pop(id(x), None)
    if entry is None or entry[0] is not x:
        return (None, None) if sums else None
    return entry[1:] if sums else entry[1]


# ---- bf16 rounding on the host (tests, references) -------------------------------------------------

def round_to_bfloat16(x):
    """float32 values rounded to the nearest bf16 (ties to even), returned as float32: what a bf16 product's
    operands hold. NaN stays NaN, infinities stay, values past bf16's largest finite round to infinity."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    out = np.where(nan, bits | np.uint32(0x00400000), rounded).astype(np.uint32)
    return out.view(np.float32).reshape(np.shape(x))


# ---- can this device run it ------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The CPU's feature flags (the first processor's "flags" line), or None where they cannot be read; read
    once per file (a bfloat16 model asks on every forward)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


# Tests only: run the CPU's bf16 path on a CPU without bf16 units (MKL emulates the bf16 products: the
# same results, several times slower than float32). Users are refused there; see unsupported_reason.
EMULATION_ENV = "TINYGRAD_LLM_CPU_BF16_EMULATION"


def cpu_emulation_allowed():
    """True when EMULATION_ENV is "1": the tests' override, which lets bfloat16 run on a CPU without bf16 units."""
    return os.environ.get(EMULATION_ENV, "0") == "1"


def _cpu_library_reason():
    """None when the CPU's bf16 GEMM loads (MKL's or oneDNN's, as TINYGRAD_LLM_CPU_BF16_GEMM picks:
    kernels/cpu/bf16_gemm.py), else one line naming the library and why not; asked by name on first use, as
    backend.py asks for kernels, so that importing this module never loads a library."""
    return importlib.import_module("tinygrad_llm.kernels.cpu.bf16_gemm").missing_reason()


def unsupported_reason(dtype, device, flags=None, library_reason=_UNSET):
    """None when `device` can train in `dtype`, else one line saying what is missing.

    bfloat16 on the CPU needs bf16 matrix units (CPU_BF16_FLAGS) and a bf16 GEMM library (MKL's, or oneDNN's
    under TINYGRAD_LLM_CPU_BF16_GEMM=onednn): where either is missing it is refused, never run on a slow path
    (a CPU without the units would emulate every product). With EMULATION_ENV=1 (tests only) the units are
    not asked for; the library still is.
    flags: the CPU's flags (default: read from /proc/cpuinfo); library_reason: one line naming the missing
    library and why (kernels/cpu/bf16_gemm.missing_reason's), or None where it loads (default: ask it)."""
    if not is_mixed(dtype) or device != "cpu":
        return None
    flags = cpu_flags() if flags is None else flags
    library_reason = _cpu_library_reason() if library_reason is _UNSET else library_reason
    names = " or ".join(CPU_BF16_FLAGS)
    missing = []
    if not cpu_emulation_allowed():
        if flags is None:
            missing.append(f"bf16 matrix units ({names}), and this CPU's flags could not be read")
        elif not any(f in flags for f in CPU_BF16_FLAGS):
            missing.append(f"bf16 matrix units ({names}), which this CPU lacks")
    if library_reason is not None:
        missing.append(library_reason)
    if not missing:
        return None
    return f"dtype bfloat16 on the CPU needs {'; and '.join(missing)}; use --dtype float32, or --device cuda"


def check_supported(dtype, device):
    """ValueError (one line) when `device` cannot train in `dtype`."""
    reason = unsupported_reason(dtype, device)
    if reason is not None:
        raise ValueError(reason)
