#!/usr/bin/env bash
# Checks alexnet2gpu on its oldest supported torch (pyproject.toml: torch>=2.11), the release
# some of the GPU machines this project is lent have (torch 2.11, torchvision 0.26, no network):
#   bash scripts/compat.sh
# Set-up, once: a second virtual environment in .venv-compat (override with COMPAT_VENV) with
# torch 2.11 and torchvision 0.26 (override with COMPAT_TORCH_SPEC; torchvision 0.26.0 pins
# torch==2.11.0), then this package with its test and plot extras (the unit tests import
# matplotlib), held to that torch by a constraints file so that pip cannot upgrade it. From
# PyPI torch 2.11 is the CUDA build with its nvidia-* and cuda-* dependencies (about 4.7 GB
# installed, 2.5-6 minutes here); `import torch` loads them, but no GPU is needed. Where
# torch 2.11 is already installed (a machine without network), COMPAT_PYTHON=python3 skips
# the set-up and uses that interpreter as it is.
# Then two checks, one closing line each, and a non-zero exit if either fails:
#   1. the unit tests: python -m pytest -m "not integration" -q
#   2. one real torchrun run of the `ranks` placement (2 processes, gloo on the CPU, a tiny
#      net for 4 steps), which on torch 2.11-2.12 goes through ranks.py's fallback to
#      all_gather_into_tensor / reduce_scatter_tensor.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${COMPAT_VENV:-.venv-compat}
TORCH_SPEC=${COMPAT_TORCH_SPEC:-"torch==2.11.* torchvision==0.26.*"}
LOGS=${COMPAT_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/alexnet2gpu-compat.XXXXXX")}
PIP=(-m pip install -q --disable-pip-version-check --progress-bar off)

say() { printf 'compat.sh: %s\n' "$*" >&2; }
die() {
    say "$*"
    exit 2
}

if [ -n "${COMPAT_PYTHON:-}" ]; then
    PY=$COMPAT_PYTHON
    say "using $PY as it is (COMPAT_PYTHON set: no set-up)"
else
    PY=$VENV/bin/python
    if [ ! -x "$VENV/bin/alexnet2gpu" ] || [ pyproject.toml -nt "$VENV/.alexnet2gpu-installed" ]; then
        say "setting up $VENV (first run only): 1/4 virtual environment"
        "$PYTHON" -m venv "$VENV" || die "could not create $VENV"
        say "2/4 installing $TORCH_SPEC (a few minutes: torch 2.11 comes with its CUDA libraries)"
        # shellcheck disable=SC2086
        "$PY" "${PIP[@]}" $TORCH_SPEC || die "could not install $TORCH_SPEC"
        say "3/4 pinning that torch and torchvision in $VENV/constraints.txt"
        "$PY" -c 'import torch, torchvision
for m in (torch, torchvision): print(m.__name__ + "==" + m.__version__.split("+")[0])' \
            >"$VENV/constraints.txt" || die "torch does not import in $VENV"
        say "4/4 installing alexnet2gpu with its test and plot extras (rich, pytest, hypothesis, ruff, import-linter, matplotlib)"
        "$PY" "${PIP[@]}" -c "$VENV/constraints.txt" -e ".[test,plot]" || die "could not install alexnet2gpu"
        touch "$VENV/.alexnet2gpu-installed"
        say "set up; to run commands yourself: source $VENV/bin/activate"
    fi
fi
versions=$("$PY" -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")') \
    || die "torch or torchvision does not import with $PY"
say "checking on $versions; logs in $LOGS"

say "1/2 unit tests: pytest -m \"not integration\" (a few minutes)"
start=$SECONDS
"$PY" -m pytest -m "not integration" -q -p no:cacheprovider --continue-on-collection-errors >"$LOGS/unit.log" 2>&1
unit_rc=$?
unit_summary=$(grep -E '[0-9]+ (passed|failed|errors?)\b|no tests ran' "$LOGS/unit.log" | tail -n 1 | tr -d '=')
tail -n 15 "$LOGS/unit.log" >&2

say "2/2 torchrun: train --placement ranks on 2 gloo processes, 4 steps of a tiny net"
start2=$SECONDS
OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore timeout -k 10 300 "$PY" -m torch.distributed.run --standalone \
    --nproc-per-node 2 -m alexnet2gpu train --placement ranks --devices cpu --data synthetic \
    --num-classes 10 --steps 4 --width 0.0625 --image-size 64 --batch-size 8 >"$LOGS/ranks.log" 2>&1
ranks_rc=$?
tail -n 8 "$LOGS/ranks.log" >&2
ranks_last=$(grep -E 'examples/sec' "$LOGS/ranks.log" | tail -n 1)

verdict() { if [ "$1" = 0 ]; then echo pass; else echo "FAIL (exit $1)"; fi; }
say "unit tests on $versions: $(verdict "$unit_rc"): ${unit_summary:-no summary} ($((start2 - start)) s)"
say "torchrun ranks run on $versions: $(verdict "$ranks_rc"): ${ranks_last:-no result line} ($((SECONDS - start2)) s)"
[ "$unit_rc" = 0 ] && [ "$ranks_rc" = 0 ]
