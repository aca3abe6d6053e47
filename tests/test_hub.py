"""Hugging Face folders in and out (tinygrad_llm.hub), with transformers as the oracle: random-weight tiny
GPT-2 and Llama models made by transformers load here with the same logits and greedy continuations, and
models made here open in transformers with no missing or unexpected keys and the same logits."""
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from tinygrad_llm import hub
from tinygrad_llm.checkpoint import load_safetensors, save_checkpoint, save_safetensors
from tinygrad_llm.export import main as export_main
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.sample import generate
from tinygrad_llm.tokenizer import BPETokenizer, CharTokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V, T = 101, 12


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: torch's threads only contend (generate measured 10x slower on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(B=2, T=T, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                          pad_token_id=0, attention_mask=torch.ones(ids.shape, dtype=torch.long))
    return out.numpy()


def _gpt2(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**cfg, **kw})).to(dtype).eval()


def _llama(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32, rope_theta=500.0, rms_norm_eps=1e-6,
               bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **kw})).to(dtype).eval()


# ---- Hugging Face -> here ------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh", "gelu"])
def test_gpt2_folder_float64_logits_and_greedy(tmp_path, activation):
    hf = _gpt2(activation_function=activation, layer_norm_epsilon=1e-4)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path, dtype="float64")
    assert model.config.block_size == 32 and model.config.norm_eps == 1e-4 and model.config.tie_embeddings
    ids = _ids()
    assert _rel(model(ids)[0].numpy(), _hf_logits(hf, ids)) < 1e-9
    np.testing.assert_array_equal(generate(model, ids[:, :4], 8, temperature=0), _hf_greedy(hf, ids[:, :4], 8))


def test_gpt2_float32_without_prefix_with_mask_buffers_and_shards(tmp_path):
    hf = _gpt2(dtype=torch.float32, tie_word_embeddings=False)
    ids = _ids()
    want = _hf_logits(hf, ids)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert _rel(GPT.from_pretrained(tmp_path / "sharded")(ids)[0].numpy(), want) < 1e-5
    # the original OpenAI-converted layout: no "transformer." prefix, causal-mask buffers, lm_head absent
    hf.save_pretrained(tmp_path / "plain")
    arrays, _ = load_safetensors(tmp_path / "plain" / "model.safetensors")
    arrays = {k.removeprefix("transformer."): v for k, v in arrays.items()}
    for i in range(2):
        arrays[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
        arrays[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_safetensors(tmp_path / "plain" / "model.safetensors", arrays, {"format": "pt"})
    model = GPT.from_pretrained(tmp_path / "plain")
    assert not model.config.tie_embeddings and model.transformer.wte.weight.dtype == np.float32
    assert _rel(model(ids)[0].numpy(), want) < 1e-5


def test_gpt2_half_precision_weights_widen_exactly(tmp_path):
    for dtype in (torch.bfloat16, torch.float16):
        hf = _gpt2(dtype=dtype)
        hf.save_pretrained(tmp_path / str(dtype))
        model = GPT.from_pretrained(tmp_path / str(dtype))
        want = hf.transformer.h[1].mlp.c_fc.weight.float().detach().numpy()
        np.testing.assert_array_equal(model.transformer.h[1].mlp.c_fc.weight.numpy(), want)


@pytest.mark.parametrize("kw", [dict(), dict(num_key_value_heads=4, tie_word_embeddings=True),
                                dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)],
                         ids=["gqa-untied", "mha-tied", "mqa-bias"])
def test_llama_folder_logits_and_greedy(tmp_path, kw):
    hf = _llama(**kw)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path, dtype="float64")
    c = model.config
    assert (c.norm, c.mlp, c.position, c.rope_theta) == ("rmsnorm", "swiglu", "rope", 500.0)
    ids = _ids()
    # transformers computes the rotary angles in float32 even in a float64 model: 1e-9 is out of reach
    assert _rel(model(ids)[0].numpy(), _hf_logits(hf, ids)) < 1e-6
    np.testing.assert_array_equal(generate(model, ids[:, :4], 8, temperature=0), _hf_greedy(hf, ids[:, :4], 8))
    hf32 = hf.float()
    model32 = GPT.from_pretrained(tmp_path)
    assert _rel(model32(ids)[0].numpy(), _hf_logits(hf32, ids)) < 1e-5


def test_gqa_kv_cache_matches_full_forward():
    cfg = GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, norm="rmsnorm",
                    mlp="swiglu", position="rope", bias=False, dtype="float64")
    model = GPT(cfg, rng=np.random.default_rng(0))
    assert model.transformer.h[0].attn.c_attn.weight.shape == (32, 32 + 2 * 16)
    ids = _ids(T=9)
    full = model(ids)[0].numpy()
    cache = model.new_kv_cache(2)
    parts = [model(ids[:, :5], kv_cache=cache)[0].numpy()] + [model(ids[:, t:t + 1], kv_cache=cache)[0].numpy()
                                                              for t in range(5, 9)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="n_kv_head=3 must be a positive divisor of n_head=4"):
        GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=4, n_kv_head=3, n_embd=32)


