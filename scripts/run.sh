#!/usr/bin/env bash
# Sets up everything alexnet2gpu needs on a fresh machine, once, then runs a command:
#   bash scripts/run.sh test [PYTEST ARGS]     lint (ruff), then the test suite
#   bash scripts/run.sh compare [ARGS]         any `alexnet2gpu` sub-command (here: the main job)
# Set-up: a virtual environment in .venv (override with ALEXNET2GPU_VENV), torch and
# torchvision (override the pins with TORCH_SPEC, e.g. for a CPU-only build; see the
# README), this package with its test and plot extras, and Fashion-MNIST from Debian's dataset-fashion-mnist where apt-get can install it
# (elsewhere `train` downloads it through torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${ALEXNET2GPU_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
FMNIST_DIR=/usr/share/datasets/fashion-mnist

say() { printf 'run.sh: %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/alexnet2gpu" ] || [ pyproject.toml -nt "$VENV/.alexnet2gpu-installed" ]; then
    say "setting up $VENV (first run only): 1/3 virtual environment"
    "$PYTHON" -m venv "$VENV"
    say "2/3 installing $TORCH_SPEC (about a minute from a local wheel, longer from the network)"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --progress-bar off $TORCH_SPEC
    say "3/3 installing alexnet2gpu with its test and plot extras (rich, matplotlib, pytest, ruff, import-linter)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --progress-bar off -e ".[test,plot]"
    touch "$VENV/.alexnet2gpu-installed"
    say "set up; to run commands yourself: source $VENV/bin/activate"
fi

if [ ! -d "$FMNIST_DIR" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    if ! apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; then
        apt-get update -q >/dev/null 2>&1 || true
        apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
            || say "could not install dataset-fashion-mnist; train will download it where the network allows"
    fi
fi

command=${1:-compare}
shift || true
if [ "$command" = test ]; then
    say "lint: ruff check and ruff format --check"
    "$VENV/bin/ruff" check alexnet2gpu tests scripts
    "$VENV/bin/ruff" format --check alexnet2gpu tests scripts
    say "tests (the layering contract runs inside them: tests/test_code_shape.py)"
    exec "$VENV/bin/python" -m pytest "$@"
fi
exec "$VENV/bin/alexnet2gpu" "$command" "$@"
