"""Hugging Face model folders in and out: `load_pretrained(path)` and `save_pretrained(model, path)`.

    model = GPT.from_pretrained("gpt2-folder")            # config.json + model.safetensors (or shards)
    model = GPT.from_pretrained("out/ckpt.safetensors")   # this project's training checkpoint, same call
    model.save_pretrained("export", tokenizer=tok)         # transformers.AutoModelForCausalLM opens it

Two Hugging Face layouts map onto GPT:

- GPT-2 (model_type "gpt2"): LayerNorm, GELU, learned positions. Its parameters have our names already
  (Conv1D weights are stored (in, out) as our Linear's), with or without the "transformer." prefix.
- Llama (model_type "llama"): RMSNorm, SwiGLU, rotary positions, usually no biases. torch Linear
  weights are (out, in), so each is transposed; q/k/v_proj become the column blocks of our c_attn,
  gate/up/down_proj our c_fc/c_fc2/c_proj. Hugging Face's rotary layout (rotate_half: pairs i, i + HS/2)
  is our default rope layout, so q and k need no permuting. num_key_value_heads < num_attention_heads
  becomes GPTConfig.n_kv_head (grouped-query attention).

Weights go from safetensors files straight into the model's arrays, which are allocated but never
initialised: a tensor whose bytes need no change (float32 into a float32 model) is read at its offset
into its array; one that needs converting (BF16/F16, a dtype change) or transposing (Llama) is copied
through a memory map a chunk at a time, each chunk's pages given back to the OS once copied. The file is
never read whole into Python bytes, and loading needs little memory beyond the model's own size
(benchmarks/load_pretrained.py). Pickled weights (pytorch_model.bin) are refused, never opened.
"""
import json
import math
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .checkpoint import FORMAT as CHECKPOINT_FORMAT, MAX_HEADER_BYTES, TIED, _check_entry, save_safetensors
from .model import GPT, GPTConfig

_FLOAT_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2"}  # BF16 is widened by hand
_CHUNK_BYTES = 8 << 20  # bytes of the file mapped in and released per step of a copy
_GPT2_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
# what a training run writes in its out_dir: the best checkpoint, then the latest state
_CHECKPOINT_NAMES = ("ckpt.safetensors", "last.safetensors")


# ---- safetensors by memory map ------------------------------------------------------------------

