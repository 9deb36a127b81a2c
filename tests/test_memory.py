"""memory: parameters, gradients and momentum by owning device, activations through
saved-tensor hooks, the bytes exchanged per step (468,992 per image for the real split
and ranks nets), the JSON keys of the report, CUDA-only paths skipped without CUDA."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from alexnet2gpu import ConfigError, build_model, place
from alexnet2gpu.cli import main
from alexnet2gpu.measure import memory as memory_mod
from alexnet2gpu.measure.estimate import estimate_memory, plan_memory
from alexnet2gpu.measure.memory import run_memory
from alexnet2gpu.parallel import Numerics

from .dist_launch import run_torchrun
from .tiny import TINY, TINY_ARGS, tiny

BYTES_PER_IMAGE = 468_992  # DESIGN.md section 3: (113,152 each way + 8,192) forward, the same backward
DEVICE0, DEVICE1 = 32_531_112, 28_434_112  # DESIGN.md section 2: parameters on each device


@pytest.mark.full_size
def test_split_exchanges_468992_bytes_per_image_and_owns_the_design_parameters():
    report = run_memory("dual", "split", "cpu,cpu", batch_size=2)
    assert report.comm_bytes_per_step == 2 * BYTES_PER_IMAGE
    d0, d1 = report.devices
    assert (d0.device, d1.device) == ("cpu #0", "cpu #1")
    assert (d0.params, d1.params) == (DEVICE0, DEVICE1)
    assert d0.parts == ["tower_a", "fc8"] and d1.parts == ["tower_b"]
    for d in report.devices:  # float32 gradients and one momentum buffer per parameter
        assert d.params_bytes == d.grads_bytes == d.optimizer_bytes == 4 * d.params
        assert d.source == "estimated"
        assert d.peak_bytes == (
            d.params_bytes + d.grads_bytes + d.optimizer_bytes + d.activations_bytes + d.input_bytes
        )


@pytest.mark.full_size
def test_split_larger_device_peak_against_one_device():
    """Issue 4's target (<= 0.56), from the estimator at the real size, batch 32."""
    one = run_memory("dual", "towers", "cpu", batch_size=32).largest_peak_bytes
    split = run_memory("dual", "split", "cpu,cpu", batch_size=32).largest_peak_bytes
    assert split / one <= 0.56


@pytest.mark.parametrize("placement,devices", [("towers", "cpu"), ("grouped", "cpu")])
def test_one_device_placements_exchange_nothing(placement, devices):
    report = run_memory("dual", placement, devices, batch_size=2, **TINY)
    assert report.comm_bytes_per_step == 0 and len(report.devices) == 1
    assert report.devices[0].params == sum(p.numel() for p in build_model("dual", **TINY).parameters())


def test_activations_grow_linearly_with_the_batch():
    a2, a4, a6 = (
        run_memory("dual", "towers", "cpu", batch_size=b, **TINY).devices[0].activations_bytes for b in (2, 4, 6)
    )
    assert a2 > 0 and a6 - a4 == a4 - a2  # exactly affine: the OOM advice extrapolates this line
    assert abs(2 * a2 - a4) <= 16  # and all but a few scalars grow with the batch


def test_activations_are_charged_to_the_tower_that_saved_them():
    """Split on cpu,cpu: tower b's activations go to device 1, including its copy of the
    image (on two GPUs it is a real copy), while the loss's go to device 0 with fc8."""
    placed = place(build_model("dual", **TINY), "split", "cpu,cpu")
    report = estimate_memory(placed, "dual", 4)
    d0, d1 = report.devices
    image = 4 * 3 * 64 * 64 * 4
    assert d0.input_bytes == image and d1.input_bytes == 0
    assert d1.activations_bytes > image  # the image copy plus tower b's own
    towers = estimate_memory(place(build_model("dual", **TINY), "towers", "cpu"), "dual", 4).devices[0]
    # each device keeps its own joined input to conv3/fc6/fc7, so two devices hold more in all
    assert d0.activations_bytes + d1.activations_bytes > towers.activations_bytes
    assert max(d0.activations_bytes, d1.activations_bytes) < towers.activations_bytes


def test_parameters_are_not_counted_as_activations():
    report = run_memory("simplified", "single", "cpu", batch_size=1, **tiny("simplified"))
    d = report.devices[0]
    assert d.activations_bytes < d.params_bytes  # the fc weights alone are larger


