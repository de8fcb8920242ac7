"""Command line: what the Makefile calls.  `python -m fp8parity {inspect,model,tiny,seven-b,run-all,faults}`.

Every user-facing failure is a WorkbookError: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from fp8parity.config import LLAMA_DEVICES, RunConfig
from fp8parity.errors import WorkbookError


def _cmd_inspect(a: argparse.Namespace) -> int:
    from fp8parity.gguf_file import GGUFModel

    card = GGUFModel(a.model).card()
    if a.json:
        print(json.dumps(card, indent=2))
        return 0
    c = card["config"]
    print(f"file          {card['file']}")
    print(f"size          {card['size_bytes']:,} bytes   sha256 {card['sha256']}")
    print(f"model         {c['name']}  ({c['architecture']}, GGUF v{card['gguf_version']})")
    print(f"layers        {c['n_layers']}   hidden {c['hidden']}   heads {c['n_heads']} / kv {c['n_kv_heads']}"
          f"   head_dim {c['head_dim']}   ffn {c['ffn']}")
    print(f"vocab         {c['vocab']}   tied embeddings {c['tied_embeddings']}   context {c['context']}")
    print(f"rms_eps       {c['rms_eps']:.3g}   rope_theta {c['rope_theta']:g}   file_type {c['file_type']}")
    types = ", ".join(f"{k} {v}" for k, v in card["tensor_types"].items())
    print(f"tensors       {card['tensors']}: {types}")
    print(f"bos/eos/pad   {c['bos_id']} / {c['eos_id']} / {c['pad_id']}   chat template: {card['has_chat_template']}")
    specials = ", ".join(f"{k}={v}" for k, v in list(card["special_tokens"].items())[:8])
    more = len(card["special_tokens"]) - 8
    print(f"special       {specials}{f' (+{more} more)' if more > 0 else ''}")
    return 0


def _cmd_model(a: argparse.Namespace) -> int:
    from fp8parity.models import DEFAULT_MODEL, fetch_default

    path = fetch_default(Path(a.dest) if a.dest else DEFAULT_MODEL)
    print(f"default model verified at {path}")
    return 0


def _cmd_tiny(a: argparse.Namespace) -> int:
    from fp8parity.models import SynthSpec, write_synthetic

    print(write_synthetic(Path(a.dest), SynthSpec(seed=a.seed)))
    return 0


def _cmd_seven_b(a: argparse.Namespace) -> int:
    from fp8parity.models import TokenizerData, write_7b_shaped

    src = Path(a.tokenizer)
    tok = TokenizerData.load(src) if src.suffix == ".gz" else TokenizerData.from_gguf(src)
    print(write_7b_shaped(Path(a.dest), tok))
    return 0


def _cmd_export_tokenizer(a: argparse.Namespace) -> int:
    from fp8parity.models import TokenizerData

    TokenizerData.from_gguf(Path(a.model)).save(Path(a.dest))
    print(a.dest)
    return 0


def _cmd_run_all(a: argparse.Namespace) -> int:
    from fp8parity.config import DEFAULT_MODEL, RunConfig, validate
    from fp8parity.models import fetch_default
    from fp8parity.runner import run_all

    cfg = RunConfig.from_strings(**{f.name: getattr(a, RunConfig.flag(f)[2:].replace("-", "_")) for f in fields(RunConfig)})
    validate(cfg, need_model=False)  # every other parameter first: a typo costs no download
    if Path(cfg.model).resolve() == DEFAULT_MODEL and not DEFAULT_MODEL.is_file():
        fetch_default(DEFAULT_MODEL)
    return run_all(cfg, runs_dir=a.runs_dir or "runs", notebooks=a.notebooks or "")


def _cmd_faults(a: argparse.Namespace) -> int:
    from fp8parity.detection import SWEEP_CANDIDATES
    from fp8parity.fault_bench import run_fault_bench

    sweep = [c for c in (a.sweep or ",".join(SWEEP_CANDIDATES)).split(",") if c and a.sweep != "none"]
    return run_fault_bench(model=a.model, backend=a.backend, runs_dir=a.runs_dir, only=a.only, sweep_candidates=sweep)


def _cmd_distribution(a: argparse.Namespace) -> int:
    import torch

    from fp8parity import distribution
    from fp8parity.config import RunConfig

    default = distribution.GPU_CANDIDATES if torch.cuda.is_available() else distribution.CPU_CANDIDATES
    candidates = [c for c in (a.candidates or ",".join(default)).split(",") if c]
    tokens = int(a.corpus_tokens or RunConfig.corpus_tokens)
    distribution.compare_backends(a.model, candidates, a.runs_dir, a.corpus or RunConfig.corpus, tokens)
    return 0


def _cmd_judge_trace(a: argparse.Namespace) -> int:
    from fp8parity import stages
    from fp8parity.config import RunConfig
    from fp8parity.workbench import Workbench

    wb = Workbench(RunConfig(model=a.model, backend="reference", max_prompts=1), a.out or "runs/judge-trace")
    result = stages.measure_b_trace(wb, a.trace)
    verdict = stages.judge_b_trace(result, stages.ParityRule())
    print(verdict.fingerprint_text.replace("**", ""))
    print(result.fingerprint.drop(columns="spec").to_string(index=False))
    print(f"stage B {verdict.status.upper()}: {verdict.summary}")
    stages.save_verdict(wb, verdict)
    return 0 if verdict.status == stages.PASS else 1


def _cmd_llama_compare(a: argparse.Namespace) -> int:
    """llama.cpp's CPU and CUDA paths and the reference side by side (fp8parity.engines.compare)."""
    import platform

    from fp8parity.config import DEFAULT_PATHS, DEFAULT_PROMPTS
    from fp8parity.engines.compare import compare, write_report
    from fp8parity.engines.llamacpp import check_device
    from fp8parity.gguf_file import GGUFModel
    from fp8parity.trace import commit, versions

    devices = tuple(d.strip() for d in a.devices.split(",") if d.strip())
    bad = [d for d in devices if d not in LLAMA_DEVICES]
    if not devices or bad:
        raise WorkbookError(f"--devices {a.devices!r} is not a non-empty subset of {','.join(LLAMA_DEVICES)}.")
    out = Path(a.out)
    if out.exists():
        raise WorkbookError(f"{out} already exists; reports never overwrite each other: pick another --out.")
    for d in devices:
        check_device(d)
    g = GGUFModel(a.model)
    paths = tuple(p.strip() for p in a.paths.split(",") if p.strip())
    if not paths or any(p not in DEFAULT_PATHS for p in paths):
        raise WorkbookError(f"--paths {a.paths!r} is not a non-empty subset of {','.join(DEFAULT_PATHS)}.")
    table = compare(a.model, list(DEFAULT_PROMPTS[: a.prompts]), devices, paths)
    import llama_cpp
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    write_report(table, out, {"model": f"{g.path.name} (sha256 {g.sha256[:16]})", "card": card,
                              "llama-cpp-python": llama_cpp.__version__, "torch": torch.__version__,
                              "fp8parity": versions()["fp8parity"] + (f" (git {commit()})" if commit() else ""),
                              "llama.cpp build": llama_cpp.llama_print_system_info().decode().strip(),
                              "engine settings": "F32 KV cache, flash attention off, op offload off; timed with the "
                                                 "eval callback attached, declining every node"})
    print((out / "compare.md").read_text())
    return 0


