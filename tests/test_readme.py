"""The README as written: its Python snippet and its command list run, and its accuracy and
timing claims equal the records in docs/runs they come from."""

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from .dist_launch import run_killing_group

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results.md"
RUNS = ROOT / "docs" / "runs"
COMMAND_LIMIT_S = 120  # each listed command took 0.1-46 s on 2 cores under load 2.5-5.5
FULL_SIZE = "# full size"  # a listed command so marked is not run here


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (RUNS / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def _evals(name: str) -> list[float]:
    return [r["test_accuracy"] for r in _records(name) if r["event"] == "eval"]


def _summary(name: str) -> dict:
    return [r for r in _records(name) if r["event"] == "summary"][-1]


def _flat(text: str) -> str:
    """Markdown prose with its line breaks as spaces, so a phrase may wrap."""
    return re.sub(r"\s+", " ", text)


def _commands() -> list[str]:
    block = re.search(r"## Commands\n\n```bash\n(.*?)```", README.read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("alexnet2gpu ")]


@pytest.mark.full_size
def test_the_python_api_snippet_runs(capsys):
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert " - " in printed  # the layout and its reason


def test_the_opening_commands_are_the_two_that_ci_runs():
    opening = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1).splitlines()
    assert [line.split("#")[0].strip() for line in opening] == [
        "bash scripts/run.sh compare",
        "bash scripts/run.sh test",
    ]
    assert "exec bash scripts/run.sh test" in (ROOT / ".ci" / "run").read_text()


def test_the_cpu_sized_run_s_accuracy_and_time_are_its_record_s():
    readme = _flat(README.read_text())
    name = "simplified-72px-2ep"
    accuracy, summary = _evals(name)[-1], _summary(name)
    assert f"test accuracy **{accuracy:.3f}** in 2 epochs" in readme
    assert f"{summary['train_seconds']:.0f} s of training at {summary['images_per_s']:.1f} images/s" in readme
    assert f"docs/runs/{name}.jsonl" in readme
    # the wall-clock time (/usr/bin/time, not in the record) holds the training time and little more
    minutes, wall = re.search(r"\*\*([\d.]+) minutes\*\* \((\d+) s by `/usr/bin/time`\)", readme).groups()
    assert summary["train_seconds"] <= int(wall) <= 1.15 * summary["train_seconds"]
    assert float(minutes) == round(int(wall) / 60 * 2) / 2  # to the half minute
    results = _flat(RESULTS.read_text())
    assert f"**{_evals(name)[0]:.4f} / {accuracy:.4f}**" in results
    assert f"test acc {accuracy:.3f}" in results and f"{summary['images_per_s']:.1f} examples/sec" in results


def test_the_seed_beating_accuracies_are_the_last_evaluations_of_their_records():
    readme = _flat(README.read_text())
    dual, simplified = (_evals(f"{net}-72px-cosine-restart-4ep")[-1] for net in ("dual", "simplified"))
    assert f"**`dual` {dual:.3f}, `simplified` {simplified:.3f}**" in readme
    half, dual_six = (_evals(f"{net}-72px-cosine-6ep")[-1] for net in ("half", "dual"))
    assert f"`half`, the paper's one-GPU net, {half:.3f} after the first six (`dual` {dual_six:.3f} there" in readme
    hours = sum(
        _summary(f"{net}-72px-cosine{stage}")["train_seconds"]
        for net in ("dual", "simplified")
        for stage in ("-6ep", "-restart-4ep")
    ) / (2 * 3600)
    assert f"about {hours:.1f} hours of training per net" in readme


def test_results_md_s_per_epoch_accuracies_are_their_records():
    results = RESULTS.read_text().replace("**", "")
    for net in ("dual", "simplified", "half"):
        row = next(line for line in results.splitlines() if line.startswith(f"| {net} | 0."))
        assert " / ".join(f"{a:.4f}" for a in _evals(f"{net}-72px-cosine-6ep")) in row, net
        if net != "half":
            assert " / ".join(f"{a:.4f}" for a in _evals(f"{net}-72px-cosine-restart-4ep")) in row, net