def test_own_checkpoint_file_and_out_dir(tmp_path):
    from tinygrad_llm.optim import AdamW
    cfg = GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32, tie_embeddings=False)
    model = GPT(cfg, rng=np.random.default_rng(3))
    save_checkpoint(tmp_path / "ckpt.safetensors", model, AdamW(model.parameters()), meta={"step": 7})
    ids = _ids(T=8)
    want = model(ids)[0].numpy()
    for path in (tmp_path / "ckpt.safetensors", tmp_path):
        np.testing.assert_array_equal(GPT.from_pretrained(path)(ids)[0].numpy(), want)
    wide = GPT.from_pretrained(tmp_path, dtype="float64")
    assert wide.config.dtype == "float64" and _rel(wide(ids)[0].numpy(), want) < 1e-5


# ---- refusals ------------------------------------------------------------------------------------

class _Boom:
    def __reduce__(self):
        return (open, ("/nonexistent-dir/unpickled", "w"))   # unpickling this would raise FileNotFoundError


def test_refuses_pickles_without_unpickling(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_gpt2().config.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never opens.*safetensors"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type='mistral' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling=.* is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters=.* is not supported"),
    ({"attention_bias": True}, "attention_bias=True with mlp_bias=False"),
])
def test_refuses_unknown_llama_settings(tmp_path, change, message):
    hf = _llama()
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(tmp_path)


def test_refuses_unknown_activation_and_bad_tensors(tmp_path):
    _gpt2().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function='relu' is not supported"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arrays, meta = load_safetensors(tmp_path / "model.safetensors")
    good = dict(arrays)
    arrays["transformer.h.1.mlp.c_fc.weight"] = arrays["transformer.h.1.mlp.c_fc.weight"][:, :-1].copy()
    save_safetensors(tmp_path / "model.safetensors", arrays, meta)
    with pytest.raises(ValueError, match=r"'transformer.h.1.mlp.c_fc.weight' has shape \[32, 127\], expected \[32, 128\]"):
        GPT.from_pretrained(tmp_path)
    arrays = {**good, "transformer.ln_f.bias": np.zeros(32, np.int32)}
    save_safetensors(tmp_path / "model.safetensors", arrays, meta)
    with pytest.raises(ValueError, match="'transformer.ln_f.bias' has dtype I32"):
        GPT.from_pretrained(tmp_path)
    arrays = {k: v for k, v in good.items() if k != "transformer.wpe.weight"}
    save_safetensors(tmp_path / "model.safetensors", arrays, meta)
    with pytest.raises(ValueError, match="lacks tensor.*transformer.wpe.weight"):
        GPT.from_pretrained(tmp_path)


# ---- here -> Hugging Face ------------------------------------------------------------------------

def _open_in_transformers(path):
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval()


@pytest.mark.parametrize("kw", [
    dict(),
    dict(tie_embeddings=False, gelu_approximate="none", mlp_hidden=40, norm_eps=1e-3),
    dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, n_kv_head=2, tie_embeddings=False, rope_theta=100.0),
    dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=True),
], ids=["gpt2", "gpt2-untied-exact-gelu", "llama-gqa-untied", "llama-bias-tied"])
def test_save_pretrained_opens_in_transformers(tmp_path, kw):
    cfg = GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32, **kw)
    model = GPT(cfg, rng=np.random.default_rng(5))
    for p in model.parameters():   # the norms and biases, too, away from their init
        p.data[...] += np.random.default_rng(6).normal(0, 0.05, p.shape).astype(p.dtype)
    model.save_pretrained(tmp_path / "out")
    hf = _open_in_transformers(tmp_path / "out")
    assert type(hf).__name__ == ("GPT2LMHeadModel" if cfg.position == "learned" else "LlamaForCausalLM")
    ids = _ids(T=10)
    assert _rel(_hf_logits(hf, ids), model(ids)[0].numpy()) < 1e-5
    back = GPT.from_pretrained(tmp_path / "out")
    np.testing.assert_array_equal(back(ids)[0].numpy(), model(ids)[0].numpy())
    assert back.config == GPTConfig.from_dict({**cfg.to_dict(), "mlp_hidden": cfg.mlp_hidden})


