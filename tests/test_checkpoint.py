"""Checkpoints: the safetensors reader/writer (against the safetensors package), atomic writes, clear
errors for bad files and mismatched models, and an exact round trip of weights, optimizer and metadata."""
import json
import os
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinygrad_llm import checkpoint, fileio
from tinygrad_llm.checkpoint import load_checkpoint, load_safetensors, save_checkpoint, save_safetensors
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.optim import AdamW, param_groups

safetensors_numpy = pytest.importorskip("safetensors.numpy")

DTYPES = ["float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool"]


def tiny_model(seed=0, **overrides):
    config = GPTConfig(**{**dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8), **overrides})
    return GPT(config, rng=np.random.default_rng(seed))


def trained_pair(seed=0, steps=2, **overrides):
    """A tiny model and its AdamW after a few steps, so the optimizer state is not all zeros."""
    model = tiny_model(seed, **overrides)
    optimizer = AdamW(param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.99))
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, 11, size=(2, 8))
        _, loss = model(idx, np.roll(idx, -1, axis=1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def sample_arrays(rng):
    arrays = {f"t_{d}": (rng.standard_normal((3, 5)) * 50).astype(d) for d in DTYPES}
    arrays.update(scalar=np.array(2.5), empty=np.zeros((0, 4), np.float32), vector=np.arange(7, dtype=np.int32))
    return arrays


# ---- the file format -------------------------------------------------------------------------

def assert_same_arrays(got, expected):
    assert set(got) == set(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array)


def test_our_files_read_by_the_safetensors_package(tmp_path):
    from safetensors import safe_open
    arrays = sample_arrays(np.random.default_rng(0))
    save_safetensors(tmp_path / "a.safetensors", arrays, {"note": "hello", "n": "3"})
    assert_same_arrays(safetensors_numpy.load_file(tmp_path / "a.safetensors"), arrays)
    with safe_open(tmp_path / "a.safetensors", framework="numpy") as f:
        assert f.metadata() == {"note": "hello", "n": "3"}


def test_package_files_read_by_us(tmp_path):
    arrays = sample_arrays(np.random.default_rng(1))
    safetensors_numpy.save_file(arrays, tmp_path / "b.safetensors", metadata={"k": "v"})
    got, metadata = load_safetensors(tmp_path / "b.safetensors")
    assert_same_arrays(got, arrays)
    assert metadata == {"k": "v"}


@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3)), max_size=5),
       st.integers(0, 2**32 - 1))
def test_round_trip_any_dtypes_and_shapes(tmp_path_factory, specs, seed):
    rng = np.random.default_rng(seed)
    arrays = {f"x{i}": (rng.standard_normal(shape) * 100).astype(dtype) for i, (dtype, shape) in enumerate(specs)}
    path = tmp_path_factory.mktemp("rt") / "c.safetensors"
    save_safetensors(path, arrays)
    assert_same_arrays(load_safetensors(path)[0], arrays)
    assert_same_arrays(safetensors_numpy.load_file(path), arrays)