class SafetensorsFile:
    """A safetensors file opened for reading: `entries` {name: (begin, end, dtype, shape)} and `metadata`
    from the header; `copy_into(name, out)` copies one tensor into an array: read at its offset straight
    into the array when the bytes need no change, else through a memory map a chunk at a time."""

    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            if size < 8:
                raise ValueError(f"{self.path} is truncated or not a safetensors file: {size} bytes")
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise ValueError(f"{self.path} is truncated or not a safetensors file: the header claims {n} bytes")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path} is corrupt: its header is not valid JSON ({e})") from None
            if not isinstance(header, dict):
                raise ValueError(f"{self.path} is corrupt: its header is not a JSON object")
            self.metadata = header.pop("__metadata__", None) or {}
            self.entries = {name: _check_entry(self.path, name, entry, size - 8 - n) for name, entry in header.items()}
            self.data_start = 8 + n
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
        self._fd = os.open(self.path, os.O_RDONLY)

    def close(self):
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def copy_into(self, name, out, transpose=False):
        """Copy tensor `name` into `out` (a float array of its shape, or of its transpose if `transpose`),
        converting the dtype; the shape and dtype are checked first, naming the tensor."""
        begin, end, dtype, shape = self.entries[name]
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {dtype}; weights must be one of {sorted(_FLOAT_DTYPES)}")
        want = tuple(reversed(out.shape)) if transpose else tuple(out.shape)
        if tuple(shape) != want:
            raise ValueError(f"{self.path}: tensor {name!r} has shape {list(shape)}, expected {list(want)}")
        if not shape or math.prod(shape) == 0:
            out[...] = self._read(begin, dtype, shape)
            return
        if (not transpose and out.flags.c_contiguous and out.dtype == np.dtype(_FLOAT_DTYPES[dtype]) and dtype != "BF16"
                and hasattr(os, "preadv")):
            # same bytes on disk as in memory: read them straight into the array, no mapping needed
            view, done = memoryview(out).cast("B"), 0
            while done < end - begin:
                n = os.preadv(self._fd, [view[done:]], self.data_start + begin + done)
                if n <= 0:
                    raise ValueError(f"{self.path} is truncated: tensor {name!r} ends early")
                done += n
            return
        rows = shape[0]
        row_bytes = (end - begin) // rows
        step = max(1, _CHUNK_BYTES // max(row_bytes, 1))
        if transpose:   # tiles of 64 rows keep the transposed reads in cache: measured 6x faster than one copy
            step = min(step, 64)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            chunk = self._read(begin + r0 * row_bytes, dtype, (r1 - r0, *shape[1:]))
            if transpose:
                out[:, r0:r1] = chunk.T
            else:
                out[r0:r1] = chunk
            del chunk
            self._release(begin + r0 * row_bytes, (r1 - r0) * row_bytes)
        # the kernel maps pages around each one read (fault-around), some beyond the chunk: release them all
        self._release(begin, end - begin + mmap.PAGESIZE)

    def _read(self, begin, dtype, shape):
        from .checkpoint import DTYPES
        count = math.prod(shape)
        if count == 0:
            return np.zeros(shape, dtype=np.float32 if dtype == "BF16" else DTYPES[dtype])
        raw = np.frombuffer(self._map, dtype=_FLOAT_DTYPES.get(dtype) or DTYPES[dtype], count=count,
                            offset=self.data_start + begin).reshape(shape)
        if dtype == "BF16":  # the top half of a float32: widen exactly
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw

    def _release(self, begin, length):
        """Drop the mapped pages of data bytes begin..begin+length from this process's memory."""
        start = self.data_start + begin
        aligned = start - start % mmap.PAGESIZE
        try:
            self._map.madvise(mmap.MADV_DONTNEED, aligned, min(start + length, len(self._map)) - aligned)
        except (AttributeError, OSError, ValueError):  # not every platform has madvise; memory use only
            pass


class _Shards:
    """The tensors of one or more safetensors files, by name."""

    def __init__(self, files):
        self.files = files
        self.where = {}
        for f in files:
            for name in f.entries:
                if name in self.where:
                    raise ValueError(f"tensor {name!r} is in both {self.where[name].path} and {f.path}")
                self.where[name] = f

    def names(self):
        return set(self.where)

    def shape(self, name):
        return tuple(self.where[name].entries[name][3])

    def copy_into(self, name, out, transpose=False):
        self.where[name].copy_into(name, out, transpose)

    def close(self):
        for f in self.files:
            f.close()


def _open_weights(folder):
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if single.is_file():
        return _Shards([SafetensorsFile(single)])
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shard_names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a weight_map): {e!r}") from None
        for shard in shard_names:
            if Path(shard).name != shard:
                raise ValueError(f"{index} names shard {shard!r} outside the folder")
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{index} names shard {shard!r}, which is not in {folder}")
        shards = _Shards([SafetensorsFile(folder / s) for s in shard_names])
        for name, shard in weight_map.items():
            if name not in shards.where or shards.where[name].path.name != shard:
                shards.close()
                raise ValueError(f"{index} says tensor {name!r} is in {shard}, but it is not there")
        return shards
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"))
    if pickles:
        raise ValueError(f"{folder} holds weights only as {', '.join(pickles)} (pickled or framework-specific "
                         "files, which this loader never opens: unpickling can run arbitrary code). Convert them "
                         "to safetensors, e.g. in transformers: AutoModelForCausalLM.from_pretrained(folder)"
                         ".save_pretrained(out, safe_serialization=True)")
    raise FileNotFoundError(f"{folder} has no model.safetensors or model.safetensors.index.json")


# ---- configs ------------------------------------------------------------------------------------

def _field(cfg, name, default=KeyError, path=""):
    if name in cfg and cfg[name] is not None:
        return cfg[name]
    if default is KeyError:
        raise ValueError(f"{path}: config.json has no {name!r}")
    return default