def _cmd_llama_trace(a: argparse.Namespace) -> int:
    """llama.cpp's taps of one chat prompt as a workbook trace, and its last logits against the reference's."""
    from fp8parity import metrics
    from fp8parity.config import DEFAULT_PROMPTS
    from fp8parity.engines.llamacpp import write_trace
    from fp8parity.gguf_file import GGUFModel
    from fp8parity.qwen2 import Qwen2Model
    from fp8parity.tokenizer import GGUFTokenizer

    g = GGUFModel(a.model)
    prompt = a.prompt or DEFAULT_PROMPTS[0]
    ids = GGUFTokenizer(g).chat_ids(prompt)
    meta, logits = write_trace(a.model, ids, a.path, Path(a.out), prompt, a.threads, a.device, not a.no_repack)
    ref = Qwen2Model(g).prefill(ids, logits_for="last")[-1]
    last = logits[-1]
    print(f"llama.cpp {meta['engine']['llama_cpp_python']} ({a.path}, {len(ids)} tokens): last-position logits vs the "
          f"reference: cosine {metrics.cosine(last, ref):.6f}, argmax {int(last.argmax())} vs {int(ref.argmax())}; "
          f"trace in {a.out} (judge it: make judge-trace CANDIDATE_TRACE={a.out})")
    return 0


