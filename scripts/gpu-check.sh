#!/usr/bin/env bash
# Check flopmatch's accelerator path in one go, on a machine with NVIDIA GPUs: `flopmatch bench` (eager, and the
# next-token sampler with torch.compile), no host synchronisation inside the training step, train + sample +
# evaluate a small run, torchrun DDP and FSDP2 over every GPU, and a learned tokenizer's training.
#
#   ./scripts/setup.sh && scripts/gpu-check.sh      # with a CUDA build of torch in .venv
#   DEVICE=cpu QUICK=1 scripts/gpu-check.sh          # the same checks on a CPU at tiny sizes (tests this script)
#
# Each check writes $OUT/<check>.log (OUT default: gpu-check/); the bench figures also go to $OUT/bench*.json.
# One line per check on stdout. Every check runs even when an earlier one failed; each is capped at
# STEP_TIMEOUT seconds (default 300). Exit status: 0 when all passed, 1 when any failed, 2 without CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PY=${PY:-.venv/bin/python}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
mkdir -p "$OUT"

if [ "$DEVICE" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu-check: CUDA is not available to $PY (a CPU build of torch, or no GPU); DEVICE=cpu QUICK=1 runs the checks on a CPU" >&2
    exit 2
fi
if [ "$DEVICE" = cuda ]; then
    NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count())")
else
    NPROC=2  # two gloo processes on a CPU
fi

# Sizes: the real ones on a GPU; tiny ones with QUICK=1 (seconds on a CPU).
if [ "$QUICK" = 1 ]; then
    BENCH=(--quick --depths 1 --rounds 1)
    COMPILE=(--quick --depths 1 --rounds 1 --objectives autoregressive --compile)
    RUN=(--depth 1 --budget 3e9 --set text.kind=hash --set data.num_train=256 --set data.num_eval=64
         --set train.batch_size=16 --set model.head_dim=16)
    SAMPLES=16
    TOKENIZER_STEPS=5
    SYNC_DEPTH=1
else
    BENCH=(--depths 2,6 --batch 256)
    COMPILE=(--depths 6 --batch 256 --objectives autoregressive --compile --rounds 2)
    RUN=(--depth 2 --budget 3e12 --set text.kind=hash --set data.num_train=4000 --set data.num_eval=500
         --set train.batch_size=64)
    SAMPLES=250
    TOKENIZER_STEPS=200
    SYNC_DEPTH=2
fi

failed=0
check() {  # check NAME COMMAND...: run it with its output in $OUT/NAME.log, print one line
    local name=$1 start rc
    shift
    start=$(date +%s)
    timeout "$STEP_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        echo "ok      $name ($(( $(date +%s) - start )) s)"
    else
        echo "FAILED  $name (exit $rc$([ $rc -eq 124 ] && echo ", timed out after $STEP_TIMEOUT s"); $OUT/$name.log):"
        tail -n 5 "$OUT/$name.log" | sed 's/^/        /'
        failed=1
    fi
}

check info "$PY" -c "
import platform, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f'cuda:{i}', p.name, f'{p.total_memory / 2**30:.0f} GiB', 'bf16' if torch.cuda.is_bf16_supported() else 'no bf16')
"

# `bench --json` prints its JSON on stdout and its progress on stderr.
check bench bash -c "$PY -m flopmatch bench --device $DEVICE ${BENCH[*]} --json > $OUT/bench.json"
check bench-compile bash -c "$PY -m flopmatch bench --device $DEVICE ${COMPILE[*]} --json > $OUT/bench-compile.json"

# No host synchronisation inside the training step or a sampling loop: after warm-up, CUDA raises on any sync (a
# .item(), a data-dependent shape, a host copy). On a CPU the steps just run.
check no-sync "$PY" -c "
import torch
from flopmatch.bench import net_spec, sizes, train_config
from flopmatch.config import SampleConfig
from flopmatch.probe import SamplingProbe, TrainingProbe
from flopmatch import PARADIGMS
device = torch.device('$DEVICE')
bf16 = device.type == 'cuda'
sz = sizes($([ "$QUICK" = 1 ] && echo True || echo False))

def without_sync(what, fn):
    fn()  # warm-up: allocation, kernel selection
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
    try:
        fn()
    finally:
        if device.type == 'cuda':
            torch.cuda.set_sync_debug_mode('default')
            torch.cuda.synchronize()
    print(what, 'no host sync')

for name in PARADIGMS:
    p = TrainingProbe(name, net_spec(name, $SYNC_DEPTH, sz), 64, train_config(), device, bf16, sz.text)
    without_sync(name + ': 3 training steps', lambda: [p.step() for _ in range(3)])
    s = SamplingProbe(name, net_spec(name, $SYNC_DEPTH, sz), 8, device, bf16, sz.text)
    for sample in [SampleConfig()] + ([SampleConfig(kv_cache=False)] if name == 'autoregressive' else []):
        without_sync(f'{name}: sampling (kv_cache={sample.kv_cache})', lambda: s.run(sample))
"

check train "$PY" -m flopmatch train --objective masked "${RUN[@]}" --set "train.device=$DEVICE" --out "$OUT/run-masked" --quiet
check eval "$PY" -m flopmatch eval "$OUT/run-masked" --num-samples "$SAMPLES" --no-timing
check sample "$PY" -m flopmatch sample "$OUT/run-masked" --prompt "a red circle above a blue square" --out "$OUT/sample.png"

# torchrun over every GPU (NCCL; on a CPU two gloo processes): DDP, then FSDP2.
for parallel in ddp fsdp2; do
    check "torchrun-$parallel" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m flopmatch train \
        --objective diffusion "${RUN[@]}" --set "train.device=$DEVICE" --set "train.parallel=$parallel" \
        --out "$OUT/run-$parallel" --quiet
done

check tokenizer "$PY" -m flopmatch tokenizer train --kind lfq --steps "$TOKENIZER_STEPS" --out "$OUT/tokenizer-lfq" --quiet

exit $failed
