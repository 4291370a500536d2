#!/usr/bin/env bash
# CUDA readiness in at most 8 minutes: the gpu-marked tests, then the layer, distributed (world 1,
# NCCL) and task-inference benchmarks; one summary at the end (name, exit status, seconds).
#
#   scripts/gpu_check.sh            # from anywhere; PYTHON=... picks the interpreter
#
# Without CUDA it prints one line and exits 2 (nothing was checked). Logs: $GPU_CHECK_LOGS
# (default: a fresh temporary directory, printed in the summary).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False for $PY): nothing checked" >&2
    exit 2
fi
LOGS="${GPU_CHECK_LOGS:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$LOGS"
SUMMARY=()
FAILED=0

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output to $LOGS/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - start))
    local status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="timed out after ${limit}s"; FAILED=1
    elif [ "$rc" -ne 0 ]; then status="failed (exit $rc)"; FAILED=1; fi
    SUMMARY+=("$(printf '%-22s %-24s %4ss' "$name" "$status" "$took")")
    echo "== $name: $status (${took}s)"
    tail -n 25 "$LOGS/$name.log"
}

GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)")
echo "gpu_check on: $GPU"
step gpu-tests 120 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
step layer-bench 90 "$PY" benchmarks/layer.py --quick --no-einsum
step distributed-bench 150 "$PY" -m torch.distributed.run --nproc-per-node 1 benchmarks/distributed.py \
    --steps 4 --repeats 2 --trials 1 --tokens 4096 --model-dim 512 --hidden-dim 1024
step task-inference-bench 90 "$PY" benchmarks/task_inference.py --quick

echo
echo "gpu_check summary: $GPU"
printf '%s\n' "${SUMMARY[@]}"
echo "logs: $LOGS"
exit "$FAILED"
