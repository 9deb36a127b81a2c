"""bench: every CUDA device synchronised, warm-up excluded, median and spread, the JSON
keys of the report, the harness against a plain loop, and CUDA out-of-memory as one line."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch

from alexnet2gpu import Alexnet2gpuError, ConfigError, build_model, place
from alexnet2gpu.cli import main
from alexnet2gpu.measure import bench as bench_mod
from alexnet2gpu.measure import timing as timing_mod
from alexnet2gpu.measure import workload as workload_mod
from alexnet2gpu.measure.bench import bench_placed, measure_overhead, run_bench
from alexnet2gpu.measure.estimate import estimate_memory, largest_batch_that_fits
from alexnet2gpu.measure.timing import rates_summary, synchronize, time_repeats
from alexnet2gpu.measure.workload import compile_placed, make_batch, parse_batch_sizes

from .close import assert_close_relative
from .tiny import TINY, TINY_ARGS, tiny, tiny_args


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
    monkeypatch.setattr(timing_mod, "synchronize", lambda devices: events.append("sync"))
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
    median, spread, rates = rates_summary(10, [0.5, 0.25, 1.0])
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


def test_bench_json_has_the_documented_keys(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            *tiny_args("simplified"),
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


def test_harness_overhead_alternates_with_the_plain_loop_and_sees_a_slower_harness(monkeypatch):
    """A harness made 50 ms slower per step by a sleep: the wall-clock overhead shows it
    (both from the medians and from the fastest repeats), the CPU-time overhead does not
    (sleeping costs no CPU), and the two loops were timed alternately."""
    real, order, delay = bench_mod.train_step, [], 0.05

    def slow_harness(*args):
        order.append("harness")
        time.sleep(delay)
        real(*args)

    monkeypatch.setattr(bench_mod, "train_step", slow_harness)
    monkeypatch.setattr(bench_mod.F, "cross_entropy", _recording(bench_mod.F.cross_entropy, order, "plain"))
    # One thread: with two, OpenMP's workers spin-wait around each parallel region and bill
    # that to the process, so CPU time would grow with the wall time after every sleep.
    # Batch 16: a step of 5-20 ms of CPU (5 ms on the 2-core AMD EPYC, where batch 8 took 2.5 ms and
    # the CPU cost of waking from each 50 ms sleep, about 1.3 ms, failed 1 run in 4), well above that
    # noise and the scheduling noise of a busy machine, and still far below the 50 ms sleep.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = measure_overhead("simplified", batch_size=16, warmup=1, repeats=3, **tiny("simplified"))
    finally:
        torch.set_num_threads(threads)
    assert order == ["harness", "plain"] * 4  # one warm-up pair, then 3 alternating repeats
    harness_s, plain_s = 16 / result.harness_images_per_s, 16 / result.plain_images_per_s
    assert harness_s - plain_s == pytest.approx(delay, rel=0.5)
    assert result.overhead > 1.0 and result.overhead_best > 1.0  # plain is more than twice as fast
    assert abs(result.overhead_cpu) < 0.5


def _recording(fn, order: list, label: str):
    def wrapper(*args, **kwargs):
        order.append(label)
        return fn(*args, **kwargs)

    return wrapper


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
    fits, _fixed, _per_image = largest_batch_that_fits("dual", placed.layout, 6 * 2**20, **TINY)
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
def test_a_timing_covers_cuda_work_still_queued_on_the_device():
    """A kernel that keeps the GPU busy returns at once to Python; the time must cover it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    torch.cuda.synchronize()
    busy_s = start.elapsed_time(end) / 1000
    seconds = time_repeats(lambda: torch.cuda._sleep(50_000_000), ["cuda:0"], warmup=0, repeats=2, steps=1)
    assert min(seconds) >= 0.8 * busy_s


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_timing_waits_for_the_second_cuda_device_too():
    """Work queued on cuda:1 while cuda:0 is current: synchronising only the current device
    would stop the clock early."""
    torch.cuda.set_device(0)

    def step():
        with torch.cuda.device(1):
            torch.cuda._sleep(50_000_000)

    with torch.cuda.device(1):  # warm-up: cuda:1's first launch creates its context, untimed
        torch.cuda._sleep(1_000)
    torch.cuda.synchronize(1)
    start = time.perf_counter()
    step()
    torch.cuda.synchronize(1)
    busy_s = time.perf_counter() - start
    seconds = time_repeats(step, ["cuda:0", "cuda:1"], warmup=0, repeats=2, steps=1)
    assert min(seconds) >= 0.8 * busy_s


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_on_cuda_takes_the_same_training_step_as_on_the_cpu():
    """One timed training step on cuda:0 moves the weights as the same step on the CPU does:
    the same weights (one model, copied) and the same batch (make_batch draws on the CPU and
    moves it: a CUDA generator would draw other numbers)."""
    torch.manual_seed(0)
    model = build_model("dual", **TINY, dropout=0.0)
    # TF32 (cuDNN's default for convolutions on Ampere and later) rounds the factors to 10
    # bits of mantissa, about 5e-4 relative: off for this test, so that both sides compute
    # in float32 and differ only by summation order; restored after.
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    moved = {}
    try:
        for device in ("cpu", "cuda:0"):
            placed = place(copy.deepcopy(model), "grouped", device)
            before = placed.fc8.weight.detach().cpu().clone()
            (result,) = bench_placed(placed, "dual", [4], ["train"], warmup=0, repeats=1)
            assert result.device == device
            moved[device] = placed.fc8.weight.detach().cpu() - before
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert moved["cpu"].abs().max() > 0
    # float32 against float64 on the CPU differs by 6e-7 of the largest move; cuDNN's
    # algorithms (Winograd, FFT) by more, so 1e-3: other weights or data would differ by O(1)
    assert_close_relative(moved["cuda:0"], moved["cpu"], 1e-3)


