"""What CUDA allows, checked on the CPU: NCCL takes one process per GPU (``ranks`` on a
machine with fewer GPUs than processes is refused in one line), ``split`` on the same GPU
twice is refused (it would count copies it never makes), and the exchange counter, which
the backward's device threads share on two GPUs, loses no count."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from alexnet2gpu import ConfigError
from alexnet2gpu.parallel import Layout, TorchrunEnv, resolve_layout
from alexnet2gpu.parallel.schedule import ExchangeCounter


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: this machine has n CUDA devices, as far as the layout can tell."""

    def have(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)

    return have


def torchrun(monkeypatch, local_rank: int, processes: int = 2) -> TorchrunEnv:
    """This process as torchrun --nproc-per-node ``processes`` starts it, one node."""
    monkeypatch.setenv("WORLD_SIZE", str(processes))  # TorchrunEnv.launched reads it
    return TorchrunEnv(rank=local_rank, local_rank=local_rank, world_size=processes, local_world_size=processes)


def test_torchrun_env_reads_the_local_world_size(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert TorchrunEnv.from_environ().local_world_size == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert TorchrunEnv.from_environ().local_world_size == 1


@pytest.mark.parametrize("local_rank", [0, 1])
def test_two_ranks_on_one_gpu_are_refused_in_one_line(monkeypatch, gpus, local_rank):
    """--devices cuda:0 under torchrun --nproc-per-node 2: NCCL would abort with "Duplicate
    GPU detected"; both ranks refuse first, naming the device, the ranks and what works."""
    gpus(1)
    env = torchrun(monkeypatch, local_rank)
    with pytest.raises(ConfigError) as caught:
        resolve_layout("ranks", "cuda:0", env=env)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert "NCCL refuses two processes on one GPU (cuda:0 for local ranks 0 and 1)" in message
    assert "a machine with 2 GPUs" in message and "--devices cpu" in message and "--placement grouped" in message


@pytest.mark.parametrize("local_rank", [0, 1])
def test_more_ranks_than_gpus_are_refused_in_one_line(monkeypatch, gpus, local_rank):
    """No --devices: local rank r takes cuda:r, and rank 1 has none on a one-GPU machine;
    every rank of the node refuses, so none waits for a peer that is gone."""
    gpus(1)
    env = torchrun(monkeypatch, local_rank)
    with pytest.raises(ConfigError) as caught:
        resolve_layout("ranks", env=env)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert "2 processes on this node (torchrun --nproc-per-node 2)" in message
    assert "this machine has 1 CUDA device(s)" in message and "--devices cpu" in message


def test_a_rank_beyond_the_gpus_is_refused_without_local_world_size(monkeypatch, gpus):
    """A launcher that sets LOCAL_RANK but not LOCAL_WORLD_SIZE: the local rank alone shows it."""
    gpus(1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    env = TorchrunEnv(rank=1, local_rank=1, world_size=2)
    with pytest.raises(ConfigError, match="need cuda:0 to cuda:1 and this machine has 1 CUDA"):
        resolve_layout("ranks", env=env)


@pytest.mark.parametrize("local_rank", [0, 1])
def test_a_listed_gpu_this_machine_lacks_is_refused_by_every_rank(monkeypatch, gpus, local_rank):
    """--devices cuda:0,cuda:1 on a one-GPU machine: rank 0's own device exists, but it
    refuses too rather than wait at the rendezvous for rank 1."""
    gpus(1)
    env = torchrun(monkeypatch, local_rank)
    with pytest.raises(ConfigError, match="puts local rank 1 on cuda:1 and this machine has 1 CUDA device"):
        resolve_layout("ranks", "cuda:0,cuda:1", env=env)


@pytest.mark.parametrize("local_rank", [0, 1])
@pytest.mark.parametrize("cuda", [0, 1])
def test_both_ranks_on_the_cpu_stay_allowed(monkeypatch, gpus, local_rank, cuda):
    gpus(cuda)
    env = torchrun(monkeypatch, local_rank)
    assert resolve_layout("ranks", "cpu", env=env).devices == (torch.device("cpu"),)
    if cuda == 0:  # no --devices and no GPU: the CPU, with gloo
        assert resolve_layout("ranks", env=env).devices == (torch.device("cpu"),)


@pytest.mark.parametrize("local_rank", [0, 1])
def test_one_gpu_per_rank_is_allowed(monkeypatch, gpus, local_rank):
    gpus(2)
    env = torchrun(monkeypatch, local_rank)
    expected = (torch.device("cuda", local_rank),)
    assert resolve_layout("ranks", env=env).devices == expected
    assert resolve_layout("ranks", "cuda:0,cuda:1", env=env).devices == expected
    with pytest.raises(ConfigError, match=r"\(cuda:1 for local ranks 0 and 1\)"):
        resolve_layout("ranks", "cuda:1,cuda:1", env=env)


def test_split_on_one_gpu_twice_is_refused_and_cpu_twice_is_not(gpus):
    gpus(1)
    with pytest.raises(ConfigError) as caught:
        resolve_layout("split", "cuda:0,cuda:0")
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert "'split' on cuda:0,cuda:0" in message and "count their bytes as exchanged" in message
    assert "cuda:0,cpu" in message and "--placement grouped" in message
    with pytest.raises(ConfigError, match="no copies between devices"):
        Layout("split", (torch.device("cuda", 1), torch.device("cuda", 1)))
    assert resolve_layout("split", "cpu,cpu").devices == (torch.device("cpu"), torch.device("cpu"))
    cross = resolve_layout("split", "cuda:0,cpu").devices  # one GPU and the CPU: real copies
    assert cross == (torch.device("cuda", 0), torch.device("cpu"))


class _PreemptedCounter(ExchangeCounter):
    """Yields to the other threads between reading a total and writing it back, as a thread
    preempted in the middle of ``+=`` would: without a lock around the read and the write,
    counts are lost."""

    @property
    def bytes(self) -> int:
        value = self._bytes
        time.sleep(0)  # releases the GIL: another thread runs here
        return value

    @bytes.setter
    def bytes(self, value: int) -> None:
        self._bytes = value


def test_the_exchange_counter_loses_no_count_across_threads():
    """On two GPUs the backward runs in one autograd thread per device, both counting."""
    counter, threads, adds = _PreemptedCounter(), 8, 300
    tensor = torch.empty(3, 5)  # 60 bytes
    start = threading.Barrier(threads)

    def count() -> None:
        start.wait()
        for _ in range(adds):
            counter.add(tensor)

    workers = [threading.Thread(target=count) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert counter.bytes == threads * adds * 60
    assert counter.transfers == threads * adds
    counter.reset()
    assert (counter.bytes, counter.transfers) == (0, 0)
