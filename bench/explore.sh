#!/usr/bin/env bash
# One device call of experiments (bench/NOTES.md): each job a shell command with a deadline,
#   bash bench/explore.sh "NAME DEADLINE_S COMMAND..." ...
# Logs go to $OUT/runs.log; bench records (JSON lines) and key trainer lines are echoed.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH || exit 1
export MICROBERT_CACHE_DIR=/tmp/mbcache PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
start=$SECONDS
for job in "$@"; do
  read -r name deadline command <<<"$job"
  echo "== $name (t=$((SECONDS - start))s): $command" | tee -a "$OUT/runs.log"
  timeout "$deadline" bash -c "$command" >"$OUT/job.log" 2>&1
  rc=$?
  cat "$OUT/job.log" >>"$OUT/runs.log"
  echo "rc=$rc"
  grep -h '^{' "$OUT/job.log" | python3 -c 'import sys,json; [print(" ", r["shape"], r["impl"], r["gpus"], r.get("compile_mode", r.get("mode")), r.get("compile_scope", ""), r["tokens_per_second"], r["mfu"], r["peak_memory_gib"]) for r in map(json.loads, sys.stdin)]'
  grep -hE "warning|Error|error:|peak memory|tokens/s|micro-batch|resumed|finished|stopped" "$OUT/job.log" | grep -v "Warning" | cut -c1-300 | tail -8
done
rm -f "$OUT/job.log"
echo "total $((SECONDS - start))s"
