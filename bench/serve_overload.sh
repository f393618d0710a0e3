#!/usr/bin/env bash
# Overload runs of microbert-serve on one host (issue 13: "under overload it stays honest"), one run
# per VARIANT in one device call, so that their differences are seen on one host:
#   bash bench/serve_overload.sh "NAME CLIENT SECONDS [ENV=value ...]" ...   # GPU: carry .whl .deb
#   OVERLOAD_PRESET=bert-tiny OVERLOAD_THREADS=1 OVERLOAD_WORKERS=2 bash bench/serve_overload.sh ...  # CPU smoke
# CLIENT: wrk (1,024 connections that re-send at once after a 429, with 16 Python probe clients
# beside them, which wait each 429's Retry-After-Ms, for the latencies of the 200s), wrk-backoff
# (the same, waiting each 429's Retry-After) or python (1,024 bench/serve_load.py clients alone);
# CLIENT:N for N connections instead of 1,024; open:M for bench/serve_open_loop.py's arrivals at M
# times the sustainable rate measured first, whatever the server answers (OVERLOAD_OPEN_PROCESSES
# processes, default 4; at most OVERLOAD_OPEN_CONNECTIONS connections, default 8,192; open:M@N: N).
# Each run: a random-weight artifact of the preset's shape (bert-base: bf16 on the GPU),
# --workers auto, 256 inputs a pass, a queue of 256 inputs. Records (with "variant") go to
# $OUT/overload.jsonl; each run's server log (with its CUDA graph captures) to $OUT/NAME-server.log.
set -uo pipefail
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"  # thousands of connections, both ends here
export OUT=${OUT:-/tmp/serve-overload} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
preset=${OVERLOAD_PRESET:-bert-base}; threads=${OVERLOAD_THREADS:-4}; workers=${OVERLOAD_WORKERS:-auto}
# OVERLOAD_SERVER_CPUS=0-9 [OVERLOAD_CLIENT_CPUS=10-15]: the server on those CPUs, wrk and the Python
# clients on the others, so that the client's CPU is not taken from the server (and --workers auto
# counts the server's CPUs only). The sustainable rate is measured with the same split.
cpu_flags=()
[ -n "${OVERLOAD_SERVER_CPUS:-}" ] && cpu_flags=(--server-cpus "$OVERLOAD_SERVER_CPUS" --client-cpus "${OVERLOAD_CLIENT_CPUS:-}")
. bench/device_env.sh  # $wrk; on the GPU machine, the carried wheels and wrk
export PYTHONPATH=$PWD:/tmp/site
run=/tmp/serve-overload-run-$preset
python3 -c "
from pathlib import Path; from bench.serve_bench import make_run
make_run(Path('$run'), '$preset')" >/dev/null 2>&1 || { echo "artifact failed"; exit 1; }
# OVERLOAD_SUSTAINABLE=R skips this and takes R requests/s as the sustainable rate: runs of two
# trees compared one after the other are then offered the same arrivals.
if [ -n "${OVERLOAD_SUSTAINABLE:-}" ]; then
  sustainable=$OVERLOAD_SUSTAINABLE
  echo "== sustainable: $sustainable requests/s, as given (OVERLOAD_SUSTAINABLE)"
else
  # The sustainable rate on this host first: single-sentence requests at 256 connections, 10 s,
  # with the same settings, so that each variant's offered rate can be read as a multiple of it. A
  # 64-connection run comes first, as in bench/serve_ab.sh: a cold server's first seconds (CUDA graph
  # captures) halved the 256-connection figure on an H100 (10,183 against 20,458 a minute earlier).
  echo "== sustainable: single requests, 64 connections to warm up, then 256 ($(uptime))"
  mkdir -p "$OUT/work"
  OUT=$OUT/work timeout 150 python3 -m bench.serve_wrk --model-dir "$run" --preset "$preset" --wrk "$wrk" \
    --threads "$threads" --duration 10 --connections 64,256 --modes single --impls microbert --workers "$workers" \
    --env MICROBERT_MAX_BATCH_SIZE=256 "${cpu_flags[@]}" 2>&1 | grep '^{' | python3 -c '
