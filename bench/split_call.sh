#!/usr/bin/env bash
# One device call (session 16): the overload criterion at a true 4×. The host's cores are split, the
# server on 0-7 (so `--workers auto` takes 4 HTTP workers and the model process) and the open-loop
# client's 8 processes on 8-15, so that the sustainable rate is the server's on its own cores and
# the client has cores of its own to offer 4× of it (session 15: the client on the server's cores
# fell seconds behind at 65,536 connections). Carry .whl .deb (and .ab for BEFORE).
#   bash bench/split_call.sh [BEFORE]   # BEFORE: a tree of .ab/ run at 16,384 connections too,
#                                       # on the same arrivals (the sustainable rate measured first)
set -uo pipefail
before=${1:-}
export OUT=${OUT:-/tmp/split-call}
je=/tmp/wrk/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
export OVERLOAD_SERVER_CPUS=${OVERLOAD_SERVER_CPUS:-0-7} OVERLOAD_CLIENT_CPUS=${OVERLOAD_CLIENT_CPUS:-8-15}
export OVERLOAD_OPEN_PROCESSES=8 OVERLOAD_OPEN_CONNECTIONS=16384
nproc; nvidia-smi --query-gpu=name --format=csv,noheader; sysctl net.core.somaxconn
show() { grep -v curve | cut -c1-2600; }
timeout 250 bash bench/serve_overload.sh "split-16k open:4 60 MICROBERT_ALLOCATOR=$je" 2>&1 | show
sustainable=$(python3 -c '
import json, os
print([r for r in map(json.loads, open(os.environ["OUT"] + "/overload.jsonl")) if r["variant"] == "sustainable"][-1]["sentences_per_second"])')
if [ -n "$before" ]; then
  rm -rf ".ab/$before/bench" && cp -r bench ".ab/$before/bench" && ln -sfn "$PWD/.deb" ".ab/$before/.deb" && ln -sfn "$PWD/.whl" ".ab/$before/.whl"
  (cd ".ab/$before" && OVERLOAD_SUSTAINABLE=$sustainable timeout 200 bash bench/serve_overload.sh \
    "before-16k open:4 60 MICROBERT_ALLOCATOR=$je" 2>&1 | show)
fi
OVERLOAD_SUSTAINABLE=$sustainable timeout 200 bash bench/serve_overload.sh "split-49k open:4@49152 60 MICROBERT_ALLOCATOR=$je" 2>&1 | show