def test_bfloat16_is_read_as_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], np.float32)  # exact in bfloat16
    top_halves = (values.view(np.uint32) >> 16).astype("<u2")
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    (tmp_path / "bf16.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + top_halves.tobytes())
    got = load_safetensors(tmp_path / "bf16.safetensors")[0]["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values)


def test_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep_bytes", [0, 5, 8, 20, -1])
def test_truncated_file_error(tmp_path, keep_bytes):
    path = tmp_path / "t.safetensors"
    save_safetensors(path, {"w": np.ones((4, 4), np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])
    with pytest.raises(ValueError, match="truncated"):
        load_safetensors(path)


def test_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes((10**6).to_bytes(8, "little") + b'{"a": 1}')
    with pytest.raises(ValueError, match="header claims 1000000 bytes"):
        load_safetensors(path)


@pytest.mark.parametrize("header, message", [
    (b"not json", "not valid JSON"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', "needs 8 bytes"),
    (b'{"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}', "dtype 'Q7'"),
    (b'{"w": {"dtype": "F32", "shape": [2]}}', "needs dtype, shape and data_offsets"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', "gap"),
])
def test_corrupt_header_errors(tmp_path, header, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ValueError, match=message):
        load_safetensors(path)


def test_unsupported_dtype_and_metadata_rejected(tmp_path):
    with pytest.raises(TypeError, match="complex128"):
        save_safetensors(tmp_path / "x.safetensors", {"z": np.zeros(2, complex)})
    with pytest.raises(TypeError, match="str to str"):
        save_safetensors(tmp_path / "x.safetensors", {}, {"n": 3})
    assert not list(tmp_path.iterdir())


# ---- atomic writes -----------------------------------------------------------------------------

def test_atomic_write_leaves_no_temporary_file(tmp_path):
    save_safetensors(tmp_path / "w.safetensors", {"a": np.arange(3)})
    save_safetensors(tmp_path / "w.safetensors", {"a": np.arange(4)})
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    np.testing.assert_array_equal(load_safetensors(tmp_path / "w.safetensors")[0]["a"], np.arange(4))


def test_a_write_failing_midway_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    model, optimizer = trained_pair()
    save_checkpoint(path, model, optimizer, meta={"step": 1})
    before = path.read_bytes()

    real_fdopen = os.fdopen

    class FailingFile:
        """Writes the first few chunks, then fails as a full disk would."""
        def __init__(self, f):
            self.f, self.writes = f, 0
        def write(self, data):
            self.writes += 1
            if self.writes > 3:
                raise OSError(28, "No space left on device")
            return self.f.write(data)
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: FailingFile(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, model, optimizer, meta={"step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]
    assert load_checkpoint(path)["step"] == 1


def test_a_failing_fsync_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_safetensors(path, {"a": np.arange(3)})
    def failing_fsync(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(fileio.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        save_safetensors(path, {"a": np.arange(5)})
    monkeypatch.undo()
    np.testing.assert_array_equal(load_safetensors(path)[0]["a"], np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


# ---- checkpoints of a model and its optimizer ---------------------------------------------------

def test_checkpoint_round_trip_is_exact(tmp_path):
    model, optimizer = trained_pair(seed=0)
    rng = np.random.default_rng(7)
    rng.standard_normal(5)
    meta = {"step": 2, "best_val_loss": 2.25, "rng_state": rng.bit_generator.state,
            "tokenizer": {"kind": "char", "chars": "abc"}}
    save_checkpoint(tmp_path / "ckpt.safetensors", model, optimizer, meta=meta)

    other, other_optimizer = trained_pair(seed=1, steps=1)
    loaded = load_checkpoint(tmp_path / "ckpt.safetensors", other, other_optimizer)
    assert loaded == {**meta, "config": model.config.to_dict()}
    assert_same_arrays(other.state_dict(), model.state_dict())
    ours, theirs = other_optimizer.state_dict(), optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert set(ours["state"]) == set(theirs["state"])
    for i, state in theirs["state"].items():
        assert ours["state"][i]["step"] == state["step"]
        assert_same_arrays({k: v for k, v in ours["state"][i].items() if k != "step"},
                           {k: v for k, v in state.items() if k != "step"})
    restored = np.random.default_rng(0)
    restored.bit_generator.state = loaded["rng_state"]
    np.testing.assert_array_equal(restored.standard_normal(4), rng.standard_normal(4))


def test_load_model_builds_the_saved_model_reading_the_file_once(tmp_path, monkeypatch):
    model = tiny_model(seed=4, n_layer=2, n_embd=8, tie_embeddings=False)
    save_checkpoint(tmp_path / "ckpt.safetensors", model, meta={"step": 3})
    reads = []
    real = checkpoint.load_safetensors
    monkeypatch.setattr(checkpoint, "load_safetensors", lambda path, **kw: reads.append(path) or real(path, **kw))
    loaded, meta = checkpoint.load_model(tmp_path / "ckpt.safetensors")
    assert len(reads) == 1
    assert meta == {"step": 3, "config": model.config.to_dict()}
    assert loaded.config == model.config
    assert_same_arrays(loaded.state_dict(), model.state_dict())


def test_tied_weights_are_stored_once_under_wte(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "ckpt.safetensors", model)
    arrays = safetensors_numpy.load_file(tmp_path / "ckpt.safetensors")
    assert "transformer.wte.weight" in arrays and "lm_head.weight" not in arrays
    assert not any(name.startswith("optimizer.") for name in arrays)

    untied = tiny_model(tie_embeddings=False)
    save_checkpoint(tmp_path / "untied.safetensors", untied)
    assert "lm_head.weight" in safetensors_numpy.load_file(tmp_path / "untied.safetensors")
    fresh = tiny_model(seed=3, tie_embeddings=False)
    load_checkpoint(tmp_path / "untied.safetensors", fresh)
    assert_same_arrays(fresh.state_dict(), untied.state_dict())


def test_config_mismatch_names_the_fields_and_changes_nothing(tmp_path):
    save_checkpoint(tmp_path / "ckpt.safetensors", tiny_model(n_layer=2, n_embd=8))
    other = tiny_model(seed=5, n_layer=1, n_embd=12)
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"n_embd: checkpoint 8, model 12.*n_layer: checkpoint 2, model 1"):
        load_checkpoint(tmp_path / "ckpt.safetensors", other)
    assert_same_arrays(other.state_dict(), before)


def test_missing_and_misshaped_weights_are_named(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "ckpt.safetensors", model)
    arrays, metadata = load_safetensors(tmp_path / "ckpt.safetensors")
    del arrays["transformer.h.1.mlp.c_fc.bias"]
    arrays["transformer.ln_f.weight"] = np.ones(3, np.float32)
    save_safetensors(tmp_path / "broken.safetensors", arrays, metadata)
    other = tiny_model(seed=2)
    before = other.state_dict()
    with pytest.raises(ValueError) as error:
        load_checkpoint(tmp_path / "broken.safetensors", other)
    message = str(error.value)
    assert "broken.safetensors" in message and "missing keys" in message and "transformer.h.1.mlp.c_fc.bias" in message
    assert "transformer.ln_f.weight: checkpoint (3,), config (8,)" in message
    assert_same_arrays(other.state_dict(), before)


def test_optimizer_mismatch_raises_before_the_model_changes(tmp_path):
    model, optimizer = trained_pair()
    save_checkpoint(tmp_path / "ckpt.safetensors", model, optimizer)
    other = tiny_model(seed=7)
    before = other.state_dict()
    one_group = AdamW(other.parameters(), lr=1e-3)  # saved with two groups (decay / no decay)
    with pytest.raises(ValueError, match="optimizer state does not fit"):
        load_checkpoint(tmp_path / "ckpt.safetensors", other, one_group)
    assert_same_arrays(other.state_dict(), before)


def test_optimizer_state_required_when_asked_for(tmp_path):
    model, optimizer = trained_pair()
    save_checkpoint(tmp_path / "ckpt.safetensors", model)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(tmp_path / "ckpt.safetensors", tiny_model(seed=4), optimizer)


def test_plain_safetensors_file_is_not_a_checkpoint(tmp_path):
    save_safetensors(tmp_path / "plain.safetensors", {"a": np.zeros(2)})
    with pytest.raises(ValueError, match="not a tinygrad_llm checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors", tiny_model())


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model, optimizer = trained_pair()
    save_checkpoint(tmp_path / "ckpt.safetensors", model, optimizer, meta={"step": 3})

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")
    for name in ("load", "loads", "Unpickler", "dump", "dumps", "Pickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(np, "load", forbidden)
    save_checkpoint(tmp_path / "ckpt.safetensors", model, optimizer, meta={"step": 3})
    assert load_checkpoint(tmp_path / "ckpt.safetensors", tiny_model(seed=9), optimizer)["step"] == 3
    source = open(checkpoint.__file__).read()
    assert "import pickle" not in source and "allow_pickle" not in source


def test_corrupt_metadata_is_named(tmp_path):
    save_checkpoint(tmp_path / "ckpt.safetensors", tiny_model())
    arrays, metadata = load_safetensors(tmp_path / "ckpt.safetensors")
    save_safetensors(tmp_path / "bad.safetensors", arrays, {**metadata, "config": "{oops"})
    with pytest.raises(ValueError, match="metadata 'config' is not JSON"):
        load_checkpoint(tmp_path / "bad.safetensors")


# ---- temporary files left by a process killed during a save ---------------------------------------

def _dead_pid():
    """The pid of a process that has exited (and been reaped), as a killed writer's would be."""
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _leftovers(folder, name, pid):
    """Temporary files as atomic_write names them, and look-alikes that are not ours to remove."""
    stale = [f".{name}.{pid}.abc_1234.tmp", f".{name}.k3jd9x0q.tmp"]   # the second: the earlier naming
    alive = [f".{name}.{os.getppid()}.zzzzzzzz.tmp"]                     # a live writer's (the test's parent)
    others = [f".{name}.notes.tmp", f"{name}.{pid}.abc_1234.tmp", f".{name}.{pid}.abc_1234.tmp.bak",
              f".other.safetensors.{pid}.abc_1234.tmp", f".{name}.{pid}.ABC_1234.tmp", f".{name}.{pid}.abc1234.tmp",
              "notes.txt"]
    for entry in stale + alive + others:
        (folder / entry).write_bytes(b"x" * 100)
    return stale, alive + others


def test_stale_temporaries_are_removed_at_the_next_save(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    stale, kept = _leftovers(tmp_path, path.name, _dead_pid())
    model, optimizer = trained_pair()
    save_checkpoint(path, model, optimizer, meta={"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [path.name])


def test_stale_temporaries_are_removed_at_the_next_load(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, tiny_model())
    stale, kept = _leftovers(tmp_path, path.name, _dead_pid())
    load_checkpoint(path, tiny_model())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [path.name])


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    """A real kill: a child process is killed (SIGKILL) inside its write, after the temporary file exists."""
    import signal
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    code = ("import os, signal, sys\nfrom tinygrad_llm.fileio import atomic_write\n"
            "def write(f):\n    f.write(b'partial')\n    f.flush()\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "atomic_write(sys.argv[1], write)\n")
    target = tmp_path / "loss.png"
    result = subprocess.run([sys.executable, "-c", code, str(target)], cwd=root, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".loss.png.") and left[0].endswith(".tmp")
    fileio.atomic_write(target, b"png")
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]


def test_a_write_in_flight_in_this_process_is_not_removed(tmp_path):
    """A temporary file of this process (same pid) that a write still has open is left alone."""
    path = tmp_path / "a.bin"
    seen = []

    def write(f):
        f.write(b"first")
        seen.extend(p.name for p in tmp_path.iterdir())
        fileio.atomic_write(path.with_name("b.bin"), b"other target")   # a nested write of another file
        assert fileio.remove_stale_temporaries(path) == []                 # ours, in flight: kept
        f.write(b" done")

    fileio.atomic_write(path, write)
    assert len(seen) == 1 and path.read_bytes() == b"first done"


# ---- corrupt metadata: always a ValueError naming the field, and checked before anything is built ------

def _rewrite(tmp_path, name="bad.safetensors", arrays_edit=None, **fields):
    """A copy of a good checkpoint (tiny model + AdamW) with metadata fields replaced by raw strings."""
    model, optimizer = trained_pair()
    good = tmp_path / "good.safetensors"
    rng = np.random.default_rng(3)
    save_checkpoint(good, model, optimizer, meta={"step": 2, "best_val_loss": 2.5, "rng_state": rng.bit_generator.state})
    arrays, metadata = load_safetensors(good)
    if arrays_edit:
        arrays_edit(arrays)
    path = tmp_path / name
    save_safetensors(path, arrays, {**metadata, **fields})
    return path


DEEP = "[" * 100_000 + "]" * 100_000


def _config_json(**changes):
    return json.dumps({**tiny_model().config.to_dict(), **changes})


@pytest.mark.parametrize("field, value, message", [
    ("version", "one", "'version' must be a whole number"),
    ("version", "1.5", "'version' must be a whole number"),
    ("config", "[]", "'config' must be a JSON object"),
    ("config", DEEP, "'config' is JSON nested too deeply"),
    ("config", '"gpt"', "'config' must be a JSON object"),
    ("config", _config_json(n_embd="8"), "config field 'n_embd' must be int"),
    ("config", _config_json(n_embd=True), "config field 'n_embd' must be int"),
    ("config", _config_json(n_embd=8.0), "config field 'n_embd' must be int"),
    ("config", _config_json(dropout="high"), "config field 'dropout' must be number"),
    ("config", _config_json(bias=1), "config field 'bias' must be bool"),
    ("config", _config_json(norm=["layernorm"]), "config field 'norm' must be str"),
    ("config", _config_json(dropout=2.0), "config is invalid: GPTConfig.dropout"),
    ("config", _config_json(n_head=3), "config is invalid: GPTConfig: n_embd=8 is not divisible by n_head=3"),
    ("config", _config_json(colour="red"), r"unknown field\(s\) \['colour'\]"),
    ("config", json.dumps({"vocab_size": 11}), r"config lacks field\(s\) \['block_size'"),
    ("step", "-1", "'step' must be a non-negative integer"),
    ("step", '"3"', "'step' must be a non-negative integer"),
    ("step", "2.5", "'step' must be a non-negative integer"),
    ("step", "true", "'step' must be a non-negative integer"),
    ("step", DEEP, "'step' is JSON nested too deeply"),
    ("best_val_loss", '"low"', "'best_val_loss' must be a number"),
    ("rng_state", "{}", "'rng_state' is not a NumPy bit generator state"),
    ("rng_state", '"PCG64"', "'rng_state' is not a NumPy bit generator state"),
    ("rng_state", '{"bit_generator": "Generator"}', "'rng_state' is not a NumPy bit generator state"),
    ("rng_state", '{"bit_generator": "__class__"}', "'rng_state' is not a NumPy bit generator state"),
    ("rng_state", '{"bit_generator": "PCG64", "state": {"state": "x", "inc": 1}, "has_uint32": 0, "uinteger": 0}',
     "'rng_state' is not a valid PCG64 state"),
    ("rng_state", '{"bit_generator": "PCG64", "state": {"state": 1}, "has_uint32": 0, "uinteger": 0}',
     "'rng_state' is not a valid PCG64 state"),
    ("optimizer", "{oops", "metadata 'optimizer' is not JSON"),
    ("optimizer", DEEP, "'optimizer' is JSON nested too deeply"),
    ("optimizer", '{"__array__": 5}', "optimizer state at optimizer is malformed"),
    ("optimizer", '{"__items__": [[[1], 2]]}', "optimizer state at optimizer is malformed"),
    ("optimizer", '{"__dict__": {"state": {"__weird__": 1}}}', r"optimizer state at optimizer.state is malformed"),
    ("optimizer", "[" * 40 + "]" * 40, "nested deeper than 32"),
])
def test_corrupt_metadata_field_is_a_value_error_naming_it(tmp_path, field, value, message):
    path = _rewrite(tmp_path, **{field: value})
    model, optimizer = trained_pair(seed=1)
    before = model.state_dict()
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path, model, optimizer)
    assert_same_arrays(model.state_dict(), before)
    with pytest.raises(ValueError, match=message):
        checkpoint.load_model(path)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["param_groups"][0].__setitem__("lr", "fast"), "group 0 field 'lr' is fast"),
    (lambda s: s["param_groups"][0].__setitem__("betas", [0.9]), "group 0 field 'betas'"),
    (lambda s: s["param_groups"][0].pop("eps"), "group 0 has keys"),
    (lambda s: s["param_groups"].pop(), "1 parameter group"),
    (lambda s: s["state"][0].__setitem__("step", -4), "state 0 'step' must be a non-negative integer"),
    (lambda s: s["state"][0].__setitem__("step", "many"), "state 0 'step' must be a non-negative integer"),
    (lambda s: s["state"].__setitem__("x", {}), "state entry 'x' is malformed"),
    (lambda s: s.pop("param_groups"), "not a dict of 'state' and 'param_groups'"),
])
def test_corrupt_optimizer_state_is_a_value_error(tmp_path, edit, message):
    model, optimizer = trained_pair()
    state = optimizer.state_dict()
    edit(state)
    arrays = checkpoint._model_arrays(model)
    metadata = {"format": checkpoint.FORMAT, "version": "1", "config": json.dumps(model.config.to_dict()),
                "optimizer": json.dumps(checkpoint._flatten(state, "optimizer", arrays))}
    save_safetensors(tmp_path / "bad.safetensors", arrays, metadata)
    other_model, other_optimizer = trained_pair(seed=1)
    before = other_optimizer.state_dict()
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path / "bad.safetensors", other_model, other_optimizer)
    assert before["param_groups"] == other_optimizer.state_dict()["param_groups"]


def test_corrupt_header_shape_types_are_value_errors(tmp_path):
    for entry in ('{"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}',
                  '{"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}',
                  '{"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}'):
        header = ('{"w": ' + entry + "}").encode()
        path = tmp_path / "bad.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
        with pytest.raises(ValueError, match="needs dtype, shape and data_offsets"):
            load_safetensors(path)


@pytest.mark.parametrize("changes, message", [
    (dict(n_embd=100_000, n_head=2, n_layer=10_000), "needs 120004 weights; the file holds 28$"),
    (dict(n_embd=4096, n_head=32, n_layer=2), r"transformer.wte.weight: checkpoint \(11, 8\), config \(11, 4096\)"),
    (dict(block_size=10**9), r"transformer.wpe.weight: checkpoint \(8, 8\), config \(1000000000, 8\)"),
    (dict(n_layer=3), r"missing keys \['transformer.h.2.ln_1.weight'"),
    (dict(vocab_size=10**9), r"transformer.wte.weight: checkpoint \(11, 8\), config \(1000000000, 8\)"),
    (dict(mlp="swiglu", mlp_hidden=None), r"missing keys \['transformer.h.0.mlp.c_fc2.weight'"),
])
def test_config_claiming_a_huge_model_fails_fast_without_allocating(tmp_path, changes, message):
    """A small file whose config claims a huge model is refused from the header: no model is built."""
    import time
    import tracemalloc
    config = {**tiny_model().config.to_dict(), **changes}
    if config["mlp_hidden"] is None or "n_embd" in changes:
        config["mlp_hidden"] = None
    path = _rewrite(tmp_path, config=json.dumps(config))
    assert path.stat().st_size < 40_000
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError, match=message):
            checkpoint.load_model(path)
        with pytest.raises(ValueError, match=message):
            load_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5 and peak < 20_000_000


@pytest.mark.parametrize("switches", [dict(), dict(bias=False), dict(norm="rmsnorm", mlp="swiglu", position="rope"),
                                      dict(tie_embeddings=False, mlp_hidden=20), dict(norm="rmsnorm", bias=False)])
def test_expected_shapes_are_those_of_the_model_saved(tmp_path, switches):
    """The header check's shapes, worked out from the config alone, are the saved model's (every switch)."""
    model = tiny_model(**switches)
    save_checkpoint(tmp_path / "m.safetensors", model)
    stored = {name: tuple(a.shape) for name, a in load_safetensors(tmp_path / "m.safetensors")[0].items()}
    assert checkpoint._expected_shapes(model.config) == stored
    loaded, _ = checkpoint.load_model(tmp_path / "m.safetensors")
    assert_same_arrays(loaded.state_dict(), model.state_dict())


@pytest.mark.parametrize("settings", [{}, {"n_kv_head": 1}, {"mlp_hidden": 12},
                                      {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "bias": False,
                                       "tie_embeddings": False}])
def test_header_check_knows_every_config_field_and_the_shapes_the_model_saves(settings):
    """The metadata check lists GPTConfig's fields and predicts the saved shapes without building a model: both
    must follow the model when it gains a setting (grouped-query attention once made its checks refuse good files)."""
    from dataclasses import fields
    from tinygrad_llm.checkpoint import _CONFIG_TYPES, _expected_shapes, _model_arrays
    assert set(_CONFIG_TYPES) == {f.name for f in fields(GPTConfig)}
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, **settings)
    saved = {name: tuple(a.shape) for name, a in _model_arrays(GPT(config, rng=np.random.default_rng(0))).items()}
    assert saved == _expected_shapes(config)
