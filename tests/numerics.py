"""Comparisons used across the suite: relative to the reference's largest magnitude."""
import torch


def max_rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / scale)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    """max|actual - expected| <= rel * max|expected|."""
    diff = max_rel_diff(actual, expected)
    if not diff <= rel:
        raise AssertionError(f"{what or 'tensor'}: max relative difference {diff:.3e} > {rel:.1e}")
