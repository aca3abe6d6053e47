"""tinygrad_llm: a GPT-style language model from scratch in NumPy, every backward pass written by hand."""
from .tensor import Tensor, cat, detect_anomaly, no_grad, where

__version__ = "0.1.0"
__all__ = ["Tensor", "cat", "where", "no_grad", "detect_anomaly"]