def config_from_hf(cfg, path="config.json", dtype="float32"):
    """GPTConfig of a Hugging Face config dict (model_type gpt2 or llama), refusing what GPT cannot run."""
    model_type = cfg.get("model_type")
    if model_type == "gpt2":
        act = _field(cfg, "activation_function", "gelu_new", path)
        if act not in _GPT2_ACTIVATIONS:
            raise ValueError(f"{path}: activation_function={act!r} is not supported (known: {sorted(_GPT2_ACTIVATIONS)})")
        for name, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                         ("add_cross_attention", False)):
            if cfg.get(name, ok) != ok:
                raise ValueError(f"{path}: {name}={cfg[name]!r} is not supported (only {ok})")
        C = _field(cfg, "n_embd", path=path)
        return GPTConfig(vocab_size=_field(cfg, "vocab_size", path=path), block_size=_field(cfg, "n_positions", path=path),
                         n_layer=_field(cfg, "n_layer", path=path), n_head=_field(cfg, "n_head", path=path), n_embd=C,
                         bias=True, dtype=dtype, norm="layernorm", mlp="gelu", position="learned",
                         tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                         norm_eps=float(_field(cfg, "layer_norm_epsilon", 1e-5, path)),
                         gelu_approximate=_GPT2_ACTIVATIONS[act], mlp_hidden=_field(cfg, "n_inner", 4 * C, path))
    if model_type == "llama":
        act = _field(cfg, "hidden_act", "silu", path)
        if act != "silu":
            raise ValueError(f"{path}: hidden_act={act!r} is not supported (Llama's SwiGLU needs 'silu')")
        # transformers < 5 writes rope_theta and rope_scaling; 5 writes rope_parameters {rope_type, rope_theta, ...}
        rope = cfg.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{path}: rope_parameters={rope!r} is not a JSON object")
        for name, scaling in (("rope_scaling", cfg.get("rope_scaling")), ("rope_parameters", rope)):
            kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
            if scaling and kind not in (None, "default"):
                raise ValueError(f"{path}: {name}={scaling!r} is not supported (only plain RoPE, rope_type 'default')")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        C, NH = _field(cfg, "hidden_size", path=path), _field(cfg, "num_attention_heads", path=path)
        head_dim = cfg.get("head_dim")
        if head_dim is not None and head_dim * NH != C:
            raise ValueError(f"{path}: head_dim={head_dim} is not hidden_size/num_attention_heads={C}/{NH}, "
                             "which GPT needs")
        attention_bias, mlp_bias = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            raise ValueError(f"{path}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported "
                             "(GPT has biases in every projection or in none)")
        kv = _field(cfg, "num_key_value_heads", NH, path)
        return GPTConfig(vocab_size=_field(cfg, "vocab_size", path=path),
                         block_size=_field(cfg, "max_position_embeddings", path=path),
                         n_layer=_field(cfg, "num_hidden_layers", path=path), n_head=NH, n_embd=C,
                         bias=attention_bias, dtype=dtype, norm="rmsnorm", mlp="swiglu", position="rope",
                         tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                         rope_theta=float(theta),
                         norm_eps=float(_field(cfg, "rms_norm_eps", 1e-6, path)),
                         mlp_hidden=_field(cfg, "intermediate_size", path=path), n_kv_head=None if kv == NH else kv)
    raise ValueError(f"{path}: model_type={model_type!r} is not supported (supported: 'gpt2', 'llama')")


