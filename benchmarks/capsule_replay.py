"""Replay a real-weight capsule (fp8parity.capsule) through the GPU backends: the layer-by-layer GEMM table.

On the CPU machine:  python benchmarks/capsule_replay.py build --model data/models/...gguf --layers 2,23 --out capsule.safetensors
On the GPU host:     python benchmarks/capsule_replay.py replay capsule.safetensors --out capsule_replay.csv
"""

from __future__ import annotations

import argparse

from fp8parity.backends import make_backend
from fp8parity.capsule import build_capsule, replay


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--model", required=True)
    b.add_argument("--layers", default="2,23")
    b.add_argument("--prompt", default="What is 2+2?")
    b.add_argument("--out", required=True)
    r = sub.add_parser("replay")
    r.add_argument("capsule")
    r.add_argument("--backends", default="reference,emulated-fp8:current,torch-fp8:current,torch-fp8:rowwise,te:current,"
                                         "te:block,te:delayed,bf16")
    r.add_argument("--out", default="")
    args = ap.parse_args()
    if args.cmd == "build":
        from fp8parity.gguf_file import GGUFModel
        from fp8parity.tokenizer import GGUFTokenizer

        g = GGUFModel(args.model)
        path = build_capsule(g, GGUFTokenizer(g).chat_ids(args.prompt), [int(x) for x in args.layers.split(",")], args.out)
        print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
        return
    backends = {}
    for spec in args.backends.split(","):
        name, _, recipe = spec.partition(":")
        backends[spec] = make_backend(name, recipe or "current")
    df = replay(args.capsule, backends)
    pivot = df.pivot_table(index=["layer", "gemm", "quant"], columns="backend", values="cosine_vs_fp64", sort=False)
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.float_format", "{:.6f}".format):
        print(pivot)
    if args.out:
        df.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
