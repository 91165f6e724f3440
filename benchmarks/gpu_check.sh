#!/usr/bin/env bash
# The GPU check, in one call of at most 8 minutes on a lent GPU machine (its own python 3.12 with torch and
# torchvision; no Ray, MLflow, Optuna, pydantic or network). Run from the repository root:
#   bash benchmarks/gpu_check.sh                 # on the GPU (`make gpu-wheels` first, carry .gpu-wheels)
#   bash benchmarks/gpu_check.sh --device cpu    # here, at a small size, fp32 only (the slow test)
# It runs the bare loop only: kdo's loop vs the anchor DataLoader loop on resnet32x4 -> resnet8x4 (fp32; bf16 +
# channels_last; and compiled), then 8 grouped KD students vs the same 8 one at a time, and prints images/s, the
# ratios and the share of the GPU's dense bf16 peak (--peak-tflops, H200: 989); then the CIFAR-100 recipe's projected
# hours (benchmarks/recipe_hours.py).
set -euo pipefail
DEVICE=cuda
PEAK=989
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --peak-tflops) PEAK="$2"; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument '$1'; allowed: --device cpu|cuda, --peak-tflops N" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .gpu-wheels ] && ! "$PYTHON" -c "import pydantic, yaml" 2>/dev/null; then
  site=$(mktemp -d)
  "$PYTHON" -m pip install -q --no-index --no-deps --target "$site" .gpu-wheels/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
fi
if [ "$DEVICE" = cuda ]; then
  SIZE=50000; EPOCHS=3; STUDENTS=8; GSIZE=10000; GEPOCHS=2; WORKERS=8; TEST=1000; RSIZE=45000; RTEST=10000
else
  SIZE=64; EPOCHS=1; STUDENTS=2; GSIZE=64; GEPOCHS=1; WORKERS=0; TEST=16; RSIZE=64; RTEST=16
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
run() { echo "== $*"; "$PYTHON" "$@"; }
T="benchmarks/throughput.py --device $DEVICE --size $SIZE --test-size $TEST --epochs $EPOCHS --workers $WORKERS"
run $T --no-bf16 --no-channels-last
if [ "$DEVICE" = cuda ]; then  # bf16 on a CPU is slow and says nothing of a GPU: the grouped check covers its flags
  run $T --bf16 --channels-last
  run $T --bf16 --channels-last --compile
fi
G="benchmarks/grouped_loop.py --device $DEVICE --students $STUDENTS --size $GSIZE --test-size $TEST --epochs $GEPOCHS"
G="$G --peak-tflops $PEAK"
run $G --no-bf16 --no-channels-last
run $G --bf16 --channels-last
# The CIFAR-100 table's recipe (batch 64, its schedule; bf16 + channels_last on the GPU): hours of one 240-epoch run
# and of the study cifar100_logit_baselines, projected from measured epochs.
run benchmarks/recipe_hours.py --device $DEVICE --size $RSIZE --test-size $RTEST --epochs $EPOCHS
