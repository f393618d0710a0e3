#!/usr/bin/env bash
# One device call of this session's quality measurements (issue: time to quality), by part:
#   bash bench/gpu_session.sh mini   # bert-mini: HF Trainer LR sweep + long, MicroBERT rows + long; CPU recipe probes beside it
#   bash bench/gpu_session.sh base   # bert-base: the same, in two calls: base-hf, base-mb
# Carry .whl (../shared/device/wheels.sh) and .data (imdb_train.jsonl.gz). Results under $OUT.
set -u
part=${1:?part}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH || exit 1
export MICROBERT_CACHE_DIR=$PWD/.mbcache MICROBERT_DATASET_IMDB=$PWD/.data/imdb_train.jsonl.gz PYTHONUNBUFFERED=1
export MICROBERT_COMMIT=${MICROBERT_COMMIT:-$(git describe --always --dirty 2>/dev/null || echo unknown)}
export TOKENIZERS_PARALLELISM=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/logs"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
start=$SECONDS
probes() {  # the cpu profile's recipe on 2 cores each (cores $1-15), beside the GPU work
  DS_ACCELERATOR=cpu timeout "$2" python3 bench/recipe_sweep.py --variants bench/cpu_probes.json \
    --parallel "$3" --cores-per-run 2 --first-core "$1" --out "$OUT/probes" >"$OUT/logs/probes.log" 2>&1
}
case $part in
  tiny)  # the cpu profile's regime per token (bench/tiny_sweep.py; carry .mbcache-tiny), the GPU golden test beside it
    (timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/train/test_golden_loss.py \
      >"$OUT/logs/golden_gpu.log" 2>&1; echo "golden rc $?" >>"$OUT/logs/golden_gpu.log") &
    timeout "${TINY_TIMEOUT:-480}" python3 bench/tiny_sweep.py --variants "${TINY_VARIANTS:-bench/tiny_variants.json}" \
      --procs "${TINY_PROCS:-10}" --cache-dir "$PWD/.mbcache-tiny" --out "$OUT" 2>&1 | grep -v -i "warn"
    wait; tail -5 "$OUT/logs/golden_gpu.log" ;;
  base-init)  # bert-base per step at the 20 s run's horizon (410 steps): inits that might leave the plateau sooner
    timeout "${TINY_TIMEOUT:-420}" python3 bench/tiny_sweep.py --variants "${TINY_VARIANTS:-bench/base_short_variants.json}" \
      --procs "${TINY_PROCS:-8}" --cache-dir "$MICROBERT_CACHE_DIR" --out "$OUT" 2>&1 | grep -v -i "warn" | tee "$OUT/logs/sweep.log" | tail -40 ;;
  init)  # the scaled residual init and unigram bias (the trainer's defaults since session 6): bert-base, bert-mini
    timeout 200 python3 bench/quality_bench.py --shape bert-base --budgets 20,80 --impls microbert \
      --mb-variants default --eval-points 16 --hf-target "${HF_BASE:-0.0749}" --out "$OUT/base" 2>&1 \
      | grep -v -i "warn" | grep '"heldout_accuracy"\|seconds_to_reach\|FAILED' | cut -c1-600
    timeout 70 python3 bench/quality_bench.py --shape bert-base --budgets 20,80 --impls microbert \
      --mb-variants seed1 --short-only --out "$OUT/base" 2>&1 | grep -v -i "warn" | grep '"heldout_accuracy"\|FAILED' | cut -c1-600
    timeout 110 python3 bench/quality_bench.py --shape bert-mini --budgets 8,30 --impls microbert \
      --mb-variants default --eval-points 12 --hf-target "${HF_MINI:-0.0841}" --out "$OUT/mini" 2>&1 \
      | grep -v -i "warn" | grep '"heldout_accuracy"\|seconds_to_reach\|FAILED' | cut -c1-600
    timeout 50 python3 bench/quality_bench.py --shape bert-mini --budgets 8,30 --impls microbert \
      --mb-variants bertinit --short-only --out "$OUT/mini" 2>&1 | grep -v -i "warn" | grep '"heldout_accuracy"\|FAILED' | cut -c1-600
    echo "total $((SECONDS - start)) s" ;;
  init-long)  # bert-base's long run with the new starting values (a curve), then the h200_1gpu profile per step, GPU golden test beside it
    timeout 270 python3 bench/quality_bench.py --shape bert-base --budgets 20,80 --impls microbert --mb-variants default \
      --long-only --steps-per-second 20.1 --eval-points 16 --hf-target "${HF_BASE:-0.0749}" --out "$OUT/base" 2>&1 \
      | grep -v -i "warn" | grep '"heldout_accuracy"\|seconds_to_reach\|FAILED' | cut -c1-600
    python3 - "$OUT/base/mb-bert-base-default-80s/training_history.json" <<'PY' 2>&1 | tee "$OUT/logs/base-curve.txt"
