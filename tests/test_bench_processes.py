"""bench with the torchrun placements (ranks, replicas, hybrid): refused with the launch
line outside torchrun, measured through the generic step under torchrun (gloo, tiny nets;
the batch sizes are global)."""

from __future__ import annotations

import argparse
import json

import pytest

from alexnet2gpu import ConfigError
from alexnet2gpu.cli import bench as bench_cli
from alexnet2gpu.cli import main

from .dist_launch import run_torchrun
from .tiny import tiny_args


@pytest.mark.parametrize("placement, model", [("replicas", "simplified"), ("hybrid", "torchvision"), ("ranks", "dual")])
def test_bench_outside_torchrun_says_how_to_launch(capsys, monkeypatch, placement, model):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["bench", *tiny_args(model), "--placement", placement]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"placement '{placement}' runs one process per device: launch bench with torchrun" in err
    assert f"torchrun --nproc-per-node 2 -m alexnet2gpu bench --placement {placement}" in err


def test_the_plain_loop_comparison_refuses_several_processes():
    args = argparse.Namespace(precision="fp32", channels_last=False)
    layout = argparse.Namespace(towers_apart=False, distributed=True)
    with pytest.raises(ConfigError, match="compares one device in one process"):
        bench_cli._overhead(args, argparse.Namespace(layout=layout), 4, {}, False)


@pytest.mark.distributed
@pytest.mark.parametrize("placement", ["replicas", "hybrid"])
def test_bench_under_torchrun_measures_two_processes(tmp_path, placement):
    out = tmp_path / "bench.json"
    argv = ["-m", "alexnet2gpu", "bench", *tiny_args("simplified"), "--placement", placement]
    argv += ["--batch-sizes", "4,8", "--repeats", "1", "--warmup", "1", "--threads", "1", "--json", str(out)]
    result = run_torchrun(2, argv, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not result.orphans
    records = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["batch_size"]) for r in records] == [("train", 4), ("infer", 4), ("train", 8), ("infer", 8)]
    for r in records:
        assert r["placement"] == placement and r["processes"] == 2 and r["device"] == "cpu x2 processes"
        assert r["images_per_s"] > 0 and r["threads"] == 1
