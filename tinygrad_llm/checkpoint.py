"""Checkpoints as safetensors files, read and written with NumPy alone (never pickle).

The safetensors format, all of it:

    [8 bytes]  N, the header length, an unsigned little-endian 64-bit integer
    [N bytes]  a JSON object: {"name": {"dtype": "F32", "shape": [C, 3C], "data_offsets": [begin, end]},
               ..., "__metadata__": {"key": "string value", ...}}   (padded with spaces)
    [rest]     the arrays' raw little-endian bytes, one after another; offsets count from here

A checkpoint is one such file. It holds the model's weights under their Hugging Face GPT-2 names
(a tied `lm_head.weight` is stored once, as `transformer.wte.weight`, exactly as HF does), the
optimizer's arrays under `optimizer.`-prefixed names, and in `__metadata__` everything else as JSON:
the model config, the caller's meta (step, best val loss, rng state, tokenizer, ...) and the
optimizer state's non-array part (hyper-parameters, step counts).

    save_checkpoint("out/ckpt.safetensors", model, optimizer, meta={"step": 500, "best_val_loss": 1.9})
    meta = load_checkpoint("out/ckpt.safetensors", model, optimizer)    # -> {"step": 500, ...}

Writes go to a temporary file in the same folder, are fsync'ed, then renamed over the target: a
crash leaves either the old file or the new one, never half of one.
"""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from .fileio import atomic_write, remove_stale_temporaries
from .model import GPT, GPTConfig

# safetensors dtype names <-> NumPy dtypes (always little-endian on disk)
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_NAMES = {(np.dtype(v).kind, np.dtype(v).itemsize): k for k, v in DTYPES.items()}  # byte order aside

FORMAT = "tinygrad_llm.checkpoint"
VERSION = 1
OPTIMIZER_PREFIX = "optimizer."
TIED = ("lm_head.weight", "transformer.wte.weight")  # (the tied name, the name it is stored under)
MAX_HEADER_BYTES = 100_000_000  # the safetensors package's own limit: larger is surely corrupt


# ---- the file format ---------------------------------------------------------------------------

def save_safetensors(path, arrays, metadata=None):
    """Write {name: array} and optional {str: str} metadata to `path` as safetensors, atomically."""
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"safetensors metadata maps str to str; not so for key(s) {bad}")
    header, offset, contiguous = {}, 0, []
    for name in sorted(arrays):
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved for the metadata; it cannot name an array")
        array = np.asarray(arrays[name])
        key = (array.dtype.kind, array.dtype.itemsize)
        if key not in _NAMES:
            raise TypeError(f"array {name!r} has dtype {array.dtype}, which safetensors cannot hold; "
                            f"supported: {[str(np.dtype(d)) for d in DTYPES.values()]}")
        array = array.astype(DTYPES[_NAMES[key]], order="C", copy=False)  # keeps 0-d arrays 0-d
        header[name] = {"dtype": _NAMES[key], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        contiguous.append(array)
    if metadata:
        header["__metadata__"] = metadata
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep the data 8-byte aligned, as HF does

    def write(f):
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for array in contiguous:
            f.write(array.reshape(-1).view(np.uint8).data)

    atomic_write(path, write)


def load_safetensors(path, check=None):
    """Read a safetensors file: ({name: ndarray}, {str: str} metadata). Raises on a bad file, naming why.

    check: called as check({name: (dtype name, shape)}, metadata) after the header is read and checked
    and before any tensor is read, so that a file can be refused before it costs memory."""
    path = Path(path)
    remove_stale_temporaries(path)  # left by a process killed while it saved this file
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise ValueError(f"{path} is truncated or not a safetensors file: {size} bytes, "
                             "fewer than the 8-byte header length")
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise ValueError(f"{path} is truncated or not a safetensors file: the header claims {n} bytes "
                             f"but only {size - 8} follow the length field")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is corrupt: its header is not valid JSON ({e})") from None
        except RecursionError:
            raise ValueError(f"{path} is corrupt: its header is JSON nested too deeply") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path} is corrupt: its header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError(f"{path} is corrupt: __metadata__ must map strings to strings")
        data_size = size - 8 - n
        entries = sorted(((_check_entry(path, name, entry, data_size), name) for name, entry in header.items()))
        if check is not None:
            check({name: (dtype, shape) for (_, _, dtype, shape), name in entries}, metadata)
        arrays, expected_begin = {}, 0
        for (begin, end, dtype, shape), name in entries:
            if begin != expected_begin:
                raise ValueError(f"{path} is corrupt: tensor {name!r} starts at byte {begin} of the data, "
                                 f"expected {expected_begin} (tensors overlap or leave a gap)")
            buffer = bytearray(end - begin)
            f.seek(8 + n + begin)
            f.readinto(buffer)
            arrays[name] = _from_bytes(buffer, dtype, shape)
            expected_begin = end
        if expected_begin != data_size:
            raise ValueError(f"{path} is corrupt: {data_size - expected_begin} bytes after the last tensor")
    return arrays, metadata