@pytest.mark.parametrize("kw, setting", [
    (dict(norm="rmsnorm"), "GPTConfig.norm='rmsnorm' with position='learned'"),
    (dict(bias=False), "GPTConfig.bias=False with position='learned'"),
    (dict(position="rope"), "GPTConfig.norm='layernorm' with position='rope'"),
    (dict(position="rope", norm="rmsnorm"), "GPTConfig.mlp='gelu' with position='rope'"),
    (dict(n_kv_head=2), "GPTConfig.n_kv_head=2"),
])
def test_save_pretrained_refuses_mixes_with_no_hf_equivalent(tmp_path, kw, setting):
    model = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=4, n_embd=32, **kw))
    with pytest.raises(ValueError, match=setting.replace("(", r"\(").replace(")", r"\)") + ".*no Hugging Face equivalent"):
        model.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_pretrained_is_atomic(tmp_path, monkeypatch):
    model = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=4, n_embd=32))
    model.save_pretrained(tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(hub, "save_safetensors", fail)
    for target in ("out", "new"):
        with pytest.raises(OSError, match="disk full"):
            GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=4, n_embd=32),
                rng=np.random.default_rng(9)).save_pretrained(tmp_path / target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]          # no temporary folder left behind
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    with pytest.raises(ValueError, match="character tokenizer cannot be written"):
        model.save_pretrained(tmp_path / "char", tokenizer=CharTokenizer.from_text("abc"))
    assert not (tmp_path / "char").exists()


def test_export_cli(tmp_path, capsys):
    tok = BPETokenizer.train("hello world, hello there " * 20, 270, special_tokens=["<|endoftext|>"])
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg, rng=np.random.default_rng(1))
    save_checkpoint(tmp_path / "ckpt.safetensors", model, meta={"tokenizer": tok.to_dict()})
    export_main([str(tmp_path / "ckpt.safetensors"), str(tmp_path / "hf")])
    hf = _open_in_transformers(tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "hello there, world<|endoftext|>"
    ids = tok.encode(text, allowed_special="all")
    assert hf_tok(text)["input_ids"] == ids
    assert _rel(_hf_logits(hf, np.array([ids])), model(np.array([ids]))[0].numpy()) < 1e-5
    # a character tokenizer: the weights are exported, a note says why the tokenizer is not
    char = CharTokenizer.from_text("abc")
    save_checkpoint(tmp_path / "char.safetensors", GPT(GPTConfig(vocab_size=3, block_size=8, n_layer=1, n_head=2,
                                                                 n_embd=8)), meta={"tokenizer": char.to_dict()})
    capsys.readouterr()
    export_main([str(tmp_path / "char.safetensors"), str(tmp_path / "hf_char")])
    assert "character tokenizer cannot be written" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "hf_char").iterdir()) == ["config.json", "model.safetensors"]
    # a user's mistake: one line on stderr, a non-zero exit, nothing written
    for argv, code, start in (([str(tmp_path / "missing.safetensors"), str(tmp_path / "x")], 1, "error: no model at"),
                              ([str(tmp_path / "ckpt.safetensors")], 2, "error: the following arguments are required"),
                              ([str(tmp_path / "ckpt.safetensors"), str(tmp_path / "x"), "--dtype=float16"], 2,
                               "error: argument --dtype: invalid choice")):
        run = subprocess.run([sys.executable, "-m", "tinygrad_llm.export", *argv], capture_output=True, text=True)
        assert run.returncode == code and run.stderr.startswith(start) and run.stderr.count("\n") == 1, run.stderr
        assert run.stdout == "" and not (tmp_path / "x").exists()


def test_llama_gqa_gradients_match_transformers(tmp_path):
    """Training a loaded model: the loss and the gradients (grouped-query keys, gate, embedding) are torch's."""
    hf = _llama()
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path, dtype="float64").train()
    ids = _ids(T=9)
    logits, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    hf_loss = hf(torch.tensor(ids), labels=torch.tensor(ids)).loss
    hf_loss.backward()
    assert abs(loss.item() - hf_loss.item()) < 1e-6 * hf_loss.item()   # transformers' loss is float32
    layer, ours = hf.model.layers[1], model.transformer.h[1]
    # transformers takes the loss in float32, so its gradients carry float32 rounding: compare to 1e-5 of their scale
    pairs = [(ours.attn.c_attn.weight.grad[:, 32:48].T, layer.self_attn.k_proj.weight.grad),   # k_proj's columns
             (ours.attn.c_attn.weight.grad[:, 48:64].T, layer.self_attn.v_proj.weight.grad),
             (ours.mlp.c_fc.weight.grad.T, layer.mlp.gate_proj.weight.grad),
             (model.transformer.wte.weight.grad, hf.model.embed_tokens.weight.grad)]
    for ours_grad, hf_grad in pairs:
        want = hf_grad.numpy()
        np.testing.assert_allclose(ours_grad, want, rtol=0, atol=1e-5 * np.abs(want).max())
