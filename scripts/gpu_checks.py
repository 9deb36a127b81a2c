"""The Python side of scripts/gpu_checks.sh: the set-up check, two of its steps, and the
summary table at the end. Run by the shell script, one sub-command at a time:

    python scripts/gpu_checks.py preflight --cuda --python PY   # imports, then the GPU count
    python scripts/gpu_checks.py env --json OUT.json            # nvidia-smi, versions, GPUs
    python scripts/gpu_checks.py verify-placement split cuda:0,cpu --json OUT.json
    python scripts/gpu_checks.py table OUTDIR                   # OUTDIR/summary.md

Nothing here imports torch before ``preflight`` has said whether it can."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# everything a step imports: checked up front, so that a missing one is one line, not a failed step
MODULES = ("torch", "torchvision", "rich", "matplotlib", "pytest", "alexnet2gpu")
MIB = 2**20


def missing_import(modules=MODULES, root: Path = ROOT) -> str | None:
    """The first of ``modules`` that does not import, with why; None when all do.
    ``alexnet2gpu`` must be this checkout's (``root``), not another copy."""
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as error:  # ImportError, or a broken install failing in its own way
            return f"{name} ({type(error).__name__}: {error})"
        if name == "alexnet2gpu":
            where = Path(module.__file__).resolve().parent
            if where != (root / "alexnet2gpu").resolve():
                return f"alexnet2gpu from this checkout ({root / 'alexnet2gpu'}; it imports {where})"
    return None


def preflight(args: argparse.Namespace) -> int:
    python = f"{args.python} ({sys.executable})" if args.python else sys.executable
    also = f"; also tried {args.tried}" if args.tried else ""
    problem = missing_import()
    if problem:
        print(f"gpu_checks: cannot import {problem} with python {python}{also}: set PYTHON=...", file=sys.stderr)
        return 2
    if args.cuda:
        import torch

        if not torch.cuda.is_available():
            print(
                f"gpu_checks: no CUDA device visible to {python} (torch {torch.__version__}, CUDA build "
                f"{torch.version.cuda or 'none: a CPU-only torch'}): nothing checked",
                file=sys.stderr,
            )
            return 2
        print(torch.cuda.device_count())
    return 0


