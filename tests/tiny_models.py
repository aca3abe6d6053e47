"""Tiny random-weight models saved to disk for the generate CLI and server tests: a Hugging Face GPT-2
folder made by transformers (with a byte-level BPE tokenizer trained by the tokenizers library) and this
project's own training checkpoint."""
import json

import numpy as np

TEXT = ("The quick brown fox jumps over the lazy dog. Où est la gare? Ünïcödé text, 日本語のテキスト, emoji 😀🎉 "
        "and runs   of    spaces.\n") * 20
HF_CONTEXT = 64


def make_hf_gpt2(folder, seed=0):
    """A 2-layer GPT-2 with a 320-token byte-level BPE vocabulary (<|endoftext|> is id 0, as the tokenizers
    library places special tokens first), weights scaled up so that greedy decoding has clear winners.
    Returns (transformers model, tokenizers.Tokenizer)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([TEXT], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(folder))                                   # vocab.json, merges.txt
    eos = tokenizer.token_to_id("<|endoftext|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "add_prefix_space": False, "model_max_length": HF_CONTEXT}))
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=HF_CONTEXT, n_embd=32, n_layer=2,
                        n_head=2, bos_token_id=eos, eos_token_id=eos)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(10)
    model.save_pretrained(folder, safe_serialization=True)
    return model, tokenizer


def hf_greedy(model, tokenizer, prompt, max_new_tokens):
    """transformers' greedy continuation of `prompt` as text: it stops at the end-of-text token, which is
    not part of the text."""
    import torch
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=model.config.eos_token_id)
    new = [i for i in out[0, ids.shape[1]:].tolist() if i != model.config.eos_token_id]
    return tokenizer.decode(new, skip_special_tokens=False)


def make_checkpoint(path, kind="bpe", block_size=32, seed=0):
    """This project's checkpoint of a 2-layer GPT with a BPE (byte-level, with <|endoftext|>) or character
    tokenizer trained on TEXT. Returns (model, tokenizer)."""
    from tinygrad_llm.checkpoint import save_checkpoint
    from tinygrad_llm.model import GPT, GPTConfig
    from tinygrad_llm.tokenizer import BPETokenizer, CharTokenizer

    tokenizer = (BPETokenizer.train(TEXT, 300, special_tokens=["<|endoftext|>"]) if kind == "bpe"
                 else CharTokenizer.from_text(TEXT))
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32),
                rng=np.random.default_rng(seed))
    for p in model.parameters():
        if p.ndim == 2:
            p.data *= 10
    save_checkpoint(path, model, meta={"tokenizer": tokenizer.to_dict()})
    return model, tokenizer
