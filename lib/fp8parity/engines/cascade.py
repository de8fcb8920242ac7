"""The cascade with llama.cpp as the candidate: the same typed results and judges as the torch candidates, measured
through the engine. Stages D and E need the candidate's RMSNorm and GEMMs fed the reference's own inputs, which an
engine does not offer: they are UNMEASURED here (its attn_norm and q/k/v are replayed by stage B's local check)."""

from __future__ import annotations

import pandas as pd
import torch

from fp8parity import metrics
from fp8parity.engines.llamacpp import LlamaCppEngine
from fp8parity.stages import (
    EmbeddingResult,
    GoldenResult,
    ParityRule,
    ReproducerResult,
    TraceParityResult,
    judge_b_trace,
    measure_b_trace,
)
from fp8parity.stages.verdict import FAIL, UNMEASURED, Verdict
from fp8parity.taps import EMBEDDING, GLOBAL_LAYER
from fp8parity.trace import save_trace
from fp8parity.workbench import PROBE_TOKEN, Workbench

ENGINE_CANNOT = {"D": "llama.cpp's RMSNorm cannot be fed the reference's own inputs; its attn_norm of every layer is "
                      "replayed by stage B's local check instead.",
                 "E": "llama.cpp's GEMMs cannot be fed chosen operands; its q/k/v of every layer are replayed by "
                      "stage B's local check (against llama.cpp's own Q8 twin) instead."}


def measure_a(engine: LlamaCppEngine, wb: Workbench, runs: int = 5) -> ReproducerResult:
    ids = wb.prompt_ids()
    ref = wb.reference.prefill(ids, logits_for="last")[-1]
    cand = [engine.last_logits(ids) for _ in range(runs)]
    return ReproducerResult(ids, [metrics.fnv1a64(c) for c in cand], metrics.fnv1a64(ref), ref, cand[0],
                            metrics.affine_fit(cand[0], ref))


def measure_b(engine: LlamaCppEngine, wb: Workbench, paths) -> list[TraceParityResult]:
    """Each prompt on each path traced through the engine into the run folder, then replayed by llama.cpp's twin."""
    out = []
    for i in range(len(wb.prompts)):
        ids = wb.prompt_ids(i)
        for path in paths:
            engine.run(ids, path)
            folder = wb.run_dir / "traces" / f"prompt{i}-{path}" / "candidate"
            save_trace(folder, engine.taps, {"path": path, "prompt_ids": ids, "prompt": wb.prompts[i],
                                             "side": "candidate", "twin": {"arithmetic": "ggml-q8"}} | wb.provenance())
            out.append(measure_b_trace(wb, folder))
    return out


def judge_b(results: list[TraceParityResult], rule: ParityRule) -> Verdict:
    """The first trace whose replay fails, or a pass over all of them."""
    verdicts = [judge_b_trace(r, rule) for r in results]
    failed = [v for v in verdicts if v.status == FAIL]
    if failed:
        return failed[0]
    v = verdicts[-1]
    v.summary = f"{len(verdicts)} traces (prompts × paths) replayed: " + " ".join(x.summary for x in verdicts)
    return v


def measure_c(engine: LlamaCppEngine, wb: Workbench) -> EmbeddingResult:
    tokens = list(dict.fromkeys([t for t in (PROBE_TOKEN,) if t < wb.gguf.config.vocab] + wb.prompt_ids()))
    engine.run(tokens, "prefill", layers=[0])
    cand = torch.stack([engine.taps[(p, GLOBAL_LAYER, EMBEDDING)] for p in range(len(tokens))])
    ref = wb.reference.embed(tokens).cpu()
    rows = [{"token": t, "text": wb.tok.decode([t]), "first16_bit_exact": bool(torch.equal(ref[k, :16], cand[k, :16])),
             "row_bit_exact": bool(torch.equal(ref[k], cand[k])), "max_abs": metrics.max_abs_diff(cand[k], ref[k]),
             "cosine": metrics.cosine(cand[k], ref[k])} for k, t in enumerate(tokens)]
    return EmbeddingResult(pd.DataFrame(rows), ref[0, :16].tolist(), cand[0, :16].tolist())


def unmeasured(stage: str) -> Verdict:
    return Verdict(stage, UNMEASURED, ENGINE_CANNOT[stage])


def measure_f(engine: LlamaCppEngine, wb: Workbench, runs: int, max_new_tokens: int) -> GoldenResult:
    stops, rows = wb.tok.stop_ids(), []
    for i, prompt in enumerate(wb.prompts):
        ids = wb.prompt_ids(i)
        golden = wb.reference.generate(ids, max_new_tokens, stops, wb.tok)
        for r in range(runs):
            toks, reason = engine.generate(ids, max_new_tokens, stops)
            text = wb.tok.decode(toks)
            rows.append({"prompt": prompt, "run": r + 1, "golden": golden.text, "output": text, "stop_reason": reason,
                         "golden_stop_reason": golden.stop_reason, "tokens": len(toks),
                         "matches_golden": toks == golden.tokens, "im_start_count": text.count("<|im_start|>")})
    toks, reason = engine.generate(wb.prompt_ids(0), max_new_tokens, None)
    return GoldenResult(pd.DataFrame(rows), stops, True,
                        {"text": wb.tok.decode(toks), "stop_reason": reason, "tokens": len(toks)})


