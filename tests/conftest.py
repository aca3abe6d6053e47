"""Shared test settings: a bounded hypothesis profile for CI, and deterministic seeds."""
import os

import pytest
from hypothesis import HealthCheck, settings

# ci draws the same examples on every run (per hypothesis version), so a red CI is repeatable; dev explores anew
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def hf_gpt2(tmp_path_factory):
    """(folder, transformers model, tokenizers.Tokenizer): a tiny random GPT-2 saved by transformers
    (tests/tiny_models.py), made once for every test that loads one."""
    from tiny_models import make_hf_gpt2
    folder = tmp_path_factory.mktemp("hf_gpt2")
    model, tokenizer = make_hf_gpt2(folder)
    return folder, model, tokenizer
