#!/usr/bin/env python3
"""Scores a fedlora classification adapter the way a Hugging Face user loads it, and compares it
with `fedlora eval` example by example.

    check_classifier.py BASE_MODEL_DIR ADAPTER_DIR PREDICTIONS.jsonl MAX_LEN

BASE_MODEL_DIR is all-MiniLM-L6-v2 as shipped (assets/minilm/.../model); PREDICTIONS.jsonl comes
from `fedlora eval --predictions` ({"text", "label", "prediction"} per held-out email). The model is
loaded with the standard classes only: AutoModelForSequenceClassification, then
PeftModel.from_pretrained. Prints one JSON object: both accuracies and the agreement.
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

base, adapter, preds_path, max_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = [json.loads(line) for line in open(preds_path)]
tok = AutoTokenizer.from_pretrained(base)
model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
model = PeftModel.from_pretrained(model, adapter)
model.eval()
torch.set_num_threads(2)
hits = agree = 0
with torch.no_grad():
    for i in range(0, len(rows), 32):
        chunk = rows[i : i + 32]
        enc = tok([r["text"] for r in chunk], truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1).tolist()
        for r, p in zip(chunk, pred):
            hits += int(p == r["label"])
            agree += int(p == r["prediction"])
n = len(rows)
fedlora_acc = sum(int(r["prediction"] == r["label"]) for r in rows) / n
print(json.dumps({
    "examples": n,
    "fedlora_accuracy": fedlora_acc,
    "peft_accuracy": hits / n,
    "agreement": agree / n,
}))
