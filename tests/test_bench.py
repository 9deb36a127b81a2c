"""bench: every CUDA device synchronised, warm-up excluded, median and spread, the JSON
keys of issue 4, the harness against a plain loop, and CUDA out-of-memory as one line."""

from __future__ import annotations

import json
import time

import pytest
import torch

from alexnet2gpu import Alexnet2gpuError, ConfigError, build_model, place
from alexnet2gpu.cli import main
from alexnet2gpu.measure import bench as bench_mod
from alexnet2gpu.measure.bench import (
    bench_placed,
    measure_overhead,
    parse_batch_sizes,
    run_bench,
    synchronize,
    time_repeats,
)
from alexnet2gpu.measure.memory import estimate_memory, largest_batch_that_fits

from .conftest import TINY

TINY_ARGS = ["--width", "0.0625", "--image-size", "64"]


def test_synchronize_waits_for_every_cuda_device_once(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    synchronize([torch.device("cuda", 0), torch.device("cpu"), torch.device("cuda", 1), torch.device("cuda", 1)])
    assert calls == [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_synchronize_needs_nothing_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    synchronize([torch.device("cpu"), torch.device("cpu")])
    assert calls == []


def test_time_repeats_excludes_the_warmup_and_synchronises_around_each_repeat(monkeypatch):
    events = []
    monkeypatch.setattr(bench_mod, "synchronize", lambda devices: events.append("sync"))
    calls = {"n": 0}

    def step():
        calls["n"] += 1
        events.append("step")
        time.sleep(0.2 if calls["n"] <= 2 else 0.01)  # the first two calls are slow, like a warm-up

    seconds = time_repeats(step, [torch.device("cpu")], warmup=2, repeats=3, steps=2)
    assert len(seconds) == 3 and calls["n"] == 2 + 3 * 2
    assert all(0.009 < s < 0.1 for s in seconds), seconds  # no warm-up time in any figure
    assert events[:2] == ["step", "step"]  # warm-up first, unsynchronised
    assert events[2:] == ["sync", "step", "step", "sync"] * 3


def test_median_and_spread_in_images_per_second():
    median, spread, rates = bench_mod._summarise(10, [0.5, 0.25, 1.0])
    assert rates == [20.0, 40.0, 10.0] and median == 20.0 and spread == 15.0


@pytest.mark.parametrize("spec", ["", "0,4", "a,b", "-2"])
def test_bad_batch_sizes_are_refused(spec):
    with pytest.raises(ConfigError, match="batch sizes"):
        parse_batch_sizes(spec)


@pytest.mark.parametrize("placement,devices", [("towers", "cpu"), ("grouped", "cpu"), ("split", "cpu,cpu")])
def test_bench_measures_every_placement(placement, devices):
    results = run_bench("dual", placement, devices, batch_sizes=[2, 4], warmup=1, repeats=2, **TINY)
    assert [(r.mode, r.batch_size) for r in results] == [("train", 2), ("infer", 2), ("train", 4), ("infer", 4)]
    for r in results:
        assert r.placement == placement and r.device == devices and r.source == "measured"
        assert r.images_per_s > 0 and len(r.repeats_images_per_s) == 2
        assert min(r.repeats_images_per_s) <= r.images_per_s <= max(r.repeats_images_per_s)


def test_bench_trains_the_weights():
    """The timed training step really is one: the weights change, and by SGD's rule."""
    placed = place(build_model("dual", **TINY), "towers", "cpu")
    before = placed.fc8.weight.detach().clone()
    bench_placed(placed, "dual", [2], ["train"], warmup=0, repeats=1)
    assert not torch.equal(before, placed.fc8.weight)
    assert placed.training and all(p.grad is None for p in placed.parameters())


def test_bench_json_has_issue_4_keys(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--model",
            "simplified",
            *TINY_ARGS[:2],
            "--image-size",
            "65",
            "--batch-sizes",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert {"results", "torch", "machine"} <= data.keys() and data["torch"] == torch.__version__
    required = {"model", "placement", "mode", "batch_size", "images_per_s", "spread", "device"}
    assert len(data["results"]) == 2
    for row in data["results"]:
        assert required <= row.keys()
        assert row["model"] == "simplified" and row["placement"] == "single" and row["device"] == "cpu"
    assert "throughput, measured" in capsys.readouterr().out


def test_harness_overhead_is_measured_against_a_plain_loop():
    result = measure_overhead("simplified", batch_size=2, warmup=1, repeats=2, width=1 / 16, image_size=65)
    assert result.harness_images_per_s > 0 and result.plain_images_per_s > 0
    assert result.overhead == pytest.approx(result.plain_images_per_s / result.harness_images_per_s - 1)
    assert result.overhead_best == pytest.approx(result.plain_best_images_per_s / result.harness_best_images_per_s - 1)
    assert result.harness_best_images_per_s >= result.harness_images_per_s
    assert result.overhead_cpu == pytest.approx(result.harness_cpu_s_per_step / result.plain_cpu_s_per_step - 1)


OOM_TEXT = (
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 6.00 MiB of which 0 bytes is free."
)


def _raise_oom(*_args, **_kwargs):
    raise torch.OutOfMemoryError(OOM_TEXT)


def test_out_of_memory_names_device_batch_and_the_largest_batch_that_fits(monkeypatch):
    monkeypatch.setattr(bench_mod, "train_step", _raise_oom)
    placed = place(build_model("dual", **TINY), "towers", "cpu")
    with pytest.raises(Alexnet2gpuError) as caught:
        bench_placed(placed, "dual", [64], ["train"], model_kwargs=dict(TINY))
    message = str(caught.value)
    fits, _fixed, _per_image = largest_batch_that_fits("dual", "towers", 6 * 2**20, **TINY)
    assert "cuda:0" in message and "batch size 64" in message and f"batch {fits} is the largest" in message
    assert fits >= 1

    # ... and the estimate agrees: batch `fits` fits in 6 MiB, one more does not.
    def peak(b):
        return estimate_memory(place(build_model("dual", **TINY), "towers", "cpu"), "dual", b).devices[0].peak_bytes

    assert peak(fits) <= 6 * 2**20 < peak(fits + 1)


def test_out_of_memory_on_the_command_line_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(bench_mod, "train_step", _raise_oom)
    code = main(
        ["bench", "--placement", "towers", "--devices", "cpu", *TINY_ARGS, "--batch-sizes", "16", "--mode", "train"]
    )
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "out of memory on cuda:0 at batch size 16" in err and "largest that fits" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_on_cuda():
    results = run_bench("dual", "grouped", "cuda:0", batch_sizes=[4], warmup=1, repeats=2, **TINY)
    assert all(r.images_per_s > 0 and r.device == "cuda:0" for r in results)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_bench_split_on_two_cuda_devices():
    results = run_bench("dual", "split", "cuda:0,cuda:1", batch_sizes=[4], warmup=1, repeats=2, **TINY)
    assert all(r.images_per_s > 0 and r.device == "cuda:0,cuda:1" for r in results)


def test_an_unwritable_json_path_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(
        [
            "bench",
            "--placement",
            "towers",
            "--devices",
            "cpu",
            *TINY_ARGS,
            "--batch-sizes",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--json",
            str(blocker / "bench.json"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and f"could not write {blocker / 'bench.json'}" in err and "Traceback" not in err
