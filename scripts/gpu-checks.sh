#!/usr/bin/env bash
# Every GPU check and figure the project owes, in one run sized for a short lease on one CUDA GPU: the tests
# that only run on a GPU, bench/gpu.py (numerics, attention, training, serving) and the training rows of
# bench/train_throughput.py (MFU, bf16 against FP8, peak memory for d20 and d24 at their presets' batches).
# Each part has a time limit of its own, so a part that hangs costs only its share; its log and figures land
# in OUTDIR as it goes (bench/gpu.py rewrites its JSON after each section), also when a part is stopped.
#   scripts/gpu-checks.sh OUTDIR [PART ...]      PART: tests, gpu, train (default: all three, in that order)
# Environment: PYTHON (default: .venv/bin/python if there, else python3); TESTS_S, GPU_S, TRAIN_S: each
# part's limit in seconds (default 120, 330, 300). Exit status: the number of parts that failed.
set -uo pipefail

out=${1:?usage: scripts/gpu-checks.sh OUTDIR [tests|gpu|train ...]}
shift
parts=("$@")
[[ ${#parts[@]} -gt 0 ]] || parts=(tests gpu train)
cd "$(dirname "$0")/.." || exit 1
python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

# runs "$@" for at most $1 seconds, its output both here and in $out/$2.log; its exit status
part() {
  local seconds=$1 name=$2
  shift 2
  echo "== $name (at most ${seconds}s): $*"
  timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$out/$name.log"
  local status=${PIPESTATUS[0]}
  [[ $status == 124 ]] && echo "== $name: stopped at its limit of ${seconds}s"
  return "$status"
}

"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu',
  torch.cuda.get_device_name() if torch.cuda.is_available() else None)" || exit 1
failed=0
for name in "${parts[@]}"; do
  case $name in
    tests) part "${TESTS_S:-120}" tests "$python" -m pytest -q -p no:cacheprovider \
             tests/nanochat/test_attention.py tests/serving/engine/test_async_scheduling.py ;;
    gpu) part "${GPU_S:-330}" gpu "$python" -m bench.gpu --json "$out/gpu.json" ;;
    train) part "${TRAIN_S:-300}" train "$python" -m bench.train_throughput --gpu-only ;;
    *) echo "gpu-checks: unknown part '$name' (tests, gpu, train)" >&2; false ;;
  esac || failed=$((failed + 1))
done
echo "== gpu-checks: ${#parts[@]} parts, $failed failed; logs and figures in $out"
exit "$failed"
