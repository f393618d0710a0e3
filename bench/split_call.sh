#!/usr/bin/env bash
# One device call (session 16): the overload criterion at a true 4×. The host's cores are split, the
# server on 0-7 (so `--workers auto` takes 4 HTTP workers and the model process) and the open-loop
# client's 8 processes on 8-15, so that the sustainable rate is the server's on its own cores and
# the client has cores of its own to offer 4× of it (session 15: the client on the server's cores
# fell seconds behind at 65,536 connections). Carry .whl .deb (and .ab/TREE for SPLIT_BEFORE).
#   bash bench/split_call.sh ["NAME open:M[@N] SECONDS [ENV=value ...]" ...]
# (default: 4× at 16,384 and at 49,152 connections; jemalloc as the allocator in every run). The
# sustainable rate is measured once, first; every run is offered the same arrivals.
# SPLIT_BEFORE=TREE: the first variant again with the tree in .ab/TREE, right after it (with this
# tree's bench/, or its own with SPLIT_BEFORE_BENCH=own).
set -uo pipefail
export OUT=${OUT:-/tmp/split-call}
je=${SPLIT_ALLOCATOR:-/tmp/wrk/usr/lib/x86_64-linux-gnu/libjemalloc.so.2}  # unpacked from .deb
export OVERLOAD_SERVER_CPUS=${OVERLOAD_SERVER_CPUS:-0-7} OVERLOAD_CLIENT_CPUS=${OVERLOAD_CLIENT_CPUS:-8-15}
export OVERLOAD_OPEN_PROCESSES=8 OVERLOAD_OPEN_CONNECTIONS=16384
[ $# -gt 0 ] || set -- "split-16k open:4 60" "split-49k open:4@49152 60"
nproc; grep -m1 "model name" /proc/cpuinfo; nvidia-smi --query-gpu=name --format=csv,noheader
sysctl net.core.somaxconn
show() { grep -v curve | cut -c1-3000; }
first=1
for variant in "$@"; do
  if [ $first = 1 ]; then
    timeout 250 bash bench/serve_overload.sh "$variant MICROBERT_ALLOCATOR=$je" 2>&1 | show
    export OVERLOAD_SUSTAINABLE
    [ -n "${OVERLOAD_SUSTAINABLE:-}" ] || OVERLOAD_SUSTAINABLE=$(python3 -c '
import json, os
print([r for r in map(json.loads, open(os.environ["OUT"] + "/overload.jsonl")) if r["variant"] == "sustainable"][-1]["sentences_per_second"])')
    if [ -n "${SPLIT_BEFORE:-}" ]; then
      tree=.ab/$SPLIT_BEFORE
      # This tree's bench in the other tree, unless SPLIT_BEFORE_BENCH=own (a client that must match
      # its own server: the keep-alive it assumes is the server's setting since session 17).
      [ "${SPLIT_BEFORE_BENCH:-}" = own ] || { rm -rf "$tree/bench" && cp -r bench "$tree/bench"; }
      ln -sfn "$PWD/.deb" "$tree/.deb" && ln -sfn "$PWD/.whl" "$tree/.whl"
      read -r name rest <<<"$variant"
      (cd "$tree" && timeout 200 bash bench/serve_overload.sh "before-$name $rest MICROBERT_ALLOCATOR=$je" 2>&1 | show)
    fi
    first=0
  else
    timeout 200 bash bench/serve_overload.sh "$variant MICROBERT_ALLOCATOR=$je" 2>&1 | show
  fi
done
