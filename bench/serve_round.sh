#!/usr/bin/env bash
# One device call that measures a serving change whole, on one host (figures from different calls
# differ by up to 25% with the same code, so the comparison must be within one):
#   bash bench/serve_ab.sh --prepare REF     # here first
#   bash bench/serve_round.sh REF            # on the GPU machine; carry .whl .deb .ab
# 1. bench/serve_ab.sh REF (REF's server first, then the working tree's; py-spy on both): single and
#    32-input requests at 64 and 256 connections;
# 2. REF's predictor alone (FillMaskPredictor.predict at batch 256, per call and on a list);
# 3. bench/serve_gpu.sh for the working tree, less its HTTP runs (done in 1): the GPU tests of the
#    predictor and batcher, the predictor alone, its stage profile, the 60 s overload run.
# $OUT gets serve_ab.jsonl, py-spy.txt, py-spy-raw.tgz, predictor_ref.jsonl, serve_gpu.log and
# serve_gpu.tgz (serve_gpu.sh's records, logs and profiles). About 520 s on one H200.
set -uo pipefail
ref=${1:?REF}
export OUT=${OUT:-/tmp/serve-round} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
start=$SECONDS
AB_SPY=1 timeout 200 bash bench/serve_ab.sh "$ref" 64,256 single,batch32 2>&1 | grep -v "^== "
echo "== serve_ab done (t=$((SECONDS - start)) s)"
(cd ".ab/$ref" && PYTHONPATH=$PWD:/tmp/site timeout 60 python3 -m bench.serve_wrk --model-dir /tmp/serve-ab-run-bert-base \
  --preset bert-base --impls "" --predictor --batch-size 256 2>&1) | grep '^{' | tee "$OUT/predictor_ref.jsonl" \
  | python3 -c 'import json, sys
for r in map(json.loads, sys.stdin):
    print("   REF predictor", r.get("texts_per_call"), "texts a call:", r["sentences_per_second"], "sentences/s")'
echo "== REF predictor done (t=$((SECONDS - start)) s)"
OUT=$OUT/sg SERVE_SKIP="microbert_auto microbert_one_process hf_pipeline_fastapi" SERVE_BUDGET_S=${ROUND_SERVE_S:-290} \
  timeout 310 bash bench/serve_gpu.sh >/dev/null 2>&1
cp "$OUT/sg/serve_gpu.log" "$OUT/serve_gpu.log" 2>/dev/null
grep -v "^-rw\|^drwx\|^total" "$OUT/serve_gpu.log"
tar czf "$OUT/serve_gpu.tgz" -C "$OUT" sg && rm -rf "$OUT/sg"
echo "== done (t=$((SECONDS - start)) s)"
