#!/usr/bin/env bash
# The serving figures of issue 13 on one GPU, in one device call of at most 8 minutes:
#
#   bash bench/serve_gpu.sh            # on the GPU machine: bert-base, bf16, 10 s per run
#   bash bench/serve_gpu.sh --smoke    # on a CPU first: bert-tiny, 2 s runs, the same steps
#
# Needs .whl/ (../shared/device/wheels.sh .whl orjson uvloop py-spy) and .deb/ (wrk, libluajit-5.1-2)
# carried along on the GPU machine; on a CPU with wrk and the project installed, neither (py-spy is
# optional: without it the server is not sampled). Makes one random-weight artifact with its
# tokenizer (no training), then runs, each with a deadline (SERVE_SKIP="NAME ..." skips some):
#   predictor    FillMaskPredictor.predict alone at batch 256, and pipeline() on a list
#   profile      bench/serve_profile.py at batches 64 and 256: microseconds per sentence by stage,
#                cProfile and torch.profiler tables (CPU and CUDA time), a Chrome trace
#   microbert_auto   microbert-serve --workers auto (one model process, HTTP workers on half the
#                cores): single and 32-input requests at 64 and 256 connections, wrk waiting
#                Retry-After after a 429 where the queue can overflow; py-spy samples the server
#                during each run when it is installed (summaries in the log)
#   microbert_one_process   the same with the model in the HTTP process, 256 connections
#   hf_pipeline_fastapi     FastAPI + pipeline("fill-mask"), single, 64 connections
#   overload     1,024 closed-loop clients against a small queue: statuses, p99 of the 200s, RSS
# Records (bench/records.py), logs, tables and samples go to $OUT.
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
spy=()
if command -v py-spy >/dev/null; then spy=(--py-spy); else echo "no py-spy: the server is not sampled" | tee -a "$log"; fi

if [ $smoke = 1 ]; then
  preset=bert-tiny; d=2; conns=16; extra=(--smoke); threads=2; over=3; repeats=3
else
  preset=bert-base; d=10; conns=64,256; extra=(); threads=4; over=15; repeats=20
fi
run=/tmp/serve-run-$preset
say "artifact ($preset, random weights, WordPiece trained on the embedded corpus)"
timeout 90 python3 -c "
import sys; from pathlib import Path; from bench.serve_bench import make_run
run = Path('$run')
if not (run / 'export' / 'latest').is_file(): make_run(run, '$preset')
print(run)" >>"$log" 2>&1 || { echo "artifact failed"; tail -20 "$log"; exit 1; }

skipped() { case " ${SERVE_SKIP:-} " in *" $1 "*) say "$1 skipped (SERVE_SKIP)"; return 0 ;; esac; return 1; }

summary() {  # the records of a job's log, one line each
  grep -h '^{' "$1" | python3 -c '
import sys, json
for r in map(json.loads, sys.stdin):
    if r["bench"] == "serve-profile":
        print("   profile batch", r["batch_size"], "us/sentence", r["us_per_sentence"], "->", r["sentences_per_second"], "sentences/s")
        continue
    print("  ", r["impl"], r["mode"], r["concurrency"], "sentences/s", r["sentences_per_second"], "p50", r["p50_ms"],
          "p99", r["p99_ms"], "429 share", r.get("share_429", "-"), r.get("statuses", ""),
          r.get("rss_mib_before", ""), r.get("rss_mib_after", ""))' | tee -a "$log"
  grep -hE "Error|error|Traceback|CUDA graph" "$1" | grep -v "^{" | cut -c1-300 | tail -5 | tee -a "$log"
}

job() {  # NAME DEADLINE ARGS...: one bench.serve_wrk call with a deadline
  local name=$1 deadline=$2; shift 2
  skipped "$name" && return
  say "$name"
  timeout "$deadline" python3 -m bench.serve_wrk --model-dir "$run" --preset "$preset" --wrk "$wrk" \
    --threads "$threads" --duration "$d" --connections "$conns" "${extra[@]}" "$@" >"$OUT/$name.log" 2>&1
  echo "rc=$?" | tee -a "$log"
  summary "$OUT/$name.log"
}

job predictor 60 --impls "" --predictor --hf-list --batch-size 256
if ! skipped profile; then
  say "profile"
  timeout 50 python3 -m bench.serve_profile --model-dir "$run" --preset "$preset" --batch-sizes 64,256 \
    --repeats "$repeats" --trace >"$OUT/profile.log" 2>&1
  echo "rc=$?" | tee -a "$log"
  summary "$OUT/profile.log"
fi
# 256 inputs per pass on the GPU (the default 64 suits a CPU); recorded in each record's settings.
job microbert_auto 100 --impls microbert --workers auto --modes single,batch32 "${spy[@]}" \
  --env MICROBERT_MAX_BATCH_SIZE=256
for f in "$OUT"/py-spy-*.txt; do
  [ -s "$f" ] && python3 -m bench.serve_profile --collapsed "$f" >>"$log"
done
job microbert_one_process 60 --impls microbert --workers 1 --modes single,batch32 --connections 256 \
  --env MICROBERT_MAX_BATCH_SIZE=256
job hf_pipeline_fastapi 45 --impls hf_pipeline_fastapi --modes single --connections 64
job overload 45 --impls "" --workers auto --overload "$over" --overload-clients 1024 --overload-queue 256 \
  --env MICROBERT_MAX_BATCH_SIZE=256
say "done"
ls "$OUT" | tee -a "$log"
