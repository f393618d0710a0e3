#!/usr/bin/env bash
# The 2-core CPU serving figures (README "Serving", BENCHMARKS.md): bert-tiny shape, wrk on the same cores.
#   bash bench/serve_cpu.sh [REPEATS]
# Compares one process, two workers each with its own model, and two HTTP workers fed by one model
# process; then FastAPI + pipeline. Records go to bench/results/ with the load average around each run:
# on a shared machine, repeat and quote the spread, not the best run.
set -euo pipefail
repeats=${1:-2}
run=/tmp/serve-cpu-run
python -c "
from pathlib import Path; from bench.serve_bench import make_run
run = Path('$run')
if not (run / 'export' / 'latest').is_file(): make_run(run, 'bert-tiny')"
common=(--model-dir "$run" --preset bert-tiny --threads 1 --duration 10)
for _ in $(seq "$repeats"); do
  uptime
  python -m bench.serve_wrk "${common[@]}" --impls microbert --workers 1 --connections 64,256 --modes single,batch32
  python -m bench.serve_wrk "${common[@]}" --impls microbert --workers 2 --connections 64,256 --modes single,batch32
  python -m bench.serve_wrk "${common[@]}" --impls microbert --workers 2 --env MICROBERT_MODEL_PROCESS=on \
    --connections 64 --modes single,batch32
done
python -m bench.serve_wrk "${common[@]}" --impls hf_pipeline_fastapi --connections 64 --modes single
python -m bench.serve_wrk "${common[@]}" --impls "" --predictor --hf-list --batch-size 64
python -m bench.serve_wrk "${common[@]}" --impls "" --workers 2 --overload 60 --overload-clients 1024 --overload-queue 256
