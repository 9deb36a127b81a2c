"""A step's memory over time, temporaries included: the peak that torch's ``MemTracker``
(``torch.distributed._tools.mem_tracker``) records for one training step run under
``FakeTensorMode``, shapes and dtypes without arithmetic. The estimate
(:mod:`.estimate`) counts every saved tensor, gradient and momentum buffer as if they
coexisted and leaves temporaries out (the gradients of activations while the backward
runs, a layer's working copies); this counts what is alive at each moment. CUDA's
library workspaces (cuDNN, cuBLAS) are in neither."""

from __future__ import annotations

import torch

from ..models import build_model
from ..parallel import Layout, Numerics, forward_loss, place
from .workload import make_batch, make_optimizer

__all__ = ["tracked_peak"]


def tracked_peak(model: str, layout: Layout, precision: str, batch: int, **model_kwargs) -> int:
    """The peak bytes of the second of two training steps (the momentum buffers exist) of
    ``model`` placed as ``layout`` (one device: MemTracker sums by device type, so towers
    apart on CPU stand-ins cannot be told apart)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with torch.device("meta"):
        net = build_model(model, **model_kwargs)
    numerics = Numerics(precision)
    with FakeTensorMode(allow_non_fake_inputs=True):
        placed = place(net, layout)
        x, y = make_batch(placed, batch)
        optimizer = make_optimizer(placed)
        tracker = MemTracker()
        tracker.track_external(placed, optimizer)
        with tracker:
            for step in range(2):
                optimizer.zero_grad(set_to_none=True)
                with numerics.autocast(layout.devices):
                    loss = forward_loss(placed, x, y)
                loss.backward()
                optimizer.step()
                if step == 0:
                    tracker.reset_mod_stats()
        peak = tracker.get_tracker_snapshot("peak")
    return int(sum(by_type["Total"] for by_type in peak.values()))