def config_to_hf(config):
    """(layout, Hugging Face config dict) for a GPTConfig; a setting with no Hugging Face equivalent raises."""
    c = config
    if c.position == "learned":
        layout, wants = "gpt2", {"norm": "layernorm", "mlp": "gelu", "bias": True}
    else:
        layout, wants = "llama", {"norm": "rmsnorm", "mlp": "swiglu"}
    for name, value in wants.items():
        if getattr(c, name) != value:
            raise ValueError(f"GPTConfig.{name}={getattr(c, name)!r} with position={c.position!r} has no Hugging Face "
                             f"equivalent: the {'GPT-2' if layout == 'gpt2' else 'Llama'} layout needs {name}={value!r}")
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "torch_dtype": c.dtype,
              "use_cache": True}
    if layout == "gpt2":
        if (c.n_kv_head or c.n_head) != c.n_head:
            raise ValueError(f"GPTConfig.n_kv_head={c.n_kv_head} has no Hugging Face equivalent with learned positions "
                             "(GPT-2 has no grouped-query attention)")
        return layout, {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                        "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
                        "n_head": c.n_head, "n_inner": c.mlp_hidden, "layer_norm_epsilon": c.norm_eps,
                        "activation_function": "gelu_new" if c.gelu_approximate == "tanh" else "gelu",
                        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return layout, {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                    "hidden_size": c.n_embd, "intermediate_size": c.mlp_hidden, "num_hidden_layers": c.n_layer,
                    "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head or c.n_head,
                    "head_dim": c.n_embd // c.n_head, "max_position_embeddings": c.block_size,
                    "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
                    "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
                    "hidden_act": "silu", "attention_bias": c.bias, "mlp_bias": c.bias, "attention_dropout": 0.0}


# ---- key maps -----------------------------------------------------------------------------------

def _weight_map(config, layout):
    """{our parameter name: [(Hugging Face name, column slice of ours or None, transpose)]}: where each of
    our parameters comes from (loading) or goes to (saving). layout "gpt2" (also our own checkpoints) or
    "llama"."""
    c = config
    if layout == "gpt2":
        model = GPT(c, rng=_Uninitialised(populate=False))   # for the names only: no memory is touched
        names = [n for n, _ in model.named_parameters()]
        return {n: [(n, None, False)] for n in names}
    C, HS = c.n_embd, c.n_embd // c.n_head
    KV = (c.n_kv_head or c.n_head) * HS
    m = {"transformer.wte.weight": [("model.embed_tokens.weight", None, False)],
         "transformer.ln_f.weight": [("model.norm.weight", None, False)]}
    for i in range(c.n_layer):
        h, p = f"transformer.h.{i}.", f"model.layers.{i}."
        m[h + "ln_1.weight"] = [(p + "input_layernorm.weight", None, False)]
        m[h + "ln_2.weight"] = [(p + "post_attention_layernorm.weight", None, False)]
        kinds = ("weight", "bias") if c.bias else ("weight",)
        for kind in kinds:
            t = kind == "weight"
            m[h + "attn.c_attn." + kind] = [(p + "self_attn.q_proj." + kind, slice(0, C), t),
                                            (p + "self_attn.k_proj." + kind, slice(C, C + KV), t),
                                            (p + "self_attn.v_proj." + kind, slice(C + KV, C + 2 * KV), t)]
            m[h + "attn.c_proj." + kind] = [(p + "self_attn.o_proj." + kind, None, t)]
            m[h + "mlp.c_fc." + kind] = [(p + "mlp.gate_proj." + kind, None, t)]
            m[h + "mlp.c_fc2." + kind] = [(p + "mlp.up_proj." + kind, None, t)]
            m[h + "mlp.c_proj." + kind] = [(p + "mlp.down_proj." + kind, None, t)]
    if not c.tie_embeddings:
        m["lm_head.weight"] = [("lm_head.weight", None, False)]
    return m


def _target(array, cols):
    """The part of `array` that one source fills: columns `cols` of a matrix, or a slice of a vector."""
    if cols is None:
        return array
    return array[cols] if array.ndim == 1 else array[:, cols]


def _allocate(shape, dtype, populate=True):
    """An uninitialised array for the loader to fill. A large one is an anonymous memory map made with
    MAP_POPULATE (Linux), so the OS hands out all its pages in one call: filling an np.empty array instead
    takes a page fault per 4 KB page, measured 4-5x slower for a 500 MB model on this project's machines."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    flag = getattr(mmap, "MAP_POPULATE", None)
    if nbytes < (1 << 20) or flag is None or not populate:
        return np.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flag)
    return np.frombuffer(region, dtype=dtype).reshape(shape)   # the array keeps the map alive


class _Empty:
    """What _Uninitialised.standard_normal returns: `(x * std).astype(dtype)` gives an uninitialised array."""

    def __init__(self, shape, populate):
        self.shape, self.populate = shape, populate

    def __mul__(self, other):
        return self

    def astype(self, dtype):
        return _allocate(self.shape, dtype, self.populate)


class _Uninitialised:
    """An rng for GPT(config, rng=...) that makes its weights without drawing them (_allocate), so building
    costs no random draws and no memory beyond the weights themselves."""

    def __init__(self, populate=True):
        self.populate = populate

    def standard_normal(self, shape):
        return _Empty(shape, self.populate)


def _build_and_fill(config, shards, layout, ignore, source):
    """A GPT of `config` with every parameter copied from `shards` by _weight_map; unexpected tensors
    (not used and not matched by `ignore`) and missing ones raise before the model is built."""
    wmap = _weight_map(config, layout)
    used = {name for sources in wmap.values() for name, _, _ in sources}
    present = shards.names()
    missing = sorted(used - present)
    if missing:
        raise ValueError(f"{source} lacks tensor(s) {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    unexpected = sorted(n for n in present - used if not ignore(n))
    if unexpected:
        raise ValueError(f"{source} has tensor(s) this {layout} model does not use: "
                         f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    model = GPT(config, rng=_Uninitialised())
    params = dict(model.named_parameters())
    for ours, sources in wmap.items():
        if ours not in params:   # a tied lm_head is the embedding
            continue
        for name, cols, transpose in sources:
            shards.copy_into(name, _target(params[ours].data, cols), transpose)
    return model


# ---- loading ------------------------------------------------------------------------------------

def load_pretrained(path, dtype="float32", device="cpu"):
    """GPT from a Hugging Face folder (GPT-2 or Llama, safetensors), this project's checkpoint file, or a
    training out_dir holding one. dtype "float32" or "float64"; device "cpu" or "cuda". The model comes in
    eval mode. A checkpoint keeps its saved dropout; a Hugging Face model gets dropout 0 (its several
    dropout rates have no single equivalent here)."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.is_dir() and not (path / "config.json").is_file():
        found = [path / n for n in _CHECKPOINT_NAMES if (path / n).is_file()]
        if found:
            path = found[0]
    model = _load_checkpoint(path, dtype) if path.is_file() else _load_folder(path, dtype)
    model.eval()   # as transformers returns it; model.train() before fine-tuning
    return model.to(device) if device != "cpu" else model


def _load_folder(folder, dtype):
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json (a Hugging Face model folder) and no "
                                f"{_CHECKPOINT_NAMES[0]} (a training checkpoint)")
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    config = config_from_hf(cfg, config_path, dtype)
    shards = _open_weights(folder)
    try:
        names = shards.names()
        if config.position == "learned":   # GPT-2: names with or without "transformer."
            if not any(n.startswith("transformer.") for n in names):
                shards.where = {(n if n.startswith("lm_head.") else "transformer." + n): f for n, f in shards.where.items()}
            tied_extra = {"lm_head.weight"} if config.tie_embeddings else set()
            return _build_and_fill(config, _Renamed(shards), "gpt2",
                                   lambda n: n.endswith((".attn.bias", ".attn.masked_bias")) or n in tied_extra, folder)
        if not any(n.startswith("model.") for n in names):   # a bare LlamaModel: no "model." prefix
            shards.where = {(n if n.startswith("lm_head.") else "model." + n): f for n, f in shards.where.items()}
        tied_extra = {"lm_head.weight"} if config.tie_embeddings else set()
        return _build_and_fill(config, _Renamed(shards), "llama",
                               lambda n: n.endswith(".rotary_emb.inv_freq") or n in tied_extra, folder)
    finally:
        shards.close()


