#!/usr/bin/env bash
# Check flopmatch's accelerator path in one go, on a machine with NVIDIA GPUs: no host synchronisation in the training
# step, the samplers or the real training loop; train + evaluate + sample a small run; the compiled next-token sampler
# against the eager one; torchrun DDP, FSDP2 and FSDP2 with bf16 parameters (NCCL) over every GPU, one included (a
# process group of one), and a sharded evaluation; a learned tokenizer's training; then `flopmatch bench` (eager, and compiled).
#
#   ./scripts/setup.sh && scripts/gpu-check.sh        # with a CUDA build of torch in .venv
#   PY=python3 scripts/gpu-check.sh                   # another Python with CUDA torch (flopmatch from src/ if not installed)
#   DEVICE=cpu QUICK=1 scripts/gpu-check.sh            # the same checks on a CPU at tiny sizes (tests this script)
#
# Python packages flopmatch needs and that Python lacks can come as wheels in .whl/ (scripts/gpu-wheels.sh fetches
# them on a machine with a package index): they are installed into $WORK/site first, nothing else is changed.
# Each check writes <work>/<check>.log, in a fresh temporary folder (or $GPU_CHECK_WORK: an empty folder, or one an
# earlier gpu-check made, which is emptied; any other is refused). The results go to $OUT (default
# gpu-check/) in a few files: summary.txt (one line per check, as printed), logs.txt (the end of every check's log),
# bench.json and bench-compile.json. Every check runs even when an earlier one failed; each is capped at STEP_TIMEOUT
# seconds (default 150), and none starts after DEADLINE seconds from the start (default 520), so the results are
# written within a time limit. Correctness checks come first, benchmarks last.
# Exit status: 0 when all passed, 1 when any failed or was skipped, 2 without CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-gpu-check}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
DEADLINE=${DEADLINE:-520}
START=$(date +%s)
if [ -z "${PY:-}" ]; then
    PY=python3
    [ -x .venv/bin/python ] && PY=.venv/bin/python