import json, sys
for e in json.load(open(sys.argv[1]))["eval"]:
    print(f"  {e['training_seconds']:6.1f} s  step {e['step']:5d}  {e['accuracy']:.2%}")
PY
    (timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/train/test_golden_loss.py \
      >"$OUT/logs/golden_gpu.log" 2>&1; echo "golden rc $?" >>"$OUT/logs/golden_gpu.log") &
    (timeout 230 python3 bench/tiny_sweep.py --variants bench/cpu_init_variants.json --procs 6 \
      --cache-dir "$PWD/.mbcache-tiny" --out "$OUT" 2>&1 | grep -v -i "warn" >"$OUT/logs/cpu_init.log") &
    MICROBERT_NO_BAR=1 timeout "${H200_TIMEOUT:-230}" python3 -m train --profile h200_1gpu --dataset imdb \
      --stop-at-step "${H200_STEPS:-1500}" --eval-every 250 --eval-batches 4 --checkpoint-every 1000000 \
      --run-dir "$OUT/h200" --resume never >"$OUT/logs/h200_1gpu.log" 2>&1
    echo "h200 rc $?"; grep "eval step\|micro-batch" "$OUT/logs/h200_1gpu.log" | cut -c1-260
    cp "$OUT/h200/training_history.json" "$OUT/logs/h200_history.json" 2>/dev/null; rm -rf "$OUT/h200"
    wait; tail -3 "$OUT/logs/golden_gpu.log"; grep "tok/s" "$OUT/logs/cpu_init.log"
    echo "total $((SECONDS - start)) s" ;;
  pos)  # the sinusoidal position init at bert-base (short rows, then a long run on a 5 s cadence) and bert-mini
    timeout 330 python3 bench/quality_bench.py --shape bert-base --budgets 20,80 --impls microbert \
      --mb-variants lr2e-4,lr3e-4 --eval-points 16 --hf-target "${HF_BASE:-0.0749}" --out "$OUT/base" 2>&1 | grep -v -i "warn" | tail -8
    timeout 150 python3 bench/quality_bench.py --shape bert-mini --budgets 8,30 --impls microbert \
      --mb-variants default --eval-points 12 --hf-target "${HF_MINI:-0.0841}" --out "$OUT/mini" 2>&1 | grep -v -i "warn" | tail -6
    timeout 100 python3 bench/tiny_sweep.py --variants bench/tiny_seeds.json --procs 10 \
      --cache-dir "$PWD/.mbcache-tiny" --out "$OUT" 2>&1 | grep -v -i "warn" ;;
  base-pos)  # bert-base long runs: BERT's position init again, a smaller sinusoid, a lower LR; one short wsd row
    for v in lr2e-4-posnormal lr2e-4-sin02; do
      timeout 200 python3 bench/quality_bench.py --shape bert-base --budgets 20,80 --impls microbert --mb-variants $v \
        --long-only --steps-per-second 20.6 --eval-points 16 --hf-target "${HF_BASE:-0.0749}" --out "$OUT/base" 2>&1 \
        | grep -v -i "warn" | grep '"heldout_accuracy"\|seconds_to_reach\|FAILED' | tail -3
    done
    timeout 90 python3 bench/quality_bench.py --shape bert-base --budgets 20,80 --impls microbert \
      --mb-variants lr2e-4-posnormal-wsd --long-only --steps-per-second 20.6 --eval-points 4 --budgets 20,20 \
      --out "$OUT/base" 2>&1 | grep -v -i "warn" | grep '"heldout_accuracy"\|FAILED' | tail -2 ;;
  mini)
    probes 6 590 5 &
    taskset -c 0-5 timeout 560 python3 bench/quality_bench.py --shape bert-mini --budgets 8,30 \
      --mb-variants default,lr2e-3,mlm15 --out "$OUT/mini" 2>&1 | grep -v -i "warn" | tail -40
    wait ;;
  base-hf)
    timeout 570 python3 bench/quality_bench.py --shape bert-base --budgets 20,80 --impls hf \
      --out "$OUT/base" 2>&1 | grep -v -i "warn" | tail -30 ;;
  base-mb)
    timeout 330 python3 bench/quality_bench.py --shape bert-base --budgets 20,80 --impls microbert \
      --mb-variants default --hf-target "${HF_TARGET:-0}" --out "$OUT/base" 2>&1 | grep -v -i "warn" | tail -30 ;;
  base-short)  # bert-base at the short budget: rows that take more, smaller steps (session 5)
    timeout 540 python3 bench/quality_bench.py --shape bert-base --budgets 20,80 --impls microbert \
      --mb-variants "${BASE_SHORT:-lr2e-4-b128,lr2e-4-b64-wsd,lr2e-4-b128-wsd,lr3e-4-b128,lr1.4e-4-b64,lr2e-4-mlm30}" \
      --short-only --out "$OUT/base" 2>&1 | grep -v -i "warn" | grep '"heldout_accuracy"\|FAILED' ;;
  base-small)  # the HF Trainer at the short budget in the same call, smaller MicroBERT batches; then the best goes long
    timeout 260 python3 bench/quality_bench.py --shape bert-base --budgets 20,80 --impls hf,microbert --short-only \
      --hf-lrs 1e-4 --mb-variants "${BASE_SMALL:-lr1e-4-b64,lr1e-4-b32}" --out "$OUT/base" 2>&1 \
      | grep -v -i "warn" | grep '"heldout_accuracy"\|FAILED'
    timeout 230 python3 bench/quality_bench.py --shape bert-base --budgets 20,80 --impls microbert \
      --mb-variants "${BASE_LONG:-lr1.4e-4-b64}" --long-only --steps-per-second 59 --eval-points 16 \
      --hf-target "${HF_BASE:-0.0749}" --out "$OUT/base" 2>&1 | grep -v -i "warn" | grep '"heldout_accuracy"\|FAILED' ;;
  steps512)  # the GPU profiles per step at their auto micro-batch (512), new starting values, against HF (compiled loop;
    # 3 processes: two MicroBERT seeds and HF, each through bert-small, bert-medium, bert-base; ~120 GB at bert-base)
    timeout "${STEPS_TIMEOUT:-540}" python3 bench/tiny_sweep.py --variants bench/step_variants_b512.json --procs "${STEPS_PROCS:-3}" \
      --only "${STEPS_ONLY:-}" --out "$OUT" 2>&1 | grep -v -i "warn" | tee "$OUT/logs/steps512.log" | grep "step 1000\|tok/s\|Error" ;;
  serve)  # the serving figures (bench/serve_gpu.sh; carry .deb too): summaries printed, its logs in one tar.
    # TOKENIZERS_PARALLELISM unset, as a user runs the server.
    env -u TOKENIZERS_PARALLELISM OUT="$OUT/serve" SERVE_SKIP="${SERVE_SKIP-profile microbert_one_process hf_pipeline_fastapi}" \
      SERVE_BUDGET_S="${SERVE_BUDGET_S:-300}" timeout "${SERVE_TIMEOUT:-330}" bash bench/serve_gpu.sh | grep -v "^-rw\|^drwx\|^total"
    (cd "$OUT/serve" && tar czf ../serve_logs.tgz ./*.log && rm -f ./*.log) ;;
  steps)  # the GPU profiles' recipes per step (their LR, warm-up, horizon) against BertConfig's defaults, 1,000 steps
    timeout "${STEPS_TIMEOUT:-300}" python3 bench/tiny_sweep.py --variants bench/step_variants.json --procs 8 \
      --out "$OUT" 2>&1 | grep -v -i "warn" ;;
  check)  # after a trainer change: the GPU golden test beside train_bench (smoke); then the serving figures
    (timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/train/test_golden_loss.py \
      >"$OUT/logs/golden_gpu.log" 2>&1; echo "golden rc $?" >>"$OUT/logs/golden_gpu.log") &
    timeout 150 python3 bench/train_bench.py --shapes bert-mini --impls microbert --warmup 5 --steps 20 \
      >"$OUT/logs/train_bench.log" 2>&1; echo "train_bench rc $?" >>"$OUT/logs/train_bench.log"
    wait; tail -3 "$OUT/logs/golden_gpu.log"; grep '^{' "$OUT/logs/train_bench.log" | cut -c1-400; tail -2 "$OUT/logs/train_bench.log"
    OUT=$OUT/serve SERVE_SKIP="${SERVE_SKIP:-hf_pipeline_fastapi microbert_one_process}" timeout "${SERVE_TIMEOUT:-330}" \
      bash bench/serve_gpu.sh 2>&1 | tail -45 ;;
  final)  # bert-base at a lower peak LR, long budget only; then the serving figures (bench/serve_gpu.sh)
    timeout 230 python3 bench/quality_bench.py --shape bert-base --budgets 20,80 --impls microbert \
      --mb-variants lr2e-4-mlm15 --long-only --steps-per-second 20.7 --eval-points 6 \
      --hf-target "${HF_TARGET:-0}" --out "$OUT/base" 2>&1 | grep -v -i "warn" | tail -14
    SERVE_SKIP="microbert_one_process hf_pipeline_fastapi overload" timeout 240 bash bench/serve_gpu.sh | tail -25 ;;
esac
for f in "$OUT"/probes/*.log "$OUT"/mini/*.log "$OUT"/base/*.log "$OUT"/*.log; do [ -f "$f" ] && tail -c 3000 "$f" >"$OUT/logs/$(basename "$f")"; done
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs probes mini base ./*.log
echo "total $((SECONDS - start)) s"