def test_the_validation_split_runs_table_and_evaluate_figures_are_their_records():
    results = RESULTS.read_text().replace("**", "")
    section = results[results.index("## With a validation split") :]
    evals = {
        net: [(r["val_accuracy"], r["test_accuracy"]) for r in _records(f"{net}-72px-val-6ep") if r["event"] == "eval"]
        for net in ("dual", "simplified")
    }
    assert len(evals["dual"]) == len(evals["simplified"]) == 6
    for epoch, (dual, simplified) in enumerate(zip(evals["dual"], evals["simplified"]), 1):
        row = f"| {epoch} | {dual[0]:.4f} | {dual[1]:.4f} | {simplified[0]:.4f} | {simplified[1]:.4f} |"
        assert row in section, row
    for net in ("dual", "simplified"):
        record = json.loads((RUNS / f"{net}-72px-val-6ep-evaluate.json").read_text())
        assert record["top1"] == evals[net][-1][1]  # evaluate reproduces the run's test accuracy
        assert f"{record['top1']:.4f}" in section and f"{record['top5']:.4f}" in section
        assert f"{round(_summary(f'{net}-72px-val-6ep')['train_seconds']):,} s" in section
    readme = _flat(README.read_text()).replace("**", "")
    assert f"`dual` test {evals['dual'][-1][1]:.4f} (validation {evals['dual'][-1][0]:.4f})" in readme
    assert f"`simplified` {evals['simplified'][-1][1]:.4f} ({evals['simplified'][-1][0]:.4f})" in readme


def test_the_interleaved_ratios_and_compile_times_are_their_records():
    readme = _flat(README.read_text())
    eager = json.loads((RUNS / "targets-eager.json").read_text())
    medians = {t["target"]: t["median"] for t in eager["targets"]}
    assert f"{medians['dual/towers against torchvision, eager']:.2f}x torchvision" in readme
    assert f"{medians['dual/grouped against dual/towers, eager']:.2f}x towers" in readme
    ranks = "ranks (2 x 1 thread) against {} (1 thread)"
    assert (
        f"{medians[ranks.format('towers')]:.2f}x towers, {medians[ranks.format('torchvision')]:.2f}x torchvision"
        in (readme)
    )
    for variant in ("dual/towers", "dual/grouped", "dual/ranks", "torchvision"):
        per_round = " / ".join(f"{r['rows'][variant]['images_per_s']:.1f}" for r in eager["rounds"])
        assert re.search(rf"\| {re.escape(variant)}[^|]*\| [^|]*\| {re.escape(per_round)} \|", readme), variant
    assert f"activations {eager['memory']['dual_activations_mib']:.1f} MiB" in readme
    assert f"holds {eager['memory']['split_larger_device_over_one_device']:.3f} of what one device holds" in readme
    compiled = json.loads((RUNS / "targets-compiled.json").read_text())
    seconds = [row["compile_s"] for r in compiled["rounds"] for row in r["rows"].values()]
    assert f"after {min(seconds):.1f}-{max(seconds):.1f} s of compiling" in readme
    assert "21-25 s" not in readme and "21-25 s" not in RESULTS.read_text()  # the whole process, not compiling


def test_every_listed_command_is_tiny_but_the_ones_marked_full_size():
    commands = _commands()
    assert len(commands) >= 8
    for line in commands:
        if FULL_SIZE in line:
            continue
        flags = line.split("#")[0].split()
        if flags[1] in ("train", "bench", "compare", "launch"):
            assert "--width" in flags and "--image-size" in flags, line


@pytest.mark.integration
@pytest.mark.distributed
def test_every_listed_command_runs_within_its_limit(tmp_path):
    """Each line of the README's command list, in order, in one scratch folder (evaluate reads
    the checkpoint train wrote); the lines marked full size are left out."""
    # a free rendezvous port, so that a concurrent torchrun test cannot collide with launch's
    env = {**os.environ, "PET_STANDALONE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for line in _commands():
        if FULL_SIZE in line:
            continue
        argv = line.split("#")[0].split()
        cmd = [sys.executable, "-m", "alexnet2gpu", *argv[1:]]
        start = time.monotonic()
        result = run_killing_group(cmd, timeout=COMMAND_LIMIT_S, env=env, merge_stderr=True, cwd=tmp_path)
        print(f"{time.monotonic() - start:6.1f} s  {line}")
        assert result.returncode == 0, f"exit {result.returncode}: {line}\n{result.stdout[-3000:]}"


def test_the_two_workers_table_is_its_record():
    """Each README two-workers row (bytes, images/s, weights per process) is the record's."""
    data = json.loads((RUNS / "two-workers-b128.json").read_text())
    text = README.read_text()
    for r in data["records"]:
        if r["way"] == "one device" or r["model"] == "simplified":  # not in the README's table
            continue
        weights = " / ".join(
            f"{m['params_bytes'] / 2**20:.1f}" for m in r["memory"][: 2 if r["way"] == "towers" else 1]
        )
        row = (
            f"| {r['model']} | {r['way']} | {weights} | {int(r['sent_bytes'][0]):,} B | "
            f"{r['images_per_s']:.1f} ± {r['spread_images_per_s']:.1f} |"
        )
        assert row in text, row
        assert all(sent == r["closed_form_bytes"] for sent in r["sent_bytes"])