def _check_entry(path, name, entry, data_size):
    """(begin, end, dtype name, shape) of one header entry, after checking it against the file."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not (isinstance(dtype, str) and isinstance(shape, list) and all(_is_int(s) for s in shape)):
            raise TypeError
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{path} is corrupt: header entry {name!r} needs dtype, shape and data_offsets (a string, "
                         f"a list of integers, two integers), got {str(entry)[:200]}") from None
    if dtype != "BF16" and dtype not in DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {dtype!r}, not one of {sorted(DTYPES) + ['BF16']}")
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end) or min(shape, default=0) < 0:
        raise ValueError(f"{path} is corrupt: tensor {name!r} has offsets {[begin, end]} and shape {shape}")
    if end > data_size:
        raise ValueError(f"{path} is truncated: tensor {name!r} needs data bytes {begin}..{end} but the "
                         f"file holds only {data_size} bytes of data")
    itemsize = 2 if dtype == "BF16" else np.dtype(DTYPES[dtype]).itemsize
    if end - begin != math.prod(shape) * itemsize:
        raise ValueError(f"{path} is corrupt: tensor {name!r} of shape {shape} and dtype {dtype} needs "
                         f"{math.prod(shape) * itemsize} bytes, its offsets span {end - begin}")
    return begin, end, dtype, tuple(shape)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _from_bytes(buffer, dtype, shape):
    if dtype == "BF16":  # NumPy has no bfloat16: it is the top half of a float32, so widen it exactly
        return (np.frombuffer(buffer, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    array = np.frombuffer(buffer, DTYPES[dtype]).reshape(shape)  # writable: it views the bytearray
    return array.astype(array.dtype.newbyteorder("="), copy=False)


# ---- checkpoints: model + optimizer + metadata ---------------------------------------------------

def save_checkpoint(path, model, optimizer=None, meta=None):
    """Write the model's weights, the optimizer's state and `meta` (JSON-able values) to one file.

    The model's config (`model.config.to_dict()`) is stored under meta key "config", so that
    load_checkpoint can check it against the model it loads into.
    """
    meta = dict(meta or {})
    reserved = {"format", "version", "config", "optimizer"} & set(meta)
    if reserved:
        raise ValueError(f"meta keys {sorted(reserved)} are reserved for the checkpoint itself")
    arrays = _model_arrays(model)
    metadata = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(model.config.to_dict())}
    if optimizer is not None:
        skeleton = _flatten(optimizer.state_dict(), OPTIMIZER_PREFIX.rstrip("."), arrays)
        metadata["optimizer"] = json.dumps(skeleton)
    for key, value in meta.items():
        try:
            metadata[key] = json.dumps(value, allow_nan=True)
        except TypeError as e:
            raise TypeError(f"meta[{key!r}] is not JSON-serialisable: {e}") from None
    save_safetensors(path, arrays, metadata)


def load_checkpoint(path, model=None, optimizer=None):
    """Read a checkpoint; load its weights into `model` and its state into `optimizer` when given.

    Returns the meta dict (the caller's keys as saved, plus "config"). Everything is checked before
    anything is loaded: the metadata (a corrupt field is a ValueError naming it), the saved config
    against the tensors in the file and against the model's (the differing fields named), missing,
    unexpected or mis-shaped weights, or a missing optimizer state raise and leave model and optimizer
    untouched.
    """
    arrays, meta, optimizer_skeleton = _read_checkpoint(path)
    _load_into(path, arrays, meta, optimizer_skeleton, model, optimizer)
    return meta


def load_model(path):
    """(model, meta): a GPT built from the checkpoint's saved config and loaded with its weights, the file
    read once (for sampling and evaluation, where no model exists yet to load into). The config is checked
    against the tensor shapes in the file's header before the model, or any tensor, is allocated."""
    arrays, meta, optimizer_skeleton = _read_checkpoint(path)
    model = GPT(_config_from_meta(path, meta["config"]))
    _load_into(path, arrays, meta, optimizer_skeleton, model, None)
    return model, meta


def _read_checkpoint(path):
    """(arrays, meta with its JSON values parsed, the optimizer's JSON skeleton or None). The metadata is
    checked in full, and the config against the header's tensor shapes, before any tensor is read."""
    parsed = {}

    def check(shapes, metadata):
        parsed.update(_parse_metadata(path, metadata))
        config = _config_from_meta(path, parsed["meta"]["config"])
        _check_shapes(path, config, {name: shape for name, (_, shape) in shapes.items()
                                     if not name.startswith(OPTIMIZER_PREFIX)})

    arrays, _ = load_safetensors(path, check=check)
    return arrays, parsed["meta"], parsed["optimizer"]


def _json_field(path, key, value):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ValueError(f"{path} is corrupt: metadata {key!r} is not JSON: {value[:80]!r}") from None
    except RecursionError:
        raise ValueError(f"{path} is corrupt: metadata {key!r} is JSON nested too deeply") from None


def _parse_metadata(path, metadata):
    """{"meta": ..., "optimizer": skeleton or None} from the raw {str: str} metadata, every known field checked."""
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a tinygrad_llm checkpoint (no "
                         f"'format': '{FORMAT}' in its metadata); use load_safetensors to read its arrays")
    version = metadata.get("version", "")
    if not (version.isascii() and version.isdigit()):
        raise ValueError(f"{path} is corrupt: metadata 'version' must be a whole number, got {version[:40]!r}")
    if int(version) > VERSION:
        raise ValueError(f"{path} is checkpoint version {version}; this code reads up to {VERSION}")
    meta = {key: _json_field(path, key, value) for key, value in metadata.items()
            if key not in ("format", "version", "optimizer")}
    if "config" not in meta:
        raise ValueError(f"{path} is corrupt: its metadata holds no model config")
    _check_meta_values(path, meta)
    optimizer = None
    if "optimizer" in metadata:
        optimizer = _json_field(path, "optimizer", metadata["optimizer"])
        _check_skeleton(path, optimizer)
    return {"meta": meta, "optimizer": optimizer}


# Fields of GPTConfig and the JSON types each may take (bool is not an int here, though Python says so).
_CONFIG_TYPES = {"vocab_size": "int", "block_size": "int", "n_layer": "int", "n_head": "int", "n_embd": "int",
                 "dropout": "number", "bias": "bool", "dtype": "str", "norm": "str", "mlp": "str", "position": "str",
                 "tie_embeddings": "bool", "rope_theta": "number", "norm_eps": "number", "gelu_approximate": "str",
                 "mlp_hidden": "int or null", "n_kv_head": "int or null"}
_REQUIRED_CONFIG = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")


def _json_type_ok(value, kind):
    if kind == "int or null":
        return value is None or _json_type_ok(value, "int")
    if kind == "int":
        return _is_int(value)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"bool": bool, "str": str}[kind])


