"""Data parallel (`replicas`) and Krizhevsky's 2014 hybrid (`hybrid`) on real torchrun
processes under gloo: one step equals the single-process float64 reference (loss and every
parameter's gradient, relative error under 1e-5), the bytes counted at the collectives
equal the closed form exactly at two batch sizes, and a hybrid checkpoint moves to one
device and back. The 4-process runs are in the integration set (`distributed`)."""

from __future__ import annotations

import json

import pytest
import torch

from alexnet2gpu import ConfigError, build_model, place
from alexnet2gpu.parallel import resolve_layout
from alexnet2gpu.parallel.layout import Layout, TorchrunEnv
from alexnet2gpu.parallel.traffic import (
    CollectiveCounter,
    closed_form_bytes,
    hybrid_bytes,
    hybrid_sizes,
    replicas_bytes,
    towers_bytes_per_image,
)

from .dist_launch import ROOT, run_torchrun

WORKER = str(ROOT / "tests" / "dist_processes_worker.py")
NETS = ("dual", "simplified", "half", "torchvision")
SINGLE_STREAM = ("simplified", "half", "torchvision")

# (placement, net, global batch): two batch sizes for every way and net.
TWO = [(p, net, b) for net in NETS for p in ("replicas", "hybrid") for b in (4, 8) if (p, net) != ("hybrid", "dual")]
TWO += [("ranks", "dual", 4), ("ranks", "dual", 8)]
FOUR = [("replicas", net, b) for net in ("dual", "simplified") for b in (8, 16)]
FOUR += [("hybrid", net, b) for net in ("simplified", "torchvision") for b in (8, 16)]  # 10 classes: uneven shards
FOUR += [("ranks", "dual", 8)]  # 2 replicas x 2 towers


def _run(tmp_path, nproc: int, checks, checkpoints=()) -> dict:
    out = tmp_path / f"processes{nproc}.json"
    args = [WORKER, "--out", str(out)]
    for placement, net, batch in checks:
        args += ["--check", f"{placement}:{net}:{batch}"]
    for net in checkpoints:
        args += ["--checkpoint", net]
    result = run_torchrun(nproc, args, timeout=420)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not result.orphans
    got = json.loads(out.read_text())
    got["by_key"] = {(r["placement"], r["model"], r["batch_size"]): r for r in got["checks"]}
    return got


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("two"), 2, TWO, checkpoints=("simplified", "torchvision"))


@pytest.fixture(scope="module")
def four_processes(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("four"), 4, FOUR)


def _check(record: dict, processes: int) -> None:
    assert record["processes"] == processes
    what = f"{record['placement']} {record['model']} batch {record['batch_size']}"
    assert record["loss_rel_err"] < 1e-5, f"{what}: loss {record['loss_rel_err']:.2e}"
    assert record["grads_rel_err"] < 1e-5, f"{what}: {record['worst_grad']} {record['grads_rel_err']:.2e}"
    # Counted at the collectives, on every process, equal to the closed form exactly.
    assert record["sent_bytes"] == [record["closed_form_bytes"]] * processes, what
    assert record["closed_form_bytes"] > 0


@pytest.mark.distributed
@pytest.mark.parametrize("key", TWO, ids=lambda k: "-".join(map(str, k)))
def test_two_processes_equal_one(two_processes, key):
    assert two_processes["world_size"] == 2
    _check(two_processes["by_key"][key], 2)
    if key[1] == "dual" and key[0] != "hybrid":
        assert two_processes["by_key"][key]["dropout"] == 0.5  # checked with each replica's masks


@pytest.mark.distributed
@pytest.mark.integration
@pytest.mark.parametrize("key", FOUR, ids=lambda k: "-".join(map(str, k)))
def test_four_processes_equal_one(four_processes, key):
    assert four_processes["world_size"] == 4
    _check(four_processes["by_key"][key], 4)


@pytest.mark.distributed
def test_bytes_grow_with_the_batch_as_the_closed_form_says(two_processes):
    """Data parallel sends the same at every batch; the hybrid and the towers more with it."""
    sent = {key: two_processes["by_key"][key]["sent_bytes"][0] for key in TWO}
    for net in NETS:
        assert sent[("replicas", net, 4)] == sent[("replicas", net, 8)]
    for net in SINGLE_STREAM:
        assert sent[("hybrid", net, 8)] > sent[("hybrid", net, 4)]
    assert sent[("ranks", "dual", 8)] == 2 * sent[("ranks", "dual", 4)]