def test_a_batch_is_the_same_numbers_whatever_the_device():
    # drawn on the CPU, then moved: the meta copy has the CPU draw's shape and dtype, and
    # two nets (two placements) get equal batches for one seed
    model = build_model("dual", **TINY)
    x, y = make_batch(place(copy.deepcopy(model), "towers", "cpu"), 4, seed=3)
    x2, y2 = make_batch(place(copy.deepcopy(model), "grouped", "cpu"), 4, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(x, torch.randn(4, 3, model.image_size, model.image_size, generator=g))
    with torch.device("meta"):
        on_meta = place(build_model("dual", **TINY), "towers", "meta")
    xm, ym = make_batch(on_meta, 4, seed=3)
    assert xm.device.type == "meta" and xm.shape == x.shape and ym.dtype == y.dtype


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


def test_compile_time_is_timed_apart_and_kept_out_of_images_per_s(monkeypatch):
    """A compiled step is slow on its first call after each reset (it compiles): that call
    is the record's compile_s, before and apart from the warm-up and the timed repeats."""
    real, state = bench_mod.train_step, {"fresh": False, "calls": 0}
    monkeypatch.setattr(torch._dynamo, "reset", lambda: state.update(fresh=True))

    def compiling_step(*args):
        state["calls"] += 1
        if state["fresh"]:
            state["fresh"] = False
            time.sleep(0.5)
        real(*args)

    monkeypatch.setattr(bench_mod, "train_step", compiling_step)
    placed = place(build_model("dual", **TINY), "towers", "cpu")
    results = bench_placed(placed, "dual", [2, 4], ["train"], warmup=1, repeats=2, compiled=True)
    assert state["calls"] == 2 * (1 + 1 + 2)  # per batch: the compiling call, the warm-up, the repeats
    for r in results:
        assert r.compiled and r.compile_s >= 0.5
        assert all(r.batch_size / rate < 0.25 for rate in r.repeats_images_per_s)  # no compile inside
    assert all(r.compile_s is None and not r.compiled for r in bench_placed(placed, "dual", [2], ["train"]))


@pytest.mark.parametrize("placement,devices", [("towers", "cpu"), ("grouped", "cpu"), ("split", "cpu,cpu")])
def test_every_placement_trains_under_torch_compile(placement, devices):
    """Dynamo traces each placement (the eager backend: no code generation, so the test is
    quick); the compiled step still trains the weights."""
    torch._dynamo.utils.counters.clear()
    placed = compile_placed(place(build_model("dual", **TINY), placement, devices), backend="eager")
    before = placed.fc8.weight.detach().clone()
    (result,) = bench_placed(placed, "dual", [2], ["train"], warmup=0, repeats=1, compiled=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert result.compiled and result.compile_s > 0 and not torch.equal(before, placed.fc8.weight)


def test_bench_compile_on_the_command_line(tmp_path, capsys, monkeypatch):
    real = workload_mod.compile_placed
    monkeypatch.setattr(workload_mod, "compile_placed", lambda placed: real(placed, backend="eager"))
    out = tmp_path / "bench.json"
    argv = ["bench", *tiny_args("simplified"), "--batch-sizes", "2", "--repeats", "1", "--warmup", "0"]
    assert main([*argv, "--compile", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["compiled"]) for r in rows] == [("train", True), ("infer", True)]
    assert all(r["compile_s"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "compile time (torch.compile" in printed and "train at batch 2:" in printed


def test_progress_in_a_log_is_plain_lines_with_an_eta(capsys, monkeypatch):
    from alexnet2gpu.report.bench import ProgressBar

    monkeypatch.setattr(ProgressBar, "LOG_EVERY_S", 0.0)
    with ProgressBar(4, "measuring") as bar:  # pytest's capture is not a terminal
        bar.advance(1, "dual/towers")
        bar.advance(3)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("dual/towers: 1/4 done, ") and "ETA" in lines[0]
    assert lines[-1].startswith("dual/towers: 4/4 done, ") and lines[-1].endswith("ETA 0 s")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("placement,devices", [("towers", "cpu"), ("split", "cpu,cpu")])
def test_bench_in_low_precision_trains_and_records_its_numerics(precision, placement, devices):
    from alexnet2gpu.parallel import Numerics

    placed = place(build_model("dual", **TINY), placement, devices)
    before = placed.fc8.weight.detach().clone()
    numerics = Numerics(precision)
    # warm-up 1: float16's GradScaler skips its first step (2^16 overflows, the scale halves)
    results = bench_placed(placed, "dual", [2], warmup=1, repeats=1, numerics=numerics)
    assert [r.mode for r in results] == ["train", "infer"]
    for r in results:
        assert r.numerics == numerics.record() and r.precision == precision and r.images_per_s > 0
    assert not torch.equal(before, placed.fc8.weight) and placed.fc8.weight.dtype == torch.float32


def test_inference_runs_under_autocast(monkeypatch):
    from alexnet2gpu.parallel import Numerics

    placed = place(build_model("dual", **TINY), "towers", "cpu")
    dtypes = []
    placed.fc8.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    bench_placed(placed, "dual", [2], ["infer"], warmup=0, repeats=1, numerics=Numerics("bf16"))
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_bench_channels_last_on_the_command_line(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", *TINY_ARGS, "--placement", "towers", "--devices", "cpu", "--batch-sizes", "2"]
    argv += ["--repeats", "1", "--warmup", "0", "--precision", "bf16", "--channels-last", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 2
    for row in rows:
        assert row["numerics"]["precision"] == "bf16" and row["numerics"]["memory_format"] == "channels_last"
        assert {"cudnn_benchmark", "tf32_matmul", "tf32_cudnn", "float32_matmul_precision"} <= row["numerics"].keys()


def test_cudnn_benchmark_is_on_for_cuda_unless_switched_off():
    import argparse

    from alexnet2gpu.cli import bench as bench_cli
    from alexnet2gpu.cli.arguments import numerics_from_args

    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    assert numerics_from_args(parser.parse_args([]), cuda=True).cudnn_benchmark is True
    assert numerics_from_args(parser.parse_args(["--no-cudnn-benchmark"]), cuda=True).cudnn_benchmark is False
    assert numerics_from_args(parser.parse_args([]), cuda=False).cudnn_benchmark is None  # the CPU: left alone
    assert numerics_from_args(parser.parse_args(["--precision", "fp16"])).scaled


def test_against_plain_loop_refuses_low_precision(capsys):
    argv = ["bench", *tiny_args("simplified"), "--batch-sizes", "2", "--precision", "bf16", "--against-plain-loop"]
    assert main(argv) == 2
    assert "--against-plain-loop times float32" in capsys.readouterr().err


def test_results_md_s_bf16_speed_ratios_are_their_records():
    """docs/results.md's bf16-against-fp32 table: every per-round ratio and median is the
    records' (images/s, and CPU seconds per step, fp32's over bf16's)."""
    import re
    import statistics
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs"
    text = (docs / "results.md").read_text()
    for run, name in ((1, "bf16-cpu-speed.json"), (2, "bf16-cpu-speed-2.json")):
        record = json.loads((docs / "runs" / name).read_text())
        for net in ("dual/towers", "simplified"):
            rows = [(r["rows"][f"{net}/fp32"], r["rows"][f"{net}/bf16"]) for r in record["rounds"]]
            speed = [b["images_per_s"] / f["images_per_s"] for f, b in rows]
            work = [f["cpu_s_per_step"] / b["cpu_s_per_step"] for f, b in rows]
            cells = [
                ", ".join(f"{x:.2f}" for x in speed),
                f"{statistics.median(speed):.2f}x",
                ", ".join(f"{x:.2f}" for x in work),
                f"**{statistics.median(work):.2f}x**",
            ]
            row = rf"\| {re.escape(net)}, 22\d px \| {run} \| " + r" \| ".join(map(re.escape, cells)) + r" \|"
            assert re.search(row, text), (run, net, cells)