import json, os, sys
for r in map(json.loads, sys.stdin):
    r["variant"] = "sustainable" if r["concurrency"] == 256 else "warm-up"
    print(json.dumps(r), file=open(os.environ["OUT"] + "/overload.jsonl", "a"))
    print(" ", r["variant"], "sentences/s", r["sentences_per_second"], "p50", r["p50_ms"], "p99", r["p99_ms"], "429s", r["non_2xx"])'
  rm -rf "$OUT/work"
  sustainable=$(python3 -c '
import json, os
records = [json.loads(line) for line in open(os.environ["OUT"] + "/overload.jsonl")]
print([r for r in records if r["variant"] == "sustainable"][-1]["sentences_per_second"])' 2>/dev/null || echo 0)
fi
for variant in "$@"; do
  read -r name client seconds envs <<<"$variant"
  clients=1024 open_flags=()
  case $client in
    open:*)  # open:M[@N]: arrivals at M × the sustainable rate measured above, whatever the server
      # answers, on at most N connections (default OVERLOAD_OPEN_CONNECTIONS)
      spec=${client#open:}; multiple=${spec%%@*}; clients=${OVERLOAD_OPEN_CONNECTIONS:-8192}
      [ "$spec" != "$multiple" ] && clients=${spec#*@}
      rate=$(python3 -c "print(round($multiple * $sustainable))")
      client=open
      open_flags=(--overload-rate "$rate" --overload-processes "${OVERLOAD_OPEN_PROCESSES:-4}") ;;
    *:*) clients=${client#*:} client=${client%%:*} ;;
  esac
  env_flags=(--env MICROBERT_MAX_BATCH_SIZE=256)
  for item in $envs; do env_flags+=(--env "$item"); done
  echo "== $name: $client × $clients, ${seconds}s, ${envs:-default env} ($(uptime))"
  mkdir -p "$OUT/work"
  OUT=$OUT/work timeout $((seconds + 150)) python3 -m bench.serve_wrk --model-dir "$run" --preset "$preset" \
    --wrk "$wrk" --threads "$threads" --impls "" --workers "$workers" --overload "$seconds" \
    --overload-clients "$clients" --overload-queue 256 --overload-client "$client" "${open_flags[@]}" \
    "${env_flags[@]}" "${cpu_flags[@]}" 2>&1 \
    | grep '^{' | VARIANT=$name python3 -c '
import json, os, sys
for r in map(json.loads, sys.stdin):
    r["variant"] = os.environ["VARIANT"]
    print(json.dumps(r), file=open(os.environ["OUT"] + "/overload.jsonl", "a"))
    print("  ok/s", r["sentences_per_second"], "offered/s", r["offered_per_second"], r["statuses"], r.get("open_loop", ""),
          "p50", r["p50_ms"], "p99", r["p99_ms"], "max", r["max_ms"], "wrk", r.get("wrk"))
    print("  in server (bucket bounds)", r.get("app_ok_ms_at_most"), "loop lag", r.get("event_loop_lag_ms_at_most"), "kernel", r.get("tcp_counters"))
    print("  rss before", r["rss_by_role_before"], "after", r["rss_by_role_after"])
    print("  curve", [(t, {k: v for k, v in roles.items() if not k.endswith("threads")}) for t, roles in r["rss_by_role_curve"]])'
  if [ -f "$OUT/work/overload-server.log" ]; then
    mv "$OUT/work/overload-server.log" "$OUT/$name-server.log"
    echo "  CUDA graph captures: $(grep -c 'captured a CUDA graph' "$OUT/$name-server.log")"
    grep 'captured a CUDA graph' "$OUT/$name-server.log" | sed 's/.*captured/  captured/' | tail -4
    echo "  socket backlogs logged: $(grep -c 'not yet read' "$OUT/$name-server.log")"
    grep 'not yet read' "$OUT/$name-server.log" | tail -3 | cut -c1-200
    grep -iE 'error|Traceback' "$OUT/$name-server.log" | cut -c1-200 | sort | uniq -c | sort -rn | head -5
  fi
  rm -rf "$OUT/work"
done
