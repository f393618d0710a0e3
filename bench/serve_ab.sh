#!/usr/bin/env bash
# The serving figures of the working tree beside those of an earlier commit, in ONE device call, so
# the two are compared on the same machine (figures from different calls differ by up to 25% with the
# same code: the lent hosts are not the same).
#   bash bench/serve_ab.sh --prepare REF   # here: REF's microbert/ and serve/ into .ab/REF
#   bash bench/serve_ab.sh REF[,REF2...] [CONNECTIONS] [MODES]   # on the GPU machine; carry .whl .deb .ab
# (a REF is a folder of .ab/: a commit prepared as above, or a candidate change copied there by hand).
# Each round measures every REF, then the working tree; AB_ROUNDS=2 repeats the round, so drift
# of the host over the call shows up as a difference between rounds, not between trees.
# Both trees are measured by the working tree's bench/ (copied into .ab/REF at run time), so the
# load and the figures are the same code; only the server differs.
# Each tree serves the same random-weight bert-base artifact with --workers auto, wrk on the same
# host; records (with "tree") in $OUT/serve_ab.jsonl, each with what the model did meanwhile (passes
# per second, inputs per pass, pass time and its share of the run, queue wait: from /metrics).
# AB_WORKERS="4 12 8:off": then the working tree again, single requests only, at those --workers
# counts (N:off: each worker with its own model, MICROBERT_MODEL_PROCESS=off).
# AB_ENV="NAME=value ...": more environment for every server (e.g. TOKENIZERS_PARALLELISM=false).
# AB_SPY=1: py-spy samples both trees' first servers (summary per thread in $OUT/py-spy.txt).
set -uo pipefail
if [ "${1:-}" = "--prepare" ]; then
  ref=${2:?REF}; rm -rf ".ab/$ref"; mkdir -p ".ab/$ref"
  git archive "$ref" microbert serve | tar -x -C ".ab/$ref" && echo ".ab/$ref ready (carry .ab)"
  exit
fi
refs=${1:?REF}; conns=${2:-256}; modes=${3:-single,batch32}
IFS=, read -ra ref_list <<<"$refs"
preset=${AB_PRESET:-bert-base}; threads=${AB_THREADS:-4}  # AB_PRESET=bert-tiny AB_THREADS=1: a CPU smoke run
export OUT=${OUT:-/tmp/serve-ab} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
. bench/device_env.sh  # $wrk; on the GPU machine, the carried wheels and wrk
run=/tmp/serve-ab-run-$preset
PYTHONPATH=$PWD:/tmp/site python3 -c "
from pathlib import Path; from bench.serve_bench import make_run
make_run(Path('$run'), '$preset')" >/dev/null 2>&1 || { echo "artifact failed"; exit 1; }
for ref in "${ref_list[@]}"; do
  [ -d ".ab/$ref/serve" ] || { echo "no .ab/$ref: run bash bench/serve_ab.sh --prepare $ref first, and carry .ab"; exit 1; }
  rm -rf ".ab/$ref/bench" && cp -r bench ".ab/$ref/bench"
done
measure() {  # TREE NAME WORKERS MODES [serve_wrk flags]
  local tree=$1 name=$2 workers=$3 modes=$4; shift 4
  echo "== $name --workers $workers $(uptime)"
  mkdir -p "$OUT/work"
  (cd "$tree" && PYTHONPATH=$tree:/tmp/site OUT=$OUT/work timeout 150 python3 -m bench.serve_wrk --model-dir "$run" \
    --preset "$preset" --wrk "$wrk" --threads "$threads" --duration 8 --connections "$conns" --modes "$modes" \
    --impls microbert --workers "$workers" --env MICROBERT_MAX_BATCH_SIZE=256 "${ab_env[@]}" "$@" 2>&1) | grep '^{' | TREE=$name ROUND=${round:-1} python3 -c '
import json, os, sys
for r in map(json.loads, sys.stdin):
    r["tree"], r["round"] = os.environ["TREE"], int(os.environ["ROUND"])
    print(json.dumps(r), file=open(os.environ["OUT"] + "/serve_ab.jsonl", "a"))
    print("  ", r["tree"], "round", r["round"], r["impl"], r["mode"], r["concurrency"], "sentences/s", r["sentences_per_second"], "p50", r["p50_ms"], "p99", r["p99_ms"],
          "429s", r.get("statuses", {}).get("429", 0),
          *(f"{k} {r[k]}" for k in ("inputs_per_pass", "pass_ms", "pass_share", "queue_ms_per_input") if k in r), flush=True)'
  for f in "$OUT"/work/py-spy-*.txt; do
    [ -s "$f" ] || continue
    PYTHONPATH=$PWD:/tmp/site python3 -m bench.serve_profile --collapsed "$f" --sampled-s 7 >>"$OUT/py-spy.txt" 2>&1
    mkdir -p "$OUT/spy" && mv "$f" "$OUT/spy/${name// /_}-r${round:-1}-$(basename "$f")"
  done
  rm -rf "$OUT/work"
}
spy=() ab_env=()
[ "${AB_SPY:-0}" = 1 ] && spy=(--py-spy)
for item in ${AB_ENV:-}; do ab_env+=(--env "$item"); done
for round in $(seq "${AB_ROUNDS:-1}"); do
  for ref in "${ref_list[@]}"; do
    measure "$PWD/.ab/$ref" "$ref" auto "$modes" "${spy[@]}"
  done
  measure "$PWD" "working tree" auto "$modes" "${spy[@]}"
done
for workers in ${AB_WORKERS:-}; do
  case $workers in
    *:off) measure "$PWD" "working tree" "${workers%:off}" single --env MICROBERT_MODEL_PROCESS=off ;;
    *) measure "$PWD" "working tree" "$workers" single ;;
  esac
done
[ -d "$OUT/spy" ] && tar czf "$OUT/py-spy-raw.tgz" -C "$OUT" spy && rm -rf "$OUT/spy"