def _config_from_meta(path, saved):
    """The saved config as a GPTConfig; ValueError naming the field if it is missing, mistyped or out of range."""
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is corrupt: metadata 'config' must be a JSON object, got {type(saved).__name__}")
    unknown = sorted(set(saved) - set(_CONFIG_TYPES))
    if unknown:
        raise ValueError(f"{path} is corrupt: config has unknown field(s) {unknown}")
    missing = [k for k in _REQUIRED_CONFIG if k not in saved]
    if missing:
        raise ValueError(f"{path} is corrupt: config lacks field(s) {missing}")
    for key, value in saved.items():
        if not _json_type_ok(value, _CONFIG_TYPES[key]):
            raise ValueError(f"{path} is corrupt: config field {key!r} must be {_CONFIG_TYPES[key]}, got {str(value)[:40]}")
    try:
        return GPTConfig.from_dict(saved)
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"{path} is corrupt: its config is invalid: {e}") from None


def _check_meta_values(path, meta):
    """The fields that resuming a run reads: step, best_val_loss, rng_state; each checked when present."""
    if "step" in meta and not (_is_int(meta["step"]) and meta["step"] >= 0):
        raise ValueError(f"{path} is corrupt: metadata 'step' must be a non-negative integer, got {str(meta['step'])[:40]}")
    if "best_val_loss" in meta and not _json_type_ok(meta["best_val_loss"], "number"):
        raise ValueError(f"{path} is corrupt: metadata 'best_val_loss' must be a number, "
                         f"got {str(meta['best_val_loss'])[:40]}")
    if "rng_state" in meta:
        _check_rng_state(path, meta["rng_state"])


