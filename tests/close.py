"""Equivalence as this project states it: the largest difference relative to the largest
value of the reference (DESIGN.md: float32 relative error under 1e-5)."""

import torch


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float, msg: str = "") -> None:
    """``torch.testing.assert_close`` with max |actual - expected| <= rel * max |expected|."""
    expected = expected.detach().to(actual.dtype).cpu()
    atol = rel * float(expected.abs().max())
    torch.testing.assert_close(actual.detach().cpu(), expected, rtol=0.0, atol=atol, msg=msg or None)