class _Renamed:
    """_Shards whose `where` keys were renamed: reads go to the file under the file's own name."""

    def __init__(self, shards):
        self.shards = shards
        self.original = {}
        for new in shards.where:
            for old in (new, new[len("transformer."):], new[len("model."):]):
                if old in shards.where[new].entries:
                    self.original[new] = old
                    break

    def names(self):
        return set(self.shards.where)

    def copy_into(self, name, out, transpose=False):
        self.shards.where[name].copy_into(self.original[name], out, transpose)


def _load_checkpoint(path, dtype):
    try:
        f = SafetensorsFile(path)
    except ValueError as e:
        raise ValueError(f"{path} is not a model: {e}") from None
    with f:
        if f.metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is a file but not a tinygrad_llm checkpoint (no 'format': "
                             f"'{CHECKPOINT_FORMAT}' in its metadata); a Hugging Face model is a folder")
        try:
            config = GPTConfig.from_dict({**json.loads(f.metadata["config"]), "dtype": dtype})
        except (KeyError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path} is corrupt: its metadata holds no readable model config ({e!r})") from None
        tied, stored = TIED
        return _build_and_fill(config, _Shards([f]), "gpt2",
                               lambda n: n.startswith("optimizer.") or (n == tied and config.tie_embeddings), path)


# ---- saving -------------------------------------------------------------------------------------

