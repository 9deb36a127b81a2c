#!/usr/bin/env bash
# Every GPU check in one run: under 8 minutes on one H200, cold torch.compile included.
#
#   bash scripts/gpu_checks.sh OUTDIR             # run every step (needs a CUDA device)
#   bash scripts/gpu_checks.sh --dry-run OUTDIR   # check every step's command line; run nothing
#
# steps() below is the one list of steps, the most important first. Each runs under its
# own time limit (the limits add up to BUDGET_S - RESERVE_S on one GPU); its output goes to
# OUTDIR/NAME.txt, its figures to OUTDIR/NAME.json (compare and compile: OUTDIR/NAME/).
# At the end OUTDIR/summary.md holds one Markdown table (step, exit, seconds, limit, key
# figure) to paste into docs/results.md. With one GPU the two-GPU steps are skipped, saying why.
#
# --dry-run writes each step's command line, as on a machine with 1 GPU and then with 2,
# to OUTDIR/dry-run.jsonl, and scripts/gpu_checks_dry_run.py checks them with the CLI's own
# parser and layout rules. No GPU needed, nothing measured.
#
# Python: $PYTHON, else .venv/bin/python if it imports torch, else python3. torch,
# torchvision, rich, matplotlib, pytest and this checkout's alexnet2gpu must import; that
# is checked first. Exit status: 0 every step passed; 1 a step failed (the table says
# which; the dry run: a step would fail); 2 nothing was run (usage, python, an import, no
# CUDA device).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = --dry-run ]; then DRY=1; shift; fi
if [ $# != 1 ] || [ -z "$1" ]; then
    echo "usage: bash scripts/gpu_checks.sh [--dry-run] OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)

BUDGET_S=480  # the whole run on one H200
RESERVE_S=20  # of which the set-up (imports, CUDA start), the table and kill grace may take this much

TRIED=""
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" > /dev/null 2>&1; then
    PY=.venv/bin/python
else
    [ -e .venv/bin/python ] && TRIED=".venv/bin/python (cannot import torch)"
    PY=python3
fi
if ! command -v "$PY" > /dev/null 2>&1; then
    echo "gpu_checks.sh: no python '$PY'${TRIED:+; also tried $TRIED}: set PYTHON=/path/to/python" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-120}
HELPER=scripts/gpu_checks.py
A2G=("$PY" -m alexnet2gpu)
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node 2)

json_str() {  # json_str VAR TEXT: VAR = TEXT as a JSON string
    local s=$2
    s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\t'/\\t}; s=${s//$'\n'/\\n}; s=${s//$'\r'/\\r}
    printf -v "$1" '"%s"' "$s"
}

record() {  # record NAME JSON_FIELDS: one line of OUT/steps.jsonl (or dry-run.jsonl)
    local name
    json_str name "$1"
    printf '{"gpus": %s, "name": %s, %s}\n' "$GPUS" "$name" "$2" >> "$RECORDS"
}

skip() {  # skip NAME WHY
    local why
    json_str why "$2"
    [ "$DRY" = 1 ] || echo "== $1 skipped: $2"
    record "$1" "\"skipped\": $why"
}

