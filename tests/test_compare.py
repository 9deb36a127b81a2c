"""compare: the matrix on a tiny size, compare.json / compare.md / plots written, every
figure labelled, speed-ups, atomic writes (an interrupted run keeps the previous report),
dual/ranks through the one process launcher, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from alexnet2gpu.cli import compare as compare_cli
from alexnet2gpu.cli import main
from alexnet2gpu.errors import ConfigError
from alexnet2gpu.measure import bench as bench_mod
from alexnet2gpu.measure import compare as compare_mod
from alexnet2gpu.measure import workload as workload_mod
from alexnet2gpu.measure.compare import run_compare
from alexnet2gpu.measure.matrix import CompareConfig, base_name, eager_name, precision_of, speedups, variant_name
from alexnet2gpu.parallel import Numerics
from alexnet2gpu.parallel.processes import WorkersFailed
from alexnet2gpu.report import compare as report_compare
from alexnet2gpu.report import make_console, plots

from .tiny import TINY_SIZE, TINY_WIDTH

SIZE = max(TINY_SIZE.values())  # one input side that every tiny net takes
TINY = dict(width=TINY_WIDTH, image_size=SIZE, batch_sizes=[2, 4], memory_batch_size=4, repeats=1, warmup=0)
TINY_ARGS = [
    "--width",
    str(TINY_WIDTH),
    "--image-size",
    str(SIZE),
    "--batch-sizes",
    "2,4",
    "--memory-batch-size",
    "4",
    "--repeats",
    "1",
    "--warmup",
    "0",
]
LOCAL = ["simplified", "dual/towers", "dual/grouped", "dual/split", "half", "torchvision"]


@pytest.fixture(scope="module")
def report():
    return run_compare(CompareConfig(variants=LOCAL, overhead=True, **TINY), command="test")


def test_compare_runs_the_local_matrix(report):
    assert [v.name for v in report.variants] == LOCAL
    for v in report.variants:
        assert v.params > 0 and v.memory is not None
        if v.name == "dual/split" and torch.cuda.device_count() < 2:
            assert v.results == [] and "needs two GPUs" in v.note
            assert [d.device for d in v.memory.devices] == ["cuda:0", "cuda:1"]
            assert {d.source for d in v.memory.devices} == {"estimated"} and v.devices == "cuda:0,cuda:1"
            assert v.comm_bytes_per_step > 0
        else:
            assert {(r.mode, r.batch_size) for r in v.results} == {(m, b) for m in ("train", "infer") for b in (2, 4)}
            assert v.comm_bytes_per_step == 0
    assert report.overhead is not None and report.overhead.model == "simplified"
    assert report.machine["torch"] == torch.__version__ and report.wall_s > 0


def test_speedups_are_ratios_of_the_measured_rates(report):
    rows = speedups(report.variants)
    rate = {(v.name, r.mode, r.batch_size): r.images_per_s for v in report.variants for r in v.results}
    for row in rows:
        assert row["speedup"] == pytest.approx(
            rate[row["name"], row["mode"], row["batch_size"]] / rate[row["vs"], row["mode"], row["batch_size"]]
        )
    assert {(row["vs"]) for row in rows} == {"simplified", "dual/towers"}
    assert all(row["speedup"] == 1.0 for row in rows if row["name"] == row["vs"])


def test_compare_writes_json_markdown_and_plots(report, tmp_path):
    paths = report_compare.write_compare(report, tmp_path)
    assert sorted(p.name for p in paths) == sorted(report_compare.FILES)
    data = json.loads((tmp_path / "compare.json").read_text())
    assert [v["name"] for v in data["variants"]] == LOCAL
    assert data["torch"] == torch.__version__ and "machine" in data and data["speedups"]
    md = (tmp_path / "compare.md").read_text()
    assert "measured" in md and "estimated" in md and torch.__version__ in md and "| dual/grouped |" in md
    for png in ("memory.png", "throughput.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_interrupted_write_keeps_the_previous_report(report, tmp_path, monkeypatch):
    report_compare.write_compare(report, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_throughput", interrupted)  # the last file to be rendered
    with pytest.raises(KeyboardInterrupt):
        report_compare.write_compare(report, tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # nothing replaced, no temporary file left


def test_an_interrupted_run_exits_130_and_keeps_the_previous_report(tmp_path, monkeypatch, capsys):
    args = ["compare", *TINY_ARGS, "--variants", "simplified", "--no-overhead", "--out", str(tmp_path)]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = []

    def interrupted_step(*a, **k):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_mod, "train_step", interrupted_step)
    assert main(args) == 130 and calls
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert "interrupted" in capsys.readouterr().err


def test_out_of_memory_in_compare_is_one_line(tmp_path, monkeypatch, capsys):
    def oom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. GPU 0 has a total capacity of 8.00 MiB")

    monkeypatch.setattr(bench_mod, "train_step", oom)
    code = main(["compare", *TINY_ARGS, "--variants", "dual/towers", "--no-overhead", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "out of memory on cuda:0 at batch size 2" in err and "largest that fits" in err
    assert not (tmp_path / "compare.json").exists()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--variants", "dual/nowhere"], "unknown variant 'dual/nowhere'"),
        (["--batch-sizes", "0"], "batch sizes"),
        (["--repeats", "0"], "repeats"),
        (["--threads", "-1"], "threads"),
    ],
)
def test_bad_compare_flags_are_usage_errors(args, fragment, tmp_path, capsys):
    assert main(["compare", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_quick_is_the_same_matrix_with_less_work():
    quick, full = CompareConfig.quick(), CompareConfig()
    assert quick.variants == full.variants and quick.width == full.width == 1.0
    assert max(quick.batch_sizes) < max(full.batch_sizes) and quick.repeats <= full.repeats


@pytest.mark.distributed
def test_compare_launches_ranks_itself_and_counts_the_same_bytes_as_split(tmp_path):
    result = run_compare(CompareConfig(variants=["dual/split", "dual/ranks"], overhead=False, **TINY))
    split, ranks = result.variants
    assert ranks.name == "dual/ranks" and ranks.devices == "cpu x2 processes"
    assert ranks.comm_bytes_per_step == split.comm_bytes_per_step > 0
    assert [d.params for d in ranks.memory.devices] == [d.params for d in split.memory.devices]
    assert all(d.rss_peak_bytes for d in ranks.memory.devices)
    assert {(r.mode, r.batch_size) for r in ranks.results} == {(m, b) for m in ("train", "infer") for b in (2, 4)}


@pytest.mark.distributed
def test_ranks_job_failure_is_one_clear_error_naming_the_rank():
    config = CompareConfig(variants=["dual/ranks"], overhead=False, **TINY)
    config.image_size = 3  # refused by the workers themselves, as a bad setting would be
    with pytest.raises(WorkersFailed, match=r"^dual/ranks: worker rank [01] failed: .*image size 3") as caught:
        compare_mod._run_ranks(config, "dual/ranks")
    assert caught.value.rank in (0, 1)


@pytest.mark.distributed
def test_compare_under_torchrun_measures_ranks_in_its_own_processes(tmp_path):
    """Started under torchrun, every rank measures dual/ranks in place; rank 0 alone goes
    on with the rest and writes the report; no worker is left behind."""
    from .dist_launch import run_torchrun

    result = run_torchrun(
        2,
        [
            "-m",
            "alexnet2gpu",
            "compare",
            *TINY_ARGS,
            "--variants",
            "simplified,dual/ranks",
            "--no-overhead",
            "--out",
            str(tmp_path),
        ],
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not result.orphans
    data = json.loads((tmp_path / "compare.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["simplified", "dual/ranks"]
    ranks = data["variants"][1]
    assert "this torchrun job's 2 processes" in ranks["note"] and ranks["comm_bytes_per_step"] > 0
    assert result.stdout.count("wrote ") == 1  # rank 0 alone reports


def test_an_unusable_out_folder_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    measured = []
    monkeypatch.setattr(compare_mod, "run_compare", lambda *a, **k: measured.append(1))
    assert main(["compare", "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker / 'out'}" in err and "Traceback" not in err and not measured


@pytest.fixture(scope="module")
def compiled_report():
    """simplified, dual/towers and dual/split with --compile (Dynamo's eager backend: quick)."""
    real = workload_mod.compile_placed
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_mod, "compile_placed", lambda placed: real(placed, backend="eager"))
        config = CompareConfig(
            variants=["simplified", "dual/towers", "dual/split"], overhead=False, compile=True, **TINY
        )
        return run_compare(config, command="test")


