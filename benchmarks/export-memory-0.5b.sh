#!/usr/bin/env bash
# The streaming export's memory at 0.5b (random weights, IWP@128): one `iwp engine` per dtype x quant in
# its own process under /usr/bin/time (export + smoke generation), then a table of the manifest's export
# peak against issue 15's bound (1.3 x the engine's weight bytes + 3 GB).
#   bash benchmarks/export-memory-0.5b.sh [OUT]
set -euo pipefail
OUT=${1:-benchmarks/export-memory-0.5b}
mkdir -p "$OUT"
for build in "fp32 none" "fp16 none" "fp32 int8" "fp32 int4"; do
    set -- $build
    /usr/bin/time -v .venv/bin/python -m iwp engine --model llava-ov-0.5b --random-weights --budget 128 \
        --dtype "$1" --quant "$2" > "$OUT/engine-$1-$2.log" 2> "$OUT/engine-$1-$2.time"
done
.venv/bin/python - "$OUT" <<'PY'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for log in sorted(out.glob("engine-*.log")):
    engine = Path(next(l.split()[1] for l in log.read_text().splitlines() if l.startswith("engine ")))
    m = json.loads((engine / "manifest.json").read_text())
    time_v = log.with_suffix(".time").read_text()
    whole = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_v).group(1)) * 1024
    stored = m["weights"]["stored_bytes"]
    rows.append({"engine": engine.name, "stored_bytes": stored, "export_peak_rss": m["build"]["peak_rss_bytes"]["export"],
                 "make_engine_peak_rss": whole, "export_seconds": m["build"]["seconds"],
                 "bound": 1.3 * stored + 3e9})
(out / "summary.json").write_text(json.dumps(rows, indent=1))
for r in rows:
    print(f"| {r['engine']} | {r['stored_bytes'] / 1e9:.2f} | {r['export_peak_rss'] / 1e9:.2f} | {r['bound'] / 1e9:.2f} "
          f"| {r['make_engine_peak_rss'] / 1e9:.2f} | {r['export_seconds']:.0f} |")
PY
