"""What the CPU and GPU bf16 tests share: the short training run they compare with float32's (the loss curve of
`steps` AdamW steps, clipping at 1.0, on random windows of a token array, each step in one weight_copies
region), and one step of two equal bf16 models, with and without the producers' bf16 copies."""
import numpy as np

from tinygrad_llm import backend, precision
from tinygrad_llm.optim import AdamW, clip_grad_norm, param_groups


def training_curve(model, data, steps, B, T=64):
    opt = AdamW(param_groups(model, 0.1), lr=2e-3, betas=(0.9, 0.99))
    rng, losses = np.random.default_rng(0), []
    model.train()
    for _ in range(steps):
        starts = rng.integers(0, len(data) - T - 1, B)
        x = np.stack([data[s:s + T] for s in starts]).astype(np.int64)
        y = np.stack([data[s + 1:s + T + 1] for s in starts]).astype(np.int64)
        with precision.weight_copies():
            _, loss = model(x, y)
            loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return np.array(losses)


def with_and_without_copies(with_copies, without, x, y, monkeypatch, seed=None):
    """One forward and backward of each model (the same weights) in a weight_copies region: `with_copies` as is,
    `without` with precision.offer_copy doing nothing (every product converts its operand itself and sums its
    bias gradient). seed: dropout's generator for each run, np.random.default_rng(seed) (None: no generator).
    Returns ((loss, {name: gradient on the host}) of each, the number of copies the first one's products took, and
    of column sums (bias gradients) they took with them)."""
    taken, summed, original_take, results = [], [], precision.take_copy, []

    def counting(a, sums=False):
        got = original_take(a, sums=sums)
        taken.append((got[0] if sums else got) is not None)
        summed.append(sums and got[1] is not None)
        return got

    monkeypatch.setattr(precision, "take_copy", counting)
    for model, offer in ((with_copies, True), (without, False)):
        if not offer:
            monkeypatch.setattr(precision, "offer_copy", lambda a, copy, sums=None: None)
        with precision.weight_copies():
            _, loss = model(x, y, rng=None if seed is None else np.random.default_rng(seed))
            loss.backward()
        grads = {name: backend.to_device(p.grad, "cpu") for name, p in model.named_parameters()}
        results.append((loss.item(), grads))
        if offer:
            count, sums = sum(taken), sum(summed)
    return results, count, sums
