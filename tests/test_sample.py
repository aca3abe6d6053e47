"""Sampling: KV cache == full recompute, greedy == argmax decoding, the filters, stop tokens."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.sample import filter_logits, generate, sample_next, softmax
from tinygrad_llm.tensor import no_grad

TINY = dict(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16, dtype="float64")
MODERN = dict(norm="rmsnorm", mlp="swiglu", position="rope")


def make(**overrides):
    model = GPT(GPTConfig(**{**TINY, **overrides}), rng=np.random.default_rng(0))
    # larger weights than GPT-2's init, so greedy decoding does not just repeat one token
    for p in model.parameters():
        if p.ndim == 2:
            p.data *= 20
    return model


@pytest.mark.parametrize("switches", [{}, MODERN], ids=["learned", "rope"])
def test_kv_cache_logits_equal_full_recompute(switches):
    model = make(**switches)
    idx = np.random.default_rng(1).integers(0, 13, (2, 8))
    full, _ = model(idx)
    cache = model.new_kv_cache(2)
    pieces = [model(idx[:, :3], kv_cache=cache)[0]]           # prompt of 3
    for t in range(3, 6):                                     # then one token at a time
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache)[0])
    pieces.append(model(idx[:, 6:8], kv_cache=cache)[0])      # then a chunk of 2
    assert cache.length == 8
    cached = np.concatenate([p.numpy() for p in pieces], axis=1)
    np.testing.assert_allclose(cached, full.numpy(), rtol=1e-12, atol=1e-12)
    assert not any(p.requires_grad for p in pieces)           # the cached path builds no graph
    with pytest.raises(ValueError, match="after 8 cached positions exceeds block_size 8"):
        model(idx[:, :1], kv_cache=cache)


def argmax_decode(model, idx, n):
    """Reference greedy decoding: a full forward over the last block_size tokens for every new token."""
    out = np.asarray(idx)
    with no_grad():
        for _ in range(n):
            logits, _ = model(out[:, -model.config.block_size:])
            out = np.concatenate([out, logits.numpy()[:, -1].argmax(-1)[:, None]], axis=1)
    return out


@pytest.mark.parametrize("switches", [{}, MODERN], ids=["learned", "rope"])
def test_greedy_is_deterministic_and_equals_argmax_decoding(switches):
    model = make(**switches)
    prompt = np.array([[1, 5, 2], [7, 7, 0]])
    expected = argmax_decode(model, prompt, 10)               # runs past block_size 8: the crop path too
    a = generate(model, prompt, 10, temperature=0)
    b = generate(model, prompt, 10, top_k=1, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(b, expected)
    assert len(set(expected[0, 3:].tolist())) > 1             # not a trivial constant sequence
    single = generate(model, prompt[0], 4, temperature=0)
    np.testing.assert_array_equal(single, expected[0, :7])


def test_sampling_is_reproducible_with_a_seed_and_needs_an_rng():
    model = make()
    a = generate(model, [[1, 2]], 12, temperature=1.0, top_p=0.9, rng=np.random.default_rng(5))
    b = generate(model, [[1, 2]], 12, temperature=1.0, top_p=0.9, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 14)
    with pytest.raises(ValueError, match="rng"):
        generate(model, [[1, 2]], 3)


def test_stop_tokens_end_generation_and_are_kept():
    model = make()
    prompt = np.array([[1, 5, 2], [7, 7, 0]])
    free = generate(model, prompt, 10, temperature=0)
    stop = int(free[0, 5])                                    # the third new token of row 0
    out = generate(model, prompt[:1], 10, temperature=0, stop_tokens=[stop])
    first = 3 + list(free[0, 3:]).index(stop)
    np.testing.assert_array_equal(out[0], free[0, :first + 1])
    both = generate(model, prompt, 10, temperature=0, stop_tokens=[stop])
    for row in range(2):
        gen = list(free[row, 3:])
        end = gen.index(stop) if stop in gen else None
        got = list(both[row, 3:])
        if end is None:
            assert got == gen[:len(got)]
        else:
            assert got[:end + 1] == gen[:end + 1] and set(got[end:]) == {stop}
    assert model.training                                     # mode restored


@given(st.lists(st.floats(-30, 30), min_size=1, max_size=12), st.floats(1e-6, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p_and_at_least_one(values, top_p):
    logits = np.array([values])
    kept = np.isfinite(filter_logits(logits, top_p=top_p))[0]
    probs = softmax(logits)[0]
    assert kept.sum() >= 1
    assert kept[np.argmax(probs)]
    assert probs[kept].sum() >= top_p - 1e-12 or kept.all()
    # minimal: dropping the least likely kept token would fall below p
    if kept.sum() > 1:
        assert probs[kept].sum() - probs[kept].min() < top_p + 1e-12
    # everything kept is at least as likely as everything dropped
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max()


def test_top_k_keeps_k_tokens_and_ties_at_the_boundary():
    logits = np.array([[1.0, 4.0, 3.0, 2.0, 3.0]])
    assert np.isfinite(filter_logits(logits, top_k=2)).sum() == 3      # 4, 3, 3
    assert np.isfinite(filter_logits(logits, top_k=1)).sum() == 1
    assert np.isfinite(filter_logits(logits, top_k=99)).all()


def test_temperature_applies_before_top_p():
    logits = np.array([[2.0, 0.0, -1.0]])                     # p = 0.84, 0.11, 0.04 at temperature 1
    assert np.isfinite(filter_logits(logits, temperature=1.0, top_p=0.8)).sum() == 1
    assert np.isfinite(filter_logits(logits, temperature=5.0, top_p=0.8)).sum() == 3


def test_empirical_distribution_matches_the_filtered_one():
    logits = np.log(np.array([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    # temperature 1, top_k 4 drops 0.03; top_p 0.85 then keeps 0.5 + 0.25 + 0.15 = 0.9 >= 0.85
    expected = np.array([0.5, 0.25, 0.15, 0, 0]) / 0.9
    n = 40000
    draws = sample_next(np.repeat(logits, n, axis=0), 1.0, top_k=4, top_p=0.85, rng=np.random.default_rng(0))
    freq = np.bincount(draws, minlength=5) / n
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-12), (freq, expected)


def test_bad_sampling_arguments_raise():
    logits = np.zeros((1, 4))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, top_p=0.0, rng=rng)
    with pytest.raises(ValueError, match="top_k"):
        sample_next(logits, top_k=0, rng=rng)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-1.0, rng=rng)
