"""scripts/gpu_checks.sh without a GPU: its dry run checks every step's command line with the
CLI's own parser and layout rules, as on one GPU and on two; a bad step is named with the
line the CLI would refuse it with; the python it picks; the summary table it ends with."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet2gpu.errors import ConfigError
from alexnet2gpu.parallel import resolve_layout

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_checks.sh"
# the steps, most important first; with one GPU the two-GPU steps are skipped, saying why
FIRST = ["env", "verify", "verify-bf16", "split-cuda0-cpu"]
ESTIMATES = ["estimate-dual-grouped", "estimate-dual-towers", "estimate-simplified-single", "estimate-half-auto"]
ONE_GPU = [*FIRST, *ESTIMATES, "lrn", "compare", "compile"]
TWO_GPUS = ["split-cuda0-cuda1", "ranks", "two-workers"]
EXTRAS = ["bench-bf16", "pytest-cuda", "memory-snapshot"]


def _load(name: str):
    """scripts/NAME.py as module NAME (the dry run imports its helper, gpu_checks, so)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def dry_run():
    return _load("gpu_checks_dry_run")


def _refusal(gpus: int, placement: str, devices, *, two_tower: bool, env: dict | None = None) -> str:
    """The CLI's own words for a layout it refuses, asked of resolve_layout as it stands."""
    dry = sys.modules["gpu_checks_dry_run"]
    with dry.simulated(gpus, env), pytest.raises(ConfigError) as refused:
        resolve_layout(placement, devices, two_tower=two_tower)
    return str(refused.value)