def test_compare_compile_adds_compiled_variants_and_their_gains(compiled_report, tmp_path):
    names = [v.name for v in compiled_report.variants]
    measurable_split = torch.cuda.device_count() >= 2
    expected = ["simplified", "simplified+compile", "dual/towers", "dual/towers+compile", "dual/split"]
    assert names == expected + (["dual/split+compile"] if measurable_split else [])
    by_name = {v.name: v for v in compiled_report.variants}
    for name in ("simplified", "dual/towers"):
        eager, compiled = by_name[name], by_name[name + "+compile"]
        assert compiled.compiled and not eager.compiled and compiled.memory is None
        assert compiled.params == eager.params and "torch.compile" in compiled.note
        assert all(r.compiled and r.compile_s > 0 for r in compiled.results)
    if not measurable_split:
        assert "needs two GPUs" in compiled_report.skipped["dual/split+compile"]
    data = compiled_report.to_json()
    rate = {(v.name, r.mode, r.batch_size): r.images_per_s for v in compiled_report.variants for r in v.results}
    assert {(g["name"], g["mode"], g["batch_size"]) for g in data["compiled_gains"]} == {
        (n, m, b) for n in ("simplified", "dual/towers") for m in ("train", "infer") for b in (2, 4)
    }
    for g in data["compiled_gains"]:
        key = (g["name"], g["mode"], g["batch_size"])
        assert g["gain"] == pytest.approx(rate[(g["name"] + "+compile", *key[1:])] / rate[key])
    report_compare.write_compare(compiled_report, tmp_path)
    md = (tmp_path / "compare.md").read_text()
    assert "compiled variants (`torch.compile`" in md and "simplified+compile, dual/towers+compile" in md
    assert "## Compiled gain" in md and "## Compile time" in md


