#!/usr/bin/env bash
# The 7B int4 engines' profile in one run: IWP@128 against unpruned, then the copy bandwidth.
#   bash benchmarks/headline-7b-profile.sh IWP_ENGINE NONE_ENGINE [OUT]
set -euo pipefail
OUT=${3:-benchmarks/headline-7b}
/usr/bin/time -v .venv/bin/python -m iwp profile --engine "$1" --baseline "$2" --warmup 0 --repeats 1 \
    --new-tokens 8 --out "$OUT/report" > "$OUT/profile.log" 2> "$OUT/profile.time"
.venv/bin/python benchmarks/bandwidth.py > "$OUT/bandwidth.json"