def test_the_dry_run_checks_every_step_as_on_one_gpu_and_on_two(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "as on a machine with 1 GPU:" in done.stdout and "as on a machine with 2 GPUs:" in done.stdout
    assert "BAD" not in done.stdout and "every step passes" in done.stdout
    records = [json.loads(line) for line in (tmp_path / "dry-run.jsonl").read_text().splitlines()]
    one = [r for r in records if r["gpus"] == 1]
    two = [r for r in records if r["gpus"] == 2]
    assert [r["name"] for r in one] == [*ONE_GPU, *TWO_GPUS, *EXTRAS]
    assert [r["name"] for r in one if "skipped" in r] == TWO_GPUS
    assert [r["name"] for r in two] == [*ONE_GPU, *TWO_GPUS, *EXTRAS] and not any("skipped" in r for r in two)
    assert sum(r["limit"] for r in one if "skipped" not in r and not r["optional"]) <= 480 - 20
    assert sorted(os.listdir(tmp_path)) == ["dry-run.jsonl"]  # nothing was run


@pytest.mark.parametrize(
    "argv, gpus, expected",
    [
        (  # a single-stream net on a two-tower placement (the script's old estimate step)
            ["-m", "alexnet2gpu", "memory", "--model", "simplified", "--placement", "towers", "--check-estimate"],
            1,
            lambda: "alexnet2gpu memory: error: " + _refusal(1, "towers", None, two_tower=False),
        ),
        (  # the same CUDA device twice
            ["-m", "alexnet2gpu", "bench", "--placement", "split", "--devices", "cuda:0,cuda:0"],
            2,
            lambda: "alexnet2gpu bench: error: " + _refusal(2, "split", "cuda:0,cuda:0", two_tower=True),
        ),
        (  # two local ranks on one GPU
            [
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "-m",
                "alexnet2gpu",
                "bench",
                "--placement",
                "ranks",
            ],
            1,
            lambda: (
                "alexnet2gpu bench: error: "
                + _refusal(1, "ranks", None, two_tower=True, env=sys.modules["gpu_checks_dry_run"]._ranks_of(2)[0])
            ),
        ),
        (["-m", "alexnet2gpu", "bench", "--no-such-flag"], 1, lambda: "unrecognized arguments: --no-such-flag"),
        (["scripts/no_such_script.py", "out.json"], 1, lambda: "scripts/no_such_script.py: no such file"),
    ],
    ids=["single-stream-on-towers", "split-on-one-gpu-twice", "ranks-on-one-gpu", "unknown-flag", "no-script"],
)
def test_a_bad_step_is_named_with_the_line_the_cli_refuses_it_with(dry_run, tmp_path, capsys, argv, gpus, expected):
    good = {"gpus": gpus, "name": "fine", "limit": 10, "python": "PY", "argv": ["PY", "-m", "alexnet2gpu", "verify"]}
    bad = {**good, "name": "bad-step", "argv": ["PY", *argv]}
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    assert dry_run.main([str(path), "--no-collect"]) == 1
    out = capsys.readouterr().out
    line = expected()
    assert "  ok    fine [10 s]" in out
    assert "  BAD   bad-step [10 s]: " in out and line in out, out
    assert "dry run: 1 problem(s)" in out


def test_split_across_the_gpu_and_the_cpu_passes_on_one_gpu(dry_run):
    argv = ["PY", "-m", "alexnet2gpu", "bench", "--placement", "split", "--devices", "cuda:0,cpu"]
    assert dry_run.check_step({"gpus": 1, "python": "PY", "argv": argv}) == ["split on cuda:0,cpu"]


def test_limits_over_the_budget_are_a_problem(dry_run, tmp_path, capsys):
    step = {"gpus": 1, "name": "verify", "limit": 470, "optional": False, "python": "PY"}
    (tmp_path / "s.jsonl").write_text(json.dumps({**step, "argv": ["PY", "-m", "alexnet2gpu", "verify"]}) + "\n")
    assert dry_run.main([str(tmp_path / "s.jsonl"), "--budget", "480", "--reserve", "20"]) == 1
    assert "limits add to 470 s, over 460 s" in capsys.readouterr().out


def test_a_missing_module_is_one_line_naming_it():
    helper = _load("gpu_checks")
    assert helper.missing_import(("json", "no_such_module_abc")).startswith("no_such_module_abc (ModuleNotFoundError")
    assert helper.missing_import(("json",)) is None


def _fake_checkout(tmp_path: Path) -> Path:
    """A copy of the script beside a .venv whose python cannot import torch, and a python3
    on PATH that only says it was called."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "scripts" / "gpu_checks.sh")
    (root / ".venv" / "bin").mkdir(parents=True)
    bins = tmp_path / "bin"
    bins.mkdir()
    for path, body in ((root / ".venv/bin/python", "exit 1"), (bins / "python3", 'echo "python3 ran: $*"')):
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    return root


def test_a_venv_without_torch_is_passed_over_for_python3(tmp_path):
    root = _fake_checkout(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
    done = subprocess.run(
        ["bash", str(root / "scripts/gpu_checks.sh"), "--dry-run", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "python3 ran: scripts/gpu_checks_dry_run.py" in done.stdout
    assert "--tried .venv/bin/python (cannot import torch)" in done.stdout


def test_no_python_at_the_path_given_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "PYTHON": str(tmp_path / "no-python")}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"gpu_checks.sh: no python '{tmp_path / 'no-python'}': set PYTHON=/path/to/python"
    ]


def test_a_run_records_every_step_and_ends_with_the_table(tmp_path):
    """The real path through the script, with a python that only pretends to check (one GPU,
    lrn fails): every step in order, the two-GPU ones skipped, the extras run, exit 1."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case " $* " in\n'
        '  *" preflight "*) echo 1 ;;\n'
        f'  *" table "*) exec {sys.executable} "$@" ;;\n'
        '  *lrn_check.py*) echo "MISMATCH"; exit 1 ;;\n'
        '  *) echo "ran: $*" ;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env={**os.environ, "PYTHON": str(fake)}
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line.split(" | ")[:2] for line in (out / "summary.md").read_text().splitlines() if line.startswith("| ")]
    expected = [[f"| {name}", "1" if name == "lrn" else "0"] for name in ONE_GPU]
    expected += [[f"| {name}", "skipped"] for name in TWO_GPUS] + [[f"| {name}", "0"] for name in EXTRAS]
    assert rows[1:] == expected
    assert "| lrn | 1 |" in done.stdout and "log: MISMATCH" in done.stdout
    assert "ran: -m alexnet2gpu verify --json" in (out / "verify.txt").read_text()


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_the_summary_table_has_every_step_and_its_key_figure(tmp_path):
    helper = _load("gpu_checks")
    steps = [
        {"name": "env", "limit": 15, "exit": 0, "start": 0.0, "end": 4.2},
        {"name": "verify", "limit": 30, "exit": 0, "start": 4.2, "end": 12.0},
        {"name": "estimate-dual-grouped", "limit": 25, "exit": 0, "start": 12.0, "end": 30.0},
        {"name": "lrn", "limit": 45, "exit": 124, "start": 30.0, "end": 75.0},
        {"name": "compare", "limit": 105, "exit": 0, "start": 75.0, "end": 140.0},
        {"name": "ranks", "skipped": "needs two GPUs"},
        {"name": "pytest-cuda", "limit": 60, "exit": 1, "start": 140.0, "end": 150.0},
    ]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps({"gpus": 1, **s}) + "\n" for s in steps))
    _write(tmp_path / "env.json", {"gpus": ["NVIDIA H200"], "torch": "2.11.0", "cuda": "12.8", "python": "3.12.3"})
    check = {"placement": "split", "devices": ["cpu", "cpu"], "logits_rel_err": 1e-7, "loss_rel_err": 0.0}
    _write(tmp_path / "verify.json", {"checks": [{**check, "grads_rel_err": 3e-7, "ok": True}]})
    row = {"device": "cuda:0", "estimated_peak_bytes": 1030 * 2**20, "measured_peak_bytes": 1000 * 2**20}
    estimate = {"model": "dual", "placement": "grouped", "batch_size": 128}
    _write(tmp_path / "estimate-dual-grouped.json", {**estimate, "devices": [{**row, "peak_rel_err": 0.03}]})
    rates = [
        {"mode": mode, "batch_size": batch, "images_per_s": rate}
        for batch, mode, rate in ((64, "train", 1.0), (128, "train", 4321.0), (128, "infer", 9876.0))
    ]
    variants = [
        {"name": "dual/towers", "results": rates, "memory": {}},
        {"name": "dual/split", "results": [], "memory": {"x": 1}},
    ]
    _write(tmp_path / "compare" / "compare.json", {"variants": variants, "compiled_gains": [], "overhead": None})
    (tmp_path / "pytest-cuda.txt").write_text("....F\n==== 1 failed, 8 passed, 2 skipped in 9.10s ====\n")
    assert helper.main(["table", str(tmp_path), "--budget", "480", "--wall", "160"]) == 0
    table = (tmp_path / "summary.md").read_text()
    assert "1 x NVIDIA H200; torch 2.11.0, CUDA 12.8" in table
    assert "6 steps run in 150 s, 160 s in all of a 480 s budget; failed: lrn, pytest-cuda" in table
    assert "| verify | 0 | 7.8 | 30 | 1/1 placements agree; worst relative error 3.0e-07 (split on cpu,cpu) |" in table
    assert "cuda:0 peak estimated 1,030.0 vs measured 1,000.0 MiB (+3.0 %)" in table
    assert "| lrn | 124 (timed out at 45 s) | 45.0 | 45 |" in table
    assert "batch 128: dual/towers 4,321 / 9,876; dual/split memory only" in table
    assert "| ranks | skipped | | | needs two GPUs |" in table
    assert "| pytest-cuda | 1 | 10.0 | 60 | 1 failed, 8 passed, 2 skipped in 9.10s |" in table


