#!/usr/bin/env bash
# One device call (session 15): the overload runs with the greedy accept (serve/accept.py) and, on the
# same host, with uvloop's one-a-turn accept (the tree in .ab/STOCK), then the target rows against
# .ab/REF. Carry .whl .deb .ab.   bash bench/accept_call.sh STOCK REF
set -uo pipefail
stock=${1:?STOCK} ref=${2:?REF}
export OUT=${OUT:-/tmp/accept-call}
je=/tmp/wrk/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
export OVERLOAD_SUSTAINABLE=${OVERLOAD_SUSTAINABLE:-13923} OVERLOAD_OPEN_PROCESSES=8 OVERLOAD_OPEN_CONNECTIONS=16384
nproc; nvidia-smi --query-gpu=name --format=csv,noheader
show() { grep -v curve | cut -c1-2600; }
timeout 200 bash bench/serve_overload.sh "greedy-16k open:4 60 MICROBERT_ALLOCATOR=$je" 2>&1 | show
rm -rf ".ab/$stock/bench" && cp -r bench ".ab/$stock/bench" && ln -sfn "$PWD/.deb" ".ab/$stock/.deb" && ln -sfn "$PWD/.whl" ".ab/$stock/.whl"
(cd ".ab/$stock" && OUT=$OUT/stock timeout 200 bash bench/serve_overload.sh "stock-16k open:4 60 MICROBERT_ALLOCATOR=$je" 2>&1 | show)
timeout 200 bash bench/serve_overload.sh "greedy-49k open:4@49152 60 MICROBERT_ALLOCATOR=$je" 2>&1 | show
AB_ROUNDS=1 OUT=$OUT/ab timeout 300 bash bench/serve_ab.sh "$ref" 64,256 2>&1 | grep -v '^=='
