"""Mixed precision's core: the settings (:class:`Numerics`), autocast on every device type
of a placement, and the LRN computing in float32 under bfloat16/float16."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alexnet2gpu.errors import ConfigError
from alexnet2gpu.models.layers import local_response_norm
from alexnet2gpu.parallel import FP32, Numerics
from alexnet2gpu.parallel.names import PRECISIONS

LRN_ARGS = (5, 1e-4, 0.75, 2.0)  # [paper] section 3.3


def test_the_names_and_the_default():
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    assert FP32.dtype == torch.float32 and not FP32.mixed and not FP32.scaled
    assert Numerics("bf16").dtype == torch.bfloat16 and not Numerics("bf16").scaled
    assert Numerics("fp16").scaled
    with pytest.raises(ConfigError, match="choose fp32, bf16, fp16"):
        Numerics("fp8")


def test_autocast_casts_on_every_device_type_named_and_fp32_casts_nothing():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with Numerics("bf16").autocast(["cpu", torch.device("cpu")]):
        assert conv(x).dtype == torch.bfloat16
    with FP32.autocast("cpu"):
        assert conv(x).dtype == torch.float32


def test_the_record_names_every_setting():
    record = Numerics("bf16", channels_last=True).record()
    assert record["precision"] == "bf16" and record["memory_format"] == "channels_last"
    assert {"cudnn_benchmark", "tf32_matmul", "tf32_cudnn", "float32_matmul_precision"} <= set(record)


def test_the_grad_scaler_is_on_for_fp16_only():
    assert Numerics("fp16").grad_scaler("cpu").is_enabled()
    assert not Numerics("bf16").grad_scaler("cpu").is_enabled()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compiled", [False, True])
def test_lrn_in_low_precision_computes_in_float32_and_returns_the_input_dtype(dtype, compiled):
    """Forward and backward against nn.LocalResponseNorm run in float32 on the same
    (rounded) input: the only difference left is the final rounding to ``dtype``."""
    torch.manual_seed(0)
    x = (torch.randn(2, 12, 6, 6) * 4).to(dtype).requires_grad_()
    dy = torch.randn(2, 12, 6, 6).to(dtype)
    fn = local_response_norm
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(local_response_norm, backend="eager", fullgraph=True)
    y = fn(x, *LRN_ARGS)
    y.backward(dy)
    x32 = x.detach().float().requires_grad_()
    y32 = nn.LocalResponseNorm(*LRN_ARGS)(x32)
    y32.backward(dy.float())
    assert y.dtype == dtype and x.grad.dtype == dtype
    eps = torch.finfo(dtype).eps  # one rounding of a float32 result to dtype
    torch.testing.assert_close(y.float(), y32, rtol=eps, atol=eps * y32.abs().max().item())
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=eps, atol=eps * x32.grad.abs().max().item())


def test_lrn_in_low_precision_saves_only_its_input():
    """The float32 scale is recomputed in the backward, not kept: under autocast the LRN
    saves one bfloat16 tensor, half what float32's x alone would take."""
    saved: list[torch.Tensor] = []
    x = torch.randn(2, 8, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        local_response_norm(x, *LRN_ARGS)
    assert [t.dtype for t in saved] == [torch.bfloat16]


def test_lrn_under_autocast_on_a_conv_output():
    conv = nn.Conv2d(3, 8, 3)
    with Numerics("bf16").autocast("cpu"):
        out = local_response_norm(torch.relu(conv(torch.randn(2, 3, 9, 9))), *LRN_ARGS)
    assert out.dtype == torch.bfloat16


def test_lrn_in_low_precision_is_the_same_across_its_chunks():
    """35 images run as chunks of 16, 16 and 3: the same as each image alone."""
    from alexnet2gpu.models.layers import LOW_PRECISION_CHUNK

    torch.manual_seed(1)
    x = (torch.randn(2 * LOW_PRECISION_CHUNK + 3, 8, 4, 4) * 4).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(x.shape).to(torch.bfloat16)
    local_response_norm(x, *LRN_ARGS).backward(dy)
    for i in (0, LOW_PRECISION_CHUNK, x.shape[0] - 1):
        one = x[i : i + 1].detach().clone().requires_grad_()
        y = local_response_norm(one, *LRN_ARGS)
        y.backward(dy[i : i + 1])
        torch.testing.assert_close(one.grad, x.grad[i : i + 1], rtol=0, atol=0)


def test_the_run_summary_names_fp16_overflows_apart_from_faults():
    from alexnet2gpu.report.training import summary_lines
    from alexnet2gpu.train.records import TrainResult

    result = TrainResult("towers", "cpu", 10, 1.0, 0.5, 0.8, 0.7, 100.0, 1.0, skipped_steps=1, overflow_steps=3)
    lines = summary_lines(result)
    assert "1 step(s) skipped for non-finite values" in lines
    assert any(line.startswith("3 step(s) skipped by fp16's loss scaler") for line in lines)
    assert not any("loss scaler" in line for line in summary_lines(TrainResult("towers", "cpu", 1, 1, 0, 0, 0, 1, 1)))
