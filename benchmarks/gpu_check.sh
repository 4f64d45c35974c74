#!/usr/bin/env bash
# The GPU check: one script, one GPU, under 8 minutes. Run it from the repository root whenever a
# CUDA machine is available, then commit benchmarks/results/gpu_check.md (and the .json files).
#
#   PYTHON=/path/to/python-with-cuda-torch benchmarks/gpu_check.sh
#
# It needs a CUDA build of torch in $PYTHON (the project's pinned torch is the CPU build) and
# nvcc for the extension. Steps, each under its own time limit:
#   1. build the extension with its CUDA kernels (FORCE_CUDA=1, in place);
#   2. the CUDA op tests (pytest -m gpu: parity with the CPU kernels and the reference, gradcheck);
#   3. esper-bench kernels --device cuda, and seed_blend's achieved fraction of the bandwidth a
#      device copy reaches (esper-bench blend-bandwidth);
#   4. an AMP (bf16) esper-train run of ResNet-18 on synthetic CIFAR-shaped data in which a seed
#      germinates and fossilizes, then the same run as a 1-rank torchrun job (NCCL);
#   5. writes benchmarks/results/gpu_check.md with every step's status and figures.
# A failing step is recorded and the script goes on; its exit status is that of the first failure.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=benchmarks/results
REPORT="$RESULTS/gpu_check.md"
WORK="$(mktemp -d -t esper-gpu-check-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RESULTS"
START=$(date +%s)
STATUS=0
STEPS=()

fail() { echo "gpu_check: $*" >&2; exit 2; }

command -v nvidia-smi >/dev/null || fail "nvidia-smi not found; expected a machine with an NVIDIA GPU"
"$PYTHON" - <<'EOF' || fail "torch in \$PYTHON cannot use CUDA; expected a CUDA build of torch and a visible GPU"
import sys, torch
sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)
EOF

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit, logs to $WORK/NAME.log.
step() {
    local name="$1" limit="$2"; shift 2
    local t0=$(date +%s) rc
    echo "== $name (limit ${limit}s)"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    tail -n 5 "$WORK/$name.log"
    if [ $rc -eq 0 ]; then
        STEPS+=("| $name | ok | ${took} s |")
    else
        [ $rc -eq 124 ] && STEPS+=("| $name | TIMED OUT after ${limit} s | ${took} s |") \
                        || STEPS+=("| $name | FAILED (exit $rc) | ${took} s |")
        [ $STATUS -eq 0 ] && STATUS=$rc
    fi
}

# Synthetic CIFAR-10 in the standard python batch format: each class has its own mean colour under
# heavy noise, so a ResNet learns it within a few epochs without the loss collapsing to ~0 (where
# every fluctuation looks like a spike to the governor).
cat >"$WORK/make_cifar.py" <<'EOF'
import pickle, sys
from pathlib import Path
import numpy as np
root = Path(sys.argv[1]) / "cifar-10-batches-py"
root.mkdir(parents=True)
rng = np.random.default_rng(0)
colours = rng.uniform(100, 155, size=(10, 3))
def batch(n):
    labels = rng.integers(0, 10, size=n)
    img = rng.normal(0, 90, size=(n, 3, 32, 32)) + colours[labels][:, :, None, None]
    return {b"data": np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072), b"labels": labels.tolist()}
for i in range(1, 6):
    (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch(1000)))
(root / "test_batch").write_bytes(pickle.dumps(batch(1000)))
EOF

AMP_RUN=(--config configs/cifar10.yaml --device cuda --mixed-precision bf16 --data-dir "$WORK/cifar"
         --progress plain model.width=32 data.batch_size=128 data.augment=false train.epochs=8
         schedule.warmup_epochs=0.5 lifecycle.training_min_steps=20 lifecycle.grafting_steps=20
         lifecycle.stabilization_steps=5 lifecycle.evaluation_epochs=1 lifecycle.fine_tuning_epochs=1
         lifecycle.min_alignment=0.0 lifecycle.min_contribution=-1.0 controller.start_epoch=1 controller.grow_without_plateau=true
         controller.cooldown_epochs=0 logging.tensorboard=false services.mode=off services.tolaria_port=-1)

