#!/usr/bin/env bash
# The GPU checks in one run, for the `device` tool (a GPU machine without internet):
#   here:  python bench/device_kit.py pack            (writes .devkit/, ignored by git)
#   there: bash bench/gpu_session.sh [.devkit]        (run with carry [".devkit"])
# 1. tests/test_cuda.py; 2. learned rounding against GPTQ, times only, on a random-weight model
# of the kit's shape (bench/learned_rounding.py --device cuda); 3. every preset on CPU and CUDA
# (bench/gpu_check.py); 4. one AdaRound step (bench/adaround_step.py --device cuda).
# Each part has its own time limit and writes its output under $OUT (or ./gpu-session).
# A dry run here: DEVICE=cpu ROWS=w4a16-rtn bash bench/gpu_session.sh
set -u
KIT=${1:-.devkit}
OUT=${OUT:-gpu-session}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LOWBIT_CACHE=${LOWBIT_CACHE:-/tmp/lbcache}
if ls "$KIT"/wheels/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kit-site "$KIT"/wheels/*.whl || exit 3
fi
export PYTHONPATH=/tmp/kit-site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
python3 bench/device_kit.py build "$KIT/model" /tmp/kit-model > /dev/null || exit 4
T0=$(date +%s)
part() {  # NAME LIMIT COMMAND...: run, keep its output, say how it ended
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name: rc $? at $(( $(date +%s) - T0 )) s"
}
part test_cuda "${LIMIT_TESTS:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
grep -E "passed|failed|^E " "$OUT/test_cuda.txt" | head -20
part learned_rounding "${LIMIT_LR:-220}" python3 bench/learned_rounding.py --model /tmp/kit-model --data "$KIT/text" \
  --rows "${ROWS:-w4a16,w4a16-ar}" --samples 64 --seq-len 512 --windows 8 --device "$DEVICE"
grep -v "Loading weights" "$OUT/learned_rounding.txt" | tail -10
part gpu_check "${LIMIT_CHECK:-130}" python3 bench/gpu_check.py --iters 30 --devices "cpu,$DEVICE"
grep -iE "error:|Traceback| on cuda" "$OUT/gpu_check.txt" | head -10
part adaround_step "${LIMIT_STEP:-60}" python3 bench/adaround_step.py --device "$DEVICE" --steps 30
tail -6 "$OUT/adaround_step.txt"
