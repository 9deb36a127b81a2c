"""The training loop reads the device once per sync point, not once per step, and its
collectives go through one helper that works under NCCL's rules (CUDA tensors only).

On the CPU a host sync costs nothing and so cannot be timed; the tests count the reads
instead: ``float()``, ``bool()`` and ``.item()`` all reach ``aten._local_scalar_dense``,
which a dispatch mode sees, and the loop's own batched read is ``Tensor.tolist``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from alexnet2gpu.parallel import Layout
from alexnet2gpu.parallel import distributed as distributed_module
from alexnet2gpu.parallel.distributed import BACKEND_CUDA, all_sum, is_collective_error
from alexnet2gpu.train import TrainConfig, train
from alexnet2gpu.train.faults import collective_failure

from .test_train import TINY

TINY = dict(TINY, threads=1)
ROOT = Path(__file__).resolve().parent.parent


class _CountScalarReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: every ``float()``, ``bool()``, ``.item()``."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _reads(monkeypatch, config: TrainConfig) -> tuple[int, int]:
    """(scalar reads, ``tolist`` calls) during ``train(config)``."""
    tolist_calls = []
    original = torch.Tensor.tolist

    def counting_tolist(self):
        tolist_calls.append(self.shape)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    with _CountScalarReads() as mode:
        train(config)
    monkeypatch.setattr(torch.Tensor, "tolist", original)
    return mode.reads, len(tolist_calls)


def test_host_reads_grow_with_sync_points_not_with_steps(monkeypatch):
    # 10 and 20 steps, a sync every 10: one more sync point, and not one more read per step
    # (the old loop called float() twice and bool() twice in every step).
    scalars_10, lists_10 = _reads(monkeypatch, TrainConfig(**TINY, steps=10, sync_every=10))
    scalars_20, lists_20 = _reads(monkeypatch, TrainConfig(**TINY, steps=20, sync_every=10))
    assert scalars_20 - scalars_10 == 0
    assert lists_20 - lists_10 == 1


def test_step_records_and_weights_do_not_depend_on_the_sync_interval(tmp_path):
    runs = {}
    for every in (1, 3, 10):
        result = train(
            TrainConfig(
                **TINY,
                steps=7,
                sync_every=every,
                checkpoint_dir=str(tmp_path / f"ck{every}"),
                metrics=str(tmp_path / f"m{every}.jsonl"),
            )
        )
        steps = [json.loads(line) for line in open(tmp_path / f"m{every}.jsonl")]
        steps = [{k: v for k, v in r.items() if k != "images_per_s"} for r in steps if r["event"] == "step"]
        weights = torch.load(tmp_path / f"ck{every}" / "step-00000007.pt", weights_only=True)["model"]
        runs[every] = (steps, weights, result.loss, result.train_accuracy)
    steps, weights, loss, accuracy = runs[1]
    assert [r["step"] for r in steps] == list(range(1, 8))
    for every in (3, 10):
        assert runs[every][0] == steps  # bit for bit: loss, accuracy, lr, epoch, skipped
        assert (runs[every][2], runs[every][3]) == (loss, accuracy)
        for name, value in weights.items():
            assert torch.equal(runs[every][1][name], value), name


def test_a_nonfinite_step_is_named_when_read_late(tmp_path, monkeypatch):
    # Step 2 turns non-finite; the next sync point is step 4: the message still names step 2
    # and the checkpoint before it is the last one kept.
    monkeypatch.setenv("ALEXNET2GPU_FAULT", "nan-grad:rank0:step2")
    from alexnet2gpu.errors import Alexnet2gpuError

    with pytest.raises(Alexnet2gpuError, match=r"gradients in tower a at step 2"):
        train(TrainConfig(**TINY, steps=6, sync_every=4, checkpoint_dir=str(tmp_path), metrics=str(tmp_path / "m")))
    events = [json.loads(line) for line in open(tmp_path / "m")]
    assert [e["step"] for e in events if e["event"] == "step"] == [1]
    assert not list(tmp_path.glob("*.pt"))


def test_sync_every_is_checked():
    from alexnet2gpu.errors import ConfigError

    with pytest.raises(ConfigError, match="sync_every must be at least 1, got 0"):  # the field, for Python callers
        TrainConfig(**TINY, steps=2, sync_every=0)


class _FakeGroup:
    def __init__(self, *types: str) -> None:
        self._device_types = [torch.device(t) for t in types]


@pytest.fixture
def fake_group(monkeypatch):
    """A process group that is not there: all_reduce records the device of what it gets."""
    reduced = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: reduced.append(tensor.device))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def use(*types: str):
        monkeypatch.setattr(dist.distributed_c10d, "_get_default_group", lambda: _FakeGroup(*types))
        return reduced

    return use


def test_all_sum_reduces_cuda_tensors_on_cuda_and_host_tensors_on_the_host(fake_group):
    reduced = fake_group("cpu", "cuda")  # BACKEND_CUDA: cpu:gloo,cuda:nccl
    with FakeTensorMode(allow_non_fake_inputs=True):
        on_gpu = all_sum(torch.zeros(3, device="cuda:0"))
        on_host = all_sum(torch.zeros(3))
    assert [d.type for d in reduced] == ["cuda", "cpu"]
    assert on_gpu.device == torch.device("cuda", 0) and on_host.device.type == "cpu"


def test_all_sum_moves_a_host_tensor_to_the_gpu_for_a_group_of_nccl_alone(fake_group):
    # A group someone else started as "nccl": NCCL raises on a CPU tensor, so it travels.
    reduced = fake_group("cuda")
    with FakeTensorMode(allow_non_fake_inputs=True):
        back = all_sum(torch.zeros(3))
    assert reduced == [torch.device("cuda", 0)]
    assert back.device.type == "cpu"


def test_a_cuda_rank_starts_nccl_with_gloo_beside_it(monkeypatch):
    started = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: started.setdefault("device", device))
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, **kw: started.update(backend=backend, device_id=kw["device_id"])
    )
    for key, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    layout = distributed_module.init_distributed()
    assert started == {"device": torch.device("cuda", 1), "backend": BACKEND_CUDA, "device_id": torch.device("cuda", 1)}
    assert layout.device == torch.device("cuda", 1) and BACKEND_CUDA == "cpu:gloo,cuda:nccl"


def test_the_training_loop_calls_no_collective_but_through_all_sum():
    for path in (ROOT / "alexnet2gpu" / "train").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"dist\.all_reduce|torch\.distributed\.all_reduce", text), path.name


RANKS = Layout("ranks", (torch.device("cpu"),), world_size=2, dp_size=1, rank=0)


@pytest.mark.parametrize(
    "error, collective",
    [
        (dist.DistBackendError("NCCL communicator was aborted on rank 1"), True),
        (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x9216 and 4608x2048)"), False),
    ],
)
def test_only_a_collective_error_is_reported_as_one(error, collective):
    assert is_collective_error(error) is collective
    reported = collective_failure(RANKS, None, 3, 180.0, error)
    if collective:
        assert str(reported).startswith("rank 0: a collective failed at step 3 (process-group timeout 180s)")
    else:
        assert reported is error  # this rank's own error, as it is: never "a peer died"


def test_a_one_process_run_sums_over_no_ranks_even_inside_a_process_group(fake_group, tmp_path):
    # A towers run inside someone's torchrun job (a group exists): its numbers are its own.
    reduced = fake_group("cpu")
    result = train(TrainConfig(**TINY, steps=3, sync_every=2, checkpoint_dir=str(tmp_path)))
    assert result.steps == 3 and reduced == []