step build 240 env FORCE_CUDA=1 "$PYTHON" setup.py build_ext --inplace
step cuda_op_tests 120 "$PYTHON" -m pytest -q -m gpu tests/kasmina tests/tezzeret
step kernels_bench 120 "$PYTHON" -m esper.bench.cli kernels --device cuda --quick \
    --json "$RESULTS/kernels_cuda.json" --markdown "$WORK/kernels_cuda.md"
step blend_bandwidth 60 "$PYTHON" -m esper.bench.cli blend-bandwidth --device cuda \
    --json "$RESULTS/blend_bandwidth_cuda.json" --markdown "$WORK/blend_bandwidth.md"
step synthetic_cifar 60 "$PYTHON" "$WORK/make_cifar.py" "$WORK/cifar"
step amp_resnet18 150 "$PYTHON" -m esper.tolaria.cli "${AMP_RUN[@]}" --output-dir "$WORK/amp"
step amp_resnet18_torchrun 120 "$PYTHON" -m esper.tolaria.cli --nproc 1 "${AMP_RUN[@]}" train.epochs=2 \
    --output-dir "$WORK/amp_ddp"

AMP_SUMMARY=$("$PYTHON" - "$WORK/amp/summary.json" <<'EOF'
import json, sys
try:
    s = json.load(open(sys.argv[1]))
except OSError:
    print("no summary (the run did not finish)"); sys.exit(0)
fossilized = s["seeds"].get("fossilized", 0)
print(f"device {s['device']}, {s['epochs']} epochs, final val acc {s['final_val_acc']:.4f}, test acc "
      f"{s['test_acc']:.4f}, params {s['params_initial']} -> {s['params_final']}, seeds {s['seeds']}, "
      f"wall {s['wall_s']:.1f} s; a seed fossilized: {'YES' if fossilized else 'NO'}")
sys.exit(0 if fossilized else 3)
EOF
)
AMP_RC=$?
if [ $AMP_RC -ne 0 ] && [ $STATUS -eq 0 ]; then STATUS=$AMP_RC; fi

{
    echo "# GPU check"
    echo
    echo '```'
    echo "benchmarks/gpu_check.sh    # $(date -u +%Y-%m-%dT%H:%MZ), $(( $(date +%s) - START )) s in all"
    echo '```'
    echo
    echo "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1);" \
         "torch $("$PYTHON" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
    echo
    echo "| step | status | time |"
    echo "|---|---|---|"
    printf '%s\n' "${STEPS[@]}"
    echo
    echo "## CUDA op tests"
    echo '```'
    tail -n 15 "$WORK/cuda_op_tests.log" 2>/dev/null
    echo '```'
    echo
    echo "## esper-bench kernels --device cuda --quick"
    cat "$WORK/kernels_cuda.md" 2>/dev/null || echo "(no output)"
    echo
    cat "$WORK/blend_bandwidth.md" 2>/dev/null || echo "(no blend-bandwidth output)"
    echo
    echo "## AMP (bf16) ResNet-18, synthetic CIFAR-shaped data"
    echo
    echo "$AMP_SUMMARY"
    echo
    echo '```'
    grep -E "^epoch|final val|seeds by" "$WORK/amp.log" 2>/dev/null | tail -n 12
    echo '```'
    echo
    echo "1-rank torchrun (NCCL) run of the same config, 2 epochs:"
    echo '```'
    tail -n 4 "$WORK/amp_resnet18_torchrun.log" 2>/dev/null
    echo '```'
} >"$REPORT"
echo "gpu_check: wrote $REPORT (exit status $STATUS)"
exit $STATUS
