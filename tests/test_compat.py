"""Torch 2.11-2.12 lack ``dist.all_gather_single`` / ``dist.reduce_scatter_single`` (they came
with 2.13): the ``ranks`` placement then falls back to ``all_gather_into_tensor`` /
``reduce_scatter_tensor`` (issue 15). Checked here with the new names removed; the whole
suite on a real torch 2.11 is ``bash scripts/compat.sh``.

Run as ``python -m torch.distributed.run --nproc-per-node 2 -m tests.test_compat`` this
module is also the 2-process worker of :func:`test_fallback_exchange_two_gloo_ranks`."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
import torch.distributed as dist

from alexnet2gpu.parallel import ranks

NEW_NAMES = ("all_gather_single", "reduce_scatter_single")
OLD_NAMES = ("all_gather_into_tensor", "reduce_scatter_tensor")


def _fake_dist(*names: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: object() for name in names})


def test_selection_prefers_the_new_names():
    fake = _fake_dist(*NEW_NAMES, *OLD_NAMES)
    assert ranks.select_collectives(fake) == (fake.all_gather_single, fake.reduce_scatter_single)


@pytest.mark.parametrize("missing", [NEW_NAMES, NEW_NAMES[:1], NEW_NAMES[1:]], ids=["both", "gather", "scatter"])
def test_selection_falls_back_where_a_new_name_is_missing(missing):
    fake = _fake_dist(*(n for n in NEW_NAMES if n not in missing), *OLD_NAMES)
    assert ranks.select_collectives(fake) == (fake.all_gather_into_tensor, fake.reduce_scatter_tensor)


def test_selection_on_torch_distributed_without_the_new_names(monkeypatch):
    for name in NEW_NAMES:
        monkeypatch.delattr(dist, name, raising=False)  # as on torch 2.11-2.12
    assert ranks.select_collectives() == (dist.all_gather_into_tensor, dist.reduce_scatter_tensor)


def test_the_module_chose_what_this_torch_has():
    expected = NEW_NAMES if all(hasattr(dist, n) for n in NEW_NAMES) else OLD_NAMES
    assert (ranks._all_gather_single, ranks._reduce_scatter_single) == tuple(getattr(dist, n) for n in expected)


@pytest.mark.distributed
def test_fallback_exchange_two_gloo_ranks():
    """Exchanges 1-3 (:class:`ranks._GatherTowers`) through the fallback pair on two gloo
    processes: the forward gathers both towers' halves, the backward sums the gradients."""
    from .dist_launch import run_torchrun

    result = run_torchrun(2, ["-m", "tests.test_compat"], timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not result.orphans
    assert result.stdout.count("fallback exchange ok") == 2, result.stdout


def _tower_output(rank: int) -> torch.Tensor:
    """Rank ``rank``'s ``[N=3, C=2, 2]`` stage output, distinct on each rank."""
    return torch.arange(12, dtype=torch.float32).reshape(3, 2, 2) + 100 * rank


def _weights(rank: int) -> torch.Tensor:
    """What rank ``rank``'s next layer multiplies the gathered ``[3, 4, 2]`` tensor by."""
    return torch.linspace(-1, 1, 24).reshape(3, 4, 2) * (rank + 2)


def _worker() -> None:
    for name in NEW_NAMES:
        if hasattr(dist, name):
            delattr(dist, name)  # as on torch 2.11-2.12
    module = importlib.reload(ranks)  # re-runs the selection at import
    assert module._all_gather_single is dist.all_gather_into_tensor
    assert module._reduce_scatter_single is dist.reduce_scatter_tensor
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        x = _tower_output(rank).requires_grad_()
        counter = module.ExchangeCounter()
        out = module._GatherTowers.apply(x, None, counter)
        torch.testing.assert_close(out, torch.cat([_tower_output(0), _tower_output(1)], dim=1))
        (out * _weights(rank)).sum().backward()
        # Each tower's gradient: the sum over both ranks of the weights on its half (dim 1).
        expected = sum(_weights(r).chunk(2, dim=1)[rank] for r in range(2))
        torch.testing.assert_close(x.grad, expected)
        assert counter.bytes == 2 * x.numel() * x.element_size()  # forward and backward
        dist.barrier()
        print(f"rank {rank}: fallback exchange ok", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(_worker())