def _run(argv: list[str]) -> str | None:
    """The stdout of a quick command, or None where it is missing or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def env(args: argparse.Namespace) -> int:
    import torch
    import torchvision

    smi = _run(["nvidia-smi"])
    print(smi or "nvidia-smi: not found or failed")
    count = torch.cuda.device_count()
    info = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(count)],
        "commit": _run(["git", "describe", "--always", "--dirty"]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nvidia_smi": smi,
    }
    print({k: v for k, v in info.items() if k != "nvidia_smi"})
    Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    return 0 if count else 1


def verify_placement(args: argparse.Namespace) -> int:
    """``alexnet2gpu verify`` for one placement on the devices given (verify itself picks
    its devices: towers and grouped on cuda:0, split on cuda:0,cuda:1 or cpu,cpu)."""
    from alexnet2gpu.checks.verify import TOLERANCE, check_placement
    from alexnet2gpu.errors import Alexnet2gpuError

    try:
        check = check_placement(
            args.placement, args.devices, width=args.width, batch_size=args.batch_size, seed=args.seed
        )
    except Alexnet2gpuError as error:
        print(f"gpu_checks verify-placement: error: {error}", file=sys.stderr)
        return 2
    print(
        f"{check.placement} on {','.join(check.devices)}: relative error logits {check.logits_rel_err:.2e}, "
        f"loss {check.loss_rel_err:.2e}, gradients {check.grads_rel_err:.2e} (worst {check.worst_grad}): "
        f"{'ok' if check.ok else 'MISMATCH'} (tolerance {TOLERANCE:g})"
    )
    Path(args.json).write_text(json.dumps({"tolerance": TOLERANCE, "checks": [check.to_json()]}, indent=2) + "\n")
    return 0 if check.ok else 1


# ---- the summary table -------------------------------------------------------------------


def _verify_figure(data: dict) -> str:
    checks = data["checks"]
    worst = max(checks, key=lambda c: max(c["logits_rel_err"], c["loss_rel_err"], c["grads_rel_err"]))
    error = max(worst["logits_rel_err"], worst["loss_rel_err"], worst["grads_rel_err"])
    where = f"{worst['placement']} on {','.join(worst['devices'])}"
    ok = sum(c["ok"] for c in checks)
    text = f"{ok}/{len(checks)} placements agree; worst relative error {error:.1e} ({where})"
    precision = (data.get("numerics") or {}).get("precision", "fp32")
    if precision == "fp32":
        return text
    limits = data.get("tolerances") or {}
    agreements = data.get("agreements") or []
    among = max((a["grads_rel_err"] for a in agreements), default=0.0)
    return (
        f"{precision}: {text}, against tolerances {limits.get('forward', 0):.3g} (logits, loss) and "
        f"{limits.get('grads', 0):.3g} (gradients); {sum(a['ok'] for a in agreements)}/{len(agreements)} "
        f"pairs of placements agree, worst gradient {among:.1e}"
    )


def _estimate_figure(data: dict) -> str:
    rows = [
        f"{r['device']} peak estimated {r['estimated_peak_bytes'] / MIB:,.1f} vs measured "
        f"{r['measured_peak_bytes'] / MIB:,.1f} MiB ({100 * r['peak_rel_err']:+.1f} %)"
        for r in data["devices"]
    ]
    return f"{data['model']}/{data['placement']}, batch {data['batch_size']}: " + "; ".join(rows)


def _memory_figure(data: dict) -> str:
    rows = [f"{d['device']} peak {d['peak_bytes'] / MIB:,.1f} MiB ({d['source']})" for d in data["devices"]]
    return f"{data['model']}/{data['placement']}, batch {data['batch_size']}: " + "; ".join(rows)


def _lrn_figure(data: dict) -> str:
    rows = [
        f"{r['where'].split()[0]} ours {r['ours']['ms']:.3f} ms, {r['speedup_vs_nn']:.2f}x nn, "
        f"{r['speedup_vs_compiled_nn']:.2f}x compiled nn"
        for r in data["rows"]
    ]
    return ("agrees" if data["agree"] else "MISMATCH") + "; " + "; ".join(rows)


def _rate(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def _batch_of(results: list[dict]) -> int | None:
    batches = sorted({r["batch_size"] for r in results})
    return 128 if 128 in batches else (batches[-1] if batches else None)


def _compare_figure(data: dict) -> str:
    batch = _batch_of([r for v in data["variants"] for r in v["results"]])
    parts = []
    for v in data["variants"]:
        rates = {r["mode"]: r["images_per_s"] for r in v["results"] if r["batch_size"] == batch}
        if not rates:
            parts.append(f"{v['name']} {'memory only' if v.get('memory') else 'not measured'}")
            continue
        compile_s = sum(r.get("compile_s") or 0 for r in v["results"] if r["batch_size"] == batch)
        text = f"{v['name']} {_rate(rates.get('train'))} / {_rate(rates.get('infer'))}"
        parts.append(text + (f" (compiling {compile_s:.0f} s)" if compile_s else ""))
    text = f"images/s, train / infer, batch {batch}: " + "; ".join(parts)
    gains = [
        f"{g['name']} {g['mode']} {g['gain']:.2f}x"
        for g in data.get("compiled_gains") or []
        if g["batch_size"] == batch
    ]
    if gains:
        text += "; compiled gain: " + ", ".join(gains)
    if data.get("overhead"):
        text += f"; harness overhead {100 * data['overhead']['overhead']:+.1f} %"
    return text


def _bench_figure(data: dict) -> str:
    batch = _batch_of(data["results"])
    rates = {r["mode"]: r for r in data["results"] if r["batch_size"] == batch}
    any_row = next(iter(rates.values()))
    precision = (any_row.get("numerics") or {}).get("precision", "fp32")
    return (
        f"{any_row['model']}/{any_row['placement']} on {any_row['device']}, {precision}: images/s at batch {batch}, "
        f"train {_rate(rates.get('train', {}).get('images_per_s'))}, "
        f"infer {_rate(rates.get('infer', {}).get('images_per_s'))}"
    )


def _env_figure(data: dict) -> str:
    gpus = data["gpus"]
    names = ", ".join(sorted(set(gpus)))
    return f"{len(gpus)} x {names}; torch {data['torch']}, CUDA {data['cuda']}, python {data['python']}"


def figure_of(data: dict) -> str:
    """The key figure of one step's JSON, told apart by what it holds."""
    if "gpus" in data:
        return _env_figure(data)
    if "checks" in data:
        return _verify_figure(data)
    if "variants" in data:
        return _compare_figure(data)
    if "agree" in data and "rows" in data:
        return _lrn_figure(data)
    if "devices" in data and data["devices"] and "estimated_peak_bytes" in data["devices"][0]:
        return _estimate_figure(data)
    if "devices" in data:
        return _memory_figure(data)
    if "results" in data:
        return _bench_figure(data)
    return ""


