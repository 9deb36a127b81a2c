"""The two-workers comparison of issue 17, end to end: one device, the 2012 towers, data
parallel and the 2014 hybrid for dual, torchvision and simplified, at full size.

    .venv/bin/python scripts/two_workers.py [--batch-size 128] [--repeats 3] [--out docs/runs]
    .venv/bin/python scripts/two_workers.py --render docs/runs/two-workers-b128.json

Measures (:func:`alexnet2gpu.measure.workers.measure_workers`: 2 processes x 1 thread,
launched once with ``elastic_launch``), with the load average before and after, and writes
OUT/two-workers-bBATCH.json (the records, the machine, the closed-form lines); then renders
OUT/two-workers-bBATCH.md and OUT/two-workers-bytes.png from that JSON
(:mod:`alexnet2gpu.report.workers`). ``--render JSON`` renders an existing JSON again.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from alexnet2gpu.measure.workers import MODELS, workers_run


def measure(args) -> Path:
    models = tuple(args.models.split(","))
    data = workers_run(
        models,
        command=shlex.join([sys.executable, *sys.argv]),
        processes=args.processes,
        batch_size=args.batch_size,
        threads=args.threads,
        repeats=args.repeats,
        steps=args.steps,
        warmup=args.warmup,
        timeout_s=args.timeout,
    )
    out = Path(args.out) / f"two-workers-b{args.batch_size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out} ({data['seconds']:.0f} s; load {data['loadavg_before']} -> {data['loadavg_after']})")
    return out


def render(path: Path) -> None:
    from alexnet2gpu.report.workers import render_run

    written = render_run(path, path.parent / "two-workers-bytes.png")
    print("wrote " + ", ".join(map(str, written)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (default: %(default)s)")
    p.add_argument("--processes", type=int, default=2, help="default: %(default)s")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per round (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per way (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=5400.0, help="seconds per process (default: %(default)s)")
    p.add_argument("--out", default="docs/runs", help="default: %(default)s")
    p.add_argument("--render", metavar="JSON", help="render an existing JSON, measure nothing")
    args = p.parse_args()
    render(Path(args.render) if args.render else measure(args))


if __name__ == "__main__":  # spawn re-imports this file in every worker: measure only here
    main()