fi
mkdir -p "$OUT"
MARK=.flopmatch-gpu-check  # in a work folder this script made: only such a folder (or an empty one) is ever emptied
if [ -n "${GPU_CHECK_WORK:-}" ]; then
    WORK=$GPU_CHECK_WORK
    if [ -d "$WORK" ] && [ -n "$(ls -A "$WORK")" ] && [ ! -e "$WORK/$MARK" ]; then
        echo "gpu-check: GPU_CHECK_WORK=$WORK holds files gpu-check did not make; give an empty or new folder" >&2
        exit 2
    fi
    rm -rf "$WORK"
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/flopmatch-gpu-check.XXXXXX")
fi
touch "$WORK/$MARK"
export FLOPMATCH_CACHE=${FLOPMATCH_CACHE:-$WORK/cache} PYTHONUNBUFFERED=1

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
        || { echo "gpu-check: installing the wheels in .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import flopmatch" 2>/dev/null; then  # not installed in this Python: the source tree
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu-check: CUDA is not available to $PY (a CPU build of torch, or no GPU); PY=<a python with CUDA torch>, or DEVICE=cpu QUICK=1 to run the checks on a CPU" >&2
    exit 2
fi
if [ "$DEVICE" = cuda ]; then  # every GPU, down to a power of two (the runs' batch of 64 splits evenly)
    NPROC=$("$PY" -c "import torch; n = torch.cuda.device_count(); print(1 << (n.bit_length() - 1))")
else
    NPROC=2  # two gloo processes on a CPU
fi

# Sizes: the real ones on a GPU; tiny ones with QUICK=1 (seconds on a CPU).
if [ "$QUICK" = 1 ]; then
    BENCH=(--quick --depths 1 --rounds 1)
    COMPILE=(--quick --depths 1 --rounds 1 --objectives autoregressive --compile)
    RUN=(--depth 1 --budget 3e9 --set text.kind=hash --set data.num_train=256 --set data.num_eval=64
         --set train.batch_size=16 --set model.head_dim=16)
    LOOP=(objective.name=masked model.depth=1 train.budget=3e9 text.kind=hash data.num_train=256 data.num_eval=64
          train.batch_size=16 model.head_dim=16)
    SAMPLES=16
    TOKENIZER_STEPS=5
    SYNC_DEPTH=1
else
    BENCH=(--depths 2,6 --batch 256)
    COMPILE=(--depths 6 --batch 256 --objectives autoregressive --compile --rounds 2)
    RUN=(--depth 2 --budget 3e12 --set text.kind=hash --set data.num_train=4000 --set data.num_eval=500
         --set train.batch_size=64)
    LOOP=(objective.name=masked model.depth=2 train.budget=1e12 text.kind=hash data.num_train=4000 data.num_eval=500
          train.batch_size=64)
    SAMPLES=250
    TOKENIZER_STEPS=200
    SYNC_DEPTH=2
fi
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")

failed=0
check() {  # check NAME COMMAND...: run it with its output in $WORK/NAME.log, print one line
    local name=$1 start rc left limit
    shift
    start=$(date +%s)
    left=$(( DEADLINE - (start - START) ))
    if [ "$left" -lt 20 ]; then
        echo "SKIPPED $name (out of time: DEADLINE=$DEADLINE s)" | tee -a "$OUT/summary.txt"
        failed=1
        return
    fi
    limit=$(( left < STEP_TIMEOUT ? left : STEP_TIMEOUT ))
    timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        echo "ok      $name ($(( $(date +%s) - start )) s)" | tee -a "$OUT/summary.txt"
    else
        { echo "FAILED  $name (exit $rc$([ $rc -eq 124 ] && echo ", timed out after $limit s"); $WORK/$name.log):"
          sed 's/.*\r//' "$WORK/$name.log" | tail -n 5 | sed 's/^/        /'; } | tee -a "$OUT/summary.txt"
        failed=1
    fi
}
: > "$OUT/summary.txt"

check info "$PY" -c "
import platform, torch, flopmatch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version(), 'flopmatch', flopmatch.__file__)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f'cuda:{i}', p.name, f'{p.total_memory / 2**30:.0f} GiB', 'bf16' if torch.cuda.is_bf16_supported() else 'no bf16')
"
check probe-sync "$PY" scripts/gpu_checks.py probe-sync "$DEVICE" "$SYNC_DEPTH" "$QUICK"
check loop-sync "$PY" scripts/gpu_checks.py loop-sync "$DEVICE" "$WORK/run-loop" "${LOOP[@]}"
check train "$PY" -m flopmatch train --objective masked "${RUN[@]}" --set "train.device=$DEVICE" --out "$WORK/run-masked" --quiet
check eval "$PY" -m flopmatch eval "$WORK/run-masked" --num-samples "$SAMPLES" --no-timing
check sample "$PY" -m flopmatch sample "$WORK/run-masked" --prompt "a red circle above a blue square" --out "$WORK/sample.png"
check compiled-equal "$PY" scripts/gpu_checks.py compiled-equal "$DEVICE" "$QUICK"
# torchrun over every GPU (NCCL; one GPU is a process group of one; on a CPU two gloo processes): DDP, FSDP2, then a
# sharded evaluation of the DDP run.
for parallel in ddp fsdp2; do
    check "torchrun-$parallel" "${TORCHRUN[@]}" -m flopmatch train --objective diffusion "${RUN[@]}" \
        --set "train.device=$DEVICE" --set "train.parallel=$parallel" --out "$WORK/run-$parallel" --quiet
done
# FSDP2 mixed precision: parameters all-gathered and computed in bf16, gradients reduce-scattered in fp32
check torchrun-fsdp2-bf16 "${TORCHRUN[@]}" -m flopmatch train --objective masked "${RUN[@]}" --set "train.device=$DEVICE" \
    --set train.parallel=fsdp2 --set train.fsdp_param_dtype=bf16 --set train.precision=bf16 --out "$WORK/run-fsdp2-bf16" --quiet
check torchrun-eval "${TORCHRUN[@]}" -m flopmatch eval "$WORK/run-ddp" --num-samples "$SAMPLES" --no-timing
check tokenizer "$PY" -m flopmatch tokenizer train --kind lfq --steps "$TOKENIZER_STEPS" --out "$WORK/tokenizer-lfq" --quiet
# `bench --json` prints its JSON on stdout and its progress on stderr.
check bench bash -c '"$0" -m flopmatch bench "${@:2}" --json > "$1"' "$PY" "$WORK/bench.json" --device "$DEVICE" "${BENCH[@]}"
check bench-compile bash -c '"$0" -m flopmatch bench "${@:2}" --json > "$1"' "$PY" "$WORK/bench-compile.json" \
    --device "$DEVICE" "${COMPILE[@]}"

# What comes back: a few files.
# (a progress bar's line keeps only its last redraw: its redraws, joined by carriage returns, would fill the tail)
for f in "$WORK"/*.log; do echo "== $(basename "$f")"; sed 's/.*\r//' "$f" | tail -n 40; done > "$OUT/logs.txt"
cp "$WORK"/bench*.json "$OUT/" 2> /dev/null
echo "gpu-check: $(grep -c '^ok' "$OUT/summary.txt") ok, $(grep -c '^FAILED\|^SKIPPED' "$OUT/summary.txt") failed or skipped, in $(( $(date +%s) - START )) s; results in $OUT/, logs and runs in $WORK/"
exit $failed
