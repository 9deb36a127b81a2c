"""The speed and memory targets of the comparison, measured as ratios in one run.

    .venv/bin/python scripts/bench_targets.py [--rounds 3] [--compiled-rounds 2] [--out DIR]

Each round times, one after the other and in a rotated order (so that other load on a
shared machine falls on every variant alike), a training step at batch 64, 227 px, one
CPU thread per process: torchvision's AlexNet, dual/towers, dual/grouped and dual/ranks
(2 processes under torchrun). Every measurement is a fresh `alexnet2gpu bench` process;
ratios are taken within a round, then their median over the rounds is reported beside
each round's ratio and the load average. Compiled rounds time torchvision and
dual/towers with `--compile`. Memory: the estimated activations of dual at batch 64, and
split's larger device against one device. Writes targets.json and targets.md to DIR.

    .venv/bin/python scripts/bench_targets.py --precision-speed [--rounds 5] [--out DIR]

instead times bf16 (autocast) against fp32 training steps of dual/towers (227 px) and
simplified (224 px) at batch 32, one thread, fp32 and bf16 interleaved in each round, and
writes DIR/precision-speed.json with the bf16/fp32 ratio per round and its median.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = 64
COMMON = ["--batch-sizes", str(BATCH), "--mode", "train", "--threads", "1", "--repeats", "3", "--warmup", "1"]
EAGER = {
    "torchvision": ["--model", "torchvision", "--placement", "single", "--devices", "cpu"],
    "dual/towers": ["--model", "dual", "--placement", "towers", "--devices", "cpu"],
    "dual/grouped": ["--model", "dual", "--placement", "grouped", "--devices", "cpu"],
    "dual/ranks": ["--model", "dual", "--placement", "ranks", "--devices", "cpu"],
}
COMPILED = {
    "torchvision+compile": [*EAGER["torchvision"], "--compile"],
    "dual/towers+compile": [*EAGER["dual/towers"], "--compile"],
}
TARGETS = [  # (what, numerator, denominator, goal)
    ("dual/towers against torchvision, eager", "dual/towers", "torchvision", 0.75),
    ("the same, both compiled", "dual/towers+compile", "torchvision+compile", 0.85),
    ("dual/grouped against dual/towers, eager", "dual/grouped", "dual/towers", 1.0),
    ("ranks (2 x 1 thread) against towers (1 thread)", "dual/ranks", "dual/towers", 1.85),
    ("ranks (2 x 1 thread) against torchvision (1 thread)", "dual/ranks", "torchvision", 1.5),
]


def _load() -> float:
    return os.getloadavg()[0]


SIZE: list[str] = []  # --smoke: a tiny net, to try the script itself in seconds


def _bench(name: str, flags: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = ["-m", "alexnet2gpu", "bench", *COMMON, *flags, *SIZE, "--json", str(out)]  # a variant's flags win
    if "ranks" in name:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *cli]
    else:
        argv = [sys.executable, *cli]
    started = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    row = json.loads(out.read_text())["results"][0]
    print(
        f"  {name:22s} {row['images_per_s']:7.2f} images/s  ({time.perf_counter() - started:5.1f} s,"
        f" load {_load():.2f})",
        flush=True,
    )
    return row


def _round(variants: dict[str, list[str]], index: int, tmp: Path) -> dict:
    names = list(variants)
    shift = index % len(names)
    order = names[shift:] + names[:shift]
    load_before = _load()
    rows = {name: _bench(name, variants[name], tmp / f"{index}-{name.replace('/', '_')}.json") for name in order}
    return {"order": order, "load_before": load_before, "load_after": _load(), "rows": rows}


# --precision-speed: a bf16 training step against fp32 on this CPU, the same net, batch 32
PRECISION_BATCH = 32
PRECISION = {
    f"{net}/{precision}": [*flags, "--precision", precision, "--batch-sizes", str(PRECISION_BATCH)]
    for net, flags in (
        ("dual/towers", EAGER["dual/towers"]),
        ("simplified", ["--model", "simplified", "--placement", "single", "--devices", "cpu"]),
    )
    for precision in ("fp32", "bf16")
}


def _precision_speed(rounds: int, out: Path, tmp: Path) -> None:
    """Rounds of fresh processes, fp32 and bf16 of each net interleaved (dual/towers fp32,
    bf16, simplified fp32, bf16, the order rotated each round); bf16/fp32 per net per round."""
    started = time.time()
    cpu_flags = sorted(
        set(re.findall(r"\b(avx512_bf16|amx_bf16|amx_tile|avx512f)\b", Path("/proc/cpuinfo").read_text()))
    )
    done = []
    for i in range(rounds):
        print(f"precision round {i + 1}/{rounds}", flush=True)
        done.append(_round(PRECISION, i, tmp))
    nets = sorted({name.rsplit("/", 1)[0] for name in PRECISION})
    ratios = {net: _ratios(done, f"{net}/bf16", f"{net}/fp32") for net in nets}
    # the same from CPU seconds per step (fp32's over bf16's): the work, which other jobs'
    # load on a shared machine does not inflate as it does wall time
    cpu = {
        net: [r["rows"][f"{net}/fp32"]["cpu_s_per_step"] / r["rows"][f"{net}/bf16"]["cpu_s_per_step"] for r in done]
        for net in nets
    }
    report = {
        "rounds": done,
        "bf16_over_fp32": {net: {"per_round": r, "median": statistics.median(r)} for net, r in ratios.items()},
        "bf16_over_fp32_cpu_time": {net: {"per_round": r, "median": statistics.median(r)} for net, r in cpu.items()},
        "cpu_flags": cpu_flags,
        "wall_s": time.time() - started,
        "command": " ".join(sys.argv),
    }
    (out / "precision-speed.json").write_text(json.dumps(report, indent=2) + "\n")
    for net, r in ratios.items():
        print(
            f"{net}: bf16/fp32 images/s per round {', '.join(f'{x:.2f}' for x in r)}; "
            f"median {statistics.median(r):.2f}x; from CPU seconds per step "
            f"{', '.join(f'{x:.2f}' for x in cpu[net])}; median {statistics.median(cpu[net]):.2f}x"
        )
    print(f"CPU flags: {', '.join(cpu_flags) or 'none'}; wall {report['wall_s']:.0f} s")


def _memory(placement: str, devices: str, tmp: Path) -> dict:
    out = tmp / f"memory-{placement}.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet2gpu",
            "memory",
            "--model",
            "dual",
            "--placement",
            placement,
            "--devices",
            devices,
            "--batch-size",
            str(BATCH),
            *SIZE,
            "--json",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(out.read_text())


def _ratios(rounds: list[dict], num: str, den: str) -> list[float]:
    return [
        r["rows"][num]["images_per_s"] / r["rows"][den]["images_per_s"]
        for r in rounds
        if num in r["rows"] and den in r["rows"]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="eager rounds (default: %(default)s)")
    parser.add_argument("--compiled-rounds", type=int, default=2, help="compiled rounds (default: %(default)s)")
    parser.add_argument("--out", default="results/targets", help="output folder (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="a tiny net (width 1/16, 67 px): tries the script")
    parser.add_argument(
        "--precision-speed",
        action="store_true",
        help=f"instead: bf16 against fp32 training steps (dual/towers, simplified; batch {PRECISION_BATCH}), "
        "--rounds rounds, written to OUT/precision-speed.json",
    )
    args = parser.parse_args()
    if args.smoke:
        SIZE.extend(["--width", "0.0625", "--image-size", "67"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.precision_speed:
        with tempfile.TemporaryDirectory() as tmp_name:
            _precision_speed(args.rounds, out, Path(tmp_name))
        return
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rounds = []
        for i in range(args.rounds):
            print(f"eager round {i + 1}/{args.rounds}", flush=True)
            rounds.append(_round(EAGER, i, tmp))
        for i in range(args.compiled_rounds):
            print(f"compiled round {i + 1}/{args.compiled_rounds}", flush=True)
            rounds.append(_round(COMPILED, i, tmp))
        one, split = _memory("towers", "cpu", tmp), _memory("split", "cpu,cpu", tmp)
    peaks = [d["peak_bytes"] for d in split["devices"]]
    memory = {
        "dual_activations_mib": one["devices"][0]["activations_bytes"] / 2**20,
        "split_larger_device_over_one_device": max(peaks) / one["devices"][0]["peak_bytes"],
    }
    table = []
    for what, num, den, goal in TARGETS:
        ratios = _ratios(rounds, num, den)
        median = statistics.median(ratios) if ratios else None
        table.append(
            {
                "target": what,
                "goal": goal,
                "ratios": ratios,
                "median": median,
                "met": median is not None and median >= goal,
            }
        )
    report = {
        "rounds": rounds,
        "targets": table,
        "memory": memory,
        "wall_s": time.time() - started,
        "command": " ".join(sys.argv),
    }
    (out / "targets.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| target | goal | per round | median | met? |", "|---|---:|---|---:|---|"]
    for t in table:
        per_round = ", ".join(f"{r:.2f}" for r in t["ratios"])
        median = f"{t['median']:.2f}x" if t["median"] is not None else "n/a"
        lines.append(f"| {t['target']} | >= {t['goal']}x | {per_round} | {median} | {'yes' if t['met'] else 'no'} |")
    lines.append(
        f"| dual's activations, batch 64 (estimated) | <= 500 MiB | | {memory['dual_activations_mib']:.1f} MiB"
        f" | {'yes' if memory['dual_activations_mib'] <= 500 else 'no'} |"
    )
    ratio = memory["split_larger_device_over_one_device"]
    lines.append(
        f"| split's larger device against one device (estimated) | <= 0.53 | | {ratio:.3f} |"
        f" {'yes' if ratio <= 0.53 else 'no'} |"
    )
    loads = [(r["load_before"], r["load_after"]) for r in rounds]
    lines.append("")
    lines.append(
        "Load average (1 min) before/after each round: "
        + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in loads)
        + f"; wall time {report['wall_s']:.0f} s."
    )
    (out / "targets.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
