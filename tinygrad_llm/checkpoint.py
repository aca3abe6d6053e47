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


def load_safetensors(path):
    """Read a safetensors file: ({name: ndarray}, {str: str} metadata). Raises on a bad file, naming why."""
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
        if not isinstance(header, dict):
            raise ValueError(f"{path} is corrupt: its header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_size = size - 8 - n
        entries = sorted(((_check_entry(path, name, entry, data_size), name) for name, entry in header.items()))
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
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path} is corrupt: __metadata__ must map strings to strings")
    return arrays, metadata


def _check_entry(path, name, entry, data_size):
    """(begin, end, dtype name, shape) of one header entry, after checking it against the file."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], [int(s) for s in entry["shape"]], entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{path} is corrupt: header entry {name!r} needs dtype, shape and data_offsets, "
                         f"got {entry!r}") from None
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
    anything is loaded: a config that differs from the model's (the differing fields named), missing,
    unexpected or mis-shaped weights, or a missing optimizer state raise and leave model and optimizer
    untouched.
    """
    arrays, metadata, meta = _read_checkpoint(path)
    _load_into(path, arrays, metadata, meta, model, optimizer)
    return meta


def load_model(path):
    """(model, meta): a GPT built from the checkpoint's saved config and loaded with its weights, the file
    read once (for sampling and evaluation, where no model exists yet to load into)."""
    arrays, metadata, meta = _read_checkpoint(path)
    model = GPT(GPTConfig.from_dict(meta["config"]))
    _load_into(path, arrays, metadata, meta, model, None)
    return model, meta


def _read_checkpoint(path):
    """(arrays, raw metadata, meta with its JSON values parsed), the format and version checked."""
    arrays, metadata = load_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a tinygrad_llm checkpoint (no "
                         f"'format': '{FORMAT}' in its metadata); use load_safetensors to read its arrays")
    if int(metadata.get("version", -1)) > VERSION:
        raise ValueError(f"{path} is checkpoint version {metadata['version']}; this code reads up to {VERSION}")
    meta = {}
    for key, value in metadata.items():
        if key not in ("format", "version", "optimizer"):
            try:
                meta[key] = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError(f"{path} is corrupt: metadata {key!r} is not JSON: {value[:80]!r}") from None
    if "config" not in meta:
        raise ValueError(f"{path} is corrupt: its metadata holds no model config")
    return arrays, metadata, meta


def _load_into(path, arrays, metadata, meta, model, optimizer):
    weights = {k: v for k, v in arrays.items() if not k.startswith(OPTIMIZER_PREFIX)}
    if model is not None:
        _check_config(path, meta["config"], model.config.to_dict())
    if optimizer is not None:
        if "optimizer" not in metadata:
            raise ValueError(f"{path} holds no optimizer state (it was saved without an optimizer)")
        optimizer_state = _unflatten(json.loads(metadata["optimizer"]), arrays)
        try:
            optimizer.check_state_dict(optimizer_state)
        except ValueError as e:
            raise ValueError(f"{path}: its optimizer state does not fit the optimizer: {e}") from None
    if model is not None:
        try:  # load_state_dict checks every key and shape before it changes anything
            model.load_state_dict(weights)
        except ValueError as e:
            raise ValueError(f"{path} does not fit the model: {e}") from None
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)


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
