"""Layers the 2012 net needs beyond ``torch.nn``: local response normalisation with a
closed-form backward, conv1's edge padding, and dropout drawn per tower.

Sources:
  [paper]  Krizhevsky, Sutskever, Hinton, NIPS 2012, section 3.3 (LRN), 4.2 (dropout).
  [cfg]    computerhistory/AlexNet-Source-Code, layers/layers-145.cfg.
  [caffe]  BVLC Caffe, src/caffe/layers/lrn_layer.cpp (``CrossChannelForward_cpu`` and
           ``CrossChannelBackward_cpu``); cuda-convnet's ``convResponseNormCrossMap`` is the
           same computation.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .sizes import conv1_out_2012

__all__ = [
    "LRN_ALPHA",
    "LRN_BETA",
    "LRN_K",
    "LRN_SIZE",
    "Conv1Padding",
    "LocalResponseNorm",
    "TowerDropout",
    "local_response_norm",
    "seed_dropout",
]

# Local response normalisation, [paper] section 3.3: k=2, n=5, alpha=1e-4, beta=0.75.
# PyTorch (like Caffe and the released code's layer.py) divides alpha by n inside the sum;
# see docs/architecture.md.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


def _window_sum(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Sum over channels ``c - before .. c + after`` (clipped at the edges) along dim -3.

    ``before + after`` shifted in-place adds: no padded copy and no pooling kernel, so this
    is one memory-bound pass per shift (``F.local_response_norm`` pads, then runs
    ``avg_pool3d`` over the squares)."""
    out = x.clone()
    channels = x.shape[-3]
    for d in range(1, min(before, channels - 1) + 1):
        out[..., d:, :, :] += x[..., : channels - d, :, :]
    for d in range(1, min(after, channels - 1) + 1):
        out[..., : channels - d, :, :] += x[..., d:, :, :]
    return out


def _pow_neg(scale: torch.Tensor, beta: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``scale ** -beta`` into ``out`` (a new tensor when None). For the paper's beta = 0.75
    it is ``rsqrt(scale * sqrt(scale))``: three cheap passes instead of ``pow``, which is
    about 5x slower than ``rsqrt`` per element on a CPU (both agree to float32 rounding)."""
    if beta != 0.75:
        return torch.pow(scale, -beta, out=out) if out is not None else scale.pow(-beta)
    out = torch.sqrt(scale, out=out) if out is not None else scale.sqrt()
    return out.mul_(scale).rsqrt_()


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _lrn_scale(x: torch.Tensor, size: int, alpha: float, k: float, groups: int, out: torch.Tensor) -> torch.Tensor:
    """``k + alpha/n * windowsum(x^2)`` within each group; ``out`` holds ``x * x`` on entry."""
    n, c = x.shape[0], x.shape[1]
    before, after = size // 2, (size - 1) // 2  # F.local_response_norm's padding
    grouped = torch.mul(x, x, out=out).view(n, groups, c // groups, *x.shape[2:])
    return _window_sum(grouped, before, after).mul_(alpha / size).add_(k).view_as(x)


# bfloat16/float16 input is normalised this many images at a time: its float32 working
# copies then take memory fixed in the batch size (about 3 x 16 x conv1's float32 output,
# 56 MiB at 227 px), not three float32 activations per image beside the saved bf16 ones.
LOW_PRECISION_CHUNK = 16


class _LRNFunction(torch.autograd.Function):
    """y = x * scale^-beta, scale = k + alpha/n * sum over the channel window of x^2.

    Backward in closed form, as [caffe]'s ``CrossChannelBackward``:
        dx = dy * scale^-beta - (2 * alpha * beta / n) * x * windowsum'(dy * y / scale)
    where windowsum' runs over the transposed window. Saves only ``x`` (which the ReLU
    before it keeps anyway) and ``scale``; ``F.local_response_norm`` keeps about four
    activation-sized tensors.

    bfloat16 or float16 input (under autocast): forward and backward compute in float32 and
    return the input's dtype (x^2 summed over 5 channels overflows float16 past 114 and
    ``scale^-0.75`` loses digits in either), :data:`LOW_PRECISION_CHUNK` images at a time;
    only ``x``, in its own dtype, is saved, and the backward recomputes ``scale`` from it,
    so no float32 tensor is kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int):
        ctx.size, ctx.alpha, ctx.beta, ctx.k, ctx.groups = size, alpha, beta, k, groups
        if x.dtype in _LOW_PRECISION:
            ctx.save_for_backward(x)
            y = torch.empty_like(x)
            for xs, ys in zip(x.split(LOW_PRECISION_CHUNK), y.split(LOW_PRECISION_CHUNK)):
                ys.copy_(_lrn_forward(xs.float(), size, alpha, beta, k, groups)[0])
            return y
        y, scale = _lrn_forward(x, size, alpha, beta, k, groups)
        ctx.save_for_backward(x, scale)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        size, alpha, beta, k, groups = ctx.size, ctx.alpha, ctx.beta, ctx.k, ctx.groups
        if len(ctx.saved_tensors) == 2:
            x, scale = ctx.saved_tensors
            return _lrn_backward(x, scale, dy, size, alpha, beta, groups), None, None, None, None, None
        (x,) = ctx.saved_tensors  # low precision: scale recomputed in float32, a chunk at a time
        dx = torch.empty_like(x)
        for xs, dys, dxs in zip(
            x.split(LOW_PRECISION_CHUNK), dy.split(LOW_PRECISION_CHUNK), dx.split(LOW_PRECISION_CHUNK)
        ):
            xf = xs.float()
            scale = _lrn_scale(xf, size, alpha, k, groups, out=torch.empty_like(xf))
            dxs.copy_(_lrn_backward(xf, scale, dys.float(), size, alpha, beta, groups))
        return dx, None, None, None, None, None


