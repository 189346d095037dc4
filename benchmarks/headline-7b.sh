#!/usr/bin/env bash
# Issue 15's headline run on this machine (2 cores, 24 GB, no GPU): the 7B engine at BUDGET=128, fp16
# activations, int4 weights, built by `make engine` (export + its smoke generation) under /usr/bin/time,
# then profiled on ONNX Runtime with the copy bandwidth measured in the same run.
#   bash benchmarks/headline-7b.sh [OUT] [METHOD]    (METHOD=none for the unpruned engine)
set -euo pipefail
OUT=${1:-benchmarks/headline-7b}
METHOD=${2:-iwp}
mkdir -p "$OUT"
/usr/bin/time -v make engine MODEL=llava-ov-7b RANDOM_WEIGHTS=1 METHOD="$METHOD" BUDGET=128 DTYPE=fp16 QUANT=int4 \
    > "$OUT/engine-$METHOD.log" 2> "$OUT/engine-$METHOD.time"
ENGINE=$(awk '$1 == "engine" {print $2; exit}' "$OUT/engine-$METHOD.log")
ls -l "$ENGINE" > "$OUT/files-$METHOD.txt"
.venv/bin/python benchmarks/bandwidth.py > "$OUT/bandwidth-$METHOD.json"
/usr/bin/time -v .venv/bin/python -m iwp profile --engine "$ENGINE" --warmup 0 --repeats 1 --new-tokens 8 \
    --out "$OUT/report" > "$OUT/profile-$METHOD.log" 2> "$OUT/profile-$METHOD.time"
echo "done: $ENGINE"
