"""The step's peak over time with temporaries (torch's MemTracker under FakeTensorMode, the
second of two steps) beside the estimate (all saved tensors, gradients and momentum at once,
no temporaries): dual/towers at 227 px over batch sizes, and the single-stream nets at batch
128 (half has the LRN, torchvision and simplified do not). Run from the repository root."""

import time

import torch

from alexnet2gpu.measure.estimate import plan_memory
from alexnet2gpu.measure.fit import tracked_peak
from alexnet2gpu.parallel import Layout, Numerics

torch.set_num_threads(1)
M = 2**20
print(f"# torch {torch.__version__}; MiB")
for precision in ("fp32", "bf16"):
    for batch in (64, 128, 195, 327):
        start = time.perf_counter()
        estimate = (
            plan_memory("dual", Layout("towers", ("cpu",)), batch, numerics=Numerics(precision)).devices[0].peak_bytes
        )
        tracked = tracked_peak("dual", "towers", precision, batch)
        print(
            f"dual/towers {precision} batch {batch}: estimate {estimate / M:,.1f}, MemTracker peak {tracked / M:,.1f}, "
            f"difference {(tracked - estimate) / M:+,.1f} ({time.perf_counter() - start:.1f} s)"
        )
# the same at batch 128 for the single-stream nets: with the LRN (half) and without (torchvision, simplified)
for model in ("half", "torchvision", "simplified"):
    for precision in ("fp32", "bf16"):
        layout = Layout("single", ("cpu",))
        estimate = plan_memory(model, layout, 128, numerics=Numerics(precision)).devices[0].peak_bytes
        tracked = tracked_peak(model, "single", precision, 128)
        print(
            f"{model}/single {precision} batch 128: estimate {estimate / M:,.1f}, MemTracker peak {tracked / M:,.1f}, "
            f"difference {(tracked - estimate) / M:+,.1f}"
        )