def _tool_commands(sub) -> None:
    s = sub.add_parser("inspect", help="print a model card of a GGUF")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_inspect)
    s = sub.add_parser("model", help="fetch and verify the default model")
    s.add_argument("--dest", default=None)
    s.set_defaults(fn=_cmd_model)
    s = sub.add_parser("tiny", help="write the tiny synthetic qwen2 GGUF")
    s.add_argument("dest")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_tiny)
    s = sub.add_parser("seven-b", help="write a 7B-shaped synthetic qwen2 GGUF (4.4 GB)")
    s.add_argument("dest")
    s.add_argument("--tokenizer", required=True, help="a qwen2 GGUF or an exported tokenizer .json.gz")
    s.set_defaults(fn=_cmd_seven_b)
    s = sub.add_parser("export-tokenizer", help="save a GGUF's tokenizer and template as .json.gz")
    s.add_argument("model")
    s.add_argument("dest")
    s.set_defaults(fn=_cmd_export_tokenizer)


def _run_all_command(sub) -> None:
    """One flag per RunConfig field, its help from the field: strings, None meaning the default defined there. The
    Makefile passes only what the user set, and every value is checked (one line, exit 2) before anything is written."""
    from fp8parity.config import RunConfig

    s = sub.add_parser("run-all", help="every notebook headless into runs/<run-id>/, with an index and an archive")
    for f in fields(RunConfig):
        s.add_argument(RunConfig.flag(f), default=None, help=f"{f.metadata['help']} (default: {f.default!r})")
    s.add_argument("--runs-dir", default=None, help="where run folders go (default runs)")
    s.add_argument("--notebooks", default=None, help="comma-separated notebook numbers (default: all)")
    s.set_defaults(fn=_cmd_run_all)


def _bench_commands(sub) -> None:
    s = sub.add_parser("faults", help="the cascade clean and once per catalogued fault, then the detection sweep")
    s.add_argument("--model", required=True)
    s.add_argument("--backend", default="auto")
    s.add_argument("--runs-dir", default="runs")
    s.add_argument("--only", default="", help="comma-separated fault names (default: all)")
    s.add_argument("--sweep", default="", help="detection-limit sweep candidates, backend[:recipe],... "
                   "(default: reference and emulated-fp8 with each recipe; 'none' skips the sweep)")
    s.set_defaults(fn=_cmd_faults)
    s = sub.add_parser("distribution", help="notebook 09 for several candidates, one comparison table and figure")
    s.add_argument("--model", required=True)
    s.add_argument("--candidates", default="", help="backend[:recipe],... (default: every FP8 recipe this machine runs)")
    s.add_argument("--runs-dir", default="runs")
    s.add_argument("--corpus", default="")
    s.add_argument("--corpus-tokens", default="")
    s.set_defaults(fn=_cmd_distribution)
    s = sub.add_parser("llama-trace", help="llama.cpp's taps of one prompt as a trace (needs `make engines`)")
    s.add_argument("--model", required=True)
    s.add_argument("--prompt", default="")
    s.add_argument("--path", default="prefill", choices=("prefill", "decode"))
    s.add_argument("--out", required=True, help="a new trace folder")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--device", default=RunConfig.llama_device, choices=LLAMA_DEVICES,
                   help="cpu, or cuda: every layer on the GPU (a CUDA build)")
    s.add_argument("--no-repack", action="store_true", help="weights not repacked for llama.cpp's batched kernels")
    s.set_defaults(fn=_cmd_llama_trace)
    s = sub.add_parser("llama-compare", help="llama.cpp CPU, llama.cpp CUDA and the reference side by side")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True, help="a new report folder")
    s.add_argument("--devices", default=",".join(LLAMA_DEVICES), help="cpu,cuda (default both)")
    s.add_argument("--prompts", type=int, default=RunConfig.max_prompts, help="how many default prompts")
    s.add_argument("--paths", default=",".join(RunConfig.paths), help="what stage B replays: prefill,decode")
    s.set_defaults(fn=_cmd_llama_compare)
    s = sub.add_parser("judge-trace", help="stage B's local check of a trace folder (ours or another engine's .npy)")
    s.add_argument("--model", required=True)
    s.add_argument("--trace", required=True, help="a folder of tensors.safetensors or p<pos>.L<layer>.<op>.npy files")
    s.add_argument("--out", default="", help="where the verdict goes (default runs/judge-trace)")
    s.set_defaults(fn=_cmd_judge_trace)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fp8parity", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    _tool_commands(sub)
    _run_all_command(sub)
    _bench_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except WorkbookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
