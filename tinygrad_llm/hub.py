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

The memory-mapped reader is safetensors_file.py; tokenizer files (load_tokenizer, save_tokenizer) are
hf_tokenizer.py's, importable from here as well.
"""
import json
import math
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .checkpoint import FORMAT as CHECKPOINT_FORMAT, TIED, save_safetensors
from .hf_tokenizer import (CHAR_TOKENIZER_ERROR, check_tokenizer_writable, load_tokenizer,  # noqa: F401 (also hub's)
                           save_tokenizer, tokenizer_files, tokenizer_from_vocab)
from .model import GPT, GPTConfig
from .safetensors_file import _CHECKPOINT_NAMES, SafetensorsFile, _open_weights, _Shards

_GPT2_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}

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
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "torch_dtype": c.param_dtype,
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