def _check_rng_state(path, state):
    """A NumPy bit generator's state (np.random.Generator().bit_generator.state): it must restore exactly."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    kind = getattr(np.random, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(kind, type) and issubclass(kind, np.random.BitGenerator)):
        raise ValueError(f"{path} is corrupt: metadata 'rng_state' is not a NumPy bit generator state "
                         f"(bit_generator {str(name)[:40]!r})")
    try:
        generator = kind()
        generator.state = state
        restored = generator.state == state
    except Exception:  # NumPy raises TypeError, ValueError, KeyError or OverflowError for a bad state
        restored = False
    if not restored:
        raise ValueError(f"{path} is corrupt: metadata 'rng_state' is not a valid {name} state")


def _expected_shapes(config):
    """{name: shape} of the weights a GPT of `config` stores (the tied lm_head left to wte, as saved)."""
    C, V, H = config.n_embd, config.vocab_size, config.mlp_hidden
    shapes = {"transformer.wte.weight": (V, C)}
    if config.position == "learned":
        shapes["transformer.wpe.weight"] = (config.block_size, C)

    def norm(prefix):
        shapes[prefix + ".weight"] = (C,)
        if config.norm == "layernorm" and config.bias:
            shapes[prefix + ".bias"] = (C,)

    def linear(prefix, n_in, n_out):
        shapes[prefix + ".weight"] = (n_in, n_out)
        if config.bias:
            shapes[prefix + ".bias"] = (n_out,)

    for i in range(config.n_layer):
        block = f"transformer.h.{i}"
        norm(block + ".ln_1")
        linear(block + ".attn.c_attn", C, C + 2 * (config.n_kv_head or config.n_head) * (C // config.n_head))
        linear(block + ".attn.c_proj", C, C)
        norm(block + ".ln_2")
        linear(block + ".mlp.c_fc", C, H)
        if config.mlp == "swiglu":
            linear(block + ".mlp.c_fc2", C, H)
        linear(block + ".mlp.c_proj", H, C)
    norm("transformer.ln_f")
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def _check_shapes(path, config, stored):
    """The saved config against the weights' shapes in the header; nothing the size of the model is built:
    a config that needs far more weights than the file holds (a million layers) is refused by the count."""
    fixed = len(_expected_shapes(_with_layers(config, 0)))
    needed = fixed + (len(_expected_shapes(_with_layers(config, 1))) - fixed) * config.n_layer
    if needed > 2 * len(stored) + 64:
        raise ValueError(f"{path} is corrupt: its config (n_layer={config.n_layer}) needs {needed} weights; "
                         f"the file holds {len(stored)}")
    expected = _expected_shapes(config)
    missing = [name for name in expected if name not in stored]
    unexpected = [name for name in stored if name not in expected]
    misshaped = [f"{name}: checkpoint {tuple(stored[name])}, config {shape}" for name, shape in expected.items()
                 if name in stored and tuple(stored[name]) != shape]
    if missing or unexpected or misshaped:
        parts = [f"missing keys {missing[:10]}" if missing else "", f"unexpected keys {unexpected[:10]}" if unexpected else "",
                 "shapes: " + "; ".join(misshaped[:10]) if misshaped else ""]
        raise ValueError(f"{path} is corrupt: its tensors do not match its config (n_layer={config.n_layer}, "
                         f"n_embd={config.n_embd}, vocab_size={config.vocab_size}, block_size={config.block_size}): "
                         + "; ".join(p for p in parts if p))


def _with_layers(config, n_layer):
    """A copy of config with n_layer set directly (GPTConfig itself refuses n_layer=0), for counting weights."""
    copy = dataclasses.replace(config)
    copy.n_layer = n_layer
    return copy


def _check_skeleton(path, node, where="optimizer", depth=0):
    """The optimizer state's JSON tree (see _flatten): every node one of the forms _flatten writes."""
    if depth > 32:
        raise ValueError(f"{path} is corrupt: the optimizer state is nested deeper than 32 at {where}")
    if node is None or isinstance(node, (bool, int, float, str)):
        return
    if isinstance(node, list):
        for i, v in enumerate(node):
            _check_skeleton(path, v, f"{where}[{i}]", depth + 1)
        return
    ok = isinstance(node, dict) and len(node) >= 1
    if ok and "__array__" in node:
        ok = set(node) == {"__array__", "scalar"} and isinstance(node["__array__"], str) and isinstance(node["scalar"], bool)
    elif ok and "__dict__" in node:
        ok = len(node) == 1 and isinstance(node["__dict__"], dict)
        for k, v in node["__dict__"].items() if ok else ():
            _check_skeleton(path, v, f"{where}.{k}", depth + 1)
    elif ok and "__items__" in node:
        items = node["__items__"]
        ok = len(node) == 1 and isinstance(items, list) and all(
            isinstance(kv, list) and len(kv) == 2 and (kv[0] is None or isinstance(kv[0], (bool, int, float, str)))
            for kv in items)
        for k, v in items if ok else ():
            _check_skeleton(path, v, f"{where}.{k}", depth + 1)
    elif ok and "__tuple__" in node:
        ok = len(node) == 1 and isinstance(node["__tuple__"], list)
        for i, v in enumerate(node["__tuple__"]) if ok else ():
            _check_skeleton(path, v, f"{where}[{i}]", depth + 1)
    else:
        ok = False
    if not ok:
        raise ValueError(f"{path} is corrupt: the optimizer state at {where} is malformed: {str(node)[:80]}")


