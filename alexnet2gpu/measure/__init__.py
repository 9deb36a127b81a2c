"""Measurements that return plain records (rendering is :mod:`alexnet2gpu.report`'s job).

* :mod:`.timing`: the clock (every device synchronised, warm-up excluded, median and
  spread) and what the figures were measured on;
* :mod:`.workload`: the synthetic batch, the optimizer and the training step that
  ``bench`` and ``memory`` run, and ``torch.compile`` of a placed net;
* :mod:`.bench`: images/s over batch sizes, and the harness against a plain loop;
* :mod:`.accounting`, :mod:`.estimate`, :mod:`.memory`: memory per device, its records,
  the estimator (no GPU needed) and the CUDA measurement;
* :mod:`.oom`: a CUDA out-of-memory error as one line with the largest batch that fits;
* :mod:`.workers`: the two-workers comparison (one device, towers, data parallel, hybrid);
* :mod:`.fit`, :mod:`.cards`: the largest batch that fits each card;
* :mod:`.compare`: the side-by-side comparison.

A new measurement: a module here that returns a dataclass with ``to_json``, a renderer
in :mod:`alexnet2gpu.report`, and a command in :mod:`alexnet2gpu.cli`.
"""
