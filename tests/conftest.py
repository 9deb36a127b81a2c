"""Shared test settings: a tiny dual net runs in milliseconds on the CPU."""

import pytest
import torch

from alexnet2gpu import build_model

from .tiny import TINY


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_dual():
    return build_model("dual", **TINY)
