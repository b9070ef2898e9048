#!/usr/bin/env bash
# RewardMap's ablations at laptop scale (§5.4, docs/experiments.md): the tiny random Qwen2.5-VL on
# synthetic maps. Run from the repository root.
#
#     bash tools/experiments.sh runs/exp      # data, 9 configs x 5 seeds, evals, table, plot (~30 min, 2 idle cores)
#     SEEDS="0 1 2" JOBS=2 bash tools/experiments.sh runs/exp      # fewer seeds / other parallelism
#     CONFIGS="default advscale" bash tools/experiments.sh runs/exp # only these configs (names below)
#     python tools/plot_experiments.py runs/exp --md runs/exp/table.md --png docs/experiments.png
#
# Groups (paper: reward §4.2, curriculum §4.3, α Table 6, advantage §4.1):
#   default   = rewardmap curriculum, α 0.5, detail reward, difficulty weight, centred advantage
#   fc        = format + correctness only      (--no-detail --no-difficulty)
#   fc_detail = + detail, no difficulty weight (--no-difficulty)
#   none / reverse / coarse = other curricula; alpha0.3 / alpha0.7; advscale (--adv-scale)
# `default` is the shared baseline of every group, so it runs once per seed, not four times.
#
# Every training setting is passed explicitly so the numbers do not move when train.py's quick
# start defaults change. One dataset (synth seed 0) is built once and shared by every run; a run's
# --seed sets only its sampling and its within-stage shuffle (the tiny model's init is fixed).
# Resumable: a run with final/ and eval.json is skipped, so re-running the script finishes a sweep.
set -euo pipefail
OUT=${1:?usage: bash tools/experiments.sh OUT_DIR}
SEEDS=${SEEDS:-"0 1 2 3 4"}
CONFIGS=${CONFIGS:-}
JOBS=${JOBS:-2}
cd "$(dirname "$0")/.."   # the repository root: OUT and every path below are relative to it
mkdir -p "$OUT"
git describe --always --dirty > "$OUT/commit.txt" 2>/dev/null || true   # the code the numbers came from

# Quick-start settings (train.py QUICK, with 1 epoch of 16 questions/type/city = 38 steps).
TRAIN="--model tiny --lr 3e-3 --kl 0 --group-size 8 --batch-size 8 --micro-batch 64 \
 --max-new-tokens 32 --temperature 1.0 --weight-decay 0 --grad-clip 1.0 --clip-eps 0.2 --epochs 1"
DEFAULT="--curriculum rewardmap --alpha 0.5"

# name|flags: the ablated flag comes after the defaults, so argparse's last value wins.
ALL_CONFIGS=(
  "default|"
  "fc|--no-detail --no-difficulty"
  "fc_detail|--no-difficulty"
  "none|--curriculum none"
  "reverse|--curriculum reverse"
  "coarse|--curriculum coarse"
  "alpha0.3|--alpha 0.3"
  "alpha0.7|--alpha 0.7"
  "advscale|--adv-scale"
)
NAMES=" ${ALL_CONFIGS[*]%%|*} "
for name in $CONFIGS; do
  [[ "$NAMES" == *" $name "* ]] || { echo "unknown config '$name'; known:$NAMES" >&2; exit 1; }
done

[ -f "$OUT/data/train.jsonl" ] || python data.py synth --out "$OUT/data" --cities 6 --seed 0 --per-type 16

# On 2 shared cores two single-threaded runs side by side beat one two-threaded run by ~3x
# (measured: 3 s/step each vs 11 s/step under load). model.init_distributed takes the thread
# count from OMP_NUM_THREADS (older versions from cpu_count // LOCAL_WORLD_SIZE); both are set
# so either pins one thread (a plain python run: WORLD_SIZE unset, nothing distributed).
# One thread also under JOBS=1, so the numbers do not depend on JOBS (nor on the core count).
THREADS_ENV="OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 LOCAL_WORLD_SIZE=$(nproc)"

run_one() {   # run_one NAME SEED FLAGS...
  local name=$1 seed=$2; shift 2
  local dir="$OUT/runs/$name/seed$seed"
  if [ -f "$dir/eval.json" ] && [ -d "$dir/final" ]; then echo "skip $dir"; return; fi
  mkdir -p "$dir"
  local t0=$(date +%s)
  env $THREADS_ENV TQDM_DISABLE=1 python train.py $TRAIN $DEFAULT "$@" --seed "$seed" \
      --data "$OUT/data/train.jsonl" --out "$dir" > "$dir/train.log" 2>&1 || { echo "FAILED $dir (see train.log)"; return 1; }
  local t1=$(date +%s)
  env $THREADS_ENV TQDM_DISABLE=1 python eval.py --model "$dir/final" --data "$OUT/data/test.jsonl" \
      --out "$dir/eval.json" --max-new-tokens 32 > "$dir/eval.log" 2>&1 || { echo "FAILED $dir (see eval.log)"; return 1; }
  local t2=$(date +%s)
  echo "{\"train_s\": $((t1 - t0)), \"eval_s\": $((t2 - t1))}" > "$dir/wall.json"
  echo "done $dir  train $((t1 - t0)) s  eval $((t2 - t1)) s"
}
export -f run_one
export OUT TRAIN DEFAULT THREADS_ENV

# The untrained model (same init as every run): what "chance" looks like on the test split.
if [ ! -f "$OUT/runs/untrained/eval.json" ]; then
  mkdir -p "$OUT/runs/untrained"
  env $THREADS_ENV TQDM_DISABLE=1 python eval.py --model tiny --data "$OUT/data/test.jsonl" \
      --out "$OUT/runs/untrained/eval.json" --max-new-tokens 32 > "$OUT/runs/untrained/eval.log" 2>&1
fi

# Seeds outermost: a sweep cut short still has every config at the seeds it reached.
start=$(date +%s)
for seed in $SEEDS; do
  for c in "${ALL_CONFIGS[@]}"; do
    [ -z "$CONFIGS" ] || [[ " $CONFIGS " == *" ${c%%|*} "* ]] || continue
    echo "${c%%|*} $seed ${c#*|}"
  done
done | xargs -P "$JOBS" -d '\n' -n 1 bash -c 'run_one $1' _   # $1 unquoted: split into name seed flags
echo "sweep: $(( $(date +%s) - start )) s wall" | tee "$OUT/sweep_time.txt"

# Reward density at the shared init, every reward mode scoring the same K=8 samples (~1.5 min):
# isolates "does the reward definition densify the signal" from any training dynamics.
[ -f "$OUT/runs/untrained/density.json" ] || env $THREADS_ENV TQDM_DISABLE=1 python eval.py --model tiny \
    --data "$OUT/data/test.jsonl" --density 8 --out "$OUT/runs/untrained/density.json" \
    --max-new-tokens 32 > "$OUT/runs/untrained/density.log" 2>&1

python tools/plot_experiments.py "$OUT" --md "$OUT/table.md" --png "$OUT/experiments.png"