def _log_figure(log: Path, failed: bool) -> str:
    """A failed step's last line (its error); pytest's summary (``8 passed, 2 skipped in 9.1s``)."""
    if not log.is_file():
        return ""
    lines = [line.strip(" =") for line in log.read_text(errors="replace").splitlines() if line.strip(" =")]
    for line in reversed(lines):
        if any(word in line for word in (" passed", " failed", " skipped", "no tests ran")):
            return line
    return f"log: {lines[-1][:300]}" if failed and lines else ""


def key_figure(out: Path, record: dict) -> str:
    name = record["name"]
    for path in (out / f"{name}.json", out / name / "compare.json"):
        if path.is_file():
            try:
                return figure_of(json.loads(path.read_text()))
            except (ValueError, KeyError, TypeError, IndexError, StopIteration, ZeroDivisionError) as error:
                return f"({path.relative_to(out)}: unreadable, {type(error).__name__})"
    return _log_figure(out / f"{name}.txt", record.get("exit") != 0)


def _exit_cell(record: dict) -> str:
    if record.get("skipped"):
        return "skipped"
    code = record["exit"]
    if code in (124, 137):
        return f"{code} (timed out at {record['limit']} s)"
    return str(code)


def _header(out: Path, records: list[dict], budget: int | None, wall: int | None) -> list[str]:
    try:
        info = json.loads((out / "env.json").read_text())
        machine = f"{_env_figure(info)}; commit {info.get('commit')}; {info.get('date')}"
    except (OSError, ValueError, KeyError):
        machine = "(no env.json)"
    ran = [r for r in records if not r.get("skipped")]
    total = sum(r["end"] - r["start"] for r in ran)
    failed = [r["name"] for r in ran if r["exit"] != 0]
    budget_text = f" of a {budget} s budget" if budget else ""
    wall_text = f", {wall} s in all{budget_text}" if wall else ""
    return [
        f"`bash scripts/gpu_checks.sh`: {machine}",
        "",
        f"{len(ran)} steps run in {total:.0f} s{wall_text}; "
        + (f"failed: {', '.join(failed)}" if failed else "every step passed"),
        "",
        "| step | exit | seconds | limit | key figure |",
        "|---|---|---:|---:|---|",
    ]


def table(args: argparse.Namespace) -> int:
    out = Path(args.out)
    records = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    lines = _header(out, records, args.budget, args.wall)
    for r in records:
        if r.get("skipped"):
            lines.append(f"| {r['name']} | skipped | | | {r['skipped']} |")
            continue
        figure = key_figure(out, r).replace("|", "\\|")
        lines.append(f"| {r['name']} | {_exit_cell(r)} | {r['end'] - r['start']:.1f} | {r['limit']} | {figure} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_checks.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("preflight", help="check every import (and with --cuda, print the GPU count)")
    pre.add_argument("--cuda", action="store_true", help="also require a CUDA device; print how many")
    pre.add_argument("--python", default="", help="the python as the shell script named it")
    pre.add_argument("--tried", default="", help="the pythons tried before this one, and why they were not used")
    pre.set_defaults(run=preflight)
    env_ = sub.add_parser("env", help="nvidia-smi, python, torch, CUDA and the GPUs")
    env_.add_argument("--json", required=True, metavar="PATH")
    env_.set_defaults(run=env)
    ver = sub.add_parser("verify-placement", help="one placement on the devices given, against float64")
    ver.add_argument("placement")
    ver.add_argument("devices", help="comma-separated, e.g. cuda:0,cpu")
    ver.add_argument("--width", type=float, default=1 / 16)
    ver.add_argument("--batch-size", type=int, default=4)
    ver.add_argument("--seed", type=int, default=0)
    ver.add_argument("--json", required=True, metavar="PATH")
    ver.set_defaults(run=verify_placement)
    tab = sub.add_parser("table", help="OUTDIR/summary.md from OUTDIR/steps.jsonl and each step's JSON")
    tab.add_argument("out", metavar="OUTDIR")
    tab.add_argument("--budget", type=int, default=None, help="the run's budget in seconds, for the header")
    tab.add_argument("--wall", type=int, default=None, help="seconds since the run began, for the header")
    tab.set_defaults(run=table)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