def _load_into(path, arrays, meta, optimizer_skeleton, model, optimizer):
    weights = {k: v for k, v in arrays.items() if not k.startswith(OPTIMIZER_PREFIX)}
    if model is not None:
        _check_config(path, meta["config"], model.config.to_dict())
    if optimizer is not None:
        if optimizer_skeleton is None:
            raise ValueError(f"{path} holds no optimizer state (it was saved without an optimizer)")
        optimizer_state = _unflatten(optimizer_skeleton, arrays)
        _check_optimizer_state(path, optimizer_state, optimizer)
    if model is not None:
        try:  # load_state_dict checks every key and shape before it changes anything
            model.load_state_dict(weights)
        except ValueError as e:
            raise ValueError(f"{path} does not fit the model: {e}") from None
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)


def _check_optimizer_state(path, state, optimizer):
    """The saved optimizer state against the optimizer: the same form as its own state_dict()."""
    current = optimizer.state_dict()
    problem = None
    if not (isinstance(state, dict) and set(state) == set(current) and isinstance(state.get("state"), dict)
            and isinstance(state.get("param_groups"), list)):
        problem = "it is not a dict of 'state' and 'param_groups'"
    elif len(state["param_groups"]) != len(current["param_groups"]):
        problem = f"{len(state['param_groups'])} parameter group(s), the optimizer has {len(current['param_groups'])}"
    else:
        for i, (saved, now) in enumerate(zip(state["param_groups"], current["param_groups"])):
            if not isinstance(saved, dict) or set(saved) != set(now):
                problem = f"group {i} has keys {sorted(saved) if isinstance(saved, dict) else saved!r}, expected {sorted(now)}"
                break
            bad = next((k for k in now if not _same_kind(saved[k], now[k])), None)
            if bad is not None:
                problem = f"group {i} field {bad!r} is {str(saved[bad])[:40]}, expected a value like {now[bad]!r}"
                break
        for key, entry in state["state"].items() if problem is None else ():
            if not (_is_int(key) or (isinstance(key, str) and key.isdigit())) or not isinstance(entry, dict):
                problem = f"state entry {str(key)[:20]!r} is malformed"
            elif "step" in entry and not (_is_int(entry["step"]) and entry["step"] >= 0):
                problem = f"state {key} 'step' must be a non-negative integer, got {str(entry['step'])[:40]}"
            elif not all(isinstance(k, str) and (hasattr(v, "shape") or k == "step") for k, v in entry.items()):
                problem = f"state {key} holds something other than arrays and 'step'"
            if problem:
                break
    if problem is None:
        try:
            optimizer.check_state_dict(state)
        except ValueError as e:
            problem = str(e)
    if problem is not None:
        raise ValueError(f"{path}: its optimizer state does not fit the optimizer: {problem}")


