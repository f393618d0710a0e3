#!/usr/bin/env bash
# One device call (session 16): the overload criterion at a true 4×. The host's cores are split, the
# server on 0-7 (so `--workers auto` takes 4 HTTP workers and the model process) and the open-loop
# client's 8 processes on 8-15, so that the sustainable rate is the server's on its own cores and
# the client has cores of its own to offer 4× of it (session 15: the client on the server's cores
# fell seconds behind at 65,536 connections). Carry .whl .deb.   bash bench/split_call.sh
set -uo pipefail
export OUT=${OUT:-/tmp/split-call}
je=/tmp/wrk/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
export OVERLOAD_SERVER_CPUS=${OVERLOAD_SERVER_CPUS:-0-7} OVERLOAD_CLIENT_CPUS=${OVERLOAD_CLIENT_CPUS:-8-15}
export OVERLOAD_OPEN_PROCESSES=8 OVERLOAD_OPEN_CONNECTIONS=16384
nproc; nvidia-smi --query-gpu=name --format=csv,noheader; sysctl net.core.somaxconn
timeout 560 bash bench/serve_overload.sh "split-16k open:4 60 MICROBERT_ALLOCATOR=$je" \
  "split-49k open:4@49152 60 MICROBERT_ALLOCATOR=$je" 2>&1 | grep -v curve | cut -c1-2600
