"""Fidelity of a quantized student to its full-precision teacher, judged by sampling.

``python -m megatron_qvgen.evaluate`` is the command; this package holds its parts, one idea a file:
``students`` (which models to compare, loaded at TP = 1 from any checkpoint layout), ``inputs`` (the
noise and text both see), ``sampler`` (the model family's own sampler), ``metrics`` (what is measured),
``compare`` (the lock-step sampling of teacher and student), ``report`` (console table, JSON, PNG grid)
and ``study`` (a training run recorded for the fidelity study in benchmarks/fidelity/).
"""
from megatron_qvgen.fidelity.errors import EvaluationError

__all__ = ["EvaluationError"]
