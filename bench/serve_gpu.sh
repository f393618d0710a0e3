#!/usr/bin/env bash
# The serving figures of issue 13 on one GPU, in one device call of at most 8 minutes:
#
#   bash bench/serve_gpu.sh            # on the GPU machine: bert-base, bf16, 10-15 s per run
#   bash bench/serve_gpu.sh --smoke    # on a CPU first: bert-tiny, 2 s runs, the same steps
#
# Needs .whl/ (../shared/device/wheels.sh .whl orjson uvloop) and .deb/ (wrk, libluajit-5.1-2) carried
# along on the GPU machine; on a CPU with wrk and the project installed, neither. Makes one random-weight
# artifact with its tokenizer (no training), then runs: the predictor alone and pipeline() on a list;
# microbert-serve (--workers auto: one model process, HTTP workers on half the cores) with single and
# 32-input requests at 64 and 256 connections; the same with one process (model in the HTTP process);
# FastAPI + pipeline("fill-mask"); an overload run. Records (bench/records.py) and logs go to $OUT.
set -uo pipefail
smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1
export OUT=${OUT:-/tmp/serve-out} PYTHONUNBUFFERED=1 MICROBERT_CACHE_DIR=/tmp/mbcache TOKENIZERS_PARALLELISM=true
mkdir -p "$OUT"
log="$OUT/serve_gpu.log"
start=$SECONDS
say() { echo "== $* (t=$((SECONDS - start))s)" | tee -a "$log"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH || { echo "wheel install failed"; exit 1; }
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .deb ] && ls .deb/*.deb >/dev/null 2>&1; then
  mkdir -p /tmp/wrk && for f in .deb/*.deb; do dpkg -x "$f" /tmp/wrk; done
  export LD_LIBRARY_PATH=/tmp/wrk/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  wrk=/tmp/wrk/usr/bin/wrk
else
  wrk=$(command -v wrk) || { echo "no wrk: carry .deb/ or apt-get install wrk"; exit 1; }
fi
"$wrk" --version 2>&1 | head -1 | tee -a "$log"
python3 -c 'import torch, fastapi, orjson; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tee -a "$log" \
  || { echo "missing packages (see the header)"; exit 1; }
nproc | sed 's/^/cores: /' | tee -a "$log"
uptime | tee -a "$log"

if [ $smoke = 1 ]; then
  preset=bert-tiny; d=2; conns=16; extra=(--smoke); threads=2; over=3
else
  preset=bert-base; d=12; conns=64,256; extra=(); threads=4; over=15
fi
run=/tmp/serve-run-$preset
say "artifact ($preset, random weights, WordPiece trained on the embedded corpus)"
timeout 120 python3 -c "
import sys; from pathlib import Path; from bench.serve_bench import make_run
run = Path('$run')
if not (run / 'export' / 'latest').is_file(): make_run(run, '$preset')
print(run)" >>"$log" 2>&1 || { echo "artifact failed"; tail -20 "$log"; exit 1; }

job() {  # NAME DEADLINE ARGS...: one bench.serve_wrk call with a deadline (SERVE_SKIP="NAME ..." skips)
  local name=$1 deadline=$2; shift 2
  case " ${SERVE_SKIP:-} " in *" $name "*) say "$name skipped (SERVE_SKIP)"; return ;; esac
  say "$name"
  timeout "$deadline" python3 -m bench.serve_wrk --model-dir "$run" --preset "$preset" --wrk "$wrk" \
    --threads "$threads" --duration "$d" --connections "$conns" "${extra[@]}" "$@" >"$OUT/$name.log" 2>&1
  echo "rc=$?" | tee -a "$log"
  grep -h '^{' "$OUT/$name.log" | python3 -c '
import sys, json
for r in map(json.loads, sys.stdin):
    print("  ", r["impl"], r["mode"], r["concurrency"], "sentences/s", r["sentences_per_second"], "p50", r["p50_ms"], "p99", r["p99_ms"],
          r.get("statuses", ""), r.get("rss_mib_before", ""), r.get("rss_mib_after", ""))' | tee -a "$log"
  grep -hE "Error|error|Traceback|CUDA graph" "$OUT/$name.log" | grep -v "^{" | cut -c1-300 | tail -5 | tee -a "$log"
}

job predictor 80 --impls "" --predictor --hf-list --batch-size 256
# 256 inputs per pass on the GPU (the default 64 suits a CPU); recorded in each record's settings.
job microbert_auto 130 --impls microbert --workers auto --modes single,batch32 --env MICROBERT_MAX_BATCH_SIZE=256
job microbert_one_process 70 --impls microbert --workers 1 --modes single,batch32 --connections 256 \
  --env MICROBERT_MAX_BATCH_SIZE=256
job hf_pipeline_fastapi 70 --impls hf_pipeline_fastapi --modes single --connections 64
job overload 60 --impls "" --workers auto --overload "$over" --overload-clients 1024 --overload-queue 256 \
  --env MICROBERT_MAX_BATCH_SIZE=256
say "done"
ls "$OUT" | tee -a "$log"
