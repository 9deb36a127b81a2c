#!/usr/bin/env bash
# The prepared GPU check: one call, about 8 minutes on one H200 (each step has its own limit).
#
#   bash scripts/gpu_checks.sh OUTDIR
#
# Runs, each step under its own time limit, writing everything to OUTDIR:
#   1. env.txt            nvidia-smi, torch and CUDA versions
#   2. verify.json        every placement on the GPU against the float64 reference
#      pytest-cuda.txt    the tests that need CUDA (every test named *cuda*; they skip on a CPU)
#   3. compare/           the whole comparison at GPU-sized batches (compare.json, .md, plots)
#   4. estimate-*.json    the CPU memory estimator against max_memory_allocated, per device
#   5. memory-grouped.*   one measured memory report, with a memory_viz snapshot
#   6. overhead-cuda.json bench against a plain PyTorch loop on the GPU
#   7. split-*.json       split on cuda:0,cuda:1, only where there are two GPUs
#   8. lrn.json           the new LRN (closed-form backward) against nn.LocalResponseNorm on
#                         CUDA: agreement in float32/float64, forward+backward speed, memory kept
#   9. compare-compile/   dual/towers and torchvision, eager and under torch.compile, at
#                         batch 128: the compiled gain and the compile times
# and summary.txt: each step's exit status and seconds. Exit status: the number of steps
# that failed (0 when all passed). Paste the measured tables into docs/results.md.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:?usage: bash scripts/gpu_checks.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# A venv made by scripts/run.sh where there is one, else the machine's python3 with torch.
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
A2G=("$PY" -m alexnet2gpu)
FAILED=0
: > "$OUT/summary.txt"

step() {  # step NAME LIMIT_S LOG COMMAND...
    local name=$1 limit=$2 log=$3; shift 3
    local start=$SECONDS rc
    echo "== $name (limit ${limit}s)" | tee -a "$OUT/summary.txt"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$log" 2>&1
    rc=$?
    echo "   exit $rc after $((SECONDS - start)) s; log: $log" | tee -a "$OUT/summary.txt"
    [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
    tail -n 3 "$OUT/$log"
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_checks.sh: no CUDA device visible to $PY (torch installed? a CPU-only build?): nothing checked" \
        | tee -a "$OUT/summary.txt" >&2
    exit 2
fi
step env 60 env.txt bash -c "nvidia-smi; $PY -c 'import torch, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"devices\", torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")

# Every placement against the float64 reference, on the GPU (split: on two GPUs where there are two).
step verify 60 verify.txt "${A2G[@]}" verify --json "$OUT/verify.json"

step pytest-cuda 120 pytest-cuda.txt "$PY" -m pytest tests -q -rs -k "cuda" -p no:cacheprovider

# The whole comparison, at batches that make a GPU work (the CPU defaults are 16,32,64).
# dual/split runs measured with two GPUs; with one, its memory is estimated on the CPU.
# dual/ranks needs one GPU per tower and is skipped, with a note, on a one-GPU machine.
step compare 180 compare.txt "${A2G[@]}" compare --out "$OUT/compare" --threads 0 \
    --batch-sizes 64,128,256 --memory-batch-size 128 --repeats 5 --steps 5 --warmup 3

for spec in "dual towers" "dual grouped" "simplified towers" "half towers"; do
    set -- $spec
    step "estimate-$1-$2" 60 "estimate-$1-$2.txt" "${A2G[@]}" memory --model "$1" --placement "$2" \
        --devices cuda:0 --batch-size 128 --check-estimate --json "$OUT/estimate-$1-$2.json"
done

step memory-grouped 60 memory-grouped.txt "${A2G[@]}" memory --model dual --placement grouped --devices cuda:0 \
    --batch-size 128 --json "$OUT/memory-grouped.json" --snapshot "$OUT/memory-grouped.pickle"

step overhead-cuda 60 overhead-cuda.txt "${A2G[@]}" bench --model simplified --placement towers --devices cuda:0 \
    --batch-sizes 128 --mode train --repeats 5 --steps 10 --warmup 5 --against-plain-loop \
    --json "$OUT/overhead-cuda.json"

# The new LRN against nn.LocalResponseNorm (and torch.compile of it) on the GPU.
step lrn 60 lrn.txt "$PY" scripts/lrn_check.py "$OUT/lrn.json"

# The compiled variants beside their eager twins: one batch size, so that compiling (each
# mode of each variant compiles once, timed apart) fits the budget.
step compare-compile 240 compare-compile.txt "${A2G[@]}" compare --out "$OUT/compare-compile" --threads 0 \
    --variants dual/towers,torchvision --compile --no-overhead \
    --batch-sizes 128 --memory-batch-size 128 --repeats 5 --steps 5 --warmup 3

if [ "$GPUS" -ge 2 ]; then
    step split-memory 60 split-memory.txt "${A2G[@]}" memory --model dual --placement split \
        --devices cuda:0,cuda:1 --batch-size 128 --json "$OUT/split-memory.json"
    step split-estimate 60 split-estimate.txt "${A2G[@]}" memory --model dual --placement split \
        --devices cuda:0,cuda:1 --batch-size 128 --check-estimate --json "$OUT/split-estimate.json"
fi

echo "failed steps: $FAILED; $SECONDS s in all; results in $OUT" | tee -a "$OUT/summary.txt"
exit "$FAILED"
