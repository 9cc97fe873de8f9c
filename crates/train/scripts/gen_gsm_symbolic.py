#!/usr/bin/env python3
"""One-time generator of crates/train/data/gsm_symbolic.jsonl (committed; not run by CI).

The GSM-Symbolic templates (derived from GSM8K) ship in the PyPI package reasoning-gym==0.1.25
under reasoning_gym/arithmetic/gsm_symbolic/. We download that wheel with pip (no install, no
dependencies), load only its generator modules and `reasoning_gym/utils.py` straight from the
wheel, and call the 85 templates marked good (`tasks_ok`) with seeded RNGs. Each line is
{"split", "template", "question", "answer"} where answer is the worked solution ending "#### N".

    python3 crates/train/scripts/gen_gsm_symbolic.py            # writes crates/train/data/gsm_symbolic.jsonl
"""
import ast
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import types
import zipfile

TRAIN, TEST, SEED = 400, 100, 20260101
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repository root
OUT = os.path.join(ROOT, "crates", "train", "data", "gsm_symbolic.jsonl")


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main():
    tmp = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "reasoning-gym==0.1.25", "-d", tmp], check=True)
    whl = next(f for f in os.listdir(tmp) if f.endswith(".whl"))
    zipfile.ZipFile(os.path.join(tmp, whl)).extractall(tmp)
    pkg = os.path.join(tmp, "reasoning_gym")
    gsm = os.path.join(pkg, "arithmetic", "gsm_symbolic")
    # Stub packages so the generator modules' `from reasoning_gym.utils import ...` resolves
    # without importing the whole package (and its dependencies).
    for name in ["reasoning_gym", "reasoning_gym.arithmetic", "reasoning_gym.arithmetic.gsm_symbolic"]:
        sys.modules[name] = types.ModuleType(name)
    load("reasoning_gym.utils", os.path.join(pkg, "utils.py"))
    gens = {}
    for f in ["generators_00_49.py", "generators_50_99.py"]:
        mod = load("reasoning_gym.arithmetic.gsm_symbolic." + f[:-3], os.path.join(gsm, f))
        for n in dir(mod):
            if n.startswith("generate_") and n[len("generate_"):].isdigit():
                gens[int(n[len("generate_"):])] = getattr(mod, n)
    # The list of templates the package marks as good.
    tree = ast.parse(open(os.path.join(gsm, "gsm_symbolic.py")).read())
    tasks_ok = next(ast.literal_eval(node.value) for node in tree.body
                    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "tasks_ok")
    rng = random.Random(SEED)
    rows, seen = [], set()
    while len(rows) < TRAIN + TEST:
        t = rng.choice(tasks_ok)
        ex = gens[t](random.Random(rng.getrandbits(64)), 1.0)
        cot = ex["metadata"]["answer_cot"].strip()
        final = cot.rsplit("####", 1)[-1].strip() if "####" in cot else None
        if final is None or final.replace(",", "") != str(ex["answer"]).replace(",", "") or ex["question"] in seen:
            continue
        seen.add(ex["question"])
        rows.append({"template": t, "question": ex["question"], "answer": cot})
    for i, r in enumerate(rows):
        r["split"] = "train" if i < TRAIN else "test"
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT + ".tmp", "w") as f:
        for r in rows:
            f.write(json.dumps({"split": r["split"], "template": r["template"], "question": r["question"],
                                "answer": r["answer"]}) + "\n")
    os.replace(OUT + ".tmp", OUT)
    print(f"wrote {len(rows)} examples ({TRAIN} train, {TEST} test) from {len(set(r['template'] for r in rows))} "
          f"templates to {OUT}")


if __name__ == "__main__":
    main()
