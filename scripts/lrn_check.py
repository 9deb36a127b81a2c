"""The new LRN (alexnet2gpu.models.layers.LocalResponseNorm, closed-form backward) against
nn.LocalResponseNorm on CUDA: agreement (float32 and float64, forward and input gradient)
and speed of forward + backward (CUDA events, warm-up first, median of the repeats), with
the memory each keeps for the backward. Run by scripts/gpu_checks.sh:

    python scripts/lrn_check.py OUT.json

Exits 2 with one line when there is no CUDA device; 1 when the two disagree."""

from __future__ import annotations

import json
import statistics
import sys

import torch
from torch import nn

from alexnet2gpu.models.layers import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, LocalResponseNorm

# (where in the net, per-tower activation at batch 128 and 227 px): conv1's and conv2's outputs
SHAPES = {"conv1 (one tower)": (128, 48, 55, 55), "conv2 (one tower)": (128, 128, 27, 27)}
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}  # largest relative error allowed


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def agreement(layer: nn.Module, shape, dtype) -> dict:
    reference = nn.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)
    x = torch.randn(shape, device="cuda", dtype=dtype).relu_().requires_grad_()
    dy = torch.randn(shape, device="cuda", dtype=dtype)
    ours, ref = layer(x), reference(x)
    (g_ours,) = torch.autograd.grad(ours, x, dy)
    (g_ref,) = torch.autograd.grad(ref, x, dy)
    return {"forward_rel_err": _rel_err(ours, ref), "grad_rel_err": _rel_err(g_ours, g_ref)}


def speed(layer: nn.Module, shape, repeats: int = 20, warmup: int = 5) -> dict:
    """Forward + backward milliseconds (median, and half the range) and the bytes that
    autograd keeps between them (memory_allocated after the forward, less the input)."""
    x = torch.randn(shape, device="cuda").relu_().requires_grad_()
    dy = torch.randn(shape, device="cuda")
    times = []
    for i in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y = layer(x)
        y.backward(dy)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
        x.grad = None
        del y
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = layer(x)
    kept = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    del y
    return {"ms": statistics.median(times), "spread_ms": (max(times) - min(times)) / 2, "kept_bytes": kept}


def main(out: str) -> int:
    if not torch.cuda.is_available():
        print("lrn_check: no CUDA device visible to this python: nothing to check", file=sys.stderr)
        return 2
    ours = LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)
    reference = nn.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)
    compiled = torch.compile(nn.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K))
    rows, ok = [], True
    for where, shape in SHAPES.items():
        row = {"where": where, "shape": list(shape), "device": torch.cuda.get_device_name(0)}
        for dtype in (torch.float32, torch.float64):
            errors = agreement(ours, shape, dtype)
            row[str(dtype).removeprefix("torch.")] = errors
            ok &= max(errors.values()) < TOLERANCE[dtype]
        row["ours"], row["nn.LocalResponseNorm"] = speed(ours, shape), speed(reference, shape)
        row["torch.compile(nn.LocalResponseNorm)"] = speed(compiled, shape)
        row["speedup_vs_nn"] = row["nn.LocalResponseNorm"]["ms"] / row["ours"]["ms"]
        row["speedup_vs_compiled_nn"] = row["torch.compile(nn.LocalResponseNorm)"]["ms"] / row["ours"]["ms"]
        rows.append(row)
        print(
            f"{where} {list(shape)}: ours {row['ours']['ms']:.3f} ms, nn {row['nn.LocalResponseNorm']['ms']:.3f} ms "
            f"({row['speedup_vs_nn']:.2f}x), compiled nn "
            f"{row['torch.compile(nn.LocalResponseNorm)']['ms']:.3f} ms; kept for backward: ours "
            f"{row['ours']['kept_bytes'] / 2**20:.1f} MiB, nn {row['nn.LocalResponseNorm']['kept_bytes'] / 2**20:.1f} "
            f"MiB; float32 errors {row['float32']}"
        )
    with open(out, "w") as f:
        json.dump({"torch": torch.__version__, "agree": ok, "rows": rows}, f, indent=2)
    print(
        "agree" if ok else "MISMATCH",
        f"(float32 < {TOLERANCE[torch.float32]:g}, float64 < {TOLERANCE[torch.float64]:g})",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/lrn_check.py OUT.json")
    sys.exit(main(sys.argv[1]))
