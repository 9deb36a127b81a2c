"""Checks every step of scripts/gpu_checks.sh without running any of them and without a
GPU: ``bash scripts/gpu_checks.sh --dry-run OUTDIR`` writes each step's command line (one
JSON line per step, as on a machine with 1 GPU and then with 2) and runs this on them:

    python scripts/gpu_checks_dry_run.py OUTDIR/dry-run.jsonl [--budget 480 --reserve 20]

An ``alexnet2gpu`` step is parsed with the CLI's own parser (unknown flags, bad choices),
then the layout each of its placements would take is resolved as the command resolves it
(``resolve_layout``, ``available_placements``, ``plan_variants``), with
``torch.cuda.device_count`` and ``torch.cuda.is_available`` made to say 1 or 2 GPUs; a
torchrun step is read with torchrun's own parser and resolved once per local rank. Other
steps: the script exists and compiles (this repository's own helper: its parser and
placement too), pytest's ``-k`` selects some test (``--collect-only``). Exit status 0 when
every step passes, 1 naming each bad step with the line the command would fail with, 2
when an import is missing or the file cannot be read."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import gpu_checks  # noqa: E402  (this folder's helper: it imports no torch at the top)

TORCHRUN_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


class Refused(Exception):
    """The step would fail: the line it would fail with."""


@contextlib.contextmanager
def simulated(gpus: int, torchrun: dict[str, str] | None = None) -> Iterator[None]:
    """torch sees ``gpus`` CUDA devices; the torchrun variables are ``torchrun``'s (or unset)."""
    import torch

    with (
        mock.patch.object(torch.cuda, "device_count", lambda: gpus),
        mock.patch.object(torch.cuda, "is_available", lambda: gpus > 0),
        mock.patch.dict(os.environ),
    ):
        for key in TORCHRUN_KEYS:
            os.environ.pop(key, None)
        os.environ.update(torchrun or {})
        yield


@contextlib.contextmanager
def _refusals(prefix: str) -> Iterator[None]:
    """A parser's exit or an alexnet2gpu error becomes :class:`Refused` with its own line."""
    from alexnet2gpu.errors import Alexnet2gpuError

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            yield
    except SystemExit as exit_:
        lines = stderr.getvalue().strip().splitlines()
        raise Refused(lines[-1] if lines else f"{prefix}: exited {exit_.code} while parsing") from None
    except Alexnet2gpuError as error:
        raise Refused(f"{prefix}: error: {error}") from None


def _two_tower(model: str) -> bool:
    """What ``is_two_tower(build_model(model))`` says, without building it: only ``dual``."""
    return model == "dual"


def _gpus(count: int) -> str:
    return f"{count} GPU{'' if count == 1 else 's'}"


def _described(layout) -> str:
    if layout.distributed:
        return f"ranks: rank {layout.rank} of {layout.world_size} on {layout.device}"
    return f"{layout.placement} on {layout.describe()}"


# ---- each alexnet2gpu command, resolved the way its cli module resolves it ----------------


def _plan_verify(args) -> list[str]:
    from alexnet2gpu.checks.verify import available_placements
    from alexnet2gpu.parallel import resolve_layout

    return [_described(resolve_layout(p, devices, two_tower=True)) for p, devices in available_placements()]


def _plan_bench(args) -> list[str]:
    from alexnet2gpu.measure.workload import parse_batch_sizes
    from alexnet2gpu.parallel import resolve_layout

    parse_batch_sizes(args.batch_sizes)
    return [_described(resolve_layout(args.placement, args.devices, two_tower=_two_tower(args.model)))]


