#!/usr/bin/env bash
# The serving figures of issue 13 on one GPU, in one device call of at most 8 minutes:
#
#   bash bench/serve_gpu.sh            # on the GPU machine: bert-base, bf16, 10 s per run
#   bash bench/serve_gpu.sh --smoke    # on a CPU first: bert-tiny, 2 s runs, the same steps
#
# Needs .whl/ (../shared/device/wheels.sh .whl orjson uvloop py-spy [pytest httpx]) and .deb/ (wrk, libluajit-5.1-2)
# carried along on the GPU machine; on a CPU with wrk and the project installed, neither (py-spy is
# optional: without it the server is not sampled). Makes one random-weight artifact with its
# tokenizer (no training), then runs, each with a deadline capped so the whole stays within
# SERVE_BUDGET_S (default 470 s; SERVE_SKIP="NAME ..." skips some, default the two last below):
#   gpu_tests    the predictor's and the batcher's tests, GPU ones included (launches in flight
#                under CUDA graphs, pipelined passes, the padded output layer), when pytest is installed
#   predictor    FillMaskPredictor.predict alone at batch 256: one call per 256 texts, and one call
#                for all 4,096 texts ("... on a list", as pipeline(list, batch_size=...) is measured)
#   profile      bench/serve_profile.py at batches 64 and 256: microseconds per sentence by stage
#                (run split into launch and collect), the overlapped figure, cProfile and
#                torch.profiler tables (CPU and CUDA time), a Chrome trace
#   microbert_auto   microbert-serve --workers auto (one model process, HTTP workers on half the
#                cores): single and 32-input requests at 64 and 256 connections, wrk waiting
#                Retry-After after a 429 where the queue can overflow; py-spy samples the server
#                during each run when it is installed (summaries in the log)
#   overload     1,024 closed-loop clients against a small queue for 60 s: statuses, p99 of the
#                200s, the server's RSS before, after and through the run (rss_mib_curve)
#   microbert_one_process   the model in the HTTP process, 256 connections (skipped by default)
#   hf_pipeline_fastapi     FastAPI + pipeline("fill-mask"), single, 64 connections (skipped by
#                default: the anchor, unchanged since session 3); SERVE_HF_LIST=1 adds pipeline(list)
# A call returns only a limited number of files, so $OUT holds only the logs (serve_gpu.log and one
# per job) and the records (<date>-<device>.json); every py-spy sample, profile table, trace, server
# log and wrk script is in ONE tar, $OUT/profiles.tar.gz.
set -uo pipefail
smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1
# TOKENIZERS_PARALLELISM is left unset (the tokenizers default, parallel), as a user runs the server.
export OUT=${OUT:-/tmp/serve-out} PYTHONUNBUFFERED=1 MICROBERT_CACHE_DIR=/tmp/mbcache
results=$OUT
work=$(mktemp -d /tmp/serve-gpu-work.XXXXXX)  # the jobs' $OUT: tarred into $results at the end
mkdir -p "$results"
log="$results/serve_gpu.log"
start=$SECONDS
budget=${SERVE_BUDGET_S:-470}
say() { echo "== $* (t=$((SECONDS - start))s)" | tee -a "$log"; }
cap() {  # DEADLINE: what is left of the budget (less 15 s for the tar), at most DEADLINE
  local left=$((budget - 15 - (SECONDS - start)))
  [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"
}
finish() {  # the records loose, everything else in one tar
  local f
  for f in "$work"/*.json; do  # the records (<date>-<device>.json), not the Chrome traces
    case $f in *.trace.json | *"*"*) ;; *) mv "$f" "$results"/ ;; esac
  done
  (cd "$work" && tar czf "$results/profiles.tar.gz" .) && rm -rf "$work"
  say "done"
  ls -la "$results" | tee -a "$log"
}
trap finish EXIT

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
  preset=bert-base; d=10; conns=64,256; extra=(); threads=4; over=60; repeats=20
fi
SERVE_SKIP=${SERVE_SKIP-microbert_one_process hf_pipeline_fastapi}
hf_list=()
[ "${SERVE_HF_LIST:-0}" = 1 ] && hf_list=(--hf-list)
run=/tmp/serve-run-$preset
say "artifact ($preset, random weights, WordPiece trained on the embedded corpus)"
timeout "$(cap 90)" python3 -c "
import sys; from pathlib import Path; from bench.serve_bench import make_run
run = Path('$run')
if not (run / 'export' / 'latest').is_file(): make_run(run, '$preset')
print(run)" >>"$log" 2>&1 || { echo "artifact failed" | tee -a "$log"; tail -20 "$log"; exit 1; }

skipped() { case " ${SERVE_SKIP:-} " in *" $1 "*) say "$1 skipped (SERVE_SKIP)"; return 0 ;; esac; return 1; }

summary() {  # the records of a job's log, one line each
  grep -h '^{' "$1" | python3 -c '
import sys, json
for r in map(json.loads, sys.stdin):
    if r["bench"] == "serve-profile":
        print("   profile batch", r["batch_size"], "us/sentence", r["us_per_sentence"], "->", r["sentences_per_second"], "sentences/s;",
              "run split", r.get("run_split_us_per_sentence"), "; overlapped", r.get("overlapped_us_per_sentence"), "us ->",
              r.get("overlapped_sentences_per_second"), "sentences/s")
        continue
    print("  ", r["impl"], r["mode"], r["concurrency"], r.get("texts_per_call", ""), "sentences/s", r["sentences_per_second"], "p50", r["p50_ms"],
          "p99", r["p99_ms"], "429 share", r.get("share_429", "-"), r.get("statuses", ""),
          r.get("rss_mib_before", ""), r.get("rss_mib_after", ""), r.get("rss_mib_curve", ""),
          *(f"{k} {r[k]}" for k in ("inputs_per_pass", "pass_ms", "pass_share", "queue_ms_per_input") if k in r))' | tee -a "$log"
  grep -hE "Error|error|Traceback|CUDA graph" "$1" | grep -v "^{" | cut -c1-300 | tail -5 | tee -a "$log"
}

job() {  # NAME DEADLINE ARGS...: one bench.serve_wrk call with a deadline
  local name=$1 deadline; deadline=$(cap "$2"); shift 2
  skipped "$name" && return
  say "$name (deadline ${deadline}s)"
  OUT=$work timeout "$deadline" python3 -m bench.serve_wrk --model-dir "$run" --preset "$preset" --wrk "$wrk" \
    --threads "$threads" --duration "$d" --connections "$conns" "${extra[@]}" "$@" >"$results/$name.log" 2>&1
  echo "rc=$?" | tee -a "$log"
  summary "$results/$name.log"
}

if skipped gpu_tests; then
  :
elif ! python3 -c "import pytest, httpx" 2>/dev/null; then
  say "gpu_tests skipped: no pytest (or httpx) on this machine (add them to .whl/)"
else
  say "gpu_tests"
  DS_ACCELERATOR=${DS_ACCELERATOR:-$([ $smoke = 1 ] && echo cpu || echo cuda)} timeout "$(cap 60)" python3 -m pytest -q -p no:cacheprovider \
    tests/microbert/test_predict.py tests/microbert/test_predict_padded_decoder.py tests/serve/test_batcher.py \
    >"$results/gpu_tests.log" 2>&1
  echo "rc=$?" | tee -a "$log"
  tail -4 "$results/gpu_tests.log" | tee -a "$log"
fi
job predictor 50 --impls "" --predictor "${hf_list[@]}" --batch-size 256
if ! skipped profile; then
  say "profile"
  OUT=$work timeout "$(cap 60)" python3 -m bench.serve_profile --model-dir "$run" --preset "$preset" \
    --batch-sizes 64,256 --repeats "$repeats" --trace >"$results/profile.log" 2>&1
  echo "rc=$?" | tee -a "$log"
  summary "$results/profile.log"
fi
# 256 inputs per pass on the GPU (the default 64 suits a CPU); recorded in each record's settings.
job microbert_auto 120 --impls microbert --workers auto --modes single,batch32 "${spy[@]}" \
  --env MICROBERT_MAX_BATCH_SIZE=256
for f in "$work"/py-spy-*.txt; do
  [ -s "$f" ] && python3 -m bench.serve_profile --collapsed "$f" | tee -a "$work/py-spy-summary.txt" | head -60 >>"$log"
done
job overload $((over + 60)) --impls "" --workers auto --overload "$over" --overload-clients 1024 \
  --overload-queue 256 --env MICROBERT_MAX_BATCH_SIZE=256
job microbert_one_process 60 --impls microbert --workers 1 --modes single,batch32 --connections 256 \
  --env MICROBERT_MAX_BATCH_SIZE=256
job hf_pipeline_fastapi 45 --impls hf_pipeline_fastapi --modes single --connections 64