def _same_kind(saved, now):
    """A saved hyper-parameter of the same JSON kind as the optimizer's own (numbers, lists of numbers, ...)."""
    if isinstance(now, bool) or now is None or isinstance(now, str):
        return type(saved) is type(now)
    if isinstance(now, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool)
    if isinstance(now, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(now) and all(
            _same_kind(a, b) for a, b in zip(saved, now))
    return True


def _to_numpy(value):
    value = value.numpy() if hasattr(value, "numpy") else value
    return np.asarray(value)


def _model_arrays(model):
    """The model's state dict as numpy arrays; a tied lm_head.weight is left to transformer.wte.weight."""
    state = model.state_dict()
    tied, stored = TIED
    # state_dict lists a tied parameter under each of its names; named_parameters under one only
    unique_names = {name for name, _ in model.named_parameters()}
    if tied in state and stored in state and not {tied, stored} <= unique_names:
        state = {k: v for k, v in state.items() if k != tied}
    return {name: _to_numpy(value) for name, value in state.items()}


def _check_config(path, saved, current):
    differing = [f"{k}: checkpoint {saved.get(k, '<absent>')!r}, model {current.get(k, '<absent>')!r}"
                 for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if differing:
        raise ValueError(f"{path} was saved from a model with a different config; differing fields: "
                         + "; ".join(differing))


# The optimizer's state_dict is a tree of dicts, lists, tuples, numbers and arrays. Its arrays go to
# the safetensors body under dotted names; the rest stays a JSON tree with a marker where each array
# was. Markers also keep what JSON alone would lose: tuples, non-string dict keys, NumPy scalars.

def _flatten(node, name, arrays):
    if isinstance(node, (np.ndarray, np.generic)) or hasattr(node, "numpy"):
        array = _to_numpy(node)
        arrays[name] = array
        return {"__array__": name, "scalar": isinstance(node, np.generic)}
    if isinstance(node, dict):
        if all(isinstance(k, str) for k in node):
            return {"__dict__": {k: _flatten(v, f"{name}.{k}", arrays) for k, v in node.items()}}
        return {"__items__": [[k, _flatten(v, f"{name}.{k}", arrays)] for k, v in node.items()]}
    if isinstance(node, (list, tuple)):
        items = [_flatten(v, f"{name}.{i}", arrays) for i, v in enumerate(node)]
        return {"__tuple__": items} if isinstance(node, tuple) else items
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise TypeError(f"optimizer state at {name!r} has type {type(node).__name__}, which a checkpoint cannot hold")


def _unflatten(node, arrays):
    if isinstance(node, list):
        return [_unflatten(v, arrays) for v in node]
    if not isinstance(node, dict):
        return node
    if "__array__" in node:
        if node["__array__"] not in arrays:
            raise ValueError(f"checkpoint is missing optimizer array {node['__array__']!r}")
        array = arrays[node["__array__"]]
        return array[()] if node["scalar"] else array
    if "__dict__" in node:
        return {k: _unflatten(v, arrays) for k, v in node["__dict__"].items()}
    if "__items__" in node:
        return {k: _unflatten(v, arrays) for k, v in node["__items__"]}
    return tuple(_unflatten(v, arrays) for v in node["__tuple__"])