def _lrn_forward(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int):
    """(y, scale) in ``x``'s dtype."""
    squares = torch.empty_like(x)
    scale = _lrn_scale(x, size, alpha, k, groups, out=squares)
    # The squares' buffer becomes the output: every activation-sized tensor allocated
    # here costs page faults on the CPU, so the forward makes two, not four.
    return _pow_neg(scale, beta, out=squares).mul_(x), scale


def _lrn_backward(
    x: torch.Tensor, scale: torch.Tensor, dy: torch.Tensor, size: int, alpha: float, beta: float, groups: int
):
    """dx from the saved ``x`` and ``scale`` (all one dtype)."""
    scale_pow = _pow_neg(scale, beta)
    # dy * y / scale = dy * x * scale^(-beta - 1)
    ratio = (dy * x).mul_(scale_pow).div_(scale)
    n, c = x.shape[0], x.shape[1]
    before, after = size // 2, (size - 1) // 2
    summed = _window_sum(ratio.view(n, groups, c // groups, *x.shape[2:]), after, before)  # transposed window
    dx = scale_pow.mul_(dy)  # in place: three activation-sized allocations in all, not six
    return dx.addcmul_(summed.view_as(x), x, value=-2.0 * alpha * beta / size)


def local_response_norm(
    x: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, groups: int = 1
) -> torch.Tensor:
    """``F.local_response_norm(x, size, alpha, beta, k)`` for ``[N, C, H, W]`` input,
    applied within each of ``groups`` equal blocks of channels (never across them)."""
    if x.dim() != 4:
        raise ValueError(f"local_response_norm takes [N, C, H, W], got {list(x.shape)}")
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} groups")
    if torch.compiler.is_compiling():
        # Under torch.compile the composite form lets inductor fuse the whole normalisation
        # into a few loops; the hand-written Function's in-place window sum would not fuse.
        n, c, h, w = x.shape
        xf = x.float() if x.dtype in _LOW_PRECISION else x  # float32 arithmetic, as the eager path
        y = F.local_response_norm(xf.reshape(n * groups, c // groups, h, w), size, alpha, beta, k)
        return y.view_as(x).to(x.dtype)
    return _LRNFunction.apply(x, size, alpha, beta, k, groups)


class LocalResponseNorm(nn.Module):
    """``nn.LocalResponseNorm`` with the closed-form backward of :func:`local_response_norm`
    (the same function; tests check it against ``nn.LocalResponseNorm``)."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        return local_response_norm(x, self.size, self.alpha, self.beta, self.k, groups)

    def extra_repr(self) -> str:
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


def paper_lrn() -> LocalResponseNorm:
    """The LRN of [paper] section 3.3."""
    return LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)


class Conv1Padding(nn.Module):
    """Pads right and bottom so that conv1 (11x11, stride 4) covers the image the way the
    released code did: 224 -> 227 -> 55x55 [cfg]. A no-op at 227."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.pad = (conv1_out_2012(image_size) - 1) * 4 + 11 - image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, self.pad, 0, self.pad)) if self.pad else x

    def extra_repr(self) -> str:
        return f"right_bottom={self.pad}"


def _tower_seed(seed: int, tower: int, replica: int) -> int:
    """A 63-bit generator seed per (run seed, data-parallel replica, tower)."""
    digest = hashlib.sha256(f"alexnet2gpu/{seed}/{replica}/{tower}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class TowerDropout(nn.Module):
    """Dropout whose masks come from this tower's own generator, not the global RNG.

    Every placement then draws the same masks for the same run seed: whether the towers run
    one after the other, fused, on two devices or in two processes ([paper] section 4.2,
    p = 0.5 in fc6 and fc7). The generator lives on the device of the activations and is
    (re)created from ``seed`` when that device changes; :func:`seed_dropout` sets the seed.
    """

    def __init__(self, p: float, tower: int) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self.tower = tower
        self.seed = _tower_seed(0, tower, 0)
        self.generator: torch.Generator | None = None

    def reseed(self, seed: int, replica: int = 0) -> None:
        self.seed = _tower_seed(seed, self.tower, replica)
        self.generator = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        # Masks are drawn in float32 whatever the activations' dtype, so that a float64
        # reference and a float32 run draw the same masks.
        mask = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        if torch.compiler.is_compiling() or x.is_meta or torch._subclasses.fake_tensor.is_fake(x):
            # Planning without hardware: masks carry no values, so no generator is needed.
            # Under torch.compile a generator object would break the graph at every call,
            # so compiled runs draw from torch's own RNG: valid dropout, but not the same
            # masks in every placement (eager runs keep that guarantee).
            mask.bernoulli_(keep)
        else:
            if self.generator is None or self.generator.device != x.device:
                self.generator = torch.Generator(device=x.device).manual_seed(self.seed)
            mask.bernoulli_(keep, generator=self.generator)
        return x * mask.to(x.dtype) * (1.0 / keep)

    def extra_repr(self) -> str:
        return f"p={self.p}, tower={self.tower}"


def seed_dropout(model: nn.Module, seed: int, replica: int = 0) -> None:
    """Seeds every tower's dropout generator from one run seed (and the replica index
    under data parallelism, so that replicas draw different masks)."""
    for module in model.modules():
        if isinstance(module, TowerDropout):
            module.reseed(seed, replica)