run_step() {  # run_step required|optional NAME LIMIT_S COMMAND...
    local kind=$1 name=$2 limit=$3 optional=false
    shift 3
    [ "$kind" = optional ] && optional=true
    if [ "$DRY" = 1 ]; then
        local argv="" sep="" arg quoted python
        for arg in "$@"; do json_str quoted "$arg"; argv+="$sep$quoted"; sep=", "; done
        json_str python "$PY"
        record "$name" "\"limit\": $limit, \"optional\": $optional, \"python\": $python, \"argv\": [$argv]"
        return 0
    fi
    if [ "$optional" = true ] && [ $((SECONDS + limit + 10)) -gt "$BUDGET_S" ]; then
        skip "$name" "no time left: it needs up to $limit s and $((BUDGET_S - SECONDS)) s of the $BUDGET_S s remain"
        return 0
    fi
    echo "== $name (limit $limit s)"
    local start end rc
    start=$(date +%s.%N)
    timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    rc=$?
    end=$(date +%s.%N)
    [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
    tail -n 3 "$OUT/$name.txt" | sed 's/^/   | /'
    echo "   exit $rc; log: $name.txt"
    record "$name" "\"limit\": $limit, \"optional\": $optional, \"exit\": $rc, \"start\": $start, \"end\": $end"
}

step() { run_step required "$@"; }   # step NAME LIMIT_S COMMAND...
extra() { run_step optional "$@"; }  # the same, run only when its limit still fits the budget

steps() {  # every step, the most important first; GPUS is the machine's GPU count
    step env 15 "$PY" "$HELPER" env --json "$OUT/env.json"
    # every placement on the GPU against float64 (towers, grouped; split on cuda:0,cuda:1 or cpu,cpu)
    step verify 30 "${A2G[@]}" verify --json "$OUT/verify.json"
    # the same under bf16 autocast: tolerances from bf16's unit roundoff, placement against placement
    step verify-bf16 20 "${A2G[@]}" verify --precision bf16 --json "$OUT/verify-bf16.json"
    # split across the GPU and the CPU: real device-to-device copies, forward and backward
    step split-cuda0-cpu 25 "$PY" "$HELPER" verify-placement split cuda:0,cpu --json "$OUT/split-cuda0-cpu.json"
    # the CPU memory estimate against the allocator: both two-tower placements of one GPU, and
    # the single-stream nets on `single` and on `auto`
    local spec
    for spec in "dual grouped" "dual towers" "simplified single" "half auto"; do
        set -- $spec
        step "estimate-$1-$2" 25 "${A2G[@]}" memory --model "$1" --placement "$2" --devices cuda:0 \
            --batch-size 128 --check-estimate --json "$OUT/estimate-$1-$2.json"
    done
    # the new LRN against nn.LocalResponseNorm (and torch.compile of it)
    step lrn 45 "$PY" scripts/lrn_check.py "$OUT/lrn.json"
    # the whole comparison at GPU batches (with two GPUs it also measures split and ranks), in
    # fp32 only: its default on CUDA adds every row again in bf16, twice the time (bench-bf16 below)
    step compare $((GPUS >= 2 ? 150 : 105)) "${A2G[@]}" compare --out "$OUT/compare" --threads 0 \
        --batch-sizes 64,128,256 --memory-batch-size 128 --repeats 5 --steps 5 --warmup 3 --precision fp32
    # compiled beside eager at batch 128: each mode of each variant compiles once, timed apart
    step compile 120 "${A2G[@]}" compare --out "$OUT/compile" --threads 0 \
        --variants dual/towers,torchvision --compile --no-overhead --precision fp32 \
        --batch-sizes 128 --memory-batch-size 128 --repeats 5 --steps 5 --warmup 3
    if [ "$GPUS" -ge 2 ]; then
        step split-cuda0-cuda1 30 "${A2G[@]}" memory --model dual --placement split --devices cuda:0,cuda:1 \
            --batch-size 128 --check-estimate --json "$OUT/split-cuda0-cuda1.json"
        step ranks 60 "${TORCHRUN[@]}" -m alexnet2gpu bench --model dual --placement ranks \
            --batch-sizes 128 --mode both --repeats 5 --steps 5 --warmup 3 --json "$OUT/ranks.json"
        # the three ways to use two devices (towers, data parallel, hybrid), one process per GPU
        extra two-workers 120 "${A2G[@]}" compare --out "$OUT/two-workers" --variants simplified --no-overhead \
            --precision fp32 --batch-sizes 128 --memory-batch-size 128 --repeats 1 --workers --workers-repeats 3
    else
        skip split-cuda0-cuda1 "needs two GPUs and this machine has $GPUS (split-cuda0-cpu ran split across devices)"
        skip ranks "torchrun --nproc-per-node 2 puts one tower per GPU and this machine has $GPUS"
        skip two-workers "the towers, data parallel and the hybrid run one process per GPU: needs two GPUs, this machine has $GPUS"
    fi
    # dual/towers in bf16 on one GPU at batch 128, against compare's fp32 row of the same batch
    extra bench-bf16 25 "${A2G[@]}" bench --model dual --placement towers --devices cuda:0 --precision bf16 \
        --batch-sizes 128 --mode both --repeats 5 --steps 5 --warmup 3 --json "$OUT/bench-bf16.json"
    extra pytest-cuda 60 "$PY" -m pytest tests -q -rs -k cuda -p no:cacheprovider
    extra memory-snapshot 30 "${A2G[@]}" memory --model dual --placement grouped --devices cuda:0 \
        --batch-size 128 --json "$OUT/memory-snapshot.json" --snapshot "$OUT/memory-snapshot.pickle"
}

if [ "$DRY" = 1 ]; then
    RECORDS=$OUT/dry-run.jsonl
    : > "$RECORDS"
    for GPUS in 1 2; do steps; done
    "$PY" scripts/gpu_checks_dry_run.py "$RECORDS" --budget "$BUDGET_S" --reserve "$RESERVE_S" \
        --python "$PY" --tried "$TRIED"
    exit $?
fi

GPUS=$("$PY" "$HELPER" preflight --cuda --python "$PY" --tried "$TRIED") || exit 2
RECORDS=$OUT/steps.jsonl
: > "$RECORDS"
# a cold compile, as the budget assumes, and no compile caches left behind
CACHE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks.XXXXXX") || exit 2
trap 'rm -rf "$CACHE"' EXIT
export TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor TRITON_CACHE_DIR=$CACHE/triton
echo "gpu_checks.sh: $PY, $GPUS GPU(s), budget $BUDGET_S s; results in $OUT"
FAILED=0
steps
echo
timeout 30 "$PY" "$HELPER" table "$OUT" --budget "$BUDGET_S" --wall "$SECONDS" \
    || echo "gpu_checks.sh: the summary table failed; the steps are in $OUT/steps.jsonl" >&2
echo "failed steps: $FAILED; $SECONDS s in all; the table is $OUT/summary.md"
[ "$FAILED" = 0 ] || exit 1
