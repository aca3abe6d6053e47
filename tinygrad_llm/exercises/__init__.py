"""Backward-pass exercises: `python -m tinygrad_llm.exercises list | start | check | hint | solution`.

The exercises are in catalog.py (one entry each: the forward written, the backward to fill, hints, a
reference) and the grading in core.py; both need hypothesis (`pip install "tinygrad_llm[testing]"`),
so this package imports neither until asked.
"""
