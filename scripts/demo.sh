#!/usr/bin/env bash
# `make demo`: the whole product on the embedded SYNTHETIC cohort (never clinical evidence):
# synthesise -> preprocess one patient -> reproduce the study -> export ONE ONNX graph -> serve it on
# loopback -> call it with the client -> stop the service.
set -euo pipefail
OUT=${1:-demo_out}
N=${DEMO_PATIENTS:-267}
mkdir -p "$OUT"
export PDL1_CACHE_DIR=${PDL1_CACHE_DIR:-$PWD/$OUT/cache}
export BENTOML_HOME=${BENTOML_HOME:-$PWD/$OUT/bentoml}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/6 synthetic multicentre DECT cohort ($N patients)"
[ -f "$OUT/cohort/manifest.csv" ] || pdl1 synth --out "$OUT/cohort" --n-patients "$N" --seed 0

step "2/6 preprocess one patient (network input, montage, VOI geometry)"
first=$(awk -F, 'NR==2 {print $4","$5}' "$OUT/cohort/manifest.csv")
pdl1 preprocess --image "$OUT/cohort/${first%,*}" --mask "$OUT/cohort/${first#*,}" --out "$OUT/preprocess" >/dev/null
echo "wrote $OUT/preprocess/{input.npy,montage.png,preprocess.json}"

step "3/6 reproduce the study (ResNet-50 with RANDOM weights + BN re-estimation: no ImageNet file here)"
pdl1 study run --manifest "$OUT/cohort/manifest.csv" --out "$OUT/run" --weights random

step "4/6 export ONE ONNX graph (fp32 / fp16 / int8) into the BentoML model store"
tag=$(pdl1 export --run "$OUT/run" --out "$OUT/export" --name pdl1 | tail -n 1)
echo "model: $tag"

step "5/6 local inference with the exported graph"
pdl1 predict --model "$tag" --image "$OUT/cohort/${first%,*}" --mask "$OUT/cohort/${first#*,}" \
  --cam "$OUT/predict_cam.nii.gz"

step "6/6 serve on loopback, call it over HTTP and gRPC, stop"
port=${DEMO_HTTP_PORT:-3000}
grpc_port=${DEMO_GRPC_PORT:-8001}
PDL1_MODEL_TAG="$tag" pdl1 serve --host 127.0.0.1 --port "$port" --grpc-port "$grpc_port" >"$OUT/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 1
done
pdl1 client --url "http://127.0.0.1:$port" --image "$OUT/cohort/${first%,*}" --mask "$OUT/cohort/${first#*,}" \
  --cam "$OUT/service_cam.nii.gz"
pdl1 client --grpc --url "127.0.0.1:$grpc_port" --image "$OUT/cohort/${first%,*}" --mask "$OUT/cohort/${first#*,}"

printf '\nReport: %s\n' "$(realpath "$OUT/run/report.html")"
