"""The `ranks` placement: one tower per process under torchrun (gloo on the CPU), checked
against the single-process `towers` placement with the same seed, weights and batches."""

from __future__ import annotations

import pytest
import torch

from alexnet2gpu import ConfigError, build_model, place, seed_dropout
from alexnet2gpu.data.synthetic import synthetic_batch
from alexnet2gpu.models import init_xavier_
from alexnet2gpu.parallel import forward_loss

from .close import assert_close_relative
from .dist_launch import ROOT, run_torchrun

WORKER = str(ROOT / "tests" / "dist_ranks_worker.py")
TOLERANCE = 1e-5  # DESIGN.md: float32 relative error under 1e-5, loss at every step and final weights


pytestmark = pytest.mark.usefixtures("one_thread")


def _towers_reference(steps: int, batch_size: int, dropout: float, lr: float = 0.01):
    """The same run as the worker's, in one process under `towers`."""
    torch.manual_seed(0)
    model = build_model("dual", width=1 / 16, image_size=64, num_classes=10, dropout=dropout)
    init_xavier_(model)
    placed = place(model, "towers", devices="cpu")
    seed_dropout(placed, 0)
    optimizer = torch.optim.SGD(placed.parameters(), lr=lr, momentum=0.9)
    before = {k: v.detach().clone() for k, v in placed.state_dict().items()}
    losses = []
    for step in range(steps):
        x, y = synthetic_batch(0, step, batch_size, in_channels=3, image_size=64, num_classes=10)
        loss = forward_loss(placed, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, before, placed.state_dict()


def _run_worker(tmp_path, nproc: int, *args: str) -> dict:
    out = tmp_path / "ranks.pt"
    result = run_torchrun(nproc, [WORKER, "--out", str(out), *args], timeout=150)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not result.orphans
    return torch.load(out, weights_only=True)


def _check_against_towers(got: dict, steps: int, batch_size: int, dropout: float) -> None:
    losses, before, after = _towers_reference(steps, batch_size, dropout)
    assert len(got["losses"]) == steps
    for step, (a, b) in enumerate(zip(got["losses"], losses)):
        assert abs(a - b) / abs(b) < TOLERANCE, f"step {step}: ranks {a} vs towers {b}"
    assert list(got["after"]) == list(after)  # the same keys, in the same order
    for name in after:
        assert torch.equal(got["before"][name], before[name]), name
        assert_close_relative(got["after"][name], after[name], TOLERANCE, msg=name)
        # The update itself, a much stricter check: a doubled or missing gradient would be
        # off by 100 %, float summation order accounts for ~1e-5.
        assert_close_relative(got["after"][name] - got["before"][name], after[name] - before[name], 1e-3, msg=name)
        assert not torch.equal(got["after"][name], got["before"][name]), f"{name} was not updated"


@pytest.mark.distributed
def test_two_ranks_match_towers_with_dropout(tmp_path):
    got = _run_worker(tmp_path, 2, "--steps", "3", "--batch-size", "4", "--dropout", "0.5")
    assert got["world_size"] == 2
    _check_against_towers(got, steps=3, batch_size=4, dropout=0.5)


@pytest.mark.distributed
def test_two_replicas_of_two_towers_match_one_process(tmp_path):
    got = _run_worker(tmp_path, 4, "--steps", "3", "--batch-size", "8", "--dropout", "0")
    assert got["world_size"] == 4
    _check_against_towers(got, steps=3, batch_size=8, dropout=0.0)


@pytest.mark.distributed
def test_exchange_bytes_match_the_design_table(tmp_path):
    # DESIGN.md section 3: 113,152 bytes each way + 8,192 forward, the same backward, per
    # image, width 1, 227 input, float32.
    got = _run_worker(
        tmp_path, 2, "--steps", "1", "--batch-size", "1", "--width", "1", "--image-size", "227", "--no-weights"
    )
    assert got["exchange_bytes"] == 468_992
    assert got["exchange_bytes_tower0"] == 2 * 113_152 + 8_192  # tower a sends fc8's gradient back


def test_ranks_without_torchrun_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        place(build_model("dual", width=1 / 16, image_size=64), "ranks")


def test_ranks_with_odd_world_size_names_it(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="WORLD_SIZE=3"):
        place(build_model("dual", width=1 / 16, image_size=64), "ranks")


def test_ranks_refuses_a_single_stream_net(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="dual"):
        place(build_model("simplified", width=1 / 16, image_size=65), "ranks")