@pytest.mark.distributed
@pytest.mark.parametrize("net", ["simplified", "torchvision"])
def test_hybrid_checkpoint_resumes_on_one_device_and_back(two_processes, net):
    trip = next(t for t in two_processes["checkpoints"] if t["model"] == net)
    assert trip["keys_same"], "a hybrid checkpoint has the single-device names"
    assert trip["plain_tensors"], "a hybrid checkpoint holds plain tensors, not DTensors"
    assert trip["saved_equal"], "the single-device net loads it as it is"
    assert trip["loaded_equal"], "a single-device checkpoint loads into hybrid"
    assert trip["logits_max_diff"] < 1e-5


def test_torchvision_hybrid_sends_under_a_quarter_of_data_parallel_at_batch_128():
    """Issue 17's target, from the closed forms (what the counted runs above confirm at small sizes)."""
    with torch.device("meta"):
        model = build_model("torchvision")
    params = sum(p.numel() for p in model.parameters())
    assert params == 61_100_840
    sizes = hybrid_sizes(model)
    assert sizes == {"trunk_params": 2_469_696, "fc_inputs": [9216, 4096, 4096], "classes": 1000}
    replicas = replicas_bytes(params, 2)
    hybrid = hybrid_bytes(128, processes=2, **sizes)
    assert replicas == 244_403_360  # 2 (p - 1) / p x 4 bytes x params, p = 2
    # 4 x 2,469,696 (trunk) + 4 x 128 x (9216 + 4096 + 4096) (fc inputs, both ways)
    # + 4 x 128 x 1000 / 2 (logits) + 8 x 128 / 2 (labels)
    assert hybrid == 9_878_784 + 8_912_896 + 256_000 + 512
    assert hybrid <= replicas / 4
    assert closed_form_bytes("hybrid", model, 128, 2) == 19_048_192


def test_towers_closed_form_is_the_design_table():
    with torch.device("meta"):
        model = build_model("dual")
    assert 2 * towers_bytes_per_image(model) == 468_992  # DESIGN.md section 3, both processes


def test_ring_accounting():
    counter = CollectiveCounter()
    counter.add("all_reduce", 400, 4)  # 2 x 3/4 x 400
    counter.add("all_gather", 400, 4)  # 3/4 x the gathered 400
    counter.add("reduce_scatter", 400, 4, "fc")
    assert counter.bytes == 600 + 300 + 300
    assert counter.by_kind() == {"all_gather": 300.0, "all_reduce": 600.0, "fc: reduce_scatter": 300.0}


def _env(world: int, rank: int = 0) -> TorchrunEnv:
    return TorchrunEnv(rank=rank, local_rank=rank, world_size=world, local_world_size=world)


def test_each_process_is_a_replica_under_replicas_and_hybrid(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    for placement in ("replicas", "hybrid"):
        layout = resolve_layout(placement, "cpu", two_tower=False, env=_env(4, rank=3))
        assert (layout.dp_size, layout.replica, layout.tower, layout.distributed) == (4, 3, 0, True)
        assert not layout.two_towers and "4 processes" in layout.describe()
    layout = resolve_layout("replicas", "cpu", two_tower=True, env=_env(4, rank=3))
    assert layout.two_towers and layout.fused


def test_the_global_batch_divides_over_the_replicas(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    layout = resolve_layout("hybrid", "cpu", two_tower=False, env=_env(4))
    assert layout.local_batch(128) == 32
    with pytest.raises(ConfigError, match="global batch of 6 does not divide over 4"):
        layout.local_batch(6)


def test_auto_runs_a_single_stream_net_data_parallel_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    layout = resolve_layout("auto", "cpu", two_tower=False, env=_env(2))
    assert layout.placement == "replicas" and layout.dp_size == 2


def test_hybrid_refuses_dual():
    with pytest.raises(ConfigError, match="--placement ranks"):
        resolve_layout("hybrid", "cpu", two_tower=True, env=_env(2))


def test_replicas_without_torchrun_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2 -m alexnet2gpu COMMAND --placement replicas"):
        place(build_model("simplified", width=1 / 16, image_size=65), "replicas")


def test_a_replicas_layout_names_a_wrong_replica_count():
    with pytest.raises(ConfigError, match="not 1"):
        Layout("replicas", (torch.device("cpu"),), world_size=2, dp_size=1, two_tower_net=False)
