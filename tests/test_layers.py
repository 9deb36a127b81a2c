"""The closed-form LRN (models.layers) against PyTorch's nn.LocalResponseNorm, the
reference: same function and gradients, fewer saved tensors, on every kind of tensor."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from alexnet2gpu.models.layers import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, LocalResponseNorm, local_response_norm

PAPER = (LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)


def _activations(shape, dtype=torch.float32, scale=30.0):
    # ReLU outputs at the scale conv1 gives on 0-255 inputs, so that the normaliser matters
    return (torch.randn(shape, dtype=dtype) * scale).relu_().requires_grad_()


@pytest.mark.parametrize("size, alpha, beta, k", [PAPER, (4, 0.1, 0.75, 2.0), (3, 0.5, 0.5, 1.0), (1, 0.2, 0.75, 1.0)])
@pytest.mark.parametrize("groups", [1, 2])
def test_gradcheck_in_float64(size, alpha, beta, k, groups):
    x = torch.rand(2, 8, 3, 3, dtype=torch.float64, requires_grad=True) * 3
    x = x.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: local_response_norm(t, size, alpha, beta, k, groups), (x,))


@pytest.mark.parametrize("size, alpha, beta, k", [PAPER, (4, 1e-3, 0.75, 2.0), (6, 1e-3, 0.75, 1.0)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_matches_nn_local_response_norm_in_float32(size, alpha, beta, k, memory_format):
    x = _activations((4, 48, 13, 13)).detach().to(memory_format=memory_format).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(4, 48, 13, 13)
    y = LocalResponseNorm(size, alpha, beta, k)(x)
    y_ref = nn.LocalResponseNorm(size, alpha, beta, k)(x_ref)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6 * y_ref.abs().max().item())
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6 * x_ref.grad.abs().max().item())


def test_groups_normalise_within_each_group_only():
    x = _activations((2, 96, 5, 5))
    halves = [nn.LocalResponseNorm(*PAPER)(h) for h in x.detach().chunk(2, dim=1)]
    torch.testing.assert_close(local_response_norm(x, *PAPER, groups=2), torch.cat(halves, dim=1))
    # and across the boundary it would differ: the check can fail
    assert not torch.allclose(local_response_norm(x, *PAPER), torch.cat(halves, dim=1))


def test_saves_only_its_input_and_scale():
    """Two activation-sized tensors, one of which (the input) the ReLU before it keeps."""

    def saved_bytes(module):
        saved = []
        x = _activations((2, 48, 27, 27))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            module(x)
        return sum(t.numel() * t.element_size() for t in saved), x.numel() * x.element_size()

    ours, one = saved_bytes(LocalResponseNorm(*PAPER))
    reference, _ = saved_bytes(nn.LocalResponseNorm(*PAPER))
    assert ours == 2 * one
    assert reference > ours


def test_runs_on_meta_and_fake_tensors():
    y = local_response_norm(torch.empty(2, 96, 27, 27, device="meta"), *PAPER, groups=2)
    assert y.shape == (2, 96, 27, 27) and y.is_meta
    with FakeTensorMode():
        x = torch.empty(2, 96, 27, 27, device="cuda:1", requires_grad=True)
        y = local_response_norm(x, *PAPER, groups=2)
        assert y.shape == x.shape and str(y.device) == "cuda:1"


def test_refuses_what_it_cannot_normalise():
    with pytest.raises(ValueError, match="do not split into 2 groups"):
        local_response_norm(torch.ones(1, 5, 2, 2), *PAPER, groups=2)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        local_response_norm(torch.ones(5, 2, 2), *PAPER)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matches_nn_local_response_norm_on_cuda():
    x = _activations((8, 96, 27, 27)).detach().cuda().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)
    LocalResponseNorm(*PAPER)(x).backward(dy)
    nn.LocalResponseNorm(*PAPER)(x_ref).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6 * x_ref.grad.abs().max().item())


def test_under_torch_compile_it_is_the_same_function():
    """Compiled, the layer uses the composite form (which inductor fuses); same values and
    gradients as the eager Function, groups included."""
    x = _activations((2, 16, 7, 7))
    x_compiled = x.detach().clone().requires_grad_()
    dy = torch.randn(2, 16, 7, 7)
    local_response_norm(x, *PAPER, groups=2).backward(dy)
    compiled = torch.compile(lambda t: local_response_norm(t, *PAPER, groups=2), backend="aot_eager", fullgraph=True)
    compiled(x_compiled).backward(dy)
    torch.testing.assert_close(x_compiled.grad, x.grad, rtol=1e-6, atol=1e-6 * x.grad.abs().max().item())