def hf_state_dict(model):
    """(layout, config dict, {Hugging Face name: float array}) for `model` in transformers' layout."""
    layout, cfg = config_to_hf(model.config)
    params = {n: p.numpy() if hasattr(p, "numpy") else p.data for n, p in model.named_parameters()}
    state = {}
    for ours, sources in _weight_map(model.config, layout).items():
        if ours not in params:
            continue
        for name, cols, transpose in sources:
            part = _target(params[ours], cols)
            state[name] = np.ascontiguousarray(part.T if transpose else part)
    if layout == "gpt2" and model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return layout, cfg, state


CHAR_TOKENIZER_ERROR = ("a character tokenizer cannot be written as Hugging Face tokenizer files (vocab.json and "
                        "merges.txt describe byte-level BPE); export the weights alone (tokenizer=None)")


def check_tokenizer_writable(tokenizer):
    from .tokenizer import BPETokenizer, CharTokenizer
    if isinstance(tokenizer, CharTokenizer):
        raise ValueError(CHAR_TOKENIZER_ERROR)
    if not isinstance(tokenizer, BPETokenizer):
        raise ValueError(f"a {type(tokenizer).__name__} cannot be saved as Hugging Face tokenizer files")


def save_pretrained(model, path, tokenizer=None):
    """Write `model` (and `tokenizer`, a BPETokenizer) as a Hugging Face folder at `path`: config.json,
    model.safetensors (and the tokenizer's files). Everything is written to a temporary folder beside
    `path` first; then the folder is renamed into place, or, if `path` is an existing folder, each file
    is renamed over its old version."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder")
    layout, cfg, state = hf_state_dict(model)   # raises on a config with no Hugging Face equivalent
    if tokenizer is not None:
        check_tokenizer_writable(tokenizer)   # before anything is written
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        save_safetensors(tmp / "model.safetensors", state, {"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if not path.exists():
            os.replace(tmp, path)
        else:
            for f in sorted(tmp.iterdir()):
                os.replace(f, path / f.name)
            stale = path / "model.safetensors.index.json"   # would describe shards we did not write
            if stale.exists():
                stale.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


# ---- tokenizers ---------------------------------------------------------------------------------

def _byte_alphabet():
    from .tokenizer import _gpt2_byte_alphabet
    alphabet = _gpt2_byte_alphabet()                    # character -> byte
    return alphabet, {b: c for c, b in alphabet.items()}


def _special_tokens_in_config(folder):
    """{content: id} of the added tokens a tokenizer_config.json or tokenizer.json lists (may be empty)."""
    found = {}
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        for i, entry in (cfg.get("added_tokens_decoder") or {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                found[entry["content"]] = int(i)
    return found


def _read_vocab_merges(vocab_path, merges_path):
    try:
        vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{vocab_path} is not valid JSON: {e}") from None
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise ValueError(f"{vocab_path} must map token strings to integer ids")
    merges = []
    for n, line in enumerate(Path(merges_path).read_text(encoding="utf-8").split("\n"), 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{merges_path} line {n}: expected two tokens separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return vocab, merges


def tokenizer_from_vocab(vocab, merges, source, extra_special=None, pattern=None):
    """A BPETokenizer (GPT-2's split pattern unless `pattern` is given) giving Hugging Face's ids for a
    byte-level BPE vocabulary {token string: id} and its merges [(left string, right string)] in priority order.

    Each merge joins two tokens into one; a token made by the i-th merge that makes a new token gets the
    rank 256 + i (single bytes are ranks 0..255), which is how tiktoken-style ranks order merges. Tokens
    that are neither a byte nor made by a merge are special tokens. When Hugging Face's ids already are
    those ranks (GPT-2's own files) the tokenizer is a plain BPETokenizer; otherwise (the tokenizers
    library puts special tokens first) it maps its ranks to Hugging Face's ids."""
    from .tokenizer import GPT2_SPLIT_PATTERN, BPETokenizer, IdMappedBPETokenizer
    alphabet, _ = _byte_alphabet()

    def to_bytes(word):
        try:
            return bytes(alphabet[c] for c in word)
        except KeyError:
            return None

    if len(set(vocab.values())) != len(vocab):
        dup = next(i for i in vocab.values() if list(vocab.values()).count(i) > 1)
        raise ValueError(f"{source}: id {dup} is given to more than one token")
    token_bytes = {word: to_bytes(word) for word in vocab}
    rank = {bytes([b]): b for b in range(256)}
    spelled = set(token_bytes.values())
    missing = [b for b in range(256) if bytes([b]) not in spelled]
    if missing:
        raise ValueError(f"{source}: the vocabulary lacks {len(missing)} of the 256 single bytes (first: "
                         f"{bytes(missing[:1])!r}); byte-level BPE needs them all")
    for n, (left, right) in enumerate(merges):
        for word in (left, right, left + right):
            if word not in vocab or token_bytes[word] is None:
                raise ValueError(f"{source}: merge {n} ({left} {right}) uses {word!r}, which is not a byte-level token "
                                 "of the vocabulary")
        joined = token_bytes[left + right]
        if joined not in rank:
            rank[joined] = len(rank)
    # the id of each rank; a byte or merged token may be spelled once only
    id_of_rank = np.empty(len(rank), dtype=np.int64)
    seen = {}
    for word, b in token_bytes.items():
        if b is not None and b in rank:
            if b in seen:
                raise ValueError(f"{source}: tokens {seen[b]!r} and {word!r} spell the same bytes")
            seen[b] = word
            id_of_rank[rank[b]] = vocab[word]
    special = {word: i for word, i in vocab.items() if token_bytes[word] is None or token_bytes[word] not in rank}
    for word, i in (extra_special or {}).items():
        if word not in vocab:
            special[word] = i
    if np.array_equal(id_of_rank[256:], np.arange(256, len(rank))) and set(id_of_rank[:256]) == set(range(256)) \
            and all(i >= len(rank) for i in special.values()):
        # GPT-2's layout: the ids are ranks already (single bytes in any order among 0..255)
        return BPETokenizer({b: int(id_of_rank[r]) for b, r in rank.items()}, pattern or GPT2_SPLIT_PATTERN, special)
    return IdMappedBPETokenizer(rank, pattern or GPT2_SPLIT_PATTERN, special, id_of_rank)


def load_tokenizer(path):
    """The tokenizer of a Hugging Face folder (vocab.json + merges.txt, or OpenAI's encoder.json +
    vocab.bpe) or of a training checkpoint (the tokenizer saved in its metadata)."""
    from .tokenizer import tokenizer_from_dict
    path = Path(path)
    if path.is_dir() and not any((path / n).is_file() for n in ("tokenizer.json", "vocab.json", "encoder.json")):
        found = [path / n for n in _CHECKPOINT_NAMES if (path / n).is_file()]
        if found:
            path = found[0]
    if path.is_file():
        with SafetensorsFile(path) as f:
            if f.metadata.get("format") != CHECKPOINT_FORMAT or "tokenizer" not in f.metadata:
                raise ValueError(f"{path} holds no tokenizer (not a tinygrad_llm checkpoint saved with one)")
            return tokenizer_from_dict(json.loads(f.metadata["tokenizer"]))
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer at {path}")
    if (path / "tokenizer.json").is_file():   # the split pattern is only here when it is not GPT-2's
        return _tokenizer_from_tokenizer_json(path / "tokenizer.json")
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        vocab, merges = _read_vocab_merges(path / "vocab.json", path / "merges.txt")
        return tokenizer_from_vocab(vocab, merges, path, _special_tokens_in_config(path))
    if (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
        vocab, merges = _read_vocab_merges(path / "encoder.json", path / "vocab.bpe")
        return tokenizer_from_vocab(vocab, merges, path)
    raise FileNotFoundError(f"{path} has no tokenizer.json, vocab.json + merges.txt or encoder.json + vocab.bpe")


def _tokenizer_from_tokenizer_json(path):
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        model = doc["model"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a tokenizers-library file: {e!r}") from None
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model.type={model.get('type')!r} is not supported (only byte-level 'BPE')")
    pattern = _split_pattern(doc.get("pre_tokenizer") or {}, path)
    if doc.get("normalizer"):
        raise ValueError(f"{path}: normalizer={json.dumps(doc['normalizer'])[:200]} is not supported (only null)")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    added = {t["content"]: t["id"] for t in doc.get("added_tokens") or []}
    return tokenizer_from_vocab(model["vocab"], merges, path, added, pattern)


def _split_pattern(pre, path):
    """The split pattern of a tokenizer.json pre_tokenizer: GPT-2's for ByteLevel with its regex, or the regex
    of a Split followed by a ByteLevel without one (what save_pretrained writes for other patterns)."""
    from .tokenizer import GPT2_SPLIT_PATTERN
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return GPT2_SPLIT_PATTERN
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") \
            and isinstance((steps[0].get("pattern") or {}).get("Regex"), str) \
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space"):
        return steps[0]["pattern"]["Regex"]
    raise ValueError(f"{path}: pre_tokenizer={json.dumps(pre)[:200]} is not supported (only GPT-2's ByteLevel, or a "
                     "Split regex, Isolated, then ByteLevel without its regex; no add_prefix_space)")


def tokenizer_files(tokenizer):
    """{file name: text} of vocab.json, merges.txt, tokenizer.json, tokenizer_config.json and
    special_tokens_map.json for a BPETokenizer."""
    from .tokenizer import GPT2_SPLIT_PATTERN
    check_tokenizer_writable(tokenizer)
    _, spell = _byte_alphabet()
    table = {b: spell[b] for b in range(256)}   # latin-1 decoding makes byte b the character b; then respell
    id_of = tokenizer.public_id                  # rank -> the id a user sees
    # the tokens spelled in GPT-2's alphabet, one character per byte, so the strings split as the bytes do
    words = {token.decode("latin-1").translate(table): r for token, r in tokenizer.mergeable_ranks.items()}
    vocab, merges = {}, []
    for word, r in sorted(words.items(), key=lambda kv: kv[1]):
        vocab[word] = id_of(r)
        if len(word) > 1:
            parts = _last_merge(word, words, r)
            if parts is None:
                raise ValueError(f"token {word!r} (id {id_of(r)}) cannot be written as a merge of two tokens of "
                                 "lower rank, so merges.txt cannot describe it")
            merges.append(" ".join(parts))
    for word, i in tokenizer.special_tokens.items():
        vocab[word] = i
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    special = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    added = [{"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for w, i in special]
    if tokenizer.pattern == GPT2_SPLIT_PATTERN:
        pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    else:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _oniguruma(tokenizer.pattern)}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                      "normalizer": None, "pre_tokenizer": pre, "post_processor": byte_level, "decoder": byte_level,
                      "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                                "ignore_merges": False, "vocab": vocab, "merges": merges}}
    eos = "<|endoftext|>" if "<|endoftext|>" in tokenizer.special_tokens else (special[-1][0] if special else None)
    # transformers' GPT2Tokenizer splits with GPT-2's pattern whatever tokenizer.json says; another pattern
    # needs the generic class, which runs tokenizer.json as written
    gpt2_split = tokenizer.pattern == GPT2_SPLIT_PATTERN
    config = {"tokenizer_class": "GPT2Tokenizer" if gpt2_split else "PreTrainedTokenizerFast", "add_prefix_space": False, "add_bos_token": False,
              "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 1 << 30,
              "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}}
    specials_map = {}
    if eos is not None:
        config.update(bos_token=eos, eos_token=eos, unk_token=eos)
        specials_map = {"bos_token": eos, "eos_token": eos, "unk_token": eos}
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
            "tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
            "special_tokens_map.json": json.dumps(specials_map, indent=2, ensure_ascii=False)}


def _oniguruma(pattern):
    """The split pattern for the tokenizers library's regex engine (Oniguruma, Ruby syntax), where `{1,3}+`
    is not a possessive {1,3} but {1,3} repeated: drop the `+` (the same matches where, as in the GPT-4
    pattern, nothing follows the repeat inside its alternative)."""
    import re
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def _last_merge(token, ranks, rank):
    """The two tokens whose merge makes `token` under tiktoken's rule: merge its bytes by rank using only
    tokens of rank below `rank`; if two parts remain, they are the pair (None otherwise)."""
    splits = [(token[:k], token[k:]) for k in range(1, len(token))
              if ranks.get(token[:k], rank) < rank and ranks.get(token[k:], rank) < rank]
    if len(splits) == 1:   # the usual case: one way to make it from two earlier tokens
        return list(splits[0])
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            return None
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts if len(parts) == 2 else None


def save_tokenizer(tokenizer, path):
    """Write the tokenizer's Hugging Face files into folder `path` (created if needed), each atomically."""
    from .fileio import atomic_write
    files = tokenizer_files(tokenizer)   # everything is worked out (and may raise) before a file is written
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder")
    for name, text in files.items():
        atomic_write(path / name, text)
    return path