def test_the_bf16_steps_key_figures_say_the_precision_and_tolerances(tmp_path):
    helper = _load("gpu_checks")
    check = {"placement": "towers", "devices": ["cuda:0"], "logits_rel_err": 4e-3, "loss_rel_err": 1e-4}
    data = {
        "numerics": {"precision": "bf16"},
        "tolerances": {"forward": 0.0625, "grads": 0.26, "agree": 0.0625},
        "checks": [{**check, "grads_rel_err": 0.02, "ok": True}],
        "agreements": [{"grads_rel_err": 0.005, "ok": True}, {"grads_rel_err": 0.0, "ok": True}],
    }
    assert helper.figure_of(data) == (
        "bf16: 1/1 placements agree; worst relative error 2.0e-02 (towers on cuda:0), against tolerances "
        "0.0625 (logits, loss) and 0.26 (gradients); 2/2 pairs of placements agree, worst gradient 5.0e-03"
    )
    row = {
        "model": "dual",
        "placement": "towers",
        "device": "cuda:0",
        "batch_size": 128,
        "numerics": {"precision": "bf16"},
    }
    bench = {
        "results": [{**row, "mode": "train", "images_per_s": 5000.0}, {**row, "mode": "infer", "images_per_s": 9e3}]
    }
    assert helper.figure_of(bench) == "dual/towers on cuda:0, bf16: images/s at batch 128, train 5,000, infer 9,000"