def _plan_memory(args) -> list[str]:
    """run_memory (and with --check-estimate check_estimator: measured, then the same
    placement on CPU stand-ins)."""
    import torch

    from alexnet2gpu.errors import ConfigError
    from alexnet2gpu.measure.memory import _absent
    from alexnet2gpu.parallel import resolve_layout

    two = _two_tower(args.model)
    intended = resolve_layout(args.placement, args.devices, two_tower=two, plan=True)
    measured = args.check_estimate or args.source == "measured"
    if args.check_estimate and not torch.cuda.is_available():
        raise ConfigError("--check-estimate measures on CUDA and this machine has no CUDA device")
    if measured and _absent(intended):
        raise ConfigError(
            f"measured memory needs the devices {intended.describe()} and this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    if measured and any(d.type != "cuda" for d in intended.devices):
        raise ConfigError(f"measured memory needs CUDA devices, got {intended.describe()}")
    plans = [_described(intended) + (" (measured)" if measured else "")]
    if args.check_estimate:
        stand_ins = ["cpu"] * len(intended.devices)
        plans.append(_described(resolve_layout(intended.placement, stand_ins, two_tower=two, plan=True)))
    return plans


def _ranks_of(processes: int) -> list[dict[str, str]]:
    """The torchrun variables of each process of a one-machine job."""
    size = str(processes)
    return [
        {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": size, "LOCAL_WORLD_SIZE": size} for r in range(processes)
    ]


def _plan_compare(args) -> list[str]:
    """run_compare's matrix: plan_variants, then run_memory (planned) and run_bench (where
    measurable) per one-process variant, and each rank of the torchrun job it launches."""
    import torch

    from alexnet2gpu.cli.compare import config_from_args
    from alexnet2gpu.measure.compare import _devices_for, _measurable, plan_variants
    from alexnet2gpu.measure.matrix import VARIANTS, base_name
    from alexnet2gpu.parallel import resolve_layout

    names, _notes = plan_variants(config_from_args(args))
    plans = []
    for name in names:
        spec = VARIANTS[base_name(name)]
        two = _two_tower(spec.model)
        if spec.processes > 1:
            for env in _ranks_of(spec.processes):
                with simulated(torch.cuda.device_count(), env):
                    layout = resolve_layout(spec.placement, None, two_tower=two)
                plans.append(f"{name}: {_described(layout)}")
            continue
        devices = _devices_for(spec)
        layout = resolve_layout(spec.placement, devices, two_tower=two, plan=True)
        if _measurable(spec):
            layout = resolve_layout(spec.placement, devices, two_tower=two)
        plans.append(f"{name}: {_described(layout)}" + ("" if _measurable(spec) else " (memory only, planned)"))
    return plans


def _plan_other(args) -> list[str]:
    from alexnet2gpu.parallel import resolve_layout

    plan = args.command == "summary"
    return [_described(resolve_layout(args.placement, args.devices, two_tower=_two_tower(args.model), plan=plan))]


PLANS = {"verify": _plan_verify, "bench": _plan_bench, "memory": _plan_memory, "compare": _plan_compare}


def check_cli(argv: list[str], gpus: int, torchrun: dict[str, str] | None = None) -> list[str]:
    """``alexnet2gpu ARGV`` on a machine with ``gpus`` GPUs: the layouts it would use."""
    from alexnet2gpu.cli.main import build_parser

    with _refusals("alexnet2gpu"):
        args = build_parser().parse_args(argv)
    with _refusals(f"alexnet2gpu {args.command}"), simulated(gpus, torchrun):
        return PLANS.get(args.command, _plan_other)(args)


def check_torchrun(argv: list[str], gpus: int) -> list[str]:
    """``python -m torch.distributed.run ARGV``: torchrun's own parser, then each local rank."""
    from torch.distributed.run import get_args_parser

    with _refusals("torchrun"):
        launch = get_args_parser().parse_args(argv)
    if not (launch.module and launch.training_script == "alexnet2gpu"):
        raise Refused(f"torchrun: runs {launch.training_script}, not -m alexnet2gpu")
    nproc = gpus if launch.nproc_per_node == "gpu" else int(launch.nproc_per_node)
    plans = []
    for env in _ranks_of(nproc):
        try:
            plans += check_cli(launch.training_script_args, gpus, env)
        except Refused as refusal:
            raise Refused(f"rank {env['RANK']} of {nproc}: {refusal}") from None
    return plans


def check_script(argv: list[str], gpus: int) -> list[str]:
    """A script of this repository: it exists and compiles; this folder's helper is also
    parsed, and its verify-placement resolved."""
    path = ROOT / argv[0]
    if not path.is_file():
        raise Refused(f"{argv[0]}: no such file")
    try:
        compile(path.read_text(), str(path), "exec")
    except SyntaxError as error:
        raise Refused(f"{argv[0]}: {error}") from None
    if path.resolve() == Path(gpu_checks.__file__).resolve():
        with _refusals("gpu_checks.py"):
            args = gpu_checks.build_parser().parse_args(argv[1:])
        if args.command == "verify-placement":
            from alexnet2gpu.parallel import resolve_layout

            with _refusals("gpu_checks.py verify-placement"), simulated(gpus):
                return [_described(resolve_layout(args.placement, args.devices, two_tower=True))]
        return [f"{argv[0]} {args.command}"]
    return [f"{argv[0]} exists"]


_collected: dict[tuple[str, ...], str] = {}


def check_pytest(argv: list[str]) -> list[str]:
    """pytest's ``--collect-only`` with the step's arguments, in this process, from the root."""
    key = tuple(argv)
    if key not in _collected:
        import pytest

        output, cwd = io.StringIO(), os.getcwd()
        os.chdir(ROOT)
        try:
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                code = pytest.main([*argv, "--collect-only", "-p", "no:cacheprovider"])
        finally:
            os.chdir(cwd)
        lines = [line.strip(" =") for line in output.getvalue().splitlines() if line.strip(" =")]
        summary = [line for line in lines if " collected" in line or "no tests ran" in line]
        last = (summary or lines or [f"pytest exited {int(code)}"])[-1]
        if int(code) == 5:
            last = f"pytest {shlex.join(argv)} selects no test ({last})"
        _collected[key] = ("ok: " if int(code) == 0 else "") + last
    result = _collected[key]
    if not result.startswith("ok: "):
        raise Refused(result)
    return [result.removeprefix("ok: ")]


def check_step(record: dict, collect: bool = True) -> list[str]:
    """One step's record, as the shell script wrote it: what it would run, or Refused."""
    argv, gpus, python = record["argv"], record["gpus"], record.get("python")
    if argv[0] != python:
        import shutil

        if shutil.which(argv[0]) is None:
            raise Refused(f"{argv[0]}: not found")
        return [f"{argv[0]} found"]
    rest = argv[1:]
    if rest[:2] == ["-m", "alexnet2gpu"]:
        return check_cli(rest[2:], gpus)
    if rest[:2] == ["-m", "torch.distributed.run"]:
        return check_torchrun(rest[2:], gpus)
    if rest[:2] == ["-m", "pytest"]:
        return check_pytest(rest[2:]) if collect else ["pytest: collection not checked (--no-collect)"]
    if rest and rest[0].endswith(".py"):
        return check_script(rest, gpus)
    raise Refused(f"not a step this dry run knows how to check: {shlex.join(argv)}")


def _check_budget(steps: list[dict], gpus: int, budget: int, reserve: int) -> tuple[str, str | None]:
    required = sum(s["limit"] for s in steps if not s.get("optional"))
    extra = sum(s["limit"] for s in steps if s.get("optional"))
    line = (
        f"limits: {required} s for the required steps (+{extra} s of extras, each run only if the time is "
        f"left); budget {budget} s, {reserve} s of it kept for the set-up and the table"
    )
    if gpus != 1:
        line += " (the budget holds for one GPU)"
    elif required > budget - reserve:
        return line, f"the required steps' limits add to {required} s, over {budget - reserve} s"
    return line, None


def _report(records: list[dict], gpus: int, collect: bool) -> list[str]:
    """Prints each step of one GPU count; returns the problems found."""
    problems, seen = [], set()
    for record in records:
        name = record["name"]
        if name in seen:
            problems.append(f"{name} ({_gpus(gpus)}): two steps of this name (their logs would collide)")
        seen.add(name)
        if "skipped" in record:
            print(f"  skip  {name}: {record['skipped']}")
            continue
        try:
            plans = check_step(record, collect)
        except Refused as refusal:
            why = str(refusal)
        except Exception as error:  # a bug here, or an API the checker no longer matches: still a problem
            why = f"the dry run itself failed: {type(error).__name__}: {error}"
        else:
            extra = ", if time is left" if record.get("optional") else ""
            print(f"  ok    {name} [{record['limit']} s{extra}]: {'; '.join(plans)}")
            continue
        print(f"  BAD   {name} [{record['limit']} s]: {why}")
        problems.append(f"{name} ({_gpus(gpus)}): {why}")
    return problems


def check_file(path: Path, budget: int, reserve: int, collect: bool = True) -> int:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    counts = sorted({r["gpus"] for r in records})
    problems = []
    for gpus in counts:
        mine = [r for r in records if r["gpus"] == gpus]
        steps = [r for r in mine if "skipped" not in r]
        print(f"as on a machine with {_gpus(gpus)}: {len(steps)} step(s), {len(mine) - len(steps)} skipped")
        problems += _report(mine, gpus, collect)
        line, over = _check_budget(steps, gpus, budget, reserve)
        print(f"  {line}")
        if over:
            problems.append(f"budget ({_gpus(gpus)}): {over}")
    checked = ", ".join(
        f"{sum(r['gpus'] == g and 'skipped' not in r for r in records)} with {_gpus(g)}" for g in counts
    )
    if problems:
        print(f"dry run: {len(problems)} problem(s) in the steps checked ({checked}):")
        for problem in problems:
            print(f"  {problem}")
        return 1
    print(f"dry run: every step passes ({checked}); nothing was run")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_checks_dry_run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", type=Path, help="the JSON lines that gpu_checks.sh --dry-run wrote")
    parser.add_argument("--budget", type=int, default=480, help="seconds for the whole run on one GPU")
    parser.add_argument("--reserve", type=int, default=20, help="of which the set-up and the table take this many")
    parser.add_argument("--no-collect", dest="collect", action="store_false", help="skip pytest --collect-only")
    parser.add_argument("--python", default="", help="the python as the shell script named it (for messages)")
    parser.add_argument("--tried", default="", help="the pythons tried before this one, and why they were not used")
    args = parser.parse_args(argv)
    problem = gpu_checks.missing_import()
    if problem:
        name = f"{args.python} ({sys.executable})" if args.python else sys.executable
        also = f"; also tried {args.tried}" if args.tried else ""
        print(f"gpu_checks dry run: cannot import {problem} with python {name}{also}: set PYTHON=...", file=sys.stderr)
        return 2
    try:
        return check_file(args.steps, args.budget, args.reserve, args.collect)
    except (OSError, ValueError, KeyError) as error:
        print(f"gpu_checks dry run: cannot read {args.steps}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
