#!/usr/bin/env bash
# Secure-aggregation round benchmark (issue: protocol core): N = 1024 clients, L = 1,000,000
# parameters, 10% dropout, every party in one process with real crypto and real encodings.
# Reports the server's time as a ratio to the PRG+sum bound measured in the same process, and the
# per-client upload as a ratio to the quantized payload. Not part of CI (minutes, ~5 GB of memory).
#
#   benches/secagg-round/run.sh [CLIENTS] [PARAMS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
CLIENTS="${1:-1024}"
PARAMS="${2:-1000000}"
cargo build --release -p fedlora-cli
out="target/secagg-round"
mkdir -p "$out"
for stage in unmask upload; do
  echo "== $CLIENTS clients x $PARAMS params, 10% dropout at stage '$stage'" >&2
  target/release/fedlora simulate --clients "$CLIENTS" --params "$PARAMS" --dropout 0.1 \
    --drop-stage "$stage" --json | tail -n 1 | tee "$out/$stage.json"
done
python3 - "$out" <<'PY'
import json, sys
rows = []
for stage in ("unmask", "upload"):
    d = json.load(open(f"{sys.argv[1]}/{stage}.json"))
    rows.append(d)
    print(f"drop at {stage:7}: survivors {d['survivors']}, masks removed {d['masks_removed']}, "
          f"server {d['server_seconds']:.2f} s = {d['server_to_bound']:.2f}x bound ({d['bound_seconds']:.2f} s), "
          f"upload {d['upload_to_quantized']:.4f}x quantized, max error {d['max_abs_error']:.2e} (bound {d['error_bound']:.2e})")
print(json.dumps({"runs": rows}))
PY