def test_quick_writes_to_its_own_folder(monkeypatch, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    compare_cli.add_arguments(parser)
    written = []
    monkeypatch.setattr(compare_cli, "check_output_dir", lambda out, flag: written.append(out))
    monkeypatch.setattr(compare_mod, "run_compare", lambda *a, **k: None)  # cli.compare imports it in run()
    for argv, out in ((["--quick"], "compare-out/quick"), ([], "compare-out"), (["--quick", "--out", "x"], "x")):
        compare_cli.run(parser.parse_args(argv))
        assert written.pop() == out


def test_tables_keep_every_number_whole_when_not_a_terminal(report, monkeypatch):
    import io

    from alexnet2gpu import report as report_pkg

    page = io.StringIO()
    monkeypatch.setattr(report_pkg, "_CONSOLE", make_console(page))
    report_compare.render_compare(report)
    text = page.getvalue()
    assert "…" not in text
    for v in report.variants:
        for d in v.memory.devices:
            assert f"{d.params:,}" in text and d.source in text
        for r in v.results:
            assert f"{r.images_per_s:,.1f} ± {r.spread:,.1f}" in text
    if torch.cuda.device_count() < 2:
        assert "not measured here" in text


def test_throughput_plot_starts_at_zero_and_says_what_the_error_bars_are(report, monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    plots.plot_throughput(report, tmp_path / "t.png")
    (fig,) = figures
    assert all(ax.get_ylim()[0] == 0 for ax in fig.axes)
    assert "error bars: half the range" in fig._suptitle.get_text()
    if torch.cuda.device_count() < 2:
        notes = " ".join(t.get_text() for t in fig.texts)
        assert "not measured here" in notes and "dual/split" in notes


@pytest.mark.parametrize(
    "gpus, where",
    [(0, "on the CPU (gloo)"), (2, "on cuda:0 and cuda:1 (NCCL)"), (4, "on cuda:0 and cuda:1 (NCCL)")],
)
def test_the_ranks_note_says_where_the_launched_workers_run(gpus, where, monkeypatch):
    """The workers take cuda:LOCAL_RANK where CUDA exists (NCCL), else the CPU (gloo): the
    launcher is told which, and the note says it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    launched = []

    def fake_launch(function, *args, **settings):
        launched.append((function, args, settings))
        return compare_mod._variant(args[1], None, [], "this torchrun job's 2 processes, one tower each")

    monkeypatch.setattr(compare_mod, "launch", fake_launch)
    config = CompareConfig(variants=["dual/ranks"], overhead=False, **TINY)
    variant = compare_mod._run_ranks(config, "dual/ranks+compile")
    assert launched == [
        (
            compare_mod._ranks_job,
            (config, "dual/ranks+compile"),
            {
                "processes": 2,
                "threads": config.threads or 1,
                "timeout_s": config.ranks_timeout_s,
                "device": "cuda" if gpus else "cpu",
            },
        )
    ]
    assert variant.note == (
        f"2 processes launched with torch.distributed.launcher (elastic_launch), one tower each, {where}"
    )


def test_one_gpu_skips_ranks_which_puts_one_tower_per_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    run, notes = compare_mod.plan_variants(CompareConfig(variants=["dual/ranks", "dual/towers"]))
    assert run == ["dual/towers"]
    assert notes["dual/ranks"] == "skipped: ranks puts one tower per GPU and this machine has 1 GPU"


def test_variant_names_carry_precision_and_compilation():
    for base in ("simplified", "dual/towers"):
        for precision in ("fp32", "bf16", "fp16"):
            for compiled in (False, True):
                name = variant_name(base, precision, compiled)
                assert (base_name(name), precision_of(name), name != eager_name(name)) == (base, precision, compiled)
    assert variant_name("dual/towers", "bf16", True) == "dual/towers+bf16+compile"
    assert variant_name("dual/towers") == "dual/towers"  # float32 rows keep their names


def test_compare_adds_bf16_rows_on_cuda_by_default_and_on_the_cpu_only_when_asked(monkeypatch):
    assert CompareConfig(precisions=["fp32", "bf16"]).resolved_precisions() == ["fp32", "bf16"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert CompareConfig().resolved_precisions() == ["fp32"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert CompareConfig().resolved_precisions() == ["fp32", "bf16"]
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        CompareConfig(precisions=["fp8"])


@pytest.fixture(scope="module")
def bf16_report():
    config = CompareConfig(variants=["simplified", "dual/towers"], overhead=False, precisions=["fp32", "bf16"], **TINY)
    return run_compare(config, command="test")


def test_compare_bf16_rows_carry_their_numerics_and_gains(bf16_report, tmp_path):
    names = [v.name for v in bf16_report.variants]
    assert names == ["simplified", "simplified+bf16", "dual/towers", "dual/towers+bf16"]
    for v in bf16_report.variants:
        assert v.results and {r.numerics["precision"] for r in v.results} == {v.precision}
        assert {r.numerics["memory_format"] for r in v.results} == {"contiguous"}
        assert all("cudnn_benchmark" in r.numerics and "tf32_matmul" in r.numerics for r in v.results)
        assert v.params > 0
        if v.precision == "fp32" or compare_mod._memory_takes_numerics():
            assert v.memory is not None  # the bf16 rows' memory step ran in bf16
    data = bf16_report.to_json()
    assert set(data["numerics"]) == {"fp32", "bf16"} and data["numerics"]["bf16"]["precision"] == "bf16"
    assert {(g["name"], g["precision"]) for g in data["precision_gains"]} == {
        ("simplified", "bf16"),
        ("dual/towers", "bf16"),
    }
    rate = {(v.name, r.mode, r.batch_size): r.images_per_s for v in bf16_report.variants for r in v.results}
    for g in data["precision_gains"]:
        assert g["gain"] == pytest.approx(rate[(g["name"] + "+bf16", g["mode"], g["batch_size"])] / g["fp32"])
    bf16_vs = {(s["name"], s["vs"]) for s in data["speedups"] if s["name"].endswith("+bf16")}
    assert bf16_vs == {
        ("simplified+bf16", "simplified"),
        ("simplified+bf16", "dual/towers"),
        ("dual/towers+bf16", "simplified"),
        ("dual/towers+bf16", "dual/towers"),
    }
    report_compare.write_compare(bf16_report, tmp_path)
    md = (tmp_path / "compare.md").read_text()
    assert "- numerics: precision fp32, bf16 (rows beyond fp32 under torch.autocast" in md
    assert "## Mixed-precision gain" in md and "| dual/towers+bf16 |" in md


@pytest.mark.parametrize("memory_takes_numerics", [True, False])
def test_the_ranks_job_gets_the_precision_and_memory_format(memory_takes_numerics, monkeypatch):
    """What the workers run (here in this process, through a stand-in launcher) measures
    in the row's precision and memory format, and its record comes back through pickle."""
    import pickle

    seen = {}

    def fake_launch(function, *args, **settings):
        return pickle.loads(pickle.dumps(function(*args)))  # spawn returns rank 0's result so

    def fake_bench(model, placement, devices, **kwargs):
        seen["bench"] = (model, placement, kwargs["numerics"])
        return []

    def fake_memory(model, placement, devices, *, numerics, **kwargs):
        seen["memory"] = numerics

    def fake_memory_without_numerics(model, placement, devices, *, batch_size, seed, **model_kwargs):
        seen["memory"] = "fp32 only"  # a tree whose memory step predates precisions

    monkeypatch.setattr(compare_mod, "launch", fake_launch)
    monkeypatch.setattr(compare_mod, "run_bench", fake_bench)
    monkeypatch.setattr(
        compare_mod, "run_memory", fake_memory if memory_takes_numerics else fake_memory_without_numerics
    )
    config = CompareConfig(variants=["dual/ranks"], overhead=False, channels_last=True, **TINY)
    variant = compare_mod._run_ranks(config, "dual/ranks+bf16")
    assert variant.precision == "bf16" and variant.name == "dual/ranks+bf16"
    bf16 = Numerics("bf16", channels_last=True)
    assert seen["bench"] == ("dual", "ranks", bf16)
    if memory_takes_numerics:
        assert seen["memory"] == bf16
    else:  # said, not run in fp32 instead
        assert "memory" not in seen and "memory not measured" in variant.note


@pytest.mark.distributed
def test_compare_workers_adds_the_two_workers_section(tmp_path):
    """`compare --workers` launches 2 processes and writes the section beside the report:
    every way's counted bytes equal the closed form, and the crossings are those of the
    nets it measured (width 1/16 here), not of the full-size ones."""
    import json

    from alexnet2gpu.cli.main import main

    out = tmp_path / "cmp"
    argv = ["compare", "--quick", "--variants", "simplified", "--no-overhead", "--repeats", "1", "--width", "0.0625"]
    argv += ["--image-size", "67", "--workers", "--workers-models", "simplified", "--workers-batch-size", "8"]
    assert main([*argv, "--out", str(out)]) == 0
    data = json.loads((out / "two-workers.json").read_text())
    ways = [r["way"] for r in data["records"]]
    assert ways == ["one device", "data parallel", "hybrid"]
    assert all(sent == r["closed_form_bytes"] for r in data["records"][1:] for sent in r["sent_bytes"])
    assert len(data["records"][1]["sent_bytes"]) == 2 and data["records"][1]["sent_bytes"][0] > 0
    assert data["settings"]["width"] == 0.0625
    assert (out / "two-workers.md").read_text().startswith("# ") and (out / "two-workers-bytes.png").stat().st_size