def test_memory_json_has_the_documented_keys(tmp_path):
    out = tmp_path / "memory.json"
    assert (
        main(
            [
                "memory",
                "--placement",
                "split",
                "--devices",
                "cpu,cpu",
                *TINY_ARGS,
                "--batch-size",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert {"model", "placement", "batch_size", "devices", "comm_bytes_per_step"} <= data.keys()
    keys = {"device", "source", "params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "peak_bytes"}
    assert len(data["devices"]) == 2 and all(keys <= d.keys() for d in data["devices"])
    assert data["comm_bytes_per_step"] > 0


def test_measured_memory_needs_cuda_devices():
    with pytest.raises(ConfigError, match="CUDA"):
        run_memory("dual", "towers", "cpu", batch_size=2, source="measured", **TINY)


def test_snapshot_of_a_cpu_step_is_a_usage_error(tmp_path, capsys):
    code = main(
        [
            "memory",
            "--placement",
            "towers",
            "--devices",
            "cpu",
            *TINY_ARGS,
            "--snapshot",
            str(tmp_path / "s.pickle"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--snapshot" in err and "Traceback" not in err
    assert not (tmp_path / "s.pickle").exists()


def test_out_of_memory_in_memory_command(monkeypatch, capsys):
    real, calls = memory_mod.estimate_memory, []

    def oom_once(*args, **kwargs):  # the step runs out of memory; the estimate for the advice does not
        if not calls:
            calls.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. GPU 1 has a total capacity of 6.00 MiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(memory_mod, "estimate_memory", oom_once)
    code = main(
        [
            "memory",
            "--placement",
            "towers",
            "--devices",
            "cpu",
            *TINY_ARGS,
            "--batch-size",
            "512",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "out of memory on cuda:1 at batch size 512" in err and "Traceback" not in err
    assert "is the largest that fits in its 6.00 MiB" in err and len(err.strip().splitlines()) == 1


@pytest.mark.distributed
@pytest.mark.full_size
def test_ranks_exchanges_468992_bytes_per_image(tmp_path):
    """Two processes on gloo, the real net: the same bytes as split, each rank owning its
    tower's parameters, with its peak RSS measured."""
    out = tmp_path / "ranks.json"
    result = run_torchrun(
        2,
        [
            "-m",
            "alexnet2gpu",
            "memory",
            "--placement",
            "ranks",
            "--batch-size",
            "2",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["placement"] == "ranks" and data["comm_bytes_per_step"] == 2 * BYTES_PER_IMAGE
    assert [d["params"] for d in data["devices"]] == [DEVICE0, DEVICE1]
    assert all(d["rss_peak_bytes"] > d["params_bytes"] for d in data["devices"])


@pytest.mark.distributed
@pytest.mark.parametrize("placement", ["replicas", "hybrid"])
def test_replicas_and_hybrid_hold_their_share_and_count_their_collectives(tmp_path, placement):
    """Each process holds the whole net (replicas) or its share of fc6-fc8 (hybrid, a
    DTensor's local shard), and the bytes are those counted at the collectives: the sum over
    the 2 processes of the closed form."""
    from alexnet2gpu.parallel.traffic import closed_form_bytes

    out = tmp_path / "m.json"
    size = ["--model", "simplified", "--width", "0.0625", "--image-size", "65"]
    argv = ["-m", "alexnet2gpu", "memory", "--placement", placement, *size, "--batch-size", "8"]
    result = run_torchrun(2, [*argv, "--threads", "1", "--json", str(out)], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    with torch.device("meta"):
        model = build_model("simplified", width=0.0625, image_size=65)
    whole = sum(p.numel() for p in model.parameters())
    held = [d["params"] for d in data["devices"]]
    assert held == [whole, whole] if placement == "replicas" else all(whole / 2 < h < whole for h in held)
    assert data["comm_bytes_per_step"] == 2 * closed_form_bytes(placement, model, 8, 2)
    assert [d["parts"] for d in data["devices"]] == [["net"], ["net"]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measured_memory_on_cuda_agrees_with_the_estimate():
    """The allocator's figures for one step beside the CPU estimate of the same step: the
    same parameters and momentum, activations within a factor of two, and a peak that
    holds at least parameters, gradients and momentum at once."""
    d = run_memory("dual", "towers", "cuda:0", batch_size=8, **TINY).devices[0]
    estimated = run_memory("dual", "towers", "cpu", batch_size=8, **TINY).devices[0]
    assert d.source == "measured" and d.device == "cuda:0"
    assert (estimated.params_bytes, estimated.optimizer_bytes) == (d.params_bytes, d.optimizer_bytes)
    assert d.peak_bytes >= d.params_bytes + d.grads_bytes + d.optimizer_bytes
    assert 0.5 <= d.activations_bytes / estimated.activations_bytes <= 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_snapshot_is_a_memory_history_pickle(tmp_path):
    import pickle

    path = tmp_path / "step.pickle"
    run_memory("dual", "towers", "cuda:0", batch_size=2, snapshot=str(path), **TINY)
    with open(path, "rb") as f:
        snapshot = pickle.load(f)
    assert snapshot["device_traces"] and snapshot["segments"]  # what pytorch.org/memory_viz reads


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_split_measured_on_two_cuda_devices_owns_and_exchanges_what_the_estimate_says():
    measured = run_memory("dual", "split", "cuda:0,cuda:1", batch_size=4, **TINY)
    estimated = run_memory("dual", "split", "cpu,cpu", batch_size=4, **TINY)
    assert [d.device for d in measured.devices] == ["cuda:0", "cuda:1"]
    assert all(d.source == "measured" for d in measured.devices)
    assert [d.params for d in measured.devices] == [d.params for d in estimated.devices]
    assert measured.comm_bytes_per_step == estimated.comm_bytes_per_step > 0
    d0, d1 = measured.devices
    assert d1.activations_bytes > 0 and d0.input_bytes > 0 == d1.input_bytes


def test_split_without_gpus_is_estimated_for_cuda0_and_cuda1(monkeypatch, capsys):
    """No GPU here (or made to look so): split is planned for cuda:0 and cuda:1 on CPU
    stand-ins, labelled estimated, with the per-device figures of split on cpu,cpu."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    planned = run_memory("dual", "split", None, batch_size=2, **TINY)
    on_cpu = run_memory("dual", "split", "cpu,cpu", batch_size=2, **TINY)
    assert [d.device for d in planned.devices] == ["cuda:0", "cuda:1"]
    assert [d.device for d in on_cpu.devices] == ["cpu #0", "cpu #1"]  # --devices cpu,cpu keeps working
    assert all(d.source == "estimated" for d in planned.devices)
    assert "estimated for cuda:0,cuda:1 (not on this machine)" in planned.note
    for p, c in zip(planned.devices, on_cpu.devices):
        assert (p.params, p.peak_bytes, p.parts) == (c.params, c.peak_bytes, c.parts)
    assert planned.comm_bytes_per_step == on_cpu.comm_bytes_per_step > 0
    with pytest.raises(ConfigError, match="measured memory needs the devices cuda:0,cuda:1"):
        run_memory("dual", "split", None, batch_size=2, source="measured", **TINY)
    assert main(["memory", "--placement", "split", *TINY_ARGS, "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "cuda:0" in printed and "cuda:1" in printed and "estimated" in printed


# --- precision (issue 16): what autocast keeps -------------------------------------------


@pytest.mark.parametrize("placement,devices", [("towers", "cpu"), ("split", "cpu,cpu"), ("grouped", "cpu")])
def test_bf16_activations_by_dtype_sum_to_the_total_and_are_mostly_bfloat16(placement, devices):
    fp32 = run_memory("dual", placement, devices, batch_size=4, **TINY)
    bf16 = run_memory("dual", placement, devices, batch_size=4, numerics=Numerics("bf16"), **TINY)
    assert bf16.precision == "bf16" and bf16.to_json()["numerics"]["precision"] == "bf16"
    assert fp32.precision == "fp32" and fp32.to_json()["numerics"]["precision"] == "fp32"
    for f, b in zip(fp32.devices, bf16.devices):
        for d in (f, b):
            assert sum(d.activations_by_dtype.values()) == d.activations_bytes > 0
            assert d.peak_bytes == (
                d.params_bytes + d.grads_bytes + d.optimizer_bytes + d.activations_bytes
                + d.weight_casts_bytes + d.input_bytes
            )  # fmt: skip
        # weights, gradients and momentum stay float32 under autocast
        assert b.params_bytes == b.grads_bytes == b.optimizer_bytes == 4 * b.params == f.params_bytes
        assert "bfloat16" not in f.activations_by_dtype
        assert b.activations_by_dtype["bfloat16"] >= 0.8 * b.activations_bytes
        # max-pool indices are int64 whatever the precision
        assert b.activations_by_dtype["int64"] == f.activations_by_dtype["int64"] > 0
        assert b.activations_bytes < 0.6 * f.activations_bytes
    # every weight (not the biases: the backward needs no bias) cast once, 2 bytes a value
    weights = sum(p.numel() for name, p in build_model("dual", **TINY).named_parameters() if name.endswith("weight"))
    assert sum(d.weight_casts_bytes for d in bf16.devices) == 2 * weights
    joined = placement == "grouped"  # grouped joins the towers' conv weights every step, in fp32 too
    assert (sum(d.weight_casts_bytes for d in fp32.devices) > 0) == joined


def test_weight_casts_do_not_grow_with_the_batch():
    b2, b4 = (
        run_memory("dual", "towers", "cpu", batch_size=b, numerics=Numerics("fp16"), **TINY).devices[0] for b in (2, 4)
    )
    assert b2.weight_casts_bytes == b4.weight_casts_bytes > 0
    assert b4.activations_by_dtype["float16"] > b2.activations_by_dtype["float16"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("placement,devices", [("towers", "cpu"), ("split", "cpu,cpu"), ("grouped", "cpu")])
def test_a_planned_step_under_fake_tensors_accounts_what_the_real_step_does(placement, devices, precision):
    placed = place(build_model("dual", **TINY), placement, devices)
    real = estimate_memory(placed, "dual", 4, numerics=Numerics(precision), width=TINY["width"])
    planned = plan_memory("dual", placed.layout, 4, numerics=Numerics(precision), **TINY)
    for r, p in zip(real.devices, planned.devices, strict=True):
        assert r.to_json() == p.to_json()
    assert "FakeTensorMode" in planned.note


def test_memory_command_reports_the_precision(tmp_path, capsys):
    out = tmp_path / "memory.json"
    argv = ["memory", "--placement", "towers", "--devices", "cpu", *TINY_ARGS, "--batch-size", "2"]
    assert main([*argv, "--precision", "bf16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bf16" in printed and "weight casts" in printed and "bfloat16" in printed
    data = json.loads(out.read_text())
    assert data["numerics"]["precision"] == "bf16"
    assert data["devices"][0]["weight_casts_bytes"] > 0 and "bfloat16" in data["devices"][0]["activations_by_dtype"]


def test_check_estimate_without_cuda_is_refused_in_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["memory", *TINY_ARGS, "--precision", "bf16", "--check-estimate"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "CUDA" in err


@pytest.mark.full_size
def test_bf16_saved_activations_of_dual_towers_at_batch_64_are_at_most_055_of_fp32():
    """Issue 16's target, at 227 px, batch 64 (planned under FakeTensorMode: the same
    accounting as a real step, tested above; about 0.5 s)."""
    layout = place(build_model("dual", width=TINY["width"]), "towers", "cpu").layout
    fp32, bf16 = (plan_memory("dual", layout, 64, numerics=Numerics(p)).devices[0] for p in ("fp32", "bf16"))
    assert bf16.activations_bytes / fp32.activations_bytes <= 0.55
    assert bf16.activations_by_dtype["bfloat16"] > bf16.activations_by_dtype["int64"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_measured_mixed_precision_memory_on_cuda_splits_activations_by_dtype(precision):
    d = run_memory("dual", "towers", "cuda:0", batch_size=8, numerics=Numerics(precision), **TINY).devices[0]
    assert d.source == "measured" and d.weight_casts_bytes > 0
    assert d.params_bytes == d.optimizer_bytes == 4 * d.params
    assert max(d.activations_by_dtype, key=d.activations_by_dtype.get) in ("bfloat16", "float16")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_a_process_peak_rss_is_its_own_not_its_parent_s():
    """A worker spawned by a big process (compare) reports its own peak: getrusage's
    ru_maxrss carries the parent's across fork and exec on Linux, VmHWM does not."""
    import subprocess

    parent = "big = bytearray(600 * 2**20)\nfor i in range(0, len(big), 4096): big[i] = 1\n"
    child = "from alexnet2gpu.measure.accounting import rss_peak_bytes; print(rss_peak_bytes())"
    script = parent + f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert 0 < int(out) < 600 * 2**20  # the child never held the parent's 600 MiB
