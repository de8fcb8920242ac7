"""The CPU reference against the alternative a user would pick, side by side in one run:

1. load + last-position logits of a 36-token chat prompt: ours (GGUF streamed, weights dequantized once into
   reused buffers) vs transformers' `from_pretrained(gguf_file=...)` + forward, in fresh processes;
2. peak RSS of a streamed reference forward of a 7B-shaped GGUF (hidden 3584, 28 layers, FFN 18944).

    python benchmarks/reference_bench.py --model data/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf [--seven-b path]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

OURS = """
import json, resource, sys, time
t0 = time.perf_counter()
from fp8parity.gguf_file import GGUFModel
from fp8parity.qwen2 import Qwen2Model
from fp8parity.tokenizer import GGUFTokenizer
g = GGUFModel(sys.argv[1]); tok = GGUFTokenizer(g)
ids = tok.chat_ids("What is 2+2?")
logits = Qwen2Model(g, keep_weights=sys.argv[2] == "keep").prefill(ids, logits_for="last")[-1]
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": len(ids), "argmax": int(logits.argmax()),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""
THEIRS = """
import json, os, resource, sys, time
t0 = time.perf_counter()
import torch, transformers
path = sys.argv[1]
d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, tokenize=True)
ids = ids["input_ids"] if hasattr(ids, "keys") else ids
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0, -1]
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": len(ids), "argmax": int(logits.argmax()),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--seven-b", default="")
    args = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, {subprocess.getoutput('nproc')} cores")
    ours = run(OURS, args.model, "stream")
    theirs = run(THEIRS, args.model)
    print(f"{'':34} {'seconds':>8} {'peak RSS GB':>12} {'tokens':>7} {'argmax':>7}")
    print(f"{'ours (stream)':34} {ours['seconds']:8.1f} {ours['peak_rss_gb']:12.2f} {ours['tokens']:7d} {ours['argmax']:7d}")
    print(f"{'transformers from_pretrained(gguf)':34} {theirs['seconds']:8.1f} {theirs['peak_rss_gb']:12.2f} "
          f"{theirs['tokens']:7d} {theirs['argmax']:7d}")
    print(f"speed-up: {theirs['seconds'] / ours['seconds']:.1f}x")
    if args.seven_b:
        big = run(OURS, args.seven_b, "stream")
        print(f"7B-shaped streamed forward ({big['tokens']} tokens): {big['seconds']:.0f} s, "
              f"peak RSS {big['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
