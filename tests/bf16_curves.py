"""The short training run that the CPU and GPU bf16 tests compare with float32's: the loss curve of `steps`
AdamW steps (clipping at 1.0) on random windows of a token array, each step in one weight_copies region."""
import numpy as np

from tinygrad_llm import precision
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
